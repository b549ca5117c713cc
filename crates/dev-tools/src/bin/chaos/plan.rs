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

/// How the call's intake is found, or why it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A patient with the dialled number and an intake just before the call.
    PhoneAndTime,
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
}

/// One webhook delivery: `call` sent `at` after sending starts. A call has
/// one first delivery; some have a redelivery of the same `data.id`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery {
    pub call: usize,
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
    let no_intake = how_many(n, o.unmatched);
    let large = how_many(n, o.large);
    let by_client_state = how_many(n, o.client_state);
    // Which calls are which: a shuffled index list, cut into kinds.
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut expect = vec![Expect::PhoneAndTime; n];
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

    let now = Utc::now().trunc_subsecs(3);
    let calls = (0..n)
        .map(|i| {
            let seconds = if is_large[i] {
                // 6.4 to 12.8 MB: two or three 6 MiB TUS chunks.
                rng.u64(400..=800)
            } else {
                rng.u64(1..=20)
            };
            let id = Uuid::from_u64_pair(o.seed, i as u64).to_string();
            let mut rec = SimRecording::sample(format!("rec-{id}"));
            // A unique number per call, so matching is never ambiguous.
            rec.to = format!("+1555{:07}", 2_000_000 + i);
            rec.from = "+15550001000".to_owned();
            rec.duration_millis = seconds * 1000;
            rec.content = SimAudio::generated(WAV_HEADER + BYTES_PER_SECOND * seconds, rng.u64(..));
            let ended = now - chrono::Duration::seconds(rng.i64(60..3600));
            rec.recording_ended_at = ended;
            rec.recording_started_at = ended - chrono::Duration::seconds(seconds as i64);
            rec.created_at = ended + chrono::Duration::seconds(1);
            Call {
                event_id: format!("chaos-{id}"),
                recording: rec,
                expect: expect[i],
                intake: None,
                large: is_large[i],
            }
        })
        .collect::<Vec<_>>();

    let window_ms = u64::try_from(o.send_over.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut deliveries: Vec<Delivery> = (0..n)
        .map(|call| Delivery {
            call,
            at: Duration::from_millis(rng.u64(..window_ms)),
            redelivery: false,
        })
        .collect();
    let dups = how_many(n, o.duplicates);
    rng.shuffle(&mut order);
    let mut concurrent = 0;
    for (k, &call) in order.iter().take(dups).enumerate() {
        let first = deliveries[call].at;
        // Half at the same moment (to another daemon), half later.
        let at = if k % 2 == 0 {
            concurrent += 1;
            first
        } else {
            first + Duration::from_millis(rng.u64(200..15_000))
        };
        deliveries.push(Delivery {
            call,
            at,
            redelivery: true,
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
    for (i, call) in calls.iter_mut().enumerate() {
        if call.expect == Expect::NoIntake {
            continue;
        }
        let patient: Uuid = sqlx::query_scalar(
            "INSERT INTO public.patients (phone, name) VALUES ($1, 'chaos patient') RETURNING id",
        )
        .bind(host_format(&call.recording.to, i))
        .fetch_one(&mut *tx)
        .await?;
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

/// The webhook Telnyx would send for `call` (official shape: no recording
/// id, no numbers), on delivery attempt `attempt`.
pub(crate) fn webhook_body(call: &Call, attempt: u32, delivered_to: &str) -> Vec<u8> {
    use base64::Engine as _;
    let rec = &call.recording;
    let mut event = recording_relay_dev_tools::testing::recording_saved_event(
        &call.event_id,
        &rec.call_session_id,
    );
    event["data"]["occurred_at"] = rec.recording_ended_at.to_rfc3339().into();
    let p = &mut event["data"]["payload"];
    p["call_control_id"] = rec.call_control_id.clone().into();
    p["call_leg_id"] = rec.call_leg_id.clone().into();
    p["connection_id"] = rec.connection_id.clone().into();
    p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
    p["recording_ended_at"] = rec.recording_ended_at.to_rfc3339().into();
    if call.expect == Expect::ClientState
        && let Some(intake) = call.intake
    {
        p["client_state"] = base64::engine::general_purpose::STANDARD
            .encode(intake.to_string())
            .into();
    }
    event["meta"]["attempt"] = attempt.into();
    event["meta"]["delivered_to"] = delivered_to.into();
    event.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(events: usize) -> PlanOptions {
        PlanOptions {
            events,
            seed: 7,
            send_over: Duration::from_secs(10),
            duplicates: 0.1,
            unmatched: 0.02,
            large: 0.02,
            client_state: 0.2,
        }
    }

    #[test]
    fn every_kind_is_present_even_when_small() {
        let plan = generate(&options(20));
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
    }

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let (a, b) = (generate(&options(50)), generate(&options(50)));
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
