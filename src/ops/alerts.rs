//! Tells a human when a job ends in a terminal failure: an error log line
//! always, and a JSON POST to `pipeline.alert_webhook_url` when set.
//! The summary carries ids and the reason, never phone numbers.
//!
//! The alert is owed from the moment the job's row says `failed` or
//! `unmatched`, whoever wrote it (this worker, the lease rescuer, another
//! process that died before alerting, a result whose commit this worker
//! never saw): the database marks it (`alert_due_at`, set by a trigger in
//! the same transaction), and `sweep_until`, run by every worker, sends
//! what is owed and clears the mark. At least once: a sender that dies
//! mid-send leaves its claim to run out (`ALERT_CLAIM`), then another
//! sends; a failed send is tried again (`ALERT_RETRY`). Once per job, not
//! once per process: each owed alert is claimed by one sweep at a time.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::jobs::{Job, JobState, Queue, QueueError};

/// How long a claimed alert is one sweep's to send: longer than a send can
/// take with its retries (four tries of `http.request_timeout`, 30 s by
/// default, and the pauses between them). Only a sender that died waits
/// this out.
pub(crate) const ALERT_CLAIM: Duration = Duration::from_secs(300);
/// A send that failed (the endpoint is down or refuses) is tried again
/// after this, by whichever worker sweeps first.
pub(crate) const ALERT_RETRY: Duration = Duration::from_secs(60);
/// Owed alerts claimed per statement.
const SWEEP_BATCH: i64 = 20;

#[derive(Debug, Clone)]
pub struct Alerter {
    http: reqwest::Client,
    url: String,
}

/// What the alert webhook receives.
#[derive(Debug, Serialize)]
pub struct JobAlert {
    pub kind: &'static str,
    pub job_id: i64,
    pub event_id: String,
    pub state: JobState,
    pub recording_id: Option<String>,
    pub intake_id: Option<uuid::Uuid>,
    pub object_path: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Retention alerts only: when the job and its object will be deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Clean-up alerts only: what is and is not wrong, for the reader who
    /// would take any alert for a missing recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

impl JobAlert {
    pub(crate) fn from_job(job: &Job) -> Self {
        Self {
            kind: "recording_relay.job_ended_unsuccessfully",
            job_id: job.id,
            event_id: job.event_id.clone(),
            state: job.state,
            recording_id: job.recording_id.clone(),
            intake_id: job.intake_id,
            object_path: job.object_path.clone(),
            attempts: job.attempts,
            last_error: job.last_error.clone(),
            delete_after: None,
            note: None,
        }
    }

    /// The recording is stored, verified and linked, and plays; only its
    /// copy at Telnyx could not be deleted after `attempts` tries
    /// (`error`, the last). Not a failed job: its state is `succeeded`.
    pub fn telnyx_cleanup_failed(job: &Job, attempts: i32, error: &str) -> Self {
        Self {
            kind: "recording_relay.telnyx_cleanup_failed",
            attempts,
            last_error: Some(error.to_owned()),
            note: Some(
                "the recording is stored, verified, linked and plays; only its copy at \
                 Telnyx is not deleted yet (retried; recording_relay.recording_cleanups_pending)",
            ),
            ..Self::from_job(job)
        }
    }

    /// Retention will delete this job (the only pointer to its recording)
    /// and its object at `delete_after`, unless someone resolves it first.
    pub(crate) fn retention_due(job: &Job, delete_after: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            kind: "recording_relay.job_retention_due",
            delete_after: Some(delete_after),
            ..Self::from_job(job)
        }
    }
}

impl Alerter {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            http,
            url: url.to_owned(),
        })
    }

    /// POSTs `alert`, retrying a few times; the caller learns whether it
    /// arrived.
    pub async fn send(&self, alert: &(impl Serialize + Sync)) -> Result<(), reqwest::Error> {
        let send = || async {
            self.http
                .post(&self.url)
                .json(alert)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
        };
        send.retry(ExponentialBuilder::default().with_max_times(3))
            .await
            .map(drop)
    }
}

/// Sends every owed alert (see the module doc): to `alerter` when there is
/// one, and an error log line for each. Stops at the first send that fails
/// (the endpoint is likely down), giving back that alert and the rest of
/// its batch for `ALERT_RETRY`. Returns how many alerts went out.
pub async fn sweep(queue: &Queue, alerter: Option<&Alerter>) -> Result<usize, QueueError> {
    let mut sent = 0;
    loop {
        let owed = queue.claim_alerts(SWEEP_BATCH, ALERT_CLAIM).await?;
        let full = owed.len() == SWEEP_BATCH.unsigned_abs() as usize;
        for (i, alert) in owed.iter().enumerate() {
            let job = &alert.job;
            if let Some(alerter) = alerter
                && let Err(e) = alerter.send(&JobAlert::from_job(job)).await
            {
                error!(job.id = job.id, error = %e.without_url(), retry_in = ?ALERT_RETRY, "alert webhook failed; the alert stays owed");
                for unsent in &owed[i..] {
                    queue.alert_failed(unsent, ALERT_RETRY).await?;
                }
                return Ok(sent);
            }
            error!(
                job.id = job.id,
                state = job.state.as_str(),
                attempts = job.attempts,
                last_error = job.last_error.as_deref().unwrap_or_default(),
                alerted = if alerter.is_some() {
                    "webhook"
                } else {
                    "log only"
                },
                "job ended unsuccessfully"
            );
            // `false`: requeued meanwhile; its next ending is owed anew.
            queue.alert_sent(alert).await?;
            sent += 1;
        }
        if !full {
            return Ok(sent);
        }
    }
}

/// Sweeps whenever `wake` is notified (the worker does on every poll tick
/// and when it ends a job failed or unmatched itself) until `stop`. A
/// sweep cut off by `stop` leaves its claimed alerts to be sent by another
/// worker once their claim runs out.
pub(crate) async fn sweep_until(
    queue: Queue,
    alerter: Option<Alerter>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    crate::jobs::worker::on_each_wake(wake, stop, || async {
        if let Err(e) = sweep(&queue, alerter.as_ref()).await {
            warn!(error = %e, "sending owed alerts failed; trying again on the next poll");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use sqlx::PgPool;

    use super::*;
    use crate::testing;

    /// Without `pipeline.alert_webhook_url` the alert is the error log
    /// line: once per job, however many workers sweep.
    #[sqlx::test(migrations = false)]
    async fn each_owed_alert_goes_out_once_whatever_the_workers(pool: PgPool) {
        let queue = Queue::new(testing::prepare(pool).await);
        // More than a batch, ended by a plain UPDATE (a DBA's, say): the
        // trigger owes the alerts whoever changes the state.
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event)
             SELECT 'ev-' || g, 'call.recording.saved', '{}' FROM generate_series(1, 45) g",
        )
        .execute(queue.pool())
        .await
        .unwrap();
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET state = 'failed', finished_at = now(), last_error = 'given up by hand'",
        )
        .execute(queue.pool())
        .await
        .unwrap();
        let (a, b) = tokio::join!(sweep(&queue, None), sweep(&queue, None));
        assert_eq!(a.unwrap() + b.unwrap(), 45);
        assert_eq!(sweep(&queue, None).await.unwrap(), 0);
    }
}
