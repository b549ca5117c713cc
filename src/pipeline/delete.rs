//! Step 5 (optional, only after the recording is stored and linked):
//! delete it at Telnyx.

use tracing::info;

use super::errors::telnyx_failure;
use super::{Run, written};
use crate::jobs::JobError;

impl Run<'_> {
    pub(super) async fn delete_at_telnyx(&mut self) -> Result<(), JobError> {
        let recording_id = self.recording_id()?.to_owned();
        self.p
            .telnyx
            .delete_recording(&recording_id)
            .await
            .map_err(telnyx_failure)?;
        written(self.queue.save_telnyx_deleted(&self.lease).await?)?;
        info!("recording deleted at Telnyx");
        Ok(())
    }
}
