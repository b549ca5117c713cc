//! Step 5 (optional, only after the recording is stored and linked):
//! delete it at Telnyx, and only with proof from step 3 that the stored
//! bytes are the whole recording. Without it the recording stays at Telnyx
//! (it still plays from the bucket) and the job says why.
//!
//! A delete that fails does not fail the job (issue #21 item 6): the
//! recording plays, so the job succeeds, and the delete is owed on its row
//! (`telnyx_delete_due_at`) and retried apart by the clean-up sweep
//! (`cleanup.rs`), which alerts as clean-up, not as a failed job.

use std::time::Duration;

use tracing::{info, warn};

use super::Run;
use crate::jobs::JobError;
use crate::metrics::metrics;
use crate::providers::telnyx_api::TelnyxError;

/// How long an owed delete at Telnyx waits before try `attempts + 1`:
/// doubling from a minute, at most six hours; a provider's own hint
/// (429, 503 with Retry-After) is a floor. Hours, not the job's seconds:
/// nothing waits on it, and a Telnyx that refuses deletes (a key without
/// the right) is not helped by a storm of them.
pub(super) fn cleanup_delay(attempts: i32, e: &TelnyxError) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(9);
    let backoff = (Duration::from_secs(60) * (1 << exponent)).min(Duration::from_secs(6 * 3600));
    let hint = match e {
        TelnyxError::RateLimited { retry_after } => Some(*retry_after),
        TelnyxError::Server { retry_after, .. } => *retry_after,
        _ => None,
    };
    hint.map_or(backoff, |h| {
        backoff.max(h.min(crate::jobs::backoff::MAX_HINT))
    })
}

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
            metrics().kept_at_telnyx.inc();
            return Ok(());
        }
        let recording_id = self.recording_id()?.to_owned();
        match self.p.telnyx.delete_recording(&recording_id).await {
            Ok(()) => {
                self.queue.save_telnyx_deleted(&self.lease).await?;
                info!("recording deleted at Telnyx");
            }
            Err(e) => {
                metrics().provider_error("telnyx", e.kind());
                metrics().telnyx_cleanup_failed.inc();
                let retry_in = cleanup_delay(1, &e);
                self.queue
                    .save_telnyx_delete_owed(&self.lease, retry_in, &e.to_string())
                    .await?;
                warn!(
                    error = %e,
                    retry_in = ?retry_in,
                    "deleting the recording at Telnyx failed; it is stored and linked, so the \
                     job succeeds and the delete is retried apart"
                );
            }
        }
        Ok(())
    }
}
