//! Retention: old finished jobs are deleted so the table stays small, but a
//! job that is the only pointer to patient data (an unmatched recording's
//! object, a failed job's recording still at Telnyx) is kept until someone
//! resolves it. Only when `retention.unresolved_for` is configured are those
//! deleted, together with their bucket object, and never before an alert
//! said so `retention.unresolved_alert_before` in advance.

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::RetentionConfig;
use crate::jobs::{Queue, QueueError};
use crate::ops::alerts::{Alerter, JobAlert};
use crate::providers::storage_api::{StorageClient, StorageError};

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
    /// `recording_relay.calls` rows deleted (older than `succeeded_for`).
    pub calls: u64,
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

/// Deletes every due finished job, batch after paced batch, until done or
/// shut down (between batches: each commits on its own).
async fn prune_finished_paced(
    queue: &Queue,
    config: &RetentionConfig,
    shutdown: &CancellationToken,
) -> Result<u64, QueueError> {
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
        tokio::select! {
            () = shutdown.cancelled() => return Ok(total),
            () = tokio::time::sleep(started.elapsed() * REST_PER_BATCH_TIME) => {}
        }
    }
}

/// One batch of old call sessions: received more than `$1` milliseconds
/// ago, oldest first along `calls_received_idx`, `$2` at most. Their
/// numbers are health data, and the exact link they hold is read only when
/// a recording is matched, within minutes of the call.
pub(crate) const PRUNE_CALLS_SQL: &str = "DELETE FROM recording_relay.calls
     WHERE call_session_id = ANY (ARRAY(
         SELECT call_session_id FROM recording_relay.calls
         WHERE received_at < now() - $1 * interval '1 millisecond'
         ORDER BY received_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED))";

/// Deletes every call session older than `keep_for`, in paced batches like
/// the jobs.
async fn prune_calls_paced(
    queue: &Queue,
    keep_for: std::time::Duration,
    shutdown: &CancellationToken,
) -> Result<u64, QueueError> {
    let keep_ms = i64::try_from(keep_for.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let deleted = sqlx::query(PRUNE_CALLS_SQL)
            .bind(keep_ms)
            .bind(PRUNE_BATCH)
            .execute(queue.pool())
            .await?
            .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH.unsigned_abs() {
            return Ok(total);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(total),
            () = tokio::time::sleep(started.elapsed() * REST_PER_BATCH_TIME) => {}
        }
    }
}

/// One retention pass. `storage` and `alerter` are needed only when
/// `unresolved_for` is set. `shutdown` ends the pass early: between batches
/// of ordinary pruning, and between unresolved jobs, never inside one (an
/// alert sent and not yet recorded would go out twice; a job whose object
/// went and whose row did not would wait for the next pass).
pub async fn run_once(
    queue: &Queue,
    config: &RetentionConfig,
    storage: Option<&StorageClient>,
    alerter: Option<&Alerter>,
    shutdown: &CancellationToken,
) -> Result<Report, RetentionError> {
    let mut report = Report {
        pruned: prune_finished_paced(queue, config, shutdown).await?,
        ..Report::default()
    };
    if !shutdown.is_cancelled() {
        report.calls = prune_calls_paced(queue, config.succeeded_for, shutdown).await?;
    }
    let Some(period) = config.unresolved_for else {
        return Ok(report);
    };
    if shutdown.is_cancelled() {
        return Ok(report);
    }
    let alerter = alerter.ok_or(RetentionError::Missing("pipeline.alert_webhook_url"))?;
    let storage = storage.ok_or(RetentionError::Missing("[supabase]"))?;
    let notice = config.unresolved_alert_before;

    // Alerts first: for jobs that will be due within `notice`.
    let soon = period.saturating_sub(notice);
    for (id, _) in queue.unresolved_due(soon, None, BATCH).await? {
        if shutdown.is_cancelled() {
            return Ok(report);
        }
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
        if shutdown.is_cancelled() {
            return Ok(report);
        }
        let deleted = queue
            .delete_unresolved(id, period, notice, |path| async move {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::PgPool;

    use super::*;
    use crate::testing;

    async fn with_due_jobs(pool: PgPool, n: i64) -> Queue {
        let queue = Queue::new(testing::prepare(pool).await);
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, finished_at)
             SELECT 'old-' || g, 'call.recording.saved', '{}', 'succeeded', now() - interval '31 days'
             FROM generate_series(1, $1) g",
        )
        .bind(n)
        .execute(queue.pool())
        .await
        .unwrap();
        queue
    }

    async fn left(queue: &Queue) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM recording_relay.recording_jobs")
            .fetch_one(queue.pool())
            .await
            .unwrap()
    }

    #[sqlx::test(migrations = false)]
    async fn a_pass_deletes_the_whole_backlog_in_paced_batches(pool: PgPool) {
        let queue = with_due_jobs(pool, 1_200).await;
        let report = run_once(
            &queue,
            &RetentionConfig::default(),
            None,
            None,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(report.pruned, 1_200);
        assert_eq!(left(&queue).await, 0);
    }

    /// A paced pass through a large backlog can take minutes; shutdown
    /// must not wait for all of it.
    #[sqlx::test(migrations = false)]
    async fn call_sessions_older_than_succeeded_for_are_deleted_in_batches(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        sqlx::query(
            "INSERT INTO recording_relay.calls (call_session_id, first_event_id, first_event_type, received_at)
             SELECT 'old-' || g, 'ev-' || g, 'call.initiated', now() - interval '31 days'
             FROM generate_series(1, 1200) g
             UNION ALL
             SELECT 'new', 'ev-new', 'call.initiated', now() - interval '29 days'",
        )
        .execute(&pool)
        .await
        .unwrap();
        let queue = Queue::new(pool.clone());
        let config = RetentionConfig::default();
        assert_eq!(config.succeeded_for, Duration::from_secs(30 * 86_400));
        let report = run_once(&queue, &config, None, None, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.calls, 1_200);
        let left: Vec<String> =
            sqlx::query_scalar("SELECT call_session_id FROM recording_relay.calls")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(left, ["new"]);
    }

    /// Its plan walks `calls_received_idx`, not the whole table.
    #[sqlx::test(migrations = false)]
    async fn pruning_call_sessions_reads_them_oldest_first_by_index(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        sqlx::query(
            "INSERT INTO recording_relay.calls (call_session_id, first_event_id, first_event_type, received_at)
             SELECT 's-' || g, 'ev-' || g, 'call.initiated', now() - g * interval '1 minute'
             FROM generate_series(1, 20000) g",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE recording_relay.calls")
            .execute(&pool)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE prune_calls(bigint, bigint) AS {PRUNE_CALLS_SQL}"),
            "EXECUTE prune_calls(2592000000, 500)",
            testing::Plan::Generic,
        )
        .await;
        assert!(plan.contains("calls_received_idx"), "{plan}");
    }

    #[sqlx::test(migrations = false)]
    async fn shutdown_ends_a_pass_after_the_batch_in_progress(pool: PgPool) {
        let queue = with_due_jobs(pool, 1_200).await;
        let stopped = CancellationToken::new();
        stopped.cancel();
        let config = RetentionConfig {
            unresolved_for: Some(Duration::from_secs(86_400)),
            ..RetentionConfig::default()
        };
        // No alerter or storage: reaching the unresolved step would fail.
        let report = run_once(&queue, &config, None, None, &stopped)
            .await
            .unwrap();
        assert_eq!(report.pruned, PRUNE_BATCH.unsigned_abs());
        assert_eq!(left(&queue).await, 1_200 - PRUNE_BATCH);
    }
}
