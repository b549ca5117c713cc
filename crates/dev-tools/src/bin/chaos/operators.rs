//! Operators in the storm (issue #10): a DBA cancelling a running job and
//! requeueing it at once (what `jobs cancel ID` + `jobs requeue ID` do, the
//! same SQL functions), and requeueing every failed job now and then. So
//! that there are failed jobs to requeue, an incident opens the run: the
//! storage refuses the service key for a few uploads (a permanent error,
//! the job ends `failed` at once), as after a botched key rotation; the
//! operator requeues them, and once more when the storm ends.
//!
//! Plus the evidence that no worker wrote through a lease it had lost: a
//! trigger, in a schema of this run's own, that records every change of a
//! job row that neither a claim, an operator function, the lease rescuer
//! nor the current lease holder could have made.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use recording_relay::jobs::{Queue, QueueError};
use recording_relay_sim::{Fault, StorageSim};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// One cancel + requeue pair on a running job.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Pair {
    pub job_id: i64,
    /// The lease the cancel took away.
    pub lease_id: Option<i64>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Actions {
    pub pairs: Vec<Pair>,
    /// The job had finished between the pick and the cancel.
    pub cancels_refused: usize,
    /// Uploads refused with 403 by the opening incident.
    pub refused_uploads: usize,
    pub requeue_failed_runs: usize,
    pub failed_jobs_requeued: usize,
    pub errors: Vec<String>,
}

/// Installed after the migrations, in the run's database only. A row is
/// kept for every UPDATE of a job that is not one of:
/// - a claim: `pending` → `running` with a lease number above every earlier one;
/// - an operator function: requeue or attach (→ `pending`), cancel
///   (`pending`/`running`/`failed`/`unmatched` → `cancelled`);
/// - a write on a `running` row that keeps its lease (the holder's fenced
///   writes, the rescuer's return to `pending`/`failed`);
/// - a write on any other row that changes only bookkeeping no pipeline
///   step reads back: the run time (the listener wakes a job waiting for
///   its call's `call.initiated`), the alert and retention marks, and the
///   owed delete at Telnyx with its result (the sweeps fence these on
///   their own claims, not on the lease).
///
/// A write through a stale lease lands on a row that is no longer running
/// under that lease: on a finished or pending row, or one re-leased.
pub(crate) const AUDIT_SQL: &str = "
CREATE SCHEMA chaos;
CREATE TABLE chaos.stale_writes (
    job_id BIGINT, at TIMESTAMPTZ DEFAULT clock_timestamp(),
    old_state TEXT, new_state TEXT, old_lease BIGINT, new_lease BIGINT);
CREATE FUNCTION chaos.pipeline_columns(j recording_relay.recording_jobs) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_jsonb(j) - ARRAY['updated_at', 'next_run_at', 'alert_due_at',
        'retention_alerted_at', 'telnyx_delete_due_at', 'telnyx_delete_attempts',
        'telnyx_delete_error', 'telnyx_cleanup_alerted_at', 'telnyx_deleted_at']
$$;
CREATE FUNCTION chaos.audit_job_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'running' THEN
        IF NEW.lease_id IS NOT DISTINCT FROM OLD.lease_id
           OR NEW.state = 'cancelled' THEN
            RETURN NEW;
        END IF;
    ELSIF OLD.state = 'pending' AND NEW.state = 'running' THEN
        IF NEW.lease_id > coalesce(OLD.lease_id, 0) THEN
            RETURN NEW;
        END IF;
    ELSIF NEW.state = 'pending' AND NEW.attempts = 0 THEN
        RETURN NEW;
    ELSIF NEW.state = 'cancelled' AND OLD.state IN ('pending', 'failed', 'unmatched') THEN
        RETURN NEW;
    ELSIF chaos.pipeline_columns(NEW) = chaos.pipeline_columns(OLD)
          AND (NEW.telnyx_deleted_at IS NOT DISTINCT FROM OLD.telnyx_deleted_at
               OR (OLD.state = 'succeeded' AND OLD.telnyx_delete_due_at IS NOT NULL)) THEN
        RETURN NEW;
    END IF;
    INSERT INTO chaos.stale_writes (job_id, old_state, new_state, old_lease, new_lease)
    VALUES (OLD.id, OLD.state::text, NEW.state::text, OLD.lease_id, NEW.lease_id);
    RETURN NEW;
END $$;
CREATE TRIGGER chaos_audit BEFORE UPDATE ON recording_relay.recording_jobs
    FOR EACH ROW EXECUTE FUNCTION chaos.audit_job_write();
";

/// One line per write the audit flagged.
pub(crate) async fn stale_writes(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT format('job %s: %s (lease %s) → %s (lease %s) at %s',
                       job_id, old_state, old_lease, new_state, new_lease, at)
         FROM chaos.stale_writes ORDER BY at",
    )
    .fetch_all(pool)
    .await
}

/// Uploads the opening incident refuses.
const REFUSED_UPLOADS: usize = 3;

/// Until `stop`: every `every` (jittered) a cancel + requeue pair on a
/// random running job; every fifth action, and once after `stop`, a
/// requeue of all failed jobs.
pub(crate) async fn run(
    queue: Queue,
    storage: StorageSim,
    every: Duration,
    stop: CancellationToken,
    actions: Arc<Mutex<Actions>>,
) {
    if every.is_zero() {
        return;
    }
    let record = |f: &mut dyn FnMut(&mut Actions)| {
        f(&mut actions.lock().unwrap_or_else(PoisonError::into_inner));
    };
    let requeue_failed = || async {
        match queue.requeue_failed().await {
            Ok(k) => record(&mut |a| {
                a.requeue_failed_runs += 1;
                a.failed_jobs_requeued += usize::try_from(k).unwrap_or(0);
            }),
            Err(e) => record(&mut |a| a.errors.push(format!("requeue_failed: {e}"))),
        }
    };
    storage.fail_next(REFUSED_UPLOADS, Fault::Status(403));
    record(&mut |a| a.refused_uploads = REFUSED_UPLOADS);
    let mut n: u64 = 0;
    loop {
        let pause = every.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            () = stop.cancelled() => {
                requeue_failed().await;
                return;
            }
            () = tokio::time::sleep(pause) => {}
        }
        n += 1;
        if n.is_multiple_of(5) {
            requeue_failed().await;
            continue;
        }
        let picked: Result<Option<(i64, Option<i64>)>, _> = sqlx::query_as(
            "SELECT id, lease_id FROM recording_relay.recording_jobs
             WHERE state = 'running' ORDER BY random() LIMIT 1",
        )
        .fetch_optional(queue.pool())
        .await;
        let (job_id, lease_id) = match picked {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                record(&mut |a| a.errors.push(format!("picking a running job: {e}")));
                continue;
            }
        };
        let at = Utc::now();
        match queue.cancel(job_id).await {
            Ok(()) => {}
            Err(QueueError::Refused(_)) => {
                record(&mut |a| a.cancels_refused += 1);
                continue;
            }
            Err(e) => {
                record(&mut |a| a.errors.push(format!("cancel {job_id}: {e}")));
                continue;
            }
        }
        match queue.requeue(job_id).await {
            Ok(()) => record(&mut |a| {
                a.pairs.push(Pair {
                    job_id,
                    lease_id,
                    at,
                });
            }),
            Err(e) => record(&mut |a| a.errors.push(format!("requeue {job_id}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use recording_relay::jobs::{JobState, NewJob};
    use recording_relay_dev_tools::testing;

    use super::*;

    /// The audit passes the writes of claims, holders, the rescuer and the
    /// operator functions, and flags a write landing on a job after its
    /// lease was taken away.
    #[sqlx::test(migrations = false)]
    async fn the_audit_flags_only_writes_through_a_lost_lease(pool: PgPool) {
        let q = Queue::new(testing::prepare(pool).await);
        sqlx::raw_sql(AUDIT_SQL).execute(q.pool()).await.unwrap();
        q.enqueue(&NewJob {
            event_id: "ev-1".into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            max_attempts: 3,
            ..NewJob::default()
        })
        .await
        .unwrap();
        let lease = q.claim("w", 1, Duration::from_secs(30)).await.unwrap()[0]
            .lease()
            .unwrap();
        q.heartbeat(&lease, Duration::from_secs(30)).await.unwrap();
        q.cancel(lease.job_id).await.unwrap();
        q.requeue(lease.job_id).await.unwrap();
        let fresh = q.claim("w", 1, Duration::from_secs(30)).await.unwrap()[0]
            .lease()
            .unwrap();
        q.finish_unsuccessfully(&fresh, JobState::Failed, "permanent", "boom")
            .await
            .unwrap();
        assert_eq!(stale_writes(q.pool()).await.unwrap(), Vec::<String>::new());
        // A completion fenced on the job id alone, after the job ended.
        sqlx::query("UPDATE recording_relay.recording_jobs SET state = 'succeeded' WHERE id = $1")
            .bind(lease.job_id)
            .execute(q.pool())
            .await
            .unwrap();
        let flagged = stale_writes(q.pool()).await.unwrap();
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        assert!(flagged[0].contains("failed"), "{flagged:?}");
    }

    /// Writes that are no pipeline step and need no lease: a wake of a
    /// waiting job when its call's `call.initiated` arrives, and the
    /// claims and marks of the alert and clean-up sweeps on a finished job.
    /// A pipeline column changed on a finished job is still flagged.
    #[sqlx::test(migrations = false)]
    async fn wakes_and_sweeps_are_no_stale_writes(pool: PgPool) {
        let q = Queue::new(testing::prepare(pool).await);
        sqlx::raw_sql(AUDIT_SQL).execute(q.pool()).await.unwrap();
        q.enqueue(&NewJob {
            event_id: "ev-1".into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            call: recording_relay::call::CallFacts {
                call_session_id: Some("s-1".into()),
                ..Default::default()
            },
            max_attempts: 3,
            ..NewJob::default()
        })
        .await
        .unwrap();
        // An attempt that waits for the call's `call.initiated`.
        let waiting = q.claim("w", 1, Duration::from_secs(30)).await.unwrap()[0]
            .lease()
            .unwrap();
        q.retry(
            &waiting,
            &recording_relay::jobs::JobError::retryable("waiting"),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        assert_eq!(Queue::wake_session(q.pool(), "s-1").await.unwrap(), 1);
        let lease = q.claim("w", 1, Duration::from_secs(30)).await.unwrap()[0]
            .lease()
            .unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "boom")
            .await
            .unwrap();
        for sweep in [
            "UPDATE recording_relay.recording_jobs
             SET alert_due_at = now() + interval '1 minute', updated_at = now() WHERE id = $1",
            "UPDATE recording_relay.recording_jobs
             SET alert_due_at = NULL, retention_alerted_at = now(), updated_at = now() WHERE id = $1",
        ] {
            sqlx::query(sweep)
            .bind(lease.job_id)
            .execute(q.pool())
            .await
            .unwrap();
        }
        assert_eq!(stale_writes(q.pool()).await.unwrap(), Vec::<String>::new());
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET last_error = 'overwritten' WHERE id = $1",
        )
        .bind(lease.job_id)
        .execute(q.pool())
        .await
        .unwrap();
        assert_eq!(stale_writes(q.pool()).await.unwrap().len(), 1);
    }
}
