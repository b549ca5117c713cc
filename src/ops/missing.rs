//! Recordings that never came (issue #21): a call Telnyx announced
//! (`call.initiated`, stored in `recording_relay.calls` by the listener)
//! whose recording no job knows `pipeline.recording_overdue_after` later
//! is looked up by its call session in the Recordings API. A recording
//! found there is enqueued as reconcile enqueues one (a missed
//! `call.recording.saved`); when there is still none
//! `pipeline.recording_missing_after` after the call, it is reported
//! missing, once: `recording_relay_recordings_missing_total`, an error
//! line, and a `recording_relay.recording_missing` alert. Never silence:
//! a recording Telnyx failed to make (storage credentials, an outbound
//! voice profile without recording) is a chart without its audio.
//!
//! Every worker runs [`run_until`] every minute, and `recording-relay
//! reconcile` runs one pass. The claim (`jobs::queue::overdue_calls`)
//! gives each overdue call to one of them at a time and asks about it at
//! most every [`RECHECK_EVERY`].
//!
//! What it cannot tell: a call nobody answered has no recording either,
//! and the calls table does not say whether a call was answered, so such
//! calls are reported too. The alert says so; the operator can filter them
//! out by the call session in Telnyx's call history (a call longer than
//! `recording_missing_after` is reported for the same reason, and its
//! recording, when it comes, still relays normally).

use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::PipelineConfig;
use crate::jobs::queue::OverdueCall;
use crate::jobs::{Enqueued, Queue};
use crate::ops::alerts::Alerter;
use crate::ops::reconcile::{ReconcileError, job_for};
use crate::providers::telnyx_api::TelnyxClient;

/// An overdue call is asked about again this long after the last time
/// (so with the defaults, at 30, 40, … 120 minutes: a dozen requests for
/// a recording that never comes, one for one that is just late).
pub const RECHECK_EVERY: Duration = Duration::from_secs(600);
/// How often each worker looks for overdue calls: one cheap statement on
/// the unsettled calls' index when there are none.
pub const PASS_EVERY: Duration = Duration::from_secs(60);
/// Calls claimed per statement.
const BATCH: i64 = 50;

/// How long to wait before asking about a call, and before giving up.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub overdue_after: Duration,
    pub missing_after: Duration,
}

impl Patience {
    pub fn from_config(pipeline: &PipelineConfig) -> Self {
        Self {
            overdue_after: pipeline.recording_overdue_after,
            missing_after: pipeline.recording_missing_after,
        }
    }
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Overdue calls found covered by a job (settled for good).
    pub settled: u64,
    /// Calls asked about at Telnyx.
    pub asked: usize,
    /// Recording ids found at Telnyx and enqueued now.
    pub enqueued: Vec<String>,
    /// Call sessions reported missing now.
    pub missing: Vec<String>,
}

/// What the alert webhook receives for a recording that never came: ids
/// only, never a phone number.
#[derive(Debug, Serialize)]
pub struct MissingRecordingAlert {
    pub kind: &'static str,
    pub call_session_id: String,
    /// The intake the dialer named in its SIP header, if any.
    pub intake_id: Option<uuid::Uuid>,
    pub connection_id: Option<String>,
    /// When the relay heard of the call (`call.initiated`).
    pub call_received_at: chrono::DateTime<chrono::Utc>,
    pub detail: &'static str,
}

impl MissingRecordingAlert {
    fn for_call(call: &OverdueCall) -> Self {
        Self {
            kind: "recording_relay.recording_missing",
            call_session_id: call.call_session_id.clone(),
            intake_id: call.intake_id,
            connection_id: call.connection_id.clone(),
            call_received_at: call.received_at,
            detail: "Telnyx lists no recording for this call session; \
                     a call nobody answered has none either",
        }
    }
}

/// One pass: settles the overdue calls a job covers, then asks Telnyx
/// about the others (see the module doc). A Telnyx error ends the pass:
/// the calls it claimed are asked about again after [`RECHECK_EVERY`], and
/// none is reported missing without Telnyx's answer.
pub async fn check_overdue_calls(
    queue: &Queue,
    telnyx: &TelnyxClient,
    alerter: Option<&Alerter>,
    patience: Patience,
    max_attempts: i32,
) -> Result<Report, ReconcileError> {
    let mut report = Report {
        settled: queue.settle_covered_calls(patience.overdue_after).await?,
        ..Report::default()
    };
    loop {
        let calls = queue
            .claim_overdue_calls(
                patience.overdue_after,
                patience.missing_after,
                RECHECK_EVERY,
                BATCH,
            )
            .await?;
        for call in &calls {
            report.asked += 1;
            let recordings = telnyx.recordings_of_call(&call.call_session_id).await?;
            if !recordings.is_empty() {
                for recording in &recordings {
                    let known = queue
                        .has_job_for_recording(
                            &recording.id,
                            recording.call.call_session_id.as_deref(),
                        )
                        .await?;
                    if known {
                        continue;
                    }
                    if let Enqueued::Inserted(id) =
                        queue.enqueue(&job_for(recording, max_attempts)).await?
                    {
                        info!(job.id = id, recording.id = %recording.id, call.session = %call.call_session_id, "enqueued the overdue recording of an announced call");
                        report.enqueued.push(recording.id.clone());
                    }
                }
                queue.call_recording_found(&call.call_session_id).await?;
            } else if call.due_missing && report_missing(queue, alerter, call).await? {
                report.missing.push(call.call_session_id.clone());
            }
        }
        if calls.len() < BATCH.unsigned_abs() as usize {
            return Ok(report);
        }
    }
}

/// Alerts first, then marks: an alert that could not be sent leaves the
/// call unmarked, to be asked about (and alerted) again after
/// [`RECHECK_EVERY`]. The claim keeps other workers off the call until
/// then, so the alert goes out once (twice only if this process dies
/// between the send and the mark).
async fn report_missing(
    queue: &Queue,
    alerter: Option<&Alerter>,
    call: &OverdueCall,
) -> Result<bool, ReconcileError> {
    let alert = MissingRecordingAlert::for_call(call);
    if let Some(alerter) = alerter
        && let Err(e) = alerter.send(&alert).await
    {
        error!(call.session = %call.call_session_id, error = %e.without_url(), retry_in = ?RECHECK_EVERY, "alert webhook failed; the missing recording is reported again later");
        return Ok(false);
    }
    if !queue.call_recording_missing(&call.call_session_id).await? {
        // Settled meanwhile (a job came), or reported by someone else.
        return Ok(false);
    }
    crate::metrics::metrics().recordings_missing.inc();
    error!(
        call.session = %call.call_session_id,
        intake.id = ?call.intake_id,
        call.received_at = %call.received_at,
        alerted = if alerter.is_some() { "webhook" } else { "log only" },
        "no recording came for an announced call (or nobody answered it)"
    );
    Ok(true)
}

/// Runs a pass every [`PASS_EVERY`] until `stop` (every worker does).
pub(crate) async fn run_until(
    queue: Queue,
    telnyx: TelnyxClient,
    alerter: Option<Alerter>,
    patience: Patience,
    max_attempts: i32,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(PASS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let pass = check_overdue_calls(&queue, &telnyx, alerter.as_ref(), patience, max_attempts);
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            done = pass => match done {
                Ok(r) if r.asked == 0 && r.settled == 0 => {}
                Ok(r) => info!(settled = r.settled, asked = r.asked, enqueued = r.enqueued.len(), missing = r.missing.len(), "looked for overdue recordings"),
                Err(e) => warn!(error = %e, "looking for overdue recordings failed; trying again in a minute"),
            }
        }
    }
}
