//! The clean-up sweep (issue #21 item 6): deletes at Telnyx that failed
//! after the recording was stored, verified and linked are owed on the
//! succeeded job (`delete.rs`), and every worker's poll retries them here,
//! apart from the job queue, with a backoff of their own. After
//! [`ALERT_AFTER`] failed tries one alert goes out, of its own kind
//! (`recording_relay.telnyx_cleanup_failed`), saying that the recording is
//! safe and plays; the tries go on, and a later success clears the debt.

use std::time::Duration;

use tracing::{error, info, warn};

use super::Pipeline;
use super::delete::cleanup_delay;
use crate::jobs::{Queue, QueueError};
use crate::metrics::metrics;
use crate::ops::alerts::{Alerter, JobAlert};

/// Failed tries (the pipeline's own included) before the clean-up alert:
/// with the backoff, about half an hour of a Telnyx that refuses.
pub(crate) const ALERT_AFTER: i32 = 5;
/// How long a claimed clean-up is one sweep's: longer than a delete and an
/// alert with their retries can take.
const CLAIM: Duration = Duration::from_secs(300);
/// Owed deletes claimed per statement; the next poll takes the rest.
const BATCH: i64 = 20;

impl Pipeline {
    /// One sweep: each owed delete whose time has come is tried once.
    /// Returns how many were cleared.
    pub(crate) async fn sweep_telnyx_cleanups(
        &self,
        queue: &Queue,
        alerter: Option<&Alerter>,
    ) -> Result<usize, QueueError> {
        if !self.opts.delete_from_telnyx {
            // Turned off since: the debt stays listed, nothing is deleted.
            return Ok(0);
        }
        let owed = queue.claim_telnyx_cleanups(BATCH, CLAIM).await?;
        let mut cleared = 0;
        for cleanup in &owed {
            let job = &cleanup.job;
            let Some(recording_id) = job.recording_id.as_deref() else {
                continue;
            };
            let e = match self.telnyx.delete_recording(recording_id).await {
                Ok(()) => {
                    if queue.telnyx_cleanup_done(cleanup).await? {
                        info!(
                            job.id = job.id,
                            recording.id = recording_id,
                            "owed delete at Telnyx done"
                        );
                        cleared += 1;
                    }
                    continue;
                }
                Err(e) => e,
            };
            metrics().provider_error("telnyx", e.kind());
            metrics().telnyx_cleanup_failed.inc();
            let attempts = cleanup.telnyx_delete_attempts.saturating_add(1);
            let message = e.to_string();
            let mut alerted = false;
            if attempts >= ALERT_AFTER && cleanup.telnyx_cleanup_alerted_at.is_none() {
                let alert = JobAlert::telnyx_cleanup_failed(job, attempts, &message);
                alerted = match alerter {
                    Some(alerter) => match alerter.send(&alert).await {
                        Ok(()) => true,
                        Err(e) => {
                            error!(job.id = job.id, error = %e.without_url(), "clean-up alert failed; sent again on the next failure");
                            false
                        }
                    },
                    None => true,
                };
                if alerted {
                    error!(
                        job.id = job.id,
                        recording.id = recording_id,
                        attempts,
                        last_error = %message,
                        "recording plays, but its copy at Telnyx could not be deleted (clean-up, not a failed job)"
                    );
                }
            }
            let retry_in = cleanup_delay(attempts, &e);
            warn!(job.id = job.id, attempts, retry_in = ?retry_in, error = %message, "owed delete at Telnyx failed again");
            queue
                .telnyx_cleanup_failed(cleanup, retry_in, &message, alerted)
                .await?;
        }
        let pending = queue.telnyx_cleanups_pending().await?;
        metrics().telnyx_cleanup_pending.set(pending);
        Ok(cleared)
    }
}
