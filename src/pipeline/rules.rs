//! The matching rules as plain code, apart from the SQL that gathers their
//! input (`intakes.rs` for the host's intakes and the call session's link,
//! `jobs/queue/competitors.rs` for other recordings of the number): which
//! tenant a call may match in, what `client_state` and the SIP header name
//! (and how long a recording waits for the header), and which intake (if
//! any) a recording takes by phone number and time. Each rule has a case in
//! the table in `tests.rs`.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::Party;
use crate::jobs::queue::competitors::Competitor;

/// How an intake was found; stored in `recording_jobs.match_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchMethod {
    ClientState,
    /// The intake the dialer named in the SIP INVITE's header, as
    /// `call.initiated` reported it (`recording_relay.calls`).
    SipHeader,
    PhoneAndTime,
}

impl MatchMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchMethod::ClientState => "client_state",
            MatchMethod::SipHeader => "sip_header",
            MatchMethod::PhoneAndTime => "phone_and_time",
        }
    }
}

/// What the matcher knows about a recording.
pub(crate) struct MatchInput<'a> {
    /// This recording's job: never its own competitor.
    pub(crate) job_id: i64,
    pub(crate) recording_id: &'a str,
    /// Other jobs of the same call are the same call's recordings, not
    /// competitors from another call.
    pub(crate) call_session_id: Option<&'a str>,
    pub(crate) client_state: Option<&'a str>,
    /// The patient's number: the remote party of the call.
    pub(crate) number: Option<&'a str>,
    /// Which number of other jobs is their patient's (the same setting).
    pub(crate) party: Party,
    /// When set, only intakes of this organization match (the Telnyx
    /// connection the call came through, or the caller ID, identifies the
    /// tenant; see [`phone_scope`]).
    pub(crate) organization: Option<Uuid>,
    /// Why no phone-and-time match may be made at all (the caller ID names
    /// no one organization); exact links still follow their own rules.
    pub(crate) no_phone_match: Option<String>,
    pub(crate) around: DateTime<Utc>,
    pub(crate) window: std::time::Duration,
}

/// What the matcher found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    Intake(Uuid, MatchMethod),
    /// No intake to take: none in the window, or every one holds another
    /// recording. The intake may not be saved yet, so matching is retried.
    Nothing(String),
    /// More than one reading fits (several free intakes, recordings
    /// competing, a nearer intake already taken, a competitor whose number
    /// is not known yet). A later attempt may see it settled (an intake
    /// saved, a competitor matched); until then nothing is guessed.
    Undecided(String),
    /// Several patients share the number within the window: guessing could
    /// put one patient's call in another's chart. Waiting does not help.
    Ambiguous(String),
}

/// Which tenant's intakes a job may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `pipeline.connection_organizations` is empty: no tenants.
    Unscoped,
    Organization(Uuid),
    /// Tenants are configured and this call's connection is none of theirs
    /// (or the job has none).
    Unknown,
}

impl Scope {
    pub(crate) fn of(
        connection: Option<&str>,
        organizations: &std::collections::HashMap<String, Uuid>,
    ) -> Scope {
        if organizations.is_empty() {
            return Scope::Unscoped;
        }
        connection
            .and_then(|c| organizations.get(c))
            .map_or(Scope::Unknown, |org| Scope::Organization(*org))
    }
}

/// What `pipeline.caller_id_organizations` says about a call: the
/// organization whose number the call's non-patient party is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallerId {
    /// Not configured.
    Off,
    /// The number is this organization's and no other's.
    Organization(Uuid),
    /// No number, no organization's number, or several's: why.
    Unknown(String),
}

/// The organization a phone-and-time match is confined to (`None`: not
/// confined), or why none may be made. The connection's organization
/// (`pipeline.connection_organizations`) and the caller ID's must agree
/// when both are known; an unknown caller ID fails closed, since the
/// patient's number alone would look across every organization's patients.
pub(crate) fn phone_scope(
    connection: Option<Uuid>,
    caller: &CallerId,
) -> Result<Option<Uuid>, String> {
    match (connection, caller) {
        (connection, CallerId::Off) => Ok(connection),
        (Some(c), CallerId::Organization(o)) if c != *o => Err(format!(
            "the call's connection is organization {c}'s (pipeline.connection_organizations) \
             but its caller ID is organization {o}'s"
        )),
        (_, CallerId::Organization(o)) => Ok(Some(*o)),
        (_, CallerId::Unknown(why)) => Err(why.clone()),
    }
}

/// `client_state` is set by whoever started the call: base64 of an intake
/// id, of `{"intake_id": "..."}`, or (leniently) the bare id.
pub(crate) fn intake_id_from_client_state(client_state: &str) -> Option<Uuid> {
    let raw = client_state.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    [decoded.as_deref(), Some(raw)]
        .into_iter()
        .flatten()
        .find_map(|text| {
            let text = text.trim();
            Uuid::parse_str(text).ok().or_else(|| {
                serde_json::from_str::<serde_json::Value>(text)
                    .ok()?
                    .get("intake_id")?
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
            })
        })
}

/// What `recording_relay.calls` says about a recording's call session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionLink {
    /// No row for the session (not yet: webhooks come out of order), or
    /// the recording names no session.
    Unknown,
    /// The session is known and names no intake (no header, or a value
    /// that is not a UUID).
    NoIntake,
    Intake(Uuid),
    /// The session's events named different intakes (the values).
    Conflicting(String),
}

/// What the exact keys say, before phone and time.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exact {
    /// Neither names an intake: phone and time decide.
    None,
    /// This intake, and nothing else is tried.
    Named(Uuid, MatchMethod),
    /// They disagree: no intake is taken, by either or by phone and time.
    Disagree(String),
}

/// The exact link: `client_state`, or the SIP header of the call session.
/// Both say which intake the dialer meant, so either wins over phone and
/// time; when they disagree, or the session's own events do, the dialer's
/// word is unreliable and a guess by phone could be the wrong chart: no
/// intake (fail closed).
pub(crate) fn exact_link(client_state: Option<Uuid>, session: &SessionLink) -> Exact {
    match (client_state, session) {
        (_, SessionLink::Conflicting(values)) => Exact::Disagree(format!(
            "the call session's events name different intakes in the SIP header ({values})"
        )),
        (Some(named), SessionLink::Intake(header)) if named != *header => Exact::Disagree(format!(
            "client_state names intake {named} and the SIP header intake {header}"
        )),
        (Some(named), _) => Exact::Named(named, MatchMethod::ClientState),
        (None, SessionLink::Intake(header)) => Exact::Named(*header, MatchMethod::SipHeader),
        (None, SessionLink::Unknown | SessionLink::NoIntake) => Exact::None,
    }
}

/// Whether a recording waits for its session's `call.initiated` before
/// phone and time may match it, and until when. It waits only when all
/// hold: no exact key of its own (`client_state`), a session to wait for,
/// none known yet, call events arriving at all (`in_use`: else the wait
/// would hold every recording for nothing), the wait not over, and attempts
/// left after this one (a wait must not end the job `failed`).
pub(crate) fn link_wait_until(
    session: &SessionLink,
    has_client_state: bool,
    has_session: bool,
    in_use: bool,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
    attempts_left: i32,
) -> Option<DateTime<Utc>> {
    let waits = *session == SessionLink::Unknown
        && !has_client_state
        && has_session
        && in_use
        && now < deadline
        && attempts_left > 1;
    waits.then_some(deadline)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct IntakeRow {
    id: Uuid,
    patient_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    recording_id: Option<String>,
    recording_object_path: Option<String>,
}

impl IntakeRow {
    /// What the intake holds already, if anything: a recording, or the
    /// object of one whose id the host cleared (then the path is the only
    /// pointer to that object, and taking the intake would lose it).
    fn holding(&self) -> Option<String> {
        match (&self.recording_id, &self.recording_object_path) {
            (Some(r), _) => Some(format!("recording {r}")),
            (None, Some(path)) => Some(format!("object {path}")),
            (None, None) => None,
        }
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn intake_name(i: &IntakeRow) -> String {
    format!("intake {} ({})", i.id, stamp(i.created_at))
}

fn list(names: impl IntoIterator<Item = String>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// A competitor as the reasons name it.
fn recording_name(o: &Competitor) -> String {
    match &o.recording_id {
        Some(r) if o.listed_only => {
            format!(
                "recording {r} (listed by Telnyx, no job yet, {})",
                stamp(o.at)
            )
        }
        Some(r) => format!("recording {r} (job {}, {})", o.id, stamp(o.at)),
        None => format!("job {} ({})", o.id, stamp(o.at)),
    }
}

/// Two times closer than this are taken as the same moment: ZScribe's
/// database and Telnyx keep separate clocks, and a test's or a retry's
/// "now" is not exact either. An intake created up to this long after the
/// recording started may still be its call's, two intakes created this
/// close are equally plausible, and a recording started this close to ours
/// may be either call's.
pub(crate) const AT_ONCE: std::time::Duration = std::time::Duration::from_secs(60);

/// A recording of the number that Telnyx lists (`GET /v2/recordings`
/// filtered by the patient's number and time), whether or not a job of
/// ours knows it: its webhook may not have come yet (issue #21).
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub(crate) recording_id: String,
    pub(crate) call_session_id: Option<String>,
    pub(crate) at: DateTime<Utc>,
}

/// The rules, apart from the SQL so each case is plain to read:
///
/// 1. An intake already holding this recording is this recording's.
/// 2. Recordings and free intakes of the number are linked when they are
///    within the window of each other; ours belongs to the group so linked
///    to it. Recordings that hold an intake already are settled and take
///    part in nothing; an intake named by another recording's
///    `client_state` is that recording's.
/// 3. The group's free intakes must be one patient's.
/// 4. ZScribe creates an intake just before it dials the call, so a
///    recording's intake is the free one created nearest before the
///    recording started (up to [`AT_ONCE`] after it, for clocks). An intake
///    created later is another call's, even when nothing earlier
///    qualifies: a call whose recording is not saved yet would otherwise
///    lose its intake to the recording before it. Two free intakes created
///    within [`AT_ONCE`] of each other are not guessed between. When
///    another competing recording started between that intake and ours,
///    the intake is that recording's call's (it came first after the
///    intake), and ours has none yet: nothing is taken.
/// 5. An intake nearer to the recording that holds another recording means
///    the calls may have been mixed up already: nothing is taken.
///
/// Competitors are the jobs whose numbers are known plus the recordings
/// Telnyx lists for the number (`listed`, deduplicated by recording id).
/// The official webhook carries no numbers: a job learns them from the
/// Recordings API in its first step, so a job that has not got that far
/// yet is invisible in our table, and a recording whose webhook has not
/// come has no job at all (issue #21: the later call's webhook came first
/// and its recording took the earlier call's intake). Telnyx's list sees
/// both.
pub(crate) fn decide(
    m: &MatchInput<'_>,
    w: chrono::Duration,
    span: (DateTime<Utc>, DateTime<Utc>),
    intakes: Vec<IntakeRow>,
    mut others: Vec<Competitor>,
    listed: Vec<Listed>,
) -> Found {
    // A recording Telnyx lists is a competitor unless it is ours, another
    // recording of our own call, or already a job (the job knows more:
    // its client_state, its intake).
    for (l, n) in listed.into_iter().zip(1..) {
        let ours = l.recording_id == m.recording_id
            || (l.call_session_id.is_some() && l.call_session_id.as_deref() == m.call_session_id);
        let known = others
            .iter()
            .any(|o| o.recording_id.as_deref() == Some(l.recording_id.as_str()));
        if !ours && !known {
            others.push(Competitor {
                id: -n,
                recording_id: Some(l.recording_id),
                client_state: None,
                intake_id: None,
                at: l.at,
                listed_only: true,
            });
        }
    }
    if intakes.len() > 100 || others.len() > 100 {
        return Found::Undecided(
            "more than 100 intakes or recordings of this number around the recording".to_owned(),
        );
    }
    // 1.
    if let Some(ours) = intakes
        .iter()
        .find(|i| i.recording_id.as_deref() == Some(m.recording_id))
    {
        return Found::Intake(ours.id, MatchMethod::PhoneAndTime);
    }
    let near = |a: DateTime<Utc>, b: DateTime<Utc>| (a - b).abs() <= w;
    // 2. Intakes reserved by another recording's client_state are not free.
    let named: std::collections::HashSet<Uuid> = others
        .iter()
        .filter_map(|o| {
            o.client_state
                .as_deref()
                .and_then(intake_id_from_client_state)
        })
        .collect();
    let held: std::collections::HashSet<&str> = intakes
        .iter()
        .filter_map(|i| i.recording_id.as_deref())
        .collect();
    let free: Vec<&IntakeRow> = intakes
        .iter()
        .filter(|i| i.holding().is_none() && !named.contains(&i.id))
        .collect();
    let free_ids: std::collections::HashSet<Uuid> = free.iter().map(|i| i.id).collect();
    // Competing: not named elsewhere, and holding no intake (an intake
    // released after a failure is free again, so its job competes again).
    let competes = |o: &Competitor| {
        let names_intake = o
            .client_state
            .as_deref()
            .and_then(intake_id_from_client_state)
            .is_some();
        let holds = o.recording_id.as_deref().is_some_and(|r| held.contains(r))
            || o.intake_id.is_some_and(|i| !free_ids.contains(&i));
        !names_intake && !holds
    };
    let competitors: Vec<&Competitor> = others.iter().filter(|o| competes(o)).collect();

    // The group: grow from our recording through overlapping windows.
    let mut group_recs: Vec<(DateTime<Utc>, Option<&Competitor>)> = vec![(m.around, None)];
    let mut group_intakes: Vec<&IntakeRow> = Vec::new();
    let mut grown = true;
    while grown {
        grown = false;
        for i in &free {
            if !group_intakes.iter().any(|g| g.id == i.id)
                && group_recs.iter().any(|(t, _)| near(*t, i.created_at))
            {
                group_intakes.push(i);
                grown = true;
            }
        }
        for o in &competitors {
            if !group_recs
                .iter()
                .any(|(_, g)| g.is_some_and(|g| g.id == o.id))
                && group_intakes.iter().any(|i| near(o.at, i.created_at))
            {
                group_recs.push((o.at, Some(o)));
                grown = true;
            }
        }
    }
    let beyond = |t: DateTime<Utc>| t - w < span.0 || t + w > span.1;
    if group_intakes.iter().any(|i| beyond(i.created_at))
        || group_recs.iter().any(|(t, _)| beyond(*t))
    {
        return Found::Undecided(
            "the number's recordings and intakes run on in a chain too long to pair".to_owned(),
        );
    }
    group_intakes.sort_by_key(|i| (i.created_at, i.id));
    let taken_in_window = || {
        list(
            intakes
                .iter()
                .filter(|i| near(i.created_at, m.around))
                .filter_map(|i| Some(format!("{} holds {}", intake_name(i), i.holding()?))),
        )
    };
    if group_intakes.is_empty() {
        let taken = taken_in_window();
        return Found::Nothing(if taken.is_empty() {
            "no intake of a patient with this number in the window".to_owned()
        } else {
            format!("no free intake in the window: {taken}")
        });
    }
    // 3.
    let patients: std::collections::HashSet<Option<Uuid>> =
        group_intakes.iter().map(|i| i.patient_id).collect();
    if patients.len() > 1 {
        return Found::Ambiguous(format!(
            "{} patients with this number have intakes in the window: {}",
            patients.len(),
            list(group_intakes.iter().map(|i| intake_name(i)))
        ));
    }
    // 4.
    let candidates = || list(group_intakes.iter().map(|i| intake_name(i)));
    let at_once = chrono::Duration::from_std(AT_ONCE).unwrap_or_default();
    let before: Vec<&IntakeRow> = group_intakes
        .iter()
        .copied()
        .filter(|i| i.created_at <= m.around + at_once)
        .collect();
    // Sorted by creation: the last is the nearest before.
    let Some(&chosen) = before.last() else {
        return Found::Nothing(format!(
            "the patient's free intakes in the window were all created after the recording \
             started, so none is its call's: {}",
            candidates()
        ));
    };
    let tied: Vec<&IntakeRow> = before
        .iter()
        .copied()
        .filter(|i| chosen.created_at - i.created_at <= at_once)
        .collect();
    if tied.len() > 1 {
        return Found::Undecided(format!(
            "{} free intakes of the patient were created within {} of each other before the \
             recording: {}",
            tied.len(),
            humantime::format_duration(AT_ONCE),
            list(tied.iter().map(|i| intake_name(i)))
        ));
    }
    let between: Vec<&Competitor> = competitors
        .iter()
        .copied()
        .filter(|o| o.at >= chosen.created_at - at_once && o.at < m.around + at_once)
        .collect();
    if !between.is_empty() {
        return Found::Undecided(format!(
            "{} is the free intake created nearest before the recording, but {} started between \
             them (or with it): the intake is that call's, and this call's may not be saved yet",
            intake_name(chosen),
            list(between.iter().map(|o| recording_name(o)))
        ));
    }
    // 5.
    let distance = |t: DateTime<Utc>| (t - m.around).abs();
    let nearer: Vec<String> = intakes
        .iter()
        .filter(|i| {
            distance(i.created_at) < distance(chosen.created_at) && near(i.created_at, m.around)
        })
        .filter_map(|i| Some(format!("{} already holds {}", intake_name(i), i.holding()?)))
        .collect();
    if !nearer.is_empty() {
        return Found::Undecided(format!(
            "{} is free, but nearer to the recording {}",
            intake_name(chosen),
            list(nearer)
        ));
    }
    Found::Intake(chosen.id, MatchMethod::PhoneAndTime)
}

#[cfg(test)]
mod tests;
