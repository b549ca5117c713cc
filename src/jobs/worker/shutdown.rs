//! Shutdown: a claim in flight when it begins is given back, and jobs
//! still running get `shutdown_timeout` to finish before they are released.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Worker;
use super::slots::Slots;
use crate::jobs::{Job, JobHandler, QueueError};

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

    /// Lets running jobs finish (or releases them), then writes the
    /// completions still owed.
    pub(super) async fn drain(&self, mut slots: Slots, hard_stop: CancellationToken) {
        if slots.running() > 0 {
            self.runs_ended(&mut slots, hard_stop).await;
        }
        // Successes already reported are written before the worker stops:
        // one batched statement. A completion that cannot be written in
        // time leaves its job to run again once its lease expires.
        let written =
            tokio::time::timeout(Duration::from_secs(5), slots.completions_written()).await;
        if written.is_err() {
            error!(
                jobs = slots.completing(),
                "could not record every finished job; they run again when their leases expire"
            );
        }
    }

    /// Gives the running jobs `shutdown_timeout`, then releases the rest.
    async fn runs_ended(&self, slots: &mut Slots, hard_stop: CancellationToken) {
        info!(
            jobs = slots.running(),
            timeout = ?self.opts.shutdown_timeout,
            "shutting down: waiting for in-flight jobs"
        );
        let finished = tokio::time::timeout(self.opts.shutdown_timeout, slots.runs_ended()).await;
        if finished.is_err() {
            warn!(
                jobs = slots.running(),
                "shutdown grace period over: releasing unfinished jobs"
            );
            hard_stop.cancel();
            // Each job releases itself on cancellation: one short UPDATE.
            let released = tokio::time::timeout(Duration::from_secs(5), slots.runs_ended()).await;
            if released.is_err() {
                error!(
                    jobs = slots.running(),
                    "could not release every job; their leases will expire"
                );
                slots.abort_runs();
            }
        }
    }
}
