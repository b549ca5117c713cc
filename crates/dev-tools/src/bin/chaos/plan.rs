//! The scenario: one call per event, each with its recording at the Telnyx
//! simulator and (for most) a patient and an intake in the host tables, plus
//! when each webhook delivery is sent. Generated from one seed.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use recording_relay_sim::{SimAudio, SimRecording};
use sqlx::PgPool;
use uuid::Uuid;

/// 8 kHz, 16-bit mono: bytes per second of the generated WAVs.
const BYTES_PER_SECOND: u64 = 16_000;
const WAV_HEADER: u64 = 44;

/// How the run's calls name their intake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Link {
    /// ZScribe's way (issue #21): each call's `call.initiated` carries the
    /// intake in the `X-Intake-Id` SIP header, no `client_state`; some
    /// patients are called twice within ten minutes.
    SipHeader,
    /// The Call Control way: some calls name their intake in
    /// `client_state`, the rest match by phone and time; no call events.
    ClientState,
}

/// How the call's intake is found, or why it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A patient with the dialled number and an intake just before the call.
    PhoneAndTime,
    /// The call's `call.initiated` names the intake in `X-Intake-Id`.
    SipHeader,
    /// The webhook's `client_state` names the intake (base64 of its id).
    ClientState,
    /// Nobody has this number: the job must end `unmatched`.
    NoIntake,
}

#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub event_id: String,
    pub recording: SimRecording,
    pub expect: Expect,
    /// Set by [`insert_host_rows`] for calls that have one.
    pub intake: Option<Uuid>,
    /// Above the 6 MiB resumable threshold: goes up through TUS.
    pub large: bool,
    /// The `data.id` of the call's `call.initiated`, when the run sends one.
    pub initiated_event_id: Option<String>,
    /// Its `call.initiated` is first sent after its recording's webhook.
    pub initiated_after: bool,
    /// The patient's second call within ten minutes: the call it repeats.
    pub repeats: Option<usize>,
}

/// Which webhook of a call a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `call.recording.saved`: the one that makes a job.
    Recording,
    /// `call.initiated`: names the session's intake in its SIP header.
    Initiated,
}

/// One webhook delivery: `call` sent `at` after sending starts. A call has
/// one first delivery; some have a redelivery of the same `data.id`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery {
    pub call: usize,
    pub kind: Kind,
    pub at: Duration,
    pub redelivery: bool,
}

pub(crate) struct Plan {
    pub calls: Vec<Call>,
    /// Sorted by `at`; not in call order (out-of-order delivery).
    pub deliveries: Vec<Delivery>,
    /// Redeliveries sent at the same moment as the first delivery.
    pub concurrent_duplicates: usize,
}

pub(crate) struct PlanOptions {
    pub events: usize,
    pub seed: u64,
    pub send_over: Duration,
    pub duplicates: f64,
    pub unmatched: f64,
    pub large: f64,
    pub client_state: f64,
    pub link: Link,
    /// Fraction of calls that are a patient's second call (`Link::SipHeader`).
    pub repeat: f64,
    /// Fraction of `call.initiated` sent after the recording's webhook.
    pub initiated_after: f64,
}

/// At least one of a kind whenever `fraction` is above zero, so the reduced
/// run exercises every path too.
fn how_many(total: usize, fraction: f64) -> usize {
    if fraction <= 0.0 || total == 0 {
        return 0;
    }
    ((total as f64 * fraction).round() as usize).clamp(1, total)
}

pub(crate) fn generate(o: &PlanOptions) -> Plan {
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let n = o.events;
    let sip = o.link == Link::SipHeader;
    let no_intake = how_many(n, o.unmatched);
    let large = how_many(n, o.large);
    let by_client_state = if sip { 0 } else { how_many(n, o.client_state) };
    // Which calls are which: a shuffled index list, cut into kinds.
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let named = if sip {
        Expect::SipHeader
    } else {
        Expect::PhoneAndTime
    };
    let mut expect = vec![named; n];
    for &i in order.iter().take(no_intake) {
        expect[i] = Expect::NoIntake;
    }
    for &i in order.iter().skip(no_intake).take(by_client_state) {
        expect[i] = Expect::ClientState;
    }
    let mut is_large = vec![false; n];
    rng.shuffle(&mut order);
    for &i in order.iter().take(large) {
        is_large[i] = true;
    }
    // Patients called twice: pairs of short calls with an intake, the
    // second repeating the first's number (`Link::SipHeader` only: by phone
    // and time two such calls could not be told apart).
    let mut repeats: Vec<Option<usize>> = vec![None; n];
    let mut repeated = vec![false; n];
    if sip {
        rng.shuffle(&mut order);
        let eligible: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| expect[i] == Expect::SipHeader && !is_large[i])
            .collect();
        let pairs = how_many(n, o.repeat).min(eligible.len() / 2);
        for pair in eligible.chunks_exact(2).take(pairs) {
            // The first call is the lower index (`insert_host_rows`).
            let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            repeats[second] = Some(first);
            repeated[first] = true;
        }
    }

    let now = Utc::now().trunc_subsecs(3);
    let mut calls: Vec<Call> = Vec::with_capacity(n);
    for i in 0..n {
        let seconds = if is_large[i] {
            // 6.4 to 12.8 MB: two or three 6 MiB TUS chunks.
            rng.u64(400..=800)
        } else {
            rng.u64(1..=20)
        };
        let id = Uuid::from_u64_pair(o.seed, i as u64).to_string();
        let mut rec = SimRecording::sample(format!("rec-{id}"));
        // A unique number per call (a patient called twice aside), so
        // matching by phone is never ambiguous.
        rec.to = format!("+1555{:07}", 2_000_000 + i);
        rec.from = "+15550001000".to_owned();
        rec.duration_millis = seconds * 1000;
        rec.content = SimAudio::generated(WAV_HEADER + BYTES_PER_SECOND * seconds, rng.u64(..));
        let ago = |rng: &mut fastrand::Rng, range: std::ops::Range<i64>| {
            now - chrono::Duration::seconds(rng.i64(range))
        };
        // With SIP headers the calls are recent: a recording whose
        // `call.initiated` has not come yet waits for it until
        // `pipeline.link_wait` after it ended (set to outlast the sending,
        // `main.rs`), rather than match by phone and time.
        let ended = match (sip, repeats[i]) {
            (false, _) => ago(&mut rng, 60..3600),
            (true, None) if repeated[i] => ago(&mut rng, 120..150),
            (true, None) => ago(&mut rng, 5..90),
            // Placed before its first call (lower index) was generated:
            // fixed up below, once both exist.
            (true, Some(_)) => now,
        };
        rec.recording_ended_at = ended;
        rec.recording_started_at = ended - chrono::Duration::seconds(seconds as i64);
        rec.created_at = ended + chrono::Duration::seconds(1);
        calls.push(Call {
            event_id: format!("chaos-{id}"),
            recording: rec,
            expect: expect[i],
            intake: None,
            large: is_large[i],
            initiated_event_id: sip.then(|| format!("chaos-initiated-{id}")),
            initiated_after: false,
            repeats: repeats[i],
        });
    }
    // The second call: the same number, started 10 to 60 s after the
    // first ended (its intake within ten minutes of the first's).
    for i in 0..n {
        let Some(first) = repeats[i] else { continue };
        let (to, first_ended) = (
            calls[first].recording.to.clone(),
            calls[first].recording.recording_ended_at,
        );
        let rec = &mut calls[i].recording;
        let seconds = i64::try_from(rec.duration_millis / 1000).unwrap_or(20);
        rec.to = to;
        rec.recording_started_at = first_ended + chrono::Duration::seconds(rng.i64(10..60));
        rec.recording_ended_at = rec.recording_started_at + chrono::Duration::seconds(seconds);
        rec.created_at = rec.recording_ended_at + chrono::Duration::seconds(1);
    }

    let window_ms = u64::try_from(o.send_over.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut deliveries: Vec<Delivery> = (0..n)
        .map(|call| Delivery {
            call,
            kind: Kind::Recording,
            at: Duration::from_millis(rng.u64(..window_ms)),
            redelivery: false,
        })
        .collect();
    if sip {
        // Most `call.initiated` come first, as at Telnyx; some after the
        // recording's webhook (never in the first fifth of the sending,
        // when no call event has arrived yet and a recording has nothing
        // to wait for).
        let after = how_many(n, o.initiated_after);
        rng.shuffle(&mut order);
        let mut chosen = 0;
        for &i in &order {
            if chosen == after {
                break;
            }
            if deliveries[i].at.as_millis() * 5 >= u128::from(window_ms) {
                calls[i].initiated_after = true;
                chosen += 1;
            }
        }
        for call in 0..n {
            let saved = deliveries[call].at;
            let at = if calls[call].initiated_after {
                saved + Duration::from_millis(rng.u64(200..10_000))
            } else {
                saved.saturating_sub(Duration::from_millis(rng.u64(200..5_000)))
            };
            deliveries.push(Delivery {
                call,
                kind: Kind::Initiated,
                at,
                redelivery: false,
            });
        }
    }
    let firsts = deliveries.clone();
    let dups = how_many(firsts.len(), o.duplicates);
    let mut picks: Vec<usize> = (0..firsts.len()).collect();
    rng.shuffle(&mut picks);
    let mut concurrent = 0;
    for (k, &d) in picks.iter().take(dups).enumerate() {
        let first = firsts[d];
        // Half at the same moment (to another daemon), half later.
        let at = if k % 2 == 0 {
            concurrent += 1;
            first.at
        } else {
            first.at + Duration::from_millis(rng.u64(200..15_000))
        };
        deliveries.push(Delivery {
            at,
            redelivery: true,
            ..first
        });
    }
    deliveries.sort_by_key(|d| d.at);
    Plan {
        calls,
        deliveries,
        concurrent_duplicates: concurrent,
    }
}

/// The host's free formats for the same number.
fn host_format(number: &str, i: usize) -> String {
    let d: String = number.chars().filter(char::is_ascii_digit).collect();
    let ten = &d[d.len() - 10..];
    match i % 3 {
        0 => format!("({}) {}-{}", &ten[..3], &ten[3..6], &ten[6..]),
        1 => format!("+1 {} {} {}", &ten[..3], &ten[3..6], &ten[6..]),
        _ => ten.to_owned(),
    }
}

/// Patients and intakes for every call that has one, the intake created 30 s
/// before the recording started (as ZScribe does when a call begins).
pub(crate) async fn insert_host_rows(pool: &PgPool, calls: &mut [Call]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let mut patients: Vec<Option<Uuid>> = vec![None; calls.len()];
    for i in 0..calls.len() {
        let call = &calls[i];
        if call.expect == Expect::NoIntake {
            continue;
        }
        // A second call is to the first one's patient (a lower index: the
        // pairs are placed so, see `generate`).
        let known = call.repeats.and_then(|first| patients[first]);
        let patient: Uuid = match known {
            Some(p) => p,
            None => {
                sqlx::query_scalar(
                    "INSERT INTO public.patients (phone, name) VALUES ($1, 'chaos patient') RETURNING id",
                )
                .bind(host_format(&call.recording.to, i))
                .fetch_one(&mut *tx)
                .await?
            }
        };
        patients[i] = Some(patient);
        let call = &mut calls[i];
        let created: DateTime<Utc> =
            call.recording.recording_started_at - chrono::Duration::seconds(30);
        let intake: Uuid = sqlx::query_scalar(
            "INSERT INTO public.intakes (patient_id, room_name, created_at)
             VALUES ($1, 'chaos', $2) RETURNING id",
        )
        .bind(patient)
        .bind(created)
        .fetch_one(&mut *tx)
        .await?;
        call.intake = Some(intake);
    }
    tx.commit().await?;
    Ok(())
}

/// The webhook Telnyx would send for `call` of `kind`, on delivery attempt
/// `attempt`.
pub(crate) fn webhook_body(call: &Call, kind: Kind, attempt: u32, delivered_to: &str) -> Vec<u8> {
    let mut event = match kind {
        Kind::Recording => recording_saved(call),
        Kind::Initiated => initiated(call),
    };
    event["meta"]["attempt"] = attempt.into();
    event["meta"]["delivered_to"] = delivered_to.into();
    event.to_string().into_bytes()
}

/// The call's `call.initiated` as ZScribe's dialer causes it (LiveKit SIP
/// over a Telnyx trunk): from the organization's number to the patient's,
/// the intake in `X-Intake-Id`, no `client_state`. A call without an intake
/// names none (somebody else's call on the connection).
fn initiated(call: &Call) -> serde_json::Value {
    let id = call.initiated_event_id.as_deref().unwrap_or_default();
    let intake = call
        .intake
        .filter(|_| call.expect == Expect::SipHeader)
        .map(|i| i.to_string());
    recording_relay_dev_tools::testing::dialled_event_for(&call.recording, id, intake.as_deref())
}

/// The recording's webhook (official shape: no recording id, no numbers).
fn recording_saved(call: &Call) -> serde_json::Value {
    use base64::Engine as _;
    let mut event =
        recording_relay_dev_tools::testing::saved_event_for(&call.recording, &call.event_id);
    if call.expect == Expect::ClientState
        && let Some(intake) = call.intake
    {
        event["data"]["payload"]["client_state"] = base64::engine::general_purpose::STANDARD
            .encode(intake.to_string())
            .into();
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(events: usize, link: Link) -> PlanOptions {
        PlanOptions {
            events,
            seed: 7,
            send_over: Duration::from_secs(10),
            duplicates: 0.1,
            unmatched: 0.02,
            large: 0.02,
            client_state: 0.2,
            link,
            repeat: 0.05,
            initiated_after: 0.1,
        }
    }

    #[test]
    fn every_kind_is_present_even_when_small() {
        let plan = generate(&options(20, Link::ClientState));
        assert_eq!(plan.calls.len(), 20);
        assert!(plan.calls.iter().any(|c| c.expect == Expect::NoIntake));
        assert!(plan.calls.iter().any(|c| c.expect == Expect::ClientState));
        assert!(plan.calls.iter().any(|c| c.large));
        let large = plan.calls.iter().find(|c| c.large).unwrap();
        assert!(large.recording.content.len() > 6 * 1024 * 1024);
        assert_eq!(
            plan.deliveries.len(),
            22,
            "20 first deliveries + 2 redeliveries"
        );
        assert!(plan.deliveries.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(plan.calls.iter().all(|c| c.initiated_event_id.is_none()));
    }

    #[test]
    fn by_default_every_call_has_its_call_initiated_and_no_client_state() {
        let plan = generate(&options(60, Link::SipHeader));
        assert!(plan.calls.iter().all(|c| c.expect != Expect::ClientState));
        assert!(plan.calls.iter().any(|c| c.expect == Expect::NoIntake));
        for (i, call) in plan.calls.iter().enumerate() {
            let at = |kind| {
                plan.deliveries
                    .iter()
                    .find(|d| d.call == i && d.kind == kind && !d.redelivery)
                    .map(|d| d.at)
                    .unwrap()
            };
            let (saved, initiated) = (at(Kind::Recording), at(Kind::Initiated));
            assert_eq!(call.initiated_after, initiated > saved, "call {i}");
            let body: serde_json::Value =
                serde_json::from_slice(&webhook_body(call, Kind::Recording, 1, "x")).unwrap();
            assert!(body["data"]["payload"].get("client_state").is_none());
        }
        assert_eq!(plan.calls.iter().filter(|c| c.initiated_after).count(), 6);
        let redelivered: Vec<Kind> = plan
            .deliveries
            .iter()
            .filter(|d| d.redelivery)
            .map(|d| d.kind)
            .collect();
        assert_eq!(redelivered.len(), 12, "10% of 120 events");
        assert!(redelivered.contains(&Kind::Initiated));
        assert!(redelivered.contains(&Kind::Recording));
    }

    #[test]
    fn a_patient_called_twice_is_called_again_within_ten_minutes() {
        let plan = generate(&options(60, Link::SipHeader));
        let seconds: Vec<&Call> = plan.calls.iter().filter(|c| c.repeats.is_some()).collect();
        assert_eq!(seconds.len(), 3, "5% of 60");
        for second in seconds {
            let first = &plan.calls[second.repeats.unwrap()];
            assert_eq!(first.recording.to, second.recording.to);
            let gap = second.recording.recording_started_at - first.recording.recording_ended_at;
            assert!(gap > chrono::Duration::zero() && gap < chrono::Duration::minutes(10));
            assert!(second.recording.recording_ended_at < Utc::now());
        }
    }

    #[test]
    fn the_call_initiated_names_the_intake_in_the_sip_header() {
        let mut plan = generate(&options(20, Link::SipHeader));
        let call = plan
            .calls
            .iter_mut()
            .find(|c| c.expect == Expect::SipHeader)
            .unwrap();
        let intake = Uuid::new_v4();
        call.intake = Some(intake);
        let body: serde_json::Value =
            serde_json::from_slice(&webhook_body(call, Kind::Initiated, 2, "x")).unwrap();
        let p = &body["data"]["payload"];
        assert_eq!(body["data"]["event_type"], "call.initiated");
        assert_eq!(
            p["custom_headers"],
            serde_json::json!([{"name": "X-Intake-Id", "value": intake.to_string()}])
        );
        assert_eq!(
            p["call_session_id"],
            call.recording.call_session_id.as_str()
        );
        assert_eq!(p["to"], call.recording.to.as_str());
        assert!(p.get("client_state").is_none());
        assert_eq!(body["meta"]["attempt"], 2);
    }

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let (a, b) = (
            generate(&options(50, Link::SipHeader)),
            generate(&options(50, Link::SipHeader)),
        );
        let ids = |p: &Plan| -> Vec<(String, u64)> {
            p.calls
                .iter()
                .map(|c| (c.event_id.clone(), c.recording.content.len()))
                .collect()
        };
        assert_eq!(ids(&a), ids(&b));
    }

    #[test]
    fn host_formats_keep_the_last_ten_digits() {
        for i in 0..3 {
            let f = host_format("+15552000042", i);
            let digits: String = f.chars().filter(char::is_ascii_digit).collect();
            assert!(digits.ends_with("5552000042"), "{f}");
        }
    }
}
