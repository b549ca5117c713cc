//! The durable job queue: one `recording_jobs` row per recording webhook.
//!
//! - [`queue`]: every SQL statement on `recording_jobs`, one concept a file
//!   (the job's lifecycle, the pipeline's fenced step writes, operator
//!   commands, retention, alerts owed, gauges, lookups for reconcile and
//!   playback), each with its tests. A write through a lost lease fails
//!   with `QueueError::LeaseLost`.
//! - [`backoff`]: the retry schedule (exponential, full jitter, capped).
//! - [`worker`]: the loop that LISTENs, claims, runs a [`JobHandler`] under a
//!   heartbeated lease, and drains on shutdown (one concept a file too).

pub mod backoff;
pub mod queue;
pub mod worker;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::call::CallFacts;

pub use queue::{Queue, QueueError};

pub use queue::Enqueued;
pub use worker::{Worker, WorkerOptions};

/// Mirrors the `recording_job_state` Postgres enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize)]
#[sqlx(
    type_name = "recording_relay.recording_job_state",
    rename_all = "lowercase"
)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unmatched,
    Cancelled,
    Duplicate,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Unmatched,
        JobState::Cancelled,
        JobState::Duplicate,
    ];

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Unmatched
                | JobState::Cancelled
                | JobState::Duplicate
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Unmatched => "unmatched",
            JobState::Cancelled => "cancelled",
            JobState::Duplicate => "duplicate",
        }
    }
}

/// A job row as the worker sees it after claiming it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub event: serde_json::Value,
    pub recording_id: Option<String>,
    #[sqlx(flatten)]
    pub call: CallFacts,
    pub client_state: Option<String>,
    pub state: JobState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub errors: serde_json::Value,
    pub next_run_at: DateTime<Utc>,
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub intake_id: Option<uuid::Uuid>,
    pub match_method: Option<String>,
    pub matched_at: Option<DateTime<Utc>>,
    pub object_path: Option<String>,
    pub tus_upload_url: Option<String>,
    pub content_type: Option<String>,
    pub object_sha256: Option<String>,
    pub object_size: Option<i64>,
    pub stored_at: Option<DateTime<Utc>>,
    pub linked_at: Option<DateTime<Utc>>,
    pub telnyx_deleted_at: Option<DateTime<Utc>>,
    /// Why the recording goes under `unmatched/`, saved with that path.
    pub unmatched_reason: Option<String>,
    /// The `unmatched/` object the recording was copied from into
    /// `object_path` (the intake's own folder) after a late match.
    pub moved_from: Option<String>,
    /// The copy at `object_path` was verified against the recorded size
    /// and SHA-256.
    pub moved_at: Option<DateTime<Utc>>,
    /// The `unmatched/` original was deleted after the link.
    pub moved_from_deleted_at: Option<DateTime<Utc>>,
    /// The fencing token of the current (or last) claim.
    pub lease_id: Option<i64>,
    /// The store step proved the stored bytes the whole recording (a known
    /// source length equal to them; for WAV, a header that agrees): only
    /// then is the recording deleted at Telnyx.
    pub source_complete: bool,
    /// Why not, when not: the recording is kept at Telnyx.
    pub telnyx_kept_reason: Option<String>,
}

impl Job {
    /// The fence every later state change of this claim must match.
    pub fn lease(&self) -> Option<Lease> {
        Some(Lease {
            job_id: self.id,
            token: self.lease_id?,
            worker: self.locked_by.clone()?,
            attempt: self.attempts,
        })
    }
}

/// Identifies one claim of one job. A worker whose lease expired, or was
/// cancelled, and whose job was claimed again holds a stale `Lease`: its
/// updates match no row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    /// Drawn from a sequence by the claim: no later claim of any job has
    /// it, whatever `attempts` says (requeue resets that to 0).
    pub token: i64,
    pub worker: String,
    /// For the retry schedule and logs; not part of the fence.
    pub attempt: i32,
}

/// What the webhook listener extracted from a verified event.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub event: serde_json::Value,
    pub recording_id: Option<String>,
    pub call: CallFacts,
    pub client_state: Option<String>,
    pub max_attempts: i32,
}

/// How a handler ended a job that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Terminal, but not an error of the relay: the recording is safe in
    /// storage and an operator has to say which intake it belongs to.
    Unmatched {
        reason: String,
    },
    /// Another job already relays this recording; nothing was stored.
    Duplicate {
        reason: String,
    },
}

/// A failed attempt, split by what should happen next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// Timeouts, 5xx, 429, connection resets: try again later.
    #[error("{message}")]
    Retryable {
        message: String,
        /// A provider's own hint (e.g. Telnyx's `x-ratelimit-reset`).
        retry_after: Option<Duration>,
    },
    /// The recording is gone, the request is invalid, a key is wrong: retrying
    /// cannot help, so the job stops at once with this as its `last_error`.
    #[error("{message}")]
    Permanent { message: String },
}

impl JobError {
    pub fn retryable(message: impl Into<String>) -> Self {
        JobError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        JobError::Permanent {
            message: message.into(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Retryable { .. } => "retryable",
            JobError::Permanent { .. } => "permanent",
        }
    }
}

/// Everything a handler gets besides the job row.
#[derive(Clone)]
pub struct JobContext {
    pub queue: Queue,
    pub lease: Lease,
}

/// The work done for one job. The worker owns claiming, leases, heartbeats
/// and recording the result; the handler only does the job's own steps.
pub trait JobHandler: Send + Sync + 'static {
    fn handle(
        &self,
        job: Job,
        ctx: JobContext,
    ) -> impl Future<Output = Result<Outcome, JobError>> + Send;

    /// Work owed after jobs ended, done on the worker's poll (in a task of
    /// its own, one sweep at a time per worker): the pipeline retries the
    /// deletes at Telnyx that failed after a link. Nothing by default.
    fn sweep(
        &self,
        queue: &Queue,
        alerter: Option<&crate::ops::alerts::Alerter>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (queue, alerter);
        std::future::ready(())
    }
}
