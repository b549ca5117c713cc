//! What an operator (the `jobs` CLI, a DBA) does to jobs: get, list,
//! requeue, cancel and attach. The changes go through the
//! `recording_jobs_*` SQL functions, which refuse with an explanation.

use super::{Queue, QueueError, refused_or};
use crate::jobs::{Job, JobState};

impl Queue {
    pub async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let job =
            sqlx::query_as::<_, Job>("SELECT * FROM recording_relay.recording_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(job)
    }

    pub async fn get_by_event_id(&self, event_id: &str) -> Result<Option<Job>, QueueError> {
        let job = sqlx::query_as::<_, Job>(
            "SELECT * FROM recording_relay.recording_jobs WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(job)
    }

    /// Makes a failed, cancelled, unmatched or waiting job runnable now with
    /// fresh attempts (the `recording_jobs_requeue` SQL function).
    pub async fn requeue(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_requeue($1)")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Requeues every failed job; returns how many.
    pub async fn requeue_failed(&self) -> Result<i32, QueueError> {
        let n = sqlx::query_scalar("SELECT recording_relay.recording_jobs_requeue_failed()")
            .fetch_one(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(n)
    }

    pub async fn cancel(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_cancel($1)")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Attaches an unmatched recording to an intake and requeues it for linking.
    pub async fn attach(&self, id: i64, intake: uuid::Uuid) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_attach($1, $2)")
            .bind(id)
            .bind(intake)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Newest first, optionally of one state.
    pub async fn list(&self, state: Option<JobState>, limit: i64) -> Result<Vec<Job>, QueueError> {
        let jobs = sqlx::query_as::<_, Job>(
            "SELECT * FROM recording_relay.recording_jobs
             WHERE $1::recording_relay.recording_job_state IS NULL OR state = $1
             ORDER BY id DESC LIMIT $2",
        )
        .bind(state)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[sqlx::test(migrations = false)]
    async fn requeue_gives_a_failed_job_fresh_attempts(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        q.requeue(id).await.unwrap();
        let job = q.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.attempts, 0);
        assert!(job.finished_at.is_none());
        assert_eq!(
            job.errors.as_array().unwrap().last().unwrap()["kind"],
            "requeued"
        );
        assert_eq!(one_claimed(&q, "w").await.id, id);
        // Running now: refused with an explanation.
        let err = q.requeue(id).await.unwrap_err();
        assert!(
            matches!(err, QueueError::Refused(ref m) if m.contains("nothing to requeue")),
            "{err}"
        );
        assert!(matches!(q.requeue(999).await, Err(QueueError::Refused(_))));
    }

    #[sqlx::test(migrations = false)]
    async fn requeue_failed_takes_every_failed_job(pool: PgPool) {
        let q = queue(pool).await;
        failed_job(&q, "a").await;
        failed_job(&q, "b").await;
        q.enqueue(&new_job("c")).await.unwrap();
        assert_eq!(q.requeue_failed().await.unwrap(), 2);
        assert_eq!(
            q.count_by_state().await.unwrap(),
            vec![(JobState::Pending, 3)]
        );
    }

    #[sqlx::test(migrations = false)]
    async fn cancel_fences_out_the_running_worker(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.cancel(lease.job_id).await.unwrap();
        lost(q.heartbeat(&lease, LEASE).await);
        lost(q.complete(&lease).await);
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Cancelled);
        assert!(job.last_error.unwrap().starts_with("cancelled by"));
        assert!(matches!(
            q.cancel(lease.job_id).await,
            Err(QueueError::Refused(_))
        ));
    }

    #[sqlx::test(migrations = false)]
    async fn attach_links_an_unmatched_recording_to_an_intake(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        sqlx::query("UPDATE recording_relay.recording_jobs SET recording_id = 'rec-1'")
            .execute(q.pool())
            .await
            .unwrap();
        let intakes: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO public.intakes (recording_id) VALUES (NULL), ('rec-other') RETURNING id",
        )
        .fetch_all(q.pool())
        .await
        .unwrap();
        let err = q.attach(lease.job_id, intakes[1]).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("already holds recording rec-other"),
            "{err}"
        );
        q.attach(lease.job_id, intakes[0]).await.unwrap();
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.intake_id, Some(intakes[0]));
        assert_eq!(job.match_method.as_deref(), Some("manual"));
        assert!(matches!(
            q.attach(lease.job_id, intakes[0]).await,
            Err(QueueError::Refused(_))
        ));
    }

    /// Issue #19 review, L3: attach checked only the intake's recording
    /// id, not the object it holds, so a job was attached to an intake
    /// whose link would be refused, and moved into its folder first.
    #[sqlx::test(migrations = false)]
    async fn attach_refuses_an_intake_that_holds_another_object(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET recording_id = 'rec:1', object_path = 'unmatched/rec_1.wav'",
        )
        .execute(q.pool())
        .await
        .unwrap();
        let intake = |path: String| {
            let q = q.clone();
            async move {
                let id = uuid::Uuid::new_v4();
                sqlx::query(
                    "INSERT INTO public.intakes (id, recording_object_path)
                     VALUES ($1, replace($2, '{id}', $1::text))",
                )
                .bind(id)
                .bind(path)
                .execute(q.pool())
                .await
                .unwrap();
                id
            }
        };
        let taken = intake("intakes/{id}/someone-else.wav".to_owned()).await;
        let err = q.attach(lease.job_id, taken).await.unwrap_err();
        assert!(
            err.to_string().contains("already holds another object"),
            "{err}"
        );
        // This recording's own file in the intake's folder is no other
        // object (an earlier link of the same recording).
        let own = intake("intakes/{id}/rec_1.wav".to_owned()).await;
        q.attach(lease.job_id, own).await.unwrap();
    }

    #[sqlx::test(migrations = false)]
    async fn dba_views_show_failed_unmatched_stuck_and_depth(pool: PgPool) {
        let q = queue(pool).await;
        failed_job(&q, "failed").await;
        q.enqueue(&new_job("stuck")).await.unwrap();
        let stuck = one_claimed(&q, "gone-worker").await;
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET locked_until = now() - interval '1 hour' WHERE id = $1",
        )
        .bind(stuck.id)
        .execute(q.pool())
        .await
        .unwrap();
        q.enqueue(&new_job("waiting")).await.unwrap();
        sqlx::query("UPDATE recording_relay.recording_jobs SET next_run_at = now() - interval '90 seconds' WHERE event_id = 'waiting'")
            .execute(q.pool())
            .await
            .unwrap();

        let failed: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs_failed")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(failed, ["failed"]);
        let stuck_ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM recording_relay.recording_jobs_stuck")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(stuck_ids, [stuck.id]);
        let (jobs, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT jobs, oldest_runnable_age_seconds::float8
             FROM recording_relay.recording_jobs_queue WHERE state = 'pending'",
        )
        .fetch_one(q.pool())
        .await
        .unwrap();
        assert_eq!(jobs, 1);
        let age = age.unwrap();
        assert!((89.0..120.0).contains(&age), "{age}");
        q.enqueue(&new_job("orphan")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        let unmatched: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM recording_relay.recording_jobs_unmatched")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(unmatched, [lease.job_id]);
    }
}
