//! Step 1: what the Recordings API says about the recording (its id,
//! numbers, duration, times), since the real webhook lacks them.

use std::time::Instant;

use tracing::info;

use super::Run;
use super::errors::telnyx_failure;
use crate::jobs::{Job, JobError, Outcome, QueueError};
use crate::providers::telnyx_api::Recording;
use crate::telemetry::mask_phone;

impl Run<'_> {
    /// Step 1. `Some(outcome)` ends the job early (a duplicate).
    pub(super) async fn resolve(&mut self) -> Result<Option<Outcome>, JobError> {
        let recording = match (&self.job.recording_id, &self.job.call.call_session_id) {
            (Some(id), _) => self
                .p
                .telnyx
                .get_recording(id)
                .await
                .map_err(telnyx_failure)?,
            (None, Some(session)) => {
                let listed = self
                    .p
                    .telnyx
                    .recordings_of_call(session)
                    .await
                    .map_err(telnyx_failure)?;
                match pick_recording(listed, &self.job) {
                    Pick::Found(recording) => *recording,
                    Pick::NotYet => {
                        return Err(JobError::retryable(format!(
                            "Telnyx lists no recording of call session {session} \
                             with this event's leg and start time yet"
                        )));
                    }
                    Pick::Ambiguous(n) => {
                        return Err(JobError::permanent(format!(
                            "{n} recordings of call session {session} fit this event; \
                             enqueue the right one by recording id (reconcile)"
                        )));
                    }
                }
            }
            (None, None) => {
                return Err(JobError::permanent(
                    "the event names neither a recording id nor a call session id",
                ));
            }
        };
        match self
            .queue
            .save_resolution(&self.lease, &recording.id, &recording.call)
            .await
        {
            Ok(()) => {}
            Err(QueueError::AlreadyOwned { recording, job_id }) => {
                return Ok(Some(Outcome::Duplicate {
                    reason: format!("recording {recording} is relayed by job {job_id}"),
                }));
            }
            Err(e) => return Err(e.into()),
        }
        if self.job.recording_id.is_none() {
            tracing::Span::current().record("recording.id", recording.id.as_str());
        }
        let j = &mut self.job;
        j.recording_id = Some(recording.id.clone());
        j.call.resolve_with(&recording.call);
        info!(
            recording.id = %recording.id,
            to = %j.call.to_number.as_deref().map(mask_phone).unwrap_or_default(),
            duration_ms = j.call.duration_millis,
            "recording resolved"
        );
        self.fresh = Some((Instant::now(), recording));
        Ok(None)
    }
}

/// Why the listed recordings do not identify this event's recording.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    Found(Box<Recording>),
    /// Nothing listed fits yet (the list can lag the webhook).
    NotYet,
    /// Several fit and nothing in the event tells them apart.
    Ambiguous(usize),
}

/// Of a call's recordings, the one this event is about. A call can have
/// several (pause/resume, transfers), so what the event says (leg, start
/// time) must match; taking "the only one listed" could take a sibling
/// recording and drop this one as a duplicate of it.
fn pick_recording(listed: Vec<Recording>, job: &Job) -> Pick {
    let fits = |r: &Recording| {
        let same_leg = match (&job.call.call_leg_id, &r.call.call_leg_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let same_start = match (job.call.recording_started_at, r.call.recording_started_at) {
            (Some(a), Some(b)) => (a - b).num_milliseconds().abs() <= 1000,
            _ => true,
        };
        same_leg && same_start
    };
    let mut fitting: Vec<Recording> = listed.into_iter().filter(fits).collect();
    match fitting.len() {
        0 => Pick::NotYet,
        1 => Pick::Found(Box::new(fitting.remove(0))),
        n => Pick::Ambiguous(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording(id: &str, leg: &str, start_secs: i64) -> Recording {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "call_leg_id": leg,
            "recording_started_at": chrono::DateTime::from_timestamp(1_700_000_000 + start_secs, 0),
        }))
        .unwrap()
    }

    fn job_with(leg: Option<&str>, start_secs: Option<i64>) -> Job {
        let now = chrono::Utc::now();
        Job {
            id: 1,
            event_id: "e".into(),
            event_type: "call.recording.saved".into(),
            occurred_at: None,
            event: serde_json::json!({}),
            recording_id: None,
            call: crate::call::CallFacts {
                call_session_id: Some("s".into()),
                call_leg_id: leg.map(str::to_owned),
                recording_started_at: start_secs
                    .and_then(|s| chrono::DateTime::from_timestamp(1_700_000_000 + s, 0)),
                ..Default::default()
            },
            client_state: None,
            state: crate::jobs::JobState::Running,
            attempts: 1,
            max_attempts: 12,
            last_error: None,
            errors: serde_json::json!([]),
            next_run_at: now,
            locked_by: Some("w".into()),
            locked_until: Some(now),
            created_at: now,
            updated_at: now,
            finished_at: None,
            resolved_at: None,
            intake_id: None,
            match_method: None,
            matched_at: None,
            object_path: None,
            tus_upload_url: None,
            content_type: None,
            object_sha256: None,
            object_size: None,
            stored_at: None,
            linked_at: None,
            telnyx_deleted_at: None,
            unmatched_reason: None,
            moved_from: None,
            moved_at: None,
            moved_from_deleted_at: None,
            lease_id: None,
            source_complete: false,
            telnyx_kept_reason: None,
        }
    }

    #[test]
    fn a_sibling_recording_is_never_taken_for_this_one() {
        let first = recording("rec-1", "leg-a", 0);
        let second = recording("rec-2", "leg-a", 300);
        // The webhook for the second arrives while only the first is listed.
        let job = job_with(Some("leg-a"), Some(300));
        assert_eq!(pick_recording(vec![first.clone()], &job), Pick::NotYet);
        let Pick::Found(found) = pick_recording(vec![first.clone(), second.clone()], &job) else {
            panic!("the second fits");
        };
        assert_eq!(found.id, "rec-2");
        // Another leg at the same time is not it either.
        let other_leg = recording("rec-3", "leg-b", 300);
        assert_eq!(pick_recording(vec![other_leg], &job), Pick::NotYet);
        // Nothing in the event to tell two apart.
        assert_eq!(
            pick_recording(vec![first, second], &job_with(None, None)),
            Pick::Ambiguous(2)
        );
    }
}
