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
            let send = || async {
                this.http
                    .post(&this.url)
                    .json(&alert)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
            };
            let sent = send
                .retry(ExponentialBuilder::default().with_max_times(3))
                .await;
            if let Err(e) = sent {
                error!(job.id = job_id, error = %e.without_url(), "alert webhook failed");
            }
        });
    }
}
