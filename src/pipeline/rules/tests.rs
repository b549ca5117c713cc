//! The rules as a table of cases in memory, one case per rule: no database,
//! milliseconds. The SQL that gathers their input is tested against the
//! database beside it (`intakes.rs`, `jobs/queue/competitors.rs`).

use std::collections::HashMap;
use std::time::Duration;

use super::*;

/// Minutes from the recording the case places.
type Minutes = f64;

/// An intake of the number's patients, as the intake query returns it.
struct I {
    /// Its name in the case; `@name` in an expected reason is its id.
    name: &'static str,
    patient: u8,
    at: Minutes,
    /// The recording id it holds already.
    holds: Option<&'static str>,
    /// The object it points at (set alone: the host cleared only the id).
    object: Option<&'static str>,
}

/// Another recording of the number, as the competitor query returns it.
struct O {
    recording: &'static str,
    at: Minutes,
    /// The intake its `client_state` names.
    names: Option<&'static str>,
    /// The intake its job matched (and, while that is free, released).
    matched: Option<&'static str>,
    /// Listed by Telnyx only: no job of ours knows it yet.
    listed: bool,
}

enum Expect {
    Intake(&'static str),
    Nothing(&'static [&'static str]),
    Undecided(&'static [&'static str]),
    Ambiguous(&'static [&'static str]),
}

struct Case {
    name: &'static str,
    /// The recording placed, and when it was made.
    ours: (&'static str, Minutes),
    intakes: &'static [I],
    others: &'static [O],
    expect: Expect,
}

const fn free(name: &'static str, patient: u8, at: Minutes) -> I {
    I {
        name,
        patient,
        at,
        holds: None,
        object: None,
    }
}

const fn holding(name: &'static str, at: Minutes, recording: &'static str) -> I {
    I {
        holds: Some(recording),
        ..free(name, 1, at)
    }
}

const fn other(recording: &'static str, at: Minutes) -> O {
    O {
        recording,
        at,
        names: None,
        matched: None,
        listed: false,
    }
}

/// A recording Telnyx lists whose webhook has not come (issue #21).
const fn at_telnyx(recording: &'static str, at: Minutes) -> O {
    O {
        listed: true,
        ..other(recording, at)
    }
}

/// The match window of every case.
const WINDOW: Duration = Duration::from_secs(600);

const CASES: &[Case] = &[
    Case {
        name: "rule 1: an intake holding this recording is this recording's",
        ours: ("rec-A", 0.0),
        intakes: &[free("older", 1, -5.0), holding("newer", -1.0, "rec-A")],
        others: &[],
        expect: Expect::Intake("newer"),
    },
    Case {
        name: "rule 2: the one free intake within the window is taken, one beyond it is not",
        ours: ("rec-1", 0.0),
        intakes: &[free("outside", 1, -30.0), free("near", 1, -2.0)],
        others: &[],
        expect: Expect::Intake("near"),
    },
    Case {
        name: "rule 2: no intake of the number in the window is nothing",
        ours: ("rec-1", 0.0),
        intakes: &[],
        others: &[],
        expect: Expect::Nothing(&["no intake of a patient with this number in the window"]),
    },
    Case {
        name: "rule 2: an intake holding another object is not free (issue #19)",
        ours: ("rec-new", 0.0),
        intakes: &[I {
            object: Some("intakes/held/rec-old.wav"),
            ..free("held", 1, -1.0)
        }],
        others: &[],
        expect: Expect::Nothing(&[
            "no free intake in the window",
            "@held",
            "holds object intakes/held/rec-old.wav",
        ]),
    },
    Case {
        name: "rule 2: an intake named by another call's client_state is not free",
        ours: ("rec-2", 0.0),
        intakes: &[free("named", 1, -3.0)],
        others: &[O {
            names: Some("named"),
            ..other("rec-1", -3.0)
        }],
        expect: Expect::Nothing(&["no intake of a patient with this number in the window"]),
    },
    Case {
        name: "rule 2: beside an intake another call's client_state names, a free one is taken",
        ours: ("rec-2", 0.0),
        intakes: &[free("named", 1, -3.0), free("free", 1, -0.5)],
        others: &[O {
            names: Some("named"),
            ..other("rec-1", -3.0)
        }],
        expect: Expect::Intake("free"),
    },
    Case {
        name: "rule 2: a recording that holds its intake does not compete",
        ours: ("rec-2", 0.0),
        intakes: &[holding("first", -6.5, "rec-1"), free("second", 1, -0.5)],
        others: &[other("rec-1", -6.0)],
        expect: Expect::Intake("second"),
    },
    Case {
        name: "rule 2: a job whose intake was released (free again) competes again",
        ours: ("rec-2", 0.0),
        intakes: &[free("released", 1, -6.5)],
        others: &[O {
            matched: Some("released"),
            ..other("rec-1", -6.0)
        }],
        expect: Expect::Undecided(&["rec-1", "started between", "@released"]),
    },
    Case {
        name: "rule 2: a chain of overlapping windows beyond the span is not paired",
        ours: ("rec-2", 0.0),
        intakes: &[free("near", 1, -8.0), free("far", 1, -24.0)],
        others: &[other("rec-1", -16.0)],
        expect: Expect::Undecided(&["chain too long"]),
    },
    Case {
        name: "rule 3: two patients sharing the number are not guessed between",
        ours: ("rec-1", 0.0),
        intakes: &[free("parent", 1, -2.0), free("child", 2, -3.0)],
        others: &[],
        expect: Expect::Ambiguous(&["2 patients", "@parent", "@child"]),
    },
    Case {
        name: "rule 4: of two free intakes, the one created nearest before the recording is taken",
        ours: ("rec-1", 0.0),
        intakes: &[free("far", 1, -9.0), free("near", 1, -2.0)],
        others: &[],
        expect: Expect::Intake("near"),
    },
    Case {
        name: "rule 4: an intake created after the recording started is another call's",
        ours: ("rec-1", 0.0),
        intakes: &[free("before", 1, -3.0), free("after", 1, 2.0)],
        others: &[],
        expect: Expect::Intake("before"),
    },
    Case {
        name: "rule 4: even when no intake was created before the recording",
        ours: ("rec-1", 0.0),
        intakes: &[free("after", 1, 3.0)],
        others: &[],
        expect: Expect::Nothing(&["created after the recording started", "@after"]),
    },
    Case {
        name: "rule 4: an intake created within a minute after the start is the call's (clocks)",
        ours: ("rec-1", 0.0),
        intakes: &[free("skewed", 1, 0.5)],
        others: &[],
        expect: Expect::Intake("skewed"),
    },
    Case {
        name: "rule 4: two free intakes created within a minute of each other are not guessed between",
        ours: ("rec-1", 0.0),
        intakes: &[free("first", 1, -2.5), free("second", 1, -2.0)],
        others: &[],
        expect: Expect::Undecided(&["2 free intakes", "within 1m", "@first", "@second"]),
    },
    Case {
        name: "rule 4: a later call does not take an earlier call's intake (issue #10)",
        ours: ("rec-2", 0.0),
        intakes: &[free("call1", 1, -6.5)],
        others: &[other("rec-1", -6.0)],
        expect: Expect::Undecided(&["rec-1", "started between", "@call1"]),
    },
    Case {
        name: "rule 4: nor when the earlier call's recording is only listed by Telnyx (issue #21)",
        ours: ("rec-2", 0.0),
        intakes: &[free("call1", 1, -6.5)],
        others: &[at_telnyx("rec-1", -6.0)],
        expect: Expect::Undecided(&["rec-1 (listed by Telnyx, no job yet", "@call1"]),
    },
    Case {
        name: "rule 4: a listed recording that is already a job counts once, as the job",
        ours: ("rec-2", 0.0),
        intakes: &[holding("call1", -6.5, "rec-1"), free("call2", 1, -0.5)],
        others: &[other("rec-1", -6.0), at_telnyx("rec-1", -6.0)],
        expect: Expect::Intake("call2"),
    },
    Case {
        name: "rule 4: a recording started at the same time as ours is not guessed between",
        ours: ("rec-2", 0.0),
        intakes: &[free("call", 1, -1.0)],
        others: &[at_telnyx("rec-1", 0.3)],
        expect: Expect::Undecided(&["rec-1", "@call"]),
    },
    Case {
        name: "rule 4: the earlier call takes its intake though the later one competes (issue #21)",
        ours: ("rec-1", -6.0),
        intakes: &[free("call1", 1, -6.5)],
        others: &[at_telnyx("rec-2", 0.0)],
        expect: Expect::Intake("call1"),
    },
    Case {
        name: "rule 4: with both intakes saved, the earlier call takes the earlier intake",
        ours: ("rec-1", -6.0),
        intakes: &[free("call1", 1, -6.5), free("call2", 1, -0.5)],
        others: &[other("rec-2", 0.0)],
        expect: Expect::Intake("call1"),
    },
    Case {
        name: "rule 4: with both intakes saved, the later call takes the later intake",
        ours: ("rec-2", 0.0),
        intakes: &[free("call1", 1, -6.5), free("call2", 1, -0.5)],
        others: &[other("rec-1", -6.0)],
        expect: Expect::Intake("call2"),
    },
    Case {
        name: "rule 4: each call takes the intake created just before it, a call between has none",
        ours: ("rec-3", 0.0),
        intakes: &[free("first", 1, -4.5), free("last", 1, -0.5)],
        others: &[other("rec-1", -4.0), other("rec-2", -2.0)],
        expect: Expect::Intake("last"),
    },
    Case {
        name: "rule 4: the call between has no intake yet",
        ours: ("rec-2", -2.0),
        intakes: &[free("first", 1, -4.5), free("last", 1, -0.5)],
        others: &[other("rec-1", -4.0), other("rec-3", 0.0)],
        expect: Expect::Undecided(&["@first", "rec-1", "started between"]),
    },
    Case {
        name: "rule 5: a nearer intake holding another recording blocks the match",
        ours: ("rec-B", 0.0),
        intakes: &[free("older", 1, -5.0), holding("newer", -1.0, "rec-A")],
        others: &[],
        expect: Expect::Undecided(&["@older", "is free, but nearer", "holds recording rec-A"]),
    },
    Case {
        name: "rule 5: a farther intake already taken does not block",
        ours: ("rec-B", 0.0),
        intakes: &[holding("taken", -8.0, "rec-A"), free("free", 1, -1.0)],
        others: &[other("rec-A", -8.0)],
        expect: Expect::Intake("free"),
    },
];

/// A case's intake names as ids, the same in every run.
fn id(name: &str) -> Uuid {
    Uuid::from_u128(name.bytes().fold(0x5eed, |a, b| (a << 8) ^ u128::from(b)))
}

fn minutes(m: Minutes) -> chrono::Duration {
    chrono::Duration::milliseconds((m * 60_000.0) as i64)
}

/// Runs `decide` on a case as `find_intake` would, with the rows its two
/// queries would return.
fn run(case: &Case, now: DateTime<Utc>) -> Found {
    let at = |m: Minutes| now + minutes(m);
    let w = chrono::Duration::from_std(WINDOW).unwrap();
    let around = at(case.ours.1);
    let span = (around - w * 3, around + w * 3);
    let patients: HashMap<u8, Uuid> = case
        .intakes
        .iter()
        .map(|i| (i.patient, Uuid::from_u128(u128::from(i.patient))))
        .collect();
    let intakes = case
        .intakes
        .iter()
        .map(|i| IntakeRow {
            id: id(i.name),
            patient_id: Some(patients[&i.patient]),
            created_at: at(i.at),
            recording_id: i.holds.map(str::to_owned),
            recording_object_path: i.object.map(str::to_owned),
        })
        .collect();
    let others = case
        .others
        .iter()
        .zip(1..)
        .filter(|(o, _)| !o.listed)
        .map(|(o, job)| Competitor {
            id: job,
            recording_id: Some(o.recording.to_owned()),
            client_state: o
                .names
                .map(|n| base64::engine::general_purpose::STANDARD.encode(id(n).to_string())),
            intake_id: o.matched.map(id),
            at: at(o.at),
            listed_only: false,
        })
        .collect();
    let listed = case
        .others
        .iter()
        .filter(|o| o.listed)
        .map(|o| Listed {
            recording_id: o.recording.to_owned(),
            call_session_id: None,
            at: at(o.at),
        })
        .collect();
    let m = MatchInput {
        job_id: 0,
        recording_id: case.ours.0,
        call_session_id: None,
        client_state: None,
        number: Some("+19712656795"),
        party: Party::To,
        organization: None,
        no_phone_match: None,
        around,
        window: WINDOW,
    };
    decide(&m, w, span, intakes, others, listed)
}

#[test]
fn every_matching_rule_decides_its_case() {
    let now = "2025-01-15T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
    for case in CASES {
        let found = run(case, now);
        let (reason, needles) = match (&case.expect, &found) {
            (Expect::Intake(name), _) => {
                assert_eq!(
                    found,
                    Found::Intake(id(name), MatchMethod::PhoneAndTime),
                    "case {:?}: expected intake {name}",
                    case.name
                );
                continue;
            }
            (Expect::Nothing(n), Found::Nothing(why))
            | (Expect::Undecided(n), Found::Undecided(why))
            | (Expect::Ambiguous(n), Found::Ambiguous(why)) => (why, *n),
            _ => panic!("case {:?}: found {found:?}", case.name),
        };
        for needle in needles {
            let needle = match needle.strip_prefix('@') {
                Some(name) => id(name).to_string(),
                None => (*needle).to_owned(),
            };
            assert!(
                reason.contains(&needle),
                "case {:?}: the reason does not say {needle:?}: {reason}",
                case.name
            );
        }
    }
}

#[test]
fn an_unlisted_connection_is_an_unknown_tenant() {
    let org = Uuid::new_v4();
    let none = HashMap::new();
    let some = HashMap::from([("conn-a".to_owned(), org)]);
    let cases = [
        (
            "no tenants configured: any connection is unscoped",
            Some("conn-a"),
            &none,
            Scope::Unscoped,
        ),
        (
            "no tenants configured: no connection is unscoped",
            None,
            &none,
            Scope::Unscoped,
        ),
        (
            "a listed connection is its organization",
            Some("conn-a"),
            &some,
            Scope::Organization(org),
        ),
        (
            "an unlisted connection is unknown",
            Some("conn-b"),
            &some,
            Scope::Unknown,
        ),
        (
            "no connection, with tenants configured, is unknown",
            None,
            &some,
            Scope::Unknown,
        ),
    ];
    for (name, connection, organizations, expected) in cases {
        assert_eq!(
            Scope::of(connection, organizations),
            expected,
            "case {name:?}"
        );
    }
}

#[test]
fn the_caller_id_confines_the_phone_match_to_one_organization() {
    let (a, b) = (Uuid::from_u128(0xa), Uuid::from_u128(0xb));
    let unknown = CallerId::Unknown("the from number is no organization's".into());
    let cases = [
        (
            "off, no connection scope: unscoped",
            None,
            CallerId::Off,
            Ok(None),
        ),
        (
            "off: the connection's organization",
            Some(a),
            CallerId::Off,
            Ok(Some(a)),
        ),
        (
            "the caller ID's organization",
            None,
            CallerId::Organization(b),
            Ok(Some(b)),
        ),
        (
            "both agree",
            Some(a),
            CallerId::Organization(a),
            Ok(Some(a)),
        ),
        (
            "they disagree: none",
            Some(a),
            CallerId::Organization(b),
            Err("but its caller ID"),
        ),
        (
            "unknown caller ID: none",
            None,
            unknown.clone(),
            Err("no organization's"),
        ),
        (
            "unknown, whatever the connection",
            Some(a),
            unknown,
            Err("no organization's"),
        ),
    ];
    for (name, connection, caller, expected) in cases {
        let got = phone_scope(connection, &caller);
        match (expected, got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "case {name:?}"),
            (Err(needle), Err(why)) => assert!(why.contains(needle), "case {name:?}: {why}"),
            (want, got) => panic!("case {name:?}: expected {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn client_state_forms() {
    let id = Uuid::parse_str("7f1c2a4e-1d2b-4c3d-9e8f-001122334455").unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let cases = [
        ("base64 of the id", b64(&id.to_string()), Some(id)),
        (
            "base64 of {\"intake_id\": ...}",
            b64(&format!(r#"{{"intake_id":"{id}"}}"#)),
            Some(id),
        ),
        ("the bare id", id.to_string(), Some(id)),
        ("base64 of anything else", b64("hello"), None),
    ];
    for (name, client_state, expected) in cases {
        assert_eq!(
            intake_id_from_client_state(&client_state),
            expected,
            "case {name:?}"
        );
    }
}

#[test]
fn the_exact_keys_and_when_they_disagree() {
    let a = Uuid::from_u128(1);
    let b = Uuid::from_u128(2);
    let cases = [
        ("nothing named", None, SessionLink::Unknown, Exact::None),
        (
            "a session without header",
            None,
            SessionLink::NoIntake,
            Exact::None,
        ),
        (
            "the header alone",
            None,
            SessionLink::Intake(a),
            Exact::Named(a, MatchMethod::SipHeader),
        ),
        (
            "client_state alone",
            Some(a),
            SessionLink::Unknown,
            Exact::Named(a, MatchMethod::ClientState),
        ),
        (
            "both, agreeing",
            Some(a),
            SessionLink::Intake(a),
            Exact::Named(a, MatchMethod::ClientState),
        ),
    ];
    for (name, client_state, session, expected) in cases {
        assert_eq!(
            exact_link(client_state, &session),
            expected,
            "case {name:?}"
        );
    }
    for (name, client_state, session) in [
        ("both, disagreeing", Some(a), SessionLink::Intake(b)),
        (
            "a session naming two",
            None,
            SessionLink::Conflicting(format!("{a}, {b}")),
        ),
        (
            "client_state and a session naming two",
            Some(a),
            SessionLink::Conflicting(format!("{a}, {b}")),
        ),
    ] {
        assert!(
            matches!(exact_link(client_state, &session), Exact::Disagree(_)),
            "case {name:?}"
        );
    }
}

#[test]
fn a_recording_waits_for_its_sessions_link_only_while_it_can_come() {
    let now = Utc::now();
    let later = now + chrono::Duration::minutes(2);
    let unknown = SessionLink::Unknown;
    // (case, session, client_state, has session, in use, deadline, attempts left, waits)
    let cases = [
        (
            "not known yet, within the wait",
            &unknown,
            false,
            true,
            true,
            later,
            11,
            true,
        ),
        (
            "the wait is over",
            &unknown,
            false,
            true,
            true,
            now,
            11,
            false,
        ),
        (
            "known, without intake",
            &SessionLink::NoIntake,
            false,
            true,
            true,
            later,
            11,
            false,
        ),
        (
            "client_state names one",
            &unknown,
            true,
            true,
            true,
            later,
            11,
            false,
        ),
        (
            "no session to wait for",
            &unknown,
            false,
            false,
            true,
            later,
            11,
            false,
        ),
        (
            "no call events arrive at all",
            &unknown,
            false,
            true,
            false,
            later,
            11,
            false,
        ),
        (
            "the last attempt",
            &unknown,
            false,
            true,
            true,
            later,
            1,
            false,
        ),
    ];
    for (name, session, client_state, has_session, in_use, deadline, left, waits) in cases {
        let got = link_wait_until(
            session,
            client_state,
            has_session,
            in_use,
            deadline,
            now,
            left,
        );
        assert_eq!(got.is_some(), waits, "case {name:?}");
    }
}
