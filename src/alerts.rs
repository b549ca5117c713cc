//! Tells a human when a job ends in a terminal failure: an error log line
//! always, and a JSON POST to `pipeline.alert_webhook_url` when set.
//! The summary carries ids and the reason, never phone numbers.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use tracing::{error, warn};

use crate::jobs::{Job, JobState, Queue};

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
}

impl JobAlert {
    pub fn from_job(job: &Job) -> Self {
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
        }
    }

    /// Retention will delete this job (the only pointer to its recording)
    /// and its object at `delete_after`, unless someone resolves it first.
    pub fn retention_due(job: &Job, delete_after: chrono::DateTime<chrono::Utc>) -> Self {
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

    /// Sends the alert in the background (a slow alert endpoint must not
    /// hold a worker slot), retrying a few times.
    pub fn job_ended(&self, queue: Queue, job_id: i64) {
        let this = self.clone();
        tokio::spawn(async move {
            let job = match queue.get(job_id).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(e) => {
                    warn!(job.id = job_id, error = %e, "cannot load the job for its alert");
                    return;
                }
            };
            let alert = JobAlert::from_job(&job);
            let sent = this.send(&alert).await;
            if let Err(e) = sent {
                error!(job.id = job_id, error = %e.without_url(), "alert webhook failed");
            }
        });
    }

    /// POSTs `alert`, retrying a few times; the caller learns whether it
    /// arrived.
    pub async fn send(&self, alert: &JobAlert) -> Result<(), reqwest::Error> {
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
