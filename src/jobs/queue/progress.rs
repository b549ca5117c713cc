//! The pipeline's step writes: each step's result recorded on the job,
//! fenced on the lease (`lease_fence!`), so a worker that lost its lease
//! changes nothing. The transactional ones (`lock_lease`, `save_match`,
//! `mark_linked`) run inside the caller's transaction on the intake.
//!
//! A lost lease fails with `QueueError::LeaseLost`.

use super::{Queue, QueueError, fenced, is_unique_violation, one_row};
use crate::call::CallFacts;
use crate::jobs::Lease;

impl Queue {
    /// Step 1 done: the recording id and what the Recordings API said about
    /// the call are known. A fact it does not have keeps what the webhook
    /// said; which call and leg it was are not touched, and the job's own
    /// connection wins (`resolve_with` does the same in
    /// memory). Fails with `AlreadyOwned` when another live job has the
    /// same recording.
    pub async fn save_resolution(
        &self,
        lease: &Lease,
        recording_id: &str,
        r: &CallFacts,
    ) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "recording_id = $4,
                 from_number = coalesce($5, from_number),
                 to_number = coalesce($6, to_number),
                 duration_millis = coalesce($7, duration_millis),
                 recording_started_at = coalesce($8, recording_started_at),
                 recording_ended_at = coalesce($9, recording_ended_at),
                 channels = coalesce($10, channels),
                 connection_id = coalesce(connection_id, $11),
                 resolved_at = now()"
            ),
            lease,
        )
        .bind(recording_id)
        .bind(&r.from_number)
        .bind(&r.to_number)
        .bind(r.duration_millis)
        .bind(r.recording_started_at)
        .bind(r.recording_ended_at)
        .bind(&r.channels)
        .bind(&r.connection_id)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => one_row(&done),
            Err(e) if is_unique_violation(&e, "recording_jobs_recording_id_key") => {
                Err(self.owner_of(recording_id, lease.job_id).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn owner_of(&self, recording: &str, not_job: i64) -> QueueError {
        let owner: Result<Option<i64>, _> = sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs
             WHERE recording_id = $1 AND state <> 'duplicate' AND id <> $2",
        )
        .bind(recording)
        .bind(not_job)
        .fetch_optional(&self.pool)
        .await;
        match owner {
            Ok(Some(job_id)) => QueueError::AlreadyOwned {
                recording: recording.to_owned(),
                job_id,
            },
            Ok(None) => QueueError::Database(sqlx::Error::RowNotFound),
            Err(e) => e.into(),
        }
    }

    /// Locks the job row inside `tx` while the lease holds; `LeaseLost` when
    /// it was lost. Transactions that change an intake and the job call this
    /// first, so every path locks the job row before the intake row (as the
    /// operator functions and the release trigger do) and none deadlocks.
    pub(crate) async fn lock_lease(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
    ) -> Result<(), QueueError> {
        let held: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT id FROM recording_relay.recording_jobs WHERE ",
            lease_fence!(),
            " FOR UPDATE"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
        .fetch_optional(&mut *tx)
        .await?;
        held.map(|_| ()).ok_or(QueueError::LeaseLost)
    }

    /// Step 2 done: the intake this recording belongs to. Runs inside the
    /// transaction that claims the intake (see `pipeline::intakes`).
    ///
    pub(crate) async fn save_match(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
        intake_id: uuid::Uuid,
        method: &str,
    ) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "intake_id = $4, match_method = $5, matched_at = now(), unmatched_reason = NULL"
            ),
            lease,
        )
        .bind(intake_id)
        .bind(method)
        .execute(&mut *tx)
        .await?;
        one_row(&done)
    }

    /// Claims the object path before the first byte is uploaded, so a retry
    /// knows where an upload that finished unobserved would be. An
    /// `unmatched/` path is saved with the reason no intake matched, which
    /// the attempt that finishes the job reports.
    pub async fn plan_object(
        &self,
        lease: &Lease,
        path: &str,
        content_type: &str,
        unmatched_reason: Option<&str>,
    ) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "object_path = $4, content_type = $5, tus_upload_url = NULL, unmatched_reason = $6"
            ),
            lease,
        )
        .bind(path)
        .bind(content_type)
        .bind(unmatched_reason)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => one_row(&done),
            Err(e) if is_unique_violation(&e, "recording_jobs_object_path_key") => {
                let owner: i64 = sqlx::query_scalar(
                    "SELECT id FROM recording_relay.recording_jobs WHERE object_path = $1",
                )
                .bind(path)
                .fetch_one(&self.pool)
                .await?;
                Err(QueueError::AlreadyOwned {
                    recording: path.to_owned(),
                    job_id: owner,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Remembers (or forgets) the resumable upload in progress.
    pub(crate) async fn save_tus_upload(
        &self,
        lease: &Lease,
        url: Option<&str>,
    ) -> Result<(), QueueError> {
        let done = fenced(fenced_update!("tus_upload_url = $4"), lease)
            .bind(url)
            .execute(&self.pool)
            .await?;
        one_row(&done)
    }

    /// Step 3 done: the object is in the bucket and its size verified.
    /// `unproven`: why the stored bytes are not proven the whole recording
    /// (the recording is then kept at Telnyx); `None` when they are.
    ///
    pub async fn save_stored(
        &self,
        lease: &Lease,
        sha256: &str,
        size: i64,
        unproven: Option<&str>,
    ) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "object_sha256 = $4, object_size = $5, stored_at = now(), tus_upload_url = NULL,
                 source_complete = ($6::text IS NULL), telnyx_kept_reason = $6"
            ),
            lease,
        )
        .bind(sha256)
        .bind(size)
        .bind(unproven)
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Step 4 done, inside the transaction that updates the intake, so the
    /// intake is linked exactly when the job says so.
    pub(crate) async fn mark_linked(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
    ) -> Result<(), QueueError> {
        let done = fenced(fenced_update!("linked_at = now()"), lease)
            .execute(&mut *tx)
            .await?;
        one_row(&done)
    }

    /// Step 5 done: the recording was deleted at Telnyx.
    pub(crate) async fn save_telnyx_deleted(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(fenced_update!("telnyx_deleted_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        one_row(&done)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Completed;
    use super::super::test_support::*;
    use super::*;

    /// Every write a worker makes through its lease, each refused
    /// (`LeaseLost`): what a stale lease must amount to.
    async fn assert_every_write_is_refused(q: &Queue, stale: &Lease) {
        lost(q.heartbeat(stale, LEASE).await);
        lost(
            q.save_resolution(stale, "rec-1", &CallFacts::default())
                .await,
        );
        lost(
            q.plan_object(stale, "intakes/x/rec-1.wav", "audio/wav", None)
                .await,
        );
        lost(q.save_tus_upload(stale, Some("http://tus/1")).await);
        lost(q.save_stored(stale, &"0".repeat(64), 1, None).await);
        lost(q.save_telnyx_deleted(stale).await);
        lost(
            q.plan_move(stale, "unmatched/rec-1.wav", "intakes/x/rec-1.wav")
                .await,
        );
        lost(q.cancel_move(stale).await);
        lost(q.save_moved(stale).await);
        lost(q.save_moved_from_deleted(stale).await);
        let mut tx = q.pool().begin().await.unwrap();
        lost(q.mark_linked(&mut tx, stale).await);
        tx.rollback().await.unwrap();
        lost(q.complete(stale).await);
        assert_eq!(
            q.complete_batch(std::slice::from_ref(stale)).await.unwrap(),
            [Completed::LeaseLost]
        );
        lost(q.retry(stale, &JobError::retryable("x"), LEASE).await);
        lost(q.release(stale).await);
        lost(
            q.finish_unsuccessfully(stale, JobState::Failed, "permanent", "x")
                .await,
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_stale_worker_cannot_change_a_job_it_lost(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let stale = one_claimed(&q, "w1").await.lease().unwrap();
        expire_lease(&q, stale.job_id).await;
        q.rescue_expired_leases().await.unwrap();
        let fresh = one_claimed(&q, "w2").await.lease().unwrap();

        assert_every_write_is_refused(&q, &stale).await;

        let job = q.get(stale.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.locked_by.as_deref(), Some("w2"));
        q.complete(&fresh).await.unwrap();
        assert_eq!(
            q.get(stale.job_id).await.unwrap().unwrap().state,
            JobState::Succeeded
        );
    }

    /// Cancel, requeue (attempts back to 0) and a re-claim by the same
    /// worker recreate the old (id, worker, attempt) triple: the first
    /// lease must still match nothing.
    #[sqlx::test(migrations = false)]
    async fn a_lease_cancelled_requeued_and_reclaimed_by_the_same_worker_stays_fenced_out(
        pool: PgPool,
    ) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let stale = one_claimed(&q, "w1").await.lease().unwrap();
        q.cancel(stale.job_id).await.unwrap();
        q.requeue(stale.job_id).await.unwrap();
        let fresh = one_claimed(&q, "w1").await.lease().unwrap();
        assert_eq!(fresh.job_id, stale.job_id);
        assert_eq!(
            (&fresh.worker, fresh.attempt),
            (&stale.worker, stale.attempt)
        );

        assert_every_write_is_refused(&q, &stale).await;

        let job = q.get(stale.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
        assert!(job.resolved_at.is_none() && job.object_path.is_none());
        assert_eq!(job.attempts, 1);
        q.heartbeat(&fresh, LEASE).await.unwrap();
        q.complete(&fresh).await.unwrap();
    }
}
