//! Clean-ups owed after a job succeeded (issue #21 item 6): a recording
//! stored, verified and linked whose delete at Telnyx failed. The job ends
//! `succeeded` (the recording plays); the delete is owed on the row
//! (`telnyx_delete_due_at`) and a sweep in every worker's poll retries it
//! apart from the queue: claimed with SKIP LOCKED in one statement that
//! commits at once, each result written through its claim (the new
//! `telnyx_delete_due_at` is the claim token, as for alerts).

use std::time::Duration;

use super::{Queue, QueueError, fenced, millis, one_row};
use crate::jobs::{Job, Lease};

/// Claims up to `$1` owed deletes for `$2` milliseconds: succeeded jobs
/// whose delete at Telnyx is due. Its plan is tested to use
/// `recording_jobs_telnyx_delete_due_idx`.
pub(crate) const CLAIM_CLEANUPS_SQL: &str = "UPDATE recording_relay.recording_jobs j
     SET telnyx_delete_due_at = now() + $2 * interval '1 millisecond'
     FROM (SELECT id FROM recording_relay.recording_jobs
           WHERE telnyx_delete_due_at <= now() AND state = 'succeeded'
           ORDER BY telnyx_delete_due_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE j.id = due.id
     RETURNING j.*";

/// One owed delete at Telnyx, claimed by [`Queue::claim_telnyx_cleanups`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwedCleanup {
    #[sqlx(flatten)]
    pub job: Job,
    /// Failed tries so far (the pipeline's own try counts).
    pub telnyx_delete_attempts: i32,
    pub telnyx_delete_error: Option<String>,
    pub telnyx_cleanup_alerted_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The claim: the result is written only while it holds.
    #[sqlx(rename = "telnyx_delete_due_at")]
    pub claimed_until: chrono::DateTime<chrono::Utc>,
}

impl Queue {
    /// The pipeline's delete at Telnyx failed after the link: the job will
    /// succeed, and the delete is owed from `retry_in` on, with `error`.
    pub async fn save_telnyx_delete_owed(
        &self,
        lease: &Lease,
        retry_in: Duration,
        error: &str,
    ) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "telnyx_delete_due_at = now() + $4 * interval '1 millisecond',
                 telnyx_delete_attempts = telnyx_delete_attempts + 1,
                 telnyx_delete_error = $5"
            ),
            lease,
        )
        .bind(millis(retry_in))
        .bind(error)
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Claims up to `limit` owed deletes (see [`CLAIM_CLEANUPS_SQL`]) for
    /// `hold`: no other sweep takes them until then.
    pub async fn claim_telnyx_cleanups(
        &self,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<OwedCleanup>, QueueError> {
        let owed = sqlx::query_as::<_, OwedCleanup>(CLAIM_CLEANUPS_SQL)
            .bind(limit)
            .bind(millis(hold))
            .fetch_all(&self.pool)
            .await?;
        Ok(owed)
    }

    /// The recording is gone at Telnyx: nothing is owed any more. `false`
    /// when the claim no longer holds.
    pub async fn telnyx_cleanup_done(&self, owed: &OwedCleanup) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET telnyx_deleted_at = now(), telnyx_delete_due_at = NULL,
                 telnyx_delete_error = NULL, updated_at = now()
             WHERE id = $1 AND telnyx_delete_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Another try failed with `error`: owed again after `retry_in`;
    /// `alerted` records that the clean-up alert went out.
    pub async fn telnyx_cleanup_failed(
        &self,
        owed: &OwedCleanup,
        retry_in: Duration,
        error: &str,
        alerted: bool,
    ) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET telnyx_delete_due_at = now() + $3 * interval '1 millisecond',
                 telnyx_delete_attempts = telnyx_delete_attempts + 1,
                 telnyx_delete_error = $4,
                 telnyx_cleanup_alerted_at = CASE WHEN $5 THEN now()
                                                  ELSE telnyx_cleanup_alerted_at END,
                 updated_at = now()
             WHERE id = $1 AND telnyx_delete_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .bind(millis(retry_in))
        .bind(error)
        .bind(alerted)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many deletes at Telnyx are owed (along the sweep's index).
    pub async fn telnyx_cleanups_pending(&self) -> Result<i64, QueueError> {
        let n = sqlx::query_scalar(
            "SELECT count(*) FROM recording_relay.recording_jobs
             WHERE telnyx_delete_due_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// A succeeded job that owes a delete, linked (the CHECK wants it).
    async fn owing(q: &Queue, event_id: &str) -> i64 {
        q.enqueue(&new_job(event_id)).await.unwrap();
        let lease = one_claimed(q, "w").await.lease().unwrap();
        stored_and_linked(q, lease.job_id, &format!("intakes/x/{event_id}.wav")).await;
        q.save_telnyx_delete_owed(&lease, Duration::ZERO, "503")
            .await
            .unwrap();
        q.complete(&lease).await.unwrap();
        lease.job_id
    }

    async fn stored_and_linked(q: &Queue, id: i64, path: &str) {
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET intake_id = gen_random_uuid(), matched_at = now(), match_method = 'manual',
                 object_path = $2, object_sha256 = repeat('0', 64), object_size = 1,
                 content_type = 'audio/wav', stored_at = now(), linked_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(path)
        .execute(q.pool())
        .await
        .unwrap();
    }

    /// One sweep at a time has an owed delete; a result written through a
    /// claim that another sweep has since taken over changes nothing.
    #[sqlx::test(migrations = false)]
    async fn an_owed_delete_is_one_sweeps_at_a_time(pool: PgPool) {
        let q = queue(pool).await;
        let id = owing(&q, "ev-1").await;
        assert_eq!(q.telnyx_cleanups_pending().await.unwrap(), 1);
        let claimed = q.claim_telnyx_cleanups(10, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].job.id, id);
        assert_eq!(claimed[0].telnyx_delete_attempts, 1);
        assert!(
            q.claim_telnyx_cleanups(10, LEASE).await.unwrap().is_empty(),
            "claimed"
        );
        assert!(
            q.telnyx_cleanup_failed(&claimed[0], Duration::ZERO, "503 again", true)
                .await
                .unwrap()
        );
        let again = q.claim_telnyx_cleanups(10, LEASE).await.unwrap();
        assert_eq!(again[0].telnyx_delete_attempts, 2);
        assert!(again[0].telnyx_cleanup_alerted_at.is_some());
        assert!(
            !q.telnyx_cleanup_done(&claimed[0]).await.unwrap(),
            "an old claim writes nothing"
        );
        assert!(q.telnyx_cleanup_done(&again[0]).await.unwrap());
        assert_eq!(q.telnyx_cleanups_pending().await.unwrap(), 0);
        let job = q.get(id).await.unwrap().unwrap();
        assert!(job.telnyx_deleted_at.is_some());
    }

    #[sqlx::test(migrations = false)]
    async fn the_cleanup_claim_uses_its_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded', now()
                 FROM generate_series(1, 20000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE claim(bigint, bigint) AS {CLAIM_CLEANUPS_SQL}"),
            "EXECUTE claim(20, 300000)",
            Plan::Generic,
        )
        .await;
        assert!(
            plan.contains("recording_jobs_telnyx_delete_due_idx"),
            "{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    /// Retention keeps a succeeded job while it owes a delete at Telnyx (it
    /// is the only pointer to that copy) or names an `unmatched/` original
    /// it could not delete (an orphan), and prunes it once neither holds.
    #[sqlx::test(migrations = false)]
    async fn retention_keeps_a_succeeded_job_that_left_a_copy_behind(pool: PgPool) {
        let q = queue(pool).await;
        let owes = owing(&q, "owes").await;
        q.enqueue(&new_job("orphan")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.complete(&lease).await.unwrap();
        let orphan = lease.job_id;
        stored_and_linked(&q, orphan, "intakes/x/r.wav").await;
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET moved_from = 'unmatched/r.wav', moved_at = now()
             WHERE id = $1",
        )
        .bind(orphan)
        .execute(q.pool())
        .await
        .unwrap();
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET finished_at = now() - interval '40 days'",
        )
        .execute(q.pool())
        .await
        .unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            q.prune_finished_batch(30 * day, 90 * day, 10)
                .await
                .unwrap(),
            0
        );
        let listed: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, cleanup FROM recording_relay.recording_cleanups_pending ORDER BY id",
        )
        .fetch_all(q.pool())
        .await
        .unwrap();
        assert_eq!(
            listed,
            [
                (owes, "telnyx_delete".to_owned()),
                (orphan, "unmatched_original".to_owned())
            ]
        );
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET telnyx_delete_due_at = NULL, telnyx_deleted_at = now(),
                 moved_from_deleted_at = moved_at",
        )
        .execute(q.pool())
        .await
        .unwrap();
        assert_eq!(
            q.prune_finished_batch(30 * day, 90 * day, 10)
                .await
                .unwrap(),
            2
        );
    }
}
