//! The move of an attached or late-matched recording from `unmatched/`
//! into the intake's own folder: planned on the job before the copy,
//! undone when the destination holds other bytes, and recorded when the
//! copy is verified and when the original is deleted.

use super::{Queue, QueueError, fenced, is_unique_violation, one_row};
use crate::jobs::Lease;

impl Queue {
    /// A late-matched recording's move is planned: `object_path` becomes
    /// the intake's own folder and `moved_from` keeps the `unmatched/`
    /// object it is copied from, before the copy, so a retry knows both.
    /// Only from `from`: a job already planned (or moved by another
    /// attempt) is not planned twice. Fails with `AlreadyOwned` when
    /// another job owns the destination.
    pub(crate) async fn plan_move(
        &self,
        lease: &Lease,
        from: &str,
        to: &str,
    ) -> Result<(), QueueError> {
        let done = sqlx::query(concat!(
            "UPDATE recording_relay.recording_jobs
             SET moved_from = object_path, object_path = $5, updated_at = now()
             WHERE ",
            lease_fence!(),
            " AND object_path = $4 AND moved_from IS NULL"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => one_row(&done),
            Err(e) if is_unique_violation(&e, "recording_jobs_object_path_key") => {
                Err(self.object_owner(to).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn object_owner(&self, path: &str) -> QueueError {
        let owner: Result<i64, _> = sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs WHERE object_path = $1",
        )
        .bind(path)
        .fetch_one(&self.pool)
        .await;
        match owner {
            Ok(job_id) => QueueError::AlreadyOwned {
                recording: path.to_owned(),
                job_id,
            },
            Err(e) => e.into(),
        }
    }

    /// Undoes a planned move whose destination holds other bytes: the job
    /// names the `unmatched/` object again, where the recording is, so
    /// nothing (an operator, retention) takes the other object for it.
    pub(crate) async fn cancel_move(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(
            concat!(
                fenced_update!("object_path = moved_from, moved_from = NULL"),
                " AND moved_from IS NOT NULL AND moved_at IS NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Undoes a planned move after a permanent failure before the link
    /// (issue #19 review, M2), so the job names the one object that holds
    /// the recording: with `keep_copy`, the verified copy (the original is
    /// gone), else the `unmatched/` original again.
    pub async fn undo_move(&self, lease: &Lease, keep_copy: bool) -> Result<(), QueueError> {
        let done = fenced(
            concat!(
                fenced_update!(
                    "object_path = CASE WHEN $4 THEN object_path ELSE moved_from END,
                     moved_from = NULL, moved_at = NULL"
                ),
                " AND moved_from IS NOT NULL AND linked_at IS NULL"
            ),
            lease,
        )
        .bind(keep_copy)
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// The moved copy holds the recorded bytes: it may be linked.
    pub(crate) async fn save_moved(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(fenced_update!("moved_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        one_row(&done)
    }

    /// The `unmatched/` original of a moved recording is deleted.
    pub(crate) async fn save_moved_from_deleted(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(fenced_update!("moved_from_deleted_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        one_row(&done)
    }

    /// Whether a job other than `job_id` has `path` as its object: a moved
    /// recording's `unmatched/` original is deleted only while none does
    /// (the path is free for another recording once the move is planned).
    pub(crate) async fn object_owned_by_another(
        &self,
        path: &str,
        job_id: i64,
    ) -> Result<bool, QueueError> {
        let owned = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM recording_relay.recording_jobs
                            WHERE object_path = $1 AND id <> $2)",
        )
        .bind(path)
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(owned)
    }
}
