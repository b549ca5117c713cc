//! Alerts owed: a job that ends `failed` or `unmatched` owes one (the
//! trigger `recording_jobs_alert_on_state` sets `alert_due_at`); sweeps
//! claim them, and mark each sent or failed through its claim.

use std::time::Duration;

use super::{Queue, QueueError, millis};
use crate::jobs::Job;

/// Claims up to `$1` owed alerts for `$2` milliseconds: jobs that ended
/// `failed` or `unmatched` and whose alert has not gone out (the trigger
/// `recording_jobs_alert_on_state` sets `alert_due_at` whenever a job enters
/// those states, whoever moves it). The claim commits at once, like the
/// job claim: no transaction is held while the alert is sent, and a sender
/// that dies leaves the claim to run out, then another sends. The new
/// `alert_due_at` of each row is its claim token. Its plan is tested to use
/// `recording_jobs_alert_due_idx`.
pub(crate) const CLAIM_ALERTS_SQL: &str = "UPDATE recording_relay.recording_jobs j
     SET alert_due_at = now() + $2 * interval '1 millisecond'
     FROM (SELECT id FROM recording_relay.recording_jobs
           WHERE alert_due_at <= now() AND state IN ('failed', 'unmatched')
           ORDER BY alert_due_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE j.id = due.id
     RETURNING j.*";

/// One owed alert, claimed by [`Queue::claim_alerts`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OwedAlert {
    #[sqlx(flatten)]
    pub job: Job,
    /// The claim: [`Queue::alert_sent`] and [`Queue::alert_failed`] match
    /// it, so a job that was requeued and ended again meanwhile (a new
    /// alert owed) is not marked by the old one.
    #[sqlx(rename = "alert_due_at")]
    pub(crate) claimed_until: chrono::DateTime<chrono::Utc>,
}

impl Queue {
    /// Claims up to `limit` owed alerts (see [`CLAIM_ALERTS_SQL`]) for
    /// `hold`: no other sweep takes them until then.
    pub(crate) async fn claim_alerts(
        &self,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<OwedAlert>, QueueError> {
        let owed = sqlx::query_as::<_, OwedAlert>(CLAIM_ALERTS_SQL)
            .bind(limit)
            .bind(millis(hold))
            .fetch_all(&self.pool)
            .await?;
        Ok(owed)
    }

    /// The alert went out: nothing is owed any more. `false` when the claim
    /// no longer holds (requeued, or claimed by another after it ran out).
    pub(crate) async fn alert_sent(&self, owed: &OwedAlert) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs SET alert_due_at = NULL
             WHERE id = $1 AND alert_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The alert could not be sent: owed again after `retry_in`.
    pub(crate) async fn alert_failed(
        &self,
        owed: &OwedAlert,
        retry_in: Duration,
    ) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET alert_due_at = now() + $3 * interval '1 millisecond'
             WHERE id = $1 AND alert_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .bind(millis(retry_in))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    async fn owed(q: &Queue) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs WHERE alert_due_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(q.pool())
        .await
        .unwrap()
    }

    /// Issue #19: only the worker that wrote a failure itself alerted. The
    /// row owes the alert now, whoever ended the job.
    #[sqlx::test(migrations = false)]
    async fn every_way_a_job_ends_failed_or_unmatched_owes_one_alert(pool: PgPool) {
        let q = queue(pool).await;
        // Ended by a permanent error, as unmatched, by the last retry, by
        // the rescuer on the last attempt.
        let permanent = failed_job(&q, "permanent").await;
        q.enqueue(&new_job("unmatched")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        let unmatched = lease.job_id;
        let mut last = new_job("last-retry");
        last.max_attempts = 1;
        q.enqueue(&last).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        let state = q.retry(&lease, &JobError::retryable("503"), LEASE).await;
        assert_eq!(state.unwrap(), JobState::Failed);
        let last_retry = lease.job_id;
        let mut rescued = new_job("rescued");
        rescued.max_attempts = 1;
        q.enqueue(&rescued).await.unwrap();
        let rescued = one_claimed(&q, "gone").await.id;
        expire_lease(&q, rescued).await;
        assert_eq!(q.rescue_expired_leases().await.unwrap(), 1);
        // None of these owes one: success, a retry with attempts left, a
        // duplicate, a cancel, a job that was failed before the upgrade.
        q.enqueue(&new_job("succeeded")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.complete(&lease).await.unwrap();
        q.enqueue(&new_job("retried")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        let state = q.retry(&lease, &JobError::retryable("503"), LEASE).await;
        assert_eq!(state.unwrap(), JobState::Pending);
        q.enqueue(&new_job("duplicate")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Duplicate, "duplicate", "dup")
            .await
            .unwrap();
        q.enqueue(&new_job("cancelled")).await.unwrap();
        q.cancel(q.get_by_event_id("cancelled").await.unwrap().unwrap().id)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs
                 (event_id, event_type, event, state, finished_at, last_error)
             VALUES ('failed-before-the-upgrade', 'call.recording.saved', '{}', 'failed', now(), 'x')",
        )
        .execute(q.pool())
        .await
        .unwrap();
        assert_eq!(owed(&q).await, [permanent, unmatched, last_retry, rescued]);

        // One sweep claims them; another finds nothing while they are sent.
        let claimed = q.claim_alerts(10, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 4);
        assert!(q.claim_alerts(10, LEASE).await.unwrap().is_empty());
        for alert in &claimed {
            assert!(q.alert_sent(alert).await.unwrap());
        }
        assert!(owed(&q).await.is_empty());
        // A requeued job that ends failed again owes a new alert.
        q.requeue(permanent).await.unwrap();
        assert!(owed(&q).await.is_empty());
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "again")
            .await
            .unwrap();
        assert_eq!(owed(&q).await, [permanent]);
    }

    /// At least once: a sender that died holding claimed alerts, or whose
    /// send failed, leaves them to be sent again; a stale claim marks
    /// nothing.
    #[sqlx::test(migrations = false)]
    async fn an_alert_whose_sender_died_or_failed_is_sent_again(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        let died = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        assert!(q.claim_alerts(10, LEASE).await.unwrap().is_empty());
        // Its claim runs out.
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET alert_due_at = now() - interval '1 second'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let again = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        assert_eq!(again.job.id, id);
        assert!(!q.alert_sent(&died).await.unwrap(), "a stale claim");
        assert!(
            q.alert_failed(&again, Duration::from_millis(1))
                .await
                .unwrap()
        );
        assert!(
            eventually_claimed(&q).await,
            "owed again after a failed send"
        );
        // Requeued while being sent: the old claim marks nothing, and the
        // job owes nothing until it ends again.
        let sending = q.claim_alerts(10, LEASE).await.unwrap();
        assert!(sending.is_empty());
        sqlx::query("UPDATE recording_relay.recording_jobs SET alert_due_at = now() WHERE id = $1")
            .bind(id)
            .execute(q.pool())
            .await
            .unwrap();
        let sending = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        q.requeue(id).await.unwrap();
        assert!(!q.alert_sent(&sending).await.unwrap());
        assert!(owed(&q).await.is_empty());
    }

    async fn eventually_claimed(q: &Queue) -> bool {
        for _ in 0..100 {
            if !q.claim_alerts(10, LEASE).await.unwrap().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Every worker sweeps for owed alerts on each poll: it must not read
    /// the history of finished jobs to find the few owed ones.
    #[sqlx::test(migrations = false)]
    async fn the_alert_sweep_uses_its_partial_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, last_error)
                 SELECT 'done-' || g, 'call.recording.saved', '{}',
                        (CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END)::recording_relay.recording_job_state,
                        now(), 'x'
                 FROM generate_series(1, 20000) g",
        )
        .await;
        failed_job(&q, "owed").await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE claim_alerts(bigint, bigint) AS {CLAIM_ALERTS_SQL}"),
            "EXECUTE claim_alerts(20, 300000)",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_alert_due_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }
}
