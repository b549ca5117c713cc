//! Step 5 (optional, only after the recording is stored and linked):
//! delete it at Telnyx, and only with proof from step 3 that the stored
//! bytes are the whole recording. Without it the recording stays at Telnyx
//! (it still plays from the bucket) and the job says why.

use tracing::{info, warn};

use super::Run;
use super::errors::telnyx_failure;
use crate::jobs::JobError;

impl Run<'_> {
    pub(super) async fn delete_at_telnyx(&mut self) -> Result<(), JobError> {
        if !self.job.source_complete {
            let reason = self.job.telnyx_kept_reason.as_deref().unwrap_or(
                "stored by a release that did not prove the stored bytes the whole recording",
            );
            warn!(
                reason,
                "recording kept at Telnyx: the stored copy is not proven complete"
            );
            crate::metrics::metrics().kept_at_telnyx.inc();
            return Ok(());
        }
        let recording_id = self.recording_id()?.to_owned();
        self.p
            .telnyx
            .delete_recording(&recording_id)
            .await
            .map_err(telnyx_failure)?;
        self.queue.save_telnyx_deleted(&self.lease).await?;
        info!("recording deleted at Telnyx");
        Ok(())
    }
}
