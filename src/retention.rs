//! Retention: old finished jobs are deleted so the table stays small, but a
//! job that is the only pointer to patient data (an unmatched recording's
//! object, a failed job's recording still at Telnyx) is kept until someone
//! resolves it. Only when `retention.unresolved_for` is configured are those
//! deleted, together with their bucket object, and never before an alert
//! said so `retention.unresolved_alert_before` in advance.

use tracing::{error, info, warn};

use crate::alerts::{Alerter, JobAlert};
use crate::config::RetentionConfig;
use crate::jobs::{Queue, QueueError};
use crate::storage::{StorageClient, StorageError};

/// Jobs handled per pass and step; the next pass takes the rest.
const BATCH: i64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// `unresolved_for` is set but there is no way to alert or to delete
    /// objects (configuration validation prevents this in the daemon).
    #[error("retention.unresolved_for needs {0}")]
    Missing(&'static str),
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Ordinary finished jobs deleted.
    pub pruned: u64,
    /// Retention alerts sent for jobs holding patient data.
    pub alerted: usize,
    /// Jobs holding patient data deleted with their object.
    pub deleted: usize,
}

/// Rows per retention DELETE: a short transaction each.
const PRUNE_BATCH: i64 = 500;

/// After each full batch, retention rests this many times as long as the
/// batch took, so it uses at most a fifth of one connection's time however
/// large the backlog. Back to back, deleting the 100,000 jobs a day of
/// history makes due took the queue's claims from 0.86x to 0.71x an empty
/// table's while it ran (`bench history`): every deleted row dirties a page
/// of the history and writes it to the WAL.
const REST_PER_BATCH_TIME: u32 = 4;

/// Deletes every due finished job, batch after paced batch.
async fn prune_finished_paced(queue: &Queue, config: &RetentionConfig) -> Result<u64, QueueError> {
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let deleted = queue
            .prune_finished_batch(config.succeeded_for, config.failed_for, PRUNE_BATCH)
            .await?;
        total += deleted;
        if deleted < PRUNE_BATCH.unsigned_abs() {
            return Ok(total);
        }
        tokio::time::sleep(started.elapsed() * REST_PER_BATCH_TIME).await;
    }
}

/// One retention pass. `storage` and `alerter` are needed only when
/// `unresolved_for` is set.
pub async fn run_once(
    queue: &Queue,
    config: &RetentionConfig,
    storage: Option<&StorageClient>,
    alerter: Option<&Alerter>,
) -> Result<Report, RetentionError> {
    let mut report = Report {
        pruned: prune_finished_paced(queue, config).await?,
        ..Report::default()
    };
    let Some(period) = config.unresolved_for else {
        return Ok(report);
    };
    let alerter = alerter.ok_or(RetentionError::Missing("pipeline.alert_webhook_url"))?;
    let storage = storage.ok_or(RetentionError::Missing("[supabase]"))?;
    let notice = config.unresolved_alert_before;

    // Alerts first: for jobs that will be due within `notice`.
    let soon = period.saturating_sub(notice);
    for (id, _) in queue.unresolved_due(soon, None, BATCH).await? {
        let Some(job) = queue.get(id).await? else {
            continue;
        };
        let finished = job.finished_at.unwrap_or(job.updated_at);
        let due = finished + chrono::Duration::from_std(period).unwrap_or(chrono::Duration::MAX);
        // Never less notice than configured, whatever the job's age.
        let earliest = chrono::Utc::now()
            + chrono::Duration::from_std(notice).unwrap_or(chrono::Duration::MAX);
        let alert = JobAlert::retention_due(&job, due.max(earliest));
        match alerter.send(&alert).await {
            Ok(()) => {
                queue.mark_retention_alerted(id).await?;
                warn!(job.id = id, delete_after = %alert.delete_after.unwrap_or(due), "retention will delete this unresolved job and its object");
                report.alerted += 1;
            }
            // Not marked: the next pass alerts again, and nothing is
            // deleted without an alert that arrived.
            Err(e) => error!(job.id = id, error = %e.without_url(), "retention alert failed"),
        }
    }

    for (id, path) in queue.unresolved_due(period, Some(notice), BATCH).await? {
        let deleted = queue
            .delete_unresolved(id, notice, |path| async move {
                match storage.delete_object(&path).await {
                    Ok(()) | Err(StorageError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await?;
        match deleted {
            Ok(true) => {
                info!(
                    job.id = id,
                    object = path.as_deref().unwrap_or("none"),
                    "retention deleted an unresolved job with its object"
                );
                report.deleted += 1;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(job.id = id, error = %e, "retention could not delete the object; job kept")
            }
        }
    }
    Ok(report)
}
