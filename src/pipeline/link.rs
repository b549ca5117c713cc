//! Step 4: point the intake at the stored object.

use tracing::info;

use super::errors::storage_failure;
use super::intakes::{self, IntakeWrite};
use super::{Run, duration_secs};
use crate::jobs::JobError;

impl Run<'_> {
    pub(super) async fn link(&mut self) -> Result<(), JobError> {
        let (Some(intake), Some(path)) = (self.job.intake_id, self.job.object_path.clone()) else {
            return Err(JobError::permanent(
                "cannot link: no intake or no stored object",
            ));
        };
        // Never link a path playback would refuse (issue #19 review, L6):
        // the intake's column would name an object with no link record, a
        // recording that does not play and that nothing tells apart from
        // one that does. Only the intake's own folder is linked; `relocate`
        // moves an `unmatched/` recording there first.
        if !crate::object_paths::is_intake_recording(&path, intake) {
            return Err(JobError::permanent(format!(
                "cannot link: {path} is not in intake {intake}'s own folder, which is all \
                 playback plays; the recording is stored at {path}"
            )));
        }
        let recording_id = self.recording_id()?.to_owned();
        let url = self
            .p
            .storage
            .authenticated_url(&path)
            .map_err(storage_failure)?;
        let duration = duration_secs(&self.job);
        // Retrying cannot bring an intake back or take it from another
        // recording: stop at once and say where the recording is.
        match intakes::link(
            &self.queue,
            &self.lease,
            intake,
            &recording_id,
            duration,
            &path,
            &url,
        )
        .await?
        {
            IntakeWrite::Written => {}
            IntakeWrite::Gone => {
                return Err(JobError::permanent(format!(
                    "cannot link: intake {intake} was deleted after the match; \
                     the recording is stored at {path}"
                )));
            }
            IntakeWrite::TakenBy(other) => {
                return Err(JobError::permanent(format!(
                    "cannot link: intake {intake} now holds recording {other}; \
                     this recording is stored at {path}"
                )));
            }
        }
        self.job.linked_at = Some(chrono::Utc::now());
        crate::metrics::metrics().recording_linked(self.job.created_at);
        info!(intake.id = %intake, "intake linked to the recording");
        Ok(())
    }
}
