//! The steps of one job. Each step is idempotent and recorded on the job
//! before the next starts, so a retry resumes where the last attempt
//! stopped and never makes a second copy:
//!
//! 1. resolve: recording id, numbers, duration, times from the Recordings
//!    API (the real webhook lacks them);
//! 2. match: the intake, via `client_state` or phone number + time;
//! 3. store: stream the file from Telnyx into the bucket, hash and count it
//!    on the way, verify the stored size; an object already at the path is
//!    adopted only if its SHA-256 is the source's, else replaced. A
//!    recording stored under `unmatched/` whose intake was found later (a
//!    requeue, an operator's attach) is moved (`relocate`): copied into the
//!    intake's own folder and checked against the recorded SHA-256 before
//!    the link, its `unmatched/` original deleted after it, as playback
//!    signs only the own folder;
//! 4. link: point the intake at the object;
//! 5. delete at Telnyx (optional, only after 3 and 4, and only when step 3
//!    proved the stored bytes the whole recording: a known source length
//!    equal to the bytes stored and, for WAV, a header that agrees). A
//!    delete that fails leaves the job succeeded (the recording plays) and
//!    owes the delete, which `cleanup` retries apart.
//!
//! A `call.recording.error` job takes none of these steps: it finds its
//! intake exactly and ends `failed` with Telnyx's reason
//! (`recording_error`).
//!
//! This file keeps the sequence; each step is a file of its own
//! (`resolve`, `matching`, `store`, `relocate`, `link`, `delete`), and
//! `errors` says what a provider's failure means for the job. The matching
//! rules are plain code in `rules`, apart from the SQL on the host's tables
//! in `intakes`.

mod cleanup;
mod delete;
mod errors;
pub mod intakes;
mod link;
mod matching;
mod recording_error;
mod relocate;
mod resolve;
mod rules;
mod store;
pub mod transfer;
mod wav;

use std::time::Instant;

use crate::config::{Config, PipelineConfig};
use crate::jobs::{Job, JobContext, JobError, JobHandler, Lease, Outcome, Queue};
use crate::providers::storage_api::{StorageClient, StorageError};
use crate::providers::telnyx_api::{Recording, TelnyxClient, TelnyxError};

pub use self::store::object_path;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Telnyx(#[from] TelnyxError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct Pipeline {
    telnyx: TelnyxClient,
    storage: StorageClient,
    opts: PipelineConfig,
}

impl Pipeline {
    pub fn new(telnyx: TelnyxClient, storage: StorageClient, opts: PipelineConfig) -> Self {
        Self {
            telnyx,
            storage,
            opts,
        }
    }

    pub fn from_config(config: &Config) -> Result<Self, PipelineError> {
        Ok(Self::new(
            TelnyxClient::from_config(config)?,
            StorageClient::from_config(config)?,
            config.pipeline.clone(),
        ))
    }
}

impl JobHandler for Pipeline {
    async fn handle(&self, job: Job, ctx: JobContext) -> Result<Outcome, JobError> {
        let mut run = Run {
            p: self,
            job,
            queue: ctx.queue,
            lease: ctx.lease,
            fresh: None,
            replaced: false,
        };
        run.execute().await
    }

    async fn sweep(&self, queue: &Queue, alerter: Option<&crate::ops::alerts::Alerter>) {
        if let Err(e) = self.sweep_telnyx_cleanups(queue, alerter).await {
            tracing::warn!(error = %e, "clean-up sweep failed; trying again on the next poll");
        }
    }
}

/// One attempt at one job.
struct Run<'a> {
    p: &'a Pipeline,
    job: Job,
    queue: Queue,
    lease: Lease,
    /// The recording as last fetched in this attempt, with fresh URLs.
    fresh: Option<(Instant, Recording)>,
    /// A foreign object at the recording's path was already replaced in
    /// this attempt: a second one is not chased in a loop.
    replaced: bool,
}

/// The sequence of the steps; each step is an `impl Run` of its own file.
impl Run<'_> {
    async fn execute(&mut self) -> Result<Outcome, JobError> {
        // No recording to fetch: it never was made. Only its intake's
        // playback state changes.
        if self.job.event_type == crate::webhook::event::RECORDING_ERROR {
            return self.recording_error().await;
        }
        if self.job.resolved_at.is_none()
            && let Some(outcome) = self.resolve().await?
        {
            return Ok(outcome);
        }
        let unmatched = match (self.job.intake_id, &self.job.object_path) {
            (Some(_), _) => None,
            // Stored under unmatched/ already (a requeued unmatched job):
            // match again. A match moves the object into the intake's
            // folder before the link (`relocate`); no match ends the job
            // unmatched again with the new reason.
            (None, Some(_)) if self.job.stored_at.is_some() => self.match_intake().await?,
            // Planned as unmatched by an earlier attempt, upload unfinished:
            // keep that path rather than match late and leave an orphan
            // (possibly partial) copy behind, and give the reason saved with
            // it. Not `last_error`: that is whatever interrupted the earlier
            // attempt (a timeout, a crash).
            (None, Some(_)) => Some(
                self.job
                    .unmatched_reason
                    .clone()
                    .unwrap_or_else(|| "no intake matched in an earlier attempt".to_owned()),
            ),
            (None, None) => self.match_intake().await?,
        };
        if self.job.stored_at.is_none()
            && let Some(outcome) = self.store(unmatched.as_deref()).await?
        {
            return Ok(outcome);
        }
        if let Some(reason) = unmatched {
            return Ok(Outcome::Unmatched { reason });
        }
        if self.job.linked_at.is_none() {
            match self.move_and_link().await {
                Ok(()) => {}
                // A planned move that can no longer end in a link is
                // undone, so the job names the one object that holds the
                // recording (`relocate`).
                Err(e @ JobError::Permanent { .. }) if self.job.moved_from.is_some() => {
                    return Err(self.undo_move(e).await?);
                }
                Err(e) => return Err(e),
            }
        }
        if self.job.moved_from.is_some() && self.job.moved_from_deleted_at.is_none() {
            self.delete_moved_original().await?;
        }
        if self.p.opts.delete_from_telnyx && self.job.telnyx_deleted_at.is_none() {
            self.delete_at_telnyx().await?;
        }
        Ok(Outcome::Succeeded)
    }

    async fn move_and_link(&mut self) -> Result<(), JobError> {
        if self.needs_move() {
            self.move_into_intake_folder().await?;
        }
        self.link().await
    }

    fn recording_id(&self) -> Result<&str, JobError> {
        self.job
            .recording_id
            .as_deref()
            .ok_or_else(|| JobError::permanent("job has no recording id after resolution"))
    }
}

/// `intakes.recording_duration` is whole seconds.
fn duration_secs(job: &Job) -> Option<i32> {
    job.call
        .duration_millis
        // The duration comes from Telnyx's API: a negative one is not
        // written, and an absurd one saturates instead of overflowing (a
        // panic in debug builds, a negative number in release).
        .filter(|ms| *ms >= 0)
        .map(|ms| i32::try_from(ms.saturating_add(500) / 1000).unwrap_or(i32::MAX))
}
