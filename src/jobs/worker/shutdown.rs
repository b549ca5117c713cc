//! Shutdown: a claim in flight when it begins is given back, and jobs
//! still running get `shutdown_timeout` to finish before they are released.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Worker;
use super::slots::Slots;
use crate::jobs::{Job, JobHandler, QueueError};

/// After the grace period: the time the releases and the completions still
/// owed get, together (part of `STOP_MARGIN` in `config::worker`).
const STOP_WINDOW: Duration = Duration::from_secs(5);

impl<H: JobHandler> Worker<H> {
    /// A claim in flight when shutdown starts still commits (dropping the
    /// future does not stop the statement; the pool drains the connection),
    /// so wait for it and give back what it took, the attempt uncounted.
    /// Bounded: a claim stuck on a lock must not hold up shutdown forever;
    /// whatever it takes after that comes back when its lease expires.
    pub(super) async fn give_back_claim(
        &self,
        claim: impl Future<Output = Result<Vec<Job>, QueueError>>,
    ) {
        let jobs = match tokio::time::timeout(self.opts.shutdown_timeout, claim).await {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(e)) => {
                warn!(error = %e, "the claim in flight at shutdown failed");
                return;
            }
            Err(_) => {
                warn!(
                    "the claim in flight at shutdown did not finish in time; jobs it took return when their lease expires"
                );
                return;
            }
        };
        for job in jobs {
            let Some(lease) = job.lease() else { continue };
            // A lease lost meanwhile (cancelled) is given back all the same.
            match self.queue.release(&lease).await {
                Ok(()) | Err(QueueError::LeaseLost) => {
                    info!(job.id = job.id, "job claimed as shutdown began; released")
                }
                Err(e) => {
                    warn!(job.id = job.id, error = %e, "could not release a job claimed as shutdown began; it returns when its lease expires");
                }
            }
        }
    }

    /// Lets running jobs finish for `shutdown_timeout`, then releases the
    /// rest; the completions still owed are written meanwhile. The releases
    /// and the completions share one window of [`STOP_WINDOW`] after the
    /// grace period: what is still running or unwritten after it is given
    /// up, and its lease expires for another worker.
    pub(super) async fn drain(
        &self,
        mut slots: Slots,
        hard_stop: CancellationToken,
        mut completer: JoinHandle<()>,
    ) {
        if slots.running() > 0 {
            info!(
                jobs = slots.running(),
                timeout = ?self.opts.shutdown_timeout,
                "shutting down: waiting for in-flight jobs"
            );
            let finished =
                tokio::time::timeout(self.opts.shutdown_timeout, slots.runs_ended()).await;
            if finished.is_err() {
                warn!(
                    jobs = slots.running(),
                    "shutdown grace period over: releasing unfinished jobs"
                );
                // Each job releases itself on cancellation: one short UPDATE.
                hard_stop.cancel();
            }
        }
        let ended = tokio::time::timeout(STOP_WINDOW, async {
            slots.runs_ended().await;
            slots.completions_written().await;
            let _ = (&mut completer).await;
        })
        .await;
        if ended.is_err() {
            error!(
                running = slots.running(),
                completing = slots.completing(),
                "could not release or record every job in time; they run again when their leases expire"
            );
            slots.give_up();
            completer.abort();
        }
    }
}
