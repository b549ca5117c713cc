//! The move (part of step 3), for a recording stored under `unmatched/` whose intake was found
//! later (a requeue matched it, or an operator attached it): move it into
//! the intake's own folder before the link, since playback signs only that
//! folder (issue #19). A move is a copy, a check and a delete; each is
//! recorded on the job, so a retry after a crash anywhere resumes without a
//! second copy and never links bytes it has not checked:
//!
//! 1. plan (before the copy): `object_path` becomes
//!    `intakes/{intake}/{file}`, `moved_from` keeps the `unmatched/` path;
//! 2. copy, server-side and never overwriting: a 409 means an object is
//!    there already (an earlier attempt's copy whose answer was lost, or
//!    something else), so it is checked like a fresh copy;
//! 3. check: the destination must hold the size and, streamed back and
//!    hashed, the SHA-256 the job recorded when it stored the recording;
//!    then `moved_at`, and the link (step 4) names the destination. Other
//!    bytes there are never linked nor overwritten: the plan is undone and
//!    the job fails, saying where each is;
//! 4. after the link, the `unmatched/` original is deleted
//!    (`moved_from_deleted_at`). A delete that fails leaves an orphan that is
//!    logged and counted (`orphaned_objects_total`), never a failed job.

use chrono::Utc;
use tracing::{info, warn};
use uuid::Uuid;

use super::errors::storage_failure;
use super::store::format_of;
use super::transfer;
use super::{Run, object_path};
use crate::jobs::{JobError, QueueError};
use crate::metrics::metrics;
use crate::providers::storage_api::StorageError;

const UNMATCHED: &str = "unmatched/";

impl Run<'_> {
    /// Whether the stored object has to move into the intake's folder
    /// before it is linked.
    pub(super) fn needs_move(&self) -> bool {
        self.job.intake_id.is_some()
            && self.job.moved_at.is_none()
            && (self.job.moved_from.is_some()
                || self
                    .job
                    .object_path
                    .as_deref()
                    .is_some_and(|p| p.starts_with(UNMATCHED)))
    }

    /// Steps 1-3 of the move; a planned move resumes at the copy.
    pub(super) async fn move_into_intake_folder(&mut self) -> Result<(), JobError> {
        let Some(intake) = self.job.intake_id else {
            return Err(JobError::permanent("cannot move the recording: no intake"));
        };
        let (from, to) = match (self.job.moved_from.clone(), self.job.object_path.clone()) {
            (Some(from), Some(to)) => (from, to),
            (None, Some(from)) => {
                let to = self.plan_move(intake, &from).await?;
                (from, to)
            }
            (_, None) => {
                return Err(JobError::permanent(
                    "cannot move the recording: the job has no stored object",
                ));
            }
        };
        let source_missing = match self.p.storage.copy_object(&from, &to).await {
            Ok(()) => {
                info!(from, to, "copied the recording into the intake's folder");
                false
            }
            Err(StorageError::Duplicate) => {
                info!(
                    to,
                    "an object is already at the destination: checking its bytes"
                );
                false
            }
            // Only a copy an earlier attempt made can still hold it.
            Err(StorageError::NotFound(_)) => {
                warn!(
                    from,
                    "the unmatched/ original is missing: checking the destination"
                );
                true
            }
            Err(e) => return Err(storage_failure(e)),
        };
        if let Err(e) = self.check_moved(&from, &to, source_missing).await {
            if let MoveCheck::OtherBytes(message) = e {
                // The job names the recording's real place again, so no
                // one takes the other object for it; nothing is deleted.
                self.queue.cancel_move(&self.lease).await?;
                self.job.object_path = Some(from);
                self.job.moved_from = None;
                return Err(JobError::permanent(message));
            }
            return Err(e.into_job_error());
        }
        self.queue.save_moved(&self.lease).await?;
        self.job.moved_at = Some(Utc::now());
        Ok(())
    }

    async fn plan_move(&mut self, intake: Uuid, from: &str) -> Result<String, JobError> {
        let format = format_of(from).ok_or_else(|| {
            JobError::permanent(format!("cannot move {from}: not a recording's file name"))
        })?;
        let to = object_path(Some(intake), self.recording_id()?, format);
        match self.queue.plan_move(&self.lease, from, &to).await {
            Ok(()) => {}
            Err(QueueError::AlreadyOwned { job_id, .. }) => {
                return Err(JobError::permanent(format!(
                    "cannot move the recording to {to}: job {job_id} owns that object; \
                     the recording stays at {from}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.job.moved_from = Some(from.to_owned());
        self.job.object_path = Some(to.clone());
        info!(from, to, "planned the move into the intake's folder");
        Ok(to)
    }

    /// Whether `to` holds exactly the recording the job stored: its size,
    /// then its SHA-256, streamed back in constant memory (the same size is
    /// not enough: another recording can have it).
    async fn check_moved(
        &self,
        from: &str,
        to: &str,
        source_missing: bool,
    ) -> Result<(), MoveCheck> {
        let (Some(sha256), Some(size)) = (self.job.object_sha256.as_deref(), self.job.object_size)
        else {
            return Err(MoveCheck::Failed(JobError::permanent(
                "cannot move the recording: the job recorded no size or hash of it",
            )));
        };
        let size = u64::try_from(size).map_err(|_| {
            MoveCheck::Failed(JobError::permanent("recorded object size is negative"))
        })?;
        let info = self
            .p
            .storage
            .object_info(to)
            .await
            .map_err(|e| MoveCheck::Failed(storage_failure(e)))?;
        let Some(info) = info else {
            return Err(MoveCheck::Failed(if source_missing {
                JobError::permanent(format!(
                    "the recording is neither at {from} nor at {to}; it may still be at Telnyx"
                ))
            } else {
                JobError::retryable(format!("{to} is missing right after the copy"))
            }));
        };
        let other = |bytes: u64, hash: &str| {
            MoveCheck::OtherBytes(format!(
                "{to} holds other bytes ({bytes} bytes, sha256 {hash}) than the recording \
                 ({size} bytes, sha256 {sha256}): not linked, not overwritten; the recording \
                 stays at {from}. Remove the object at {to}, then requeue the job"
            ))
        };
        if info.size != size {
            return Err(other(info.size, "not read"));
        }
        let stored = self
            .p
            .storage
            .download(to)
            .await
            .map_err(|e| MoveCheck::Failed(storage_failure(e)))?;
        let digest = transfer::digest_of(transfer::body_stream(stored))
            .await
            .map_err(|e| {
                MoveCheck::Failed(JobError::retryable(format!(
                    "reading back the moved object failed: {e}"
                )))
            })?;
        if digest.size != size || digest.sha256 != sha256 {
            return Err(other(digest.size, &digest.sha256));
        }
        info!(
            to,
            bytes = size,
            sha256,
            "the copy in the intake's folder is the recording"
        );
        Ok(())
    }

    /// Step 4 of the move, after the link: delete the `unmatched/` original.
    /// Never fails the job on the storage side: what cannot be deleted is
    /// logged and counted as an orphan.
    pub(super) async fn delete_moved_original(&mut self) -> Result<(), JobError> {
        let Some(from) = self.job.moved_from.clone() else {
            return Ok(());
        };
        // Once the move was planned the path was free: a recording whose id
        // sanitizes to the same name may have taken it since. Not ours.
        if self
            .queue
            .object_owned_by_another(&from, self.job.id)
            .await?
        {
            warn!(
                from,
                "another job owns the unmatched/ path of the moved recording now: left alone"
            );
            return Ok(());
        }
        match self.p.storage.delete_object(&from).await {
            Ok(()) | Err(StorageError::NotFound(_)) => {
                self.queue.save_moved_from_deleted(&self.lease).await?;
                self.job.moved_from_deleted_at = Some(Utc::now());
                info!(
                    from,
                    "deleted the unmatched/ original of the moved recording"
                );
            }
            Err(e) => {
                metrics().provider_error("storage", e.kind());
                metrics().orphaned_objects.inc();
                warn!(
                    from,
                    error = %e,
                    "could not delete the unmatched/ original of the moved recording: \
                     left behind as an orphan; the job goes on"
                );
            }
        }
        Ok(())
    }
}

impl Run<'_> {
    /// A permanent failure after the move was planned (the intake was
    /// deleted or took another recording, the copy could not be checked):
    /// no link will follow, so the job must name the one object that holds
    /// the recording. Left planned, it named the copy while the original
    /// stayed under `unmatched/`, and retention (`unresolved_for`) deleted
    /// the copy and left the original with no row naming it (issue #19
    /// review, M2). Never deletes the only copy: while the original is
    /// there, the verified copy is deleted and the job names the original;
    /// when the original is gone, the job names the verified copy. Returns
    /// the job's error, saying where the recording is now.
    pub(super) async fn undo_move(&mut self, failure: JobError) -> Result<JobError, JobError> {
        let (Some(from), Some(to)) = (self.job.moved_from.clone(), self.job.object_path.clone())
        else {
            return Ok(failure);
        };
        let original_there = self
            .p
            .storage
            .object_info(&from)
            .await
            .map_err(storage_failure)?
            .is_some();
        let verified_copy = self.job.moved_at.is_some();
        let keep_copy = !original_there && verified_copy;
        if original_there && verified_copy {
            // Ours: planned under the job's unique object path and checked
            // against its recorded hash.
            match self.p.storage.delete_object(&to).await {
                Ok(()) | Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(storage_failure(e)),
            }
        }
        self.queue.undo_move(&self.lease, keep_copy).await?;
        let at = if keep_copy { to } else { from };
        self.job.object_path = Some(at.clone());
        self.job.moved_from = None;
        self.job.moved_at = None;
        warn!(at, "the planned move was undone after a permanent failure");
        Ok(JobError::permanent(format!(
            "{failure}; the move into the intake's folder was undone: the recording is at {at}"
        )))
    }
}

/// Why a moved object was not accepted.
enum MoveCheck {
    /// Other bytes at the destination: never linked, the plan is undone.
    OtherBytes(String),
    Failed(JobError),
}

impl MoveCheck {
    fn into_job_error(self) -> JobError {
        match self {
            MoveCheck::OtherBytes(message) => JobError::permanent(message),
            MoveCheck::Failed(e) => e,
        }
    }
}
