//! The worker loop: wake on NOTIFY (or the fallback poll), claim as many jobs
//! as there are free slots, run each under a heartbeated lease, record the
//! result with a fenced update, and drain on shutdown.
//!
//! This file is the claim/dispatch loop; `run.rs` is one job's run (its
//! heartbeat and lease, and the result written back), `slots.rs` counts
//! what runs and what is still being completed, `completions.rs` batches
//! the completions, `shutdown.rs` gives back and drains, and `notify.rs`
//! turns NOTIFYs into wake-ups.

mod completions;
mod notify;
mod run;
mod shutdown;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use self::completions::Completions;
use self::notify::forward_notifications;
use self::run::run_job;
use self::slots::Slots;
use super::backoff::Backoff;
use super::{Job, JobHandler, Queue, QueueError};
use crate::ops::alerts::Alerter;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Written to `locked_by`; unique per process so leases can be told apart.
    pub worker_id: String,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub shutdown_timeout: Duration,
    pub backoff: Backoff,
    /// Told about every job that ends failed or unmatched, whoever ended
    /// it (`alerts::sweep`); without one, the alert is an error log line.
    pub alerter: Option<Alerter>,
}

impl WorkerOptions {
    pub fn from_config(config: &crate::config::Config, worker_id: String) -> Self {
        Self {
            worker_id,
            concurrency: config.worker.concurrency,
            poll_interval: config.worker.poll_interval,
            lease: config.worker.lease,
            shutdown_timeout: config.worker.shutdown_timeout,
            backoff: Backoff {
                base: config.retry.base,
                cap: config.retry.cap,
            },
            alerter: None,
        }
    }
}

/// A process-unique worker id: host, pid and a random suffix (pids repeat
/// across restarts and containers).
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!(
        "{host}:{}:{:06x}",
        std::process::id(),
        fastrand::u32(..0x100_0000)
    )
}

pub struct Worker<H> {
    queue: Queue,
    handler: Arc<H>,
    opts: Arc<WorkerOptions>,
    /// Wakes this worker's alert sweep: on every poll tick, and at once
    /// when one of its jobs ends failed or unmatched.
    alerts_due: Arc<Notify>,
}

impl<H: JobHandler> Worker<H> {
    pub fn new(queue: Queue, handler: H, opts: WorkerOptions) -> Self {
        Self {
            queue,
            handler: Arc::new(handler),
            opts: Arc::new(opts),
            alerts_due: Arc::new(Notify::new()),
        }
    }

    /// Runs until `shutdown` is cancelled, then stops claiming, gives
    /// in-flight jobs `shutdown_timeout` to finish and releases the rest.
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener_stop = CancellationToken::new();
        let listener = tokio::spawn(forward_notifications(
            self.queue.pool().clone(),
            wake.clone(),
            listener_stop.clone(),
        ));
        let (completions, completer) =
            Completions::start(self.queue.clone(), self.opts.concurrency);
        let alerts_stop = CancellationToken::new();
        let alerts = tokio::spawn(crate::ops::alerts::sweep_until(
            self.queue.clone(),
            self.opts.alerter.clone(),
            self.alerts_due.clone(),
            alerts_stop.clone(),
        ));
        // The handler's own sweep (the pipeline's owed deletes at Telnyx),
        // apart from the claim loop: it calls providers.
        let sweep_due = Arc::new(Notify::new());
        let sweeps = tokio::spawn(sweep_until(
            self.handler.clone(),
            self.queue.clone(),
            self.opts.alerter.clone(),
            sweep_due.clone(),
            alerts_stop.clone(),
        ));
        let hard_stop = CancellationToken::new();
        let mut slots = Slots::new(self.opts.concurrency);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            worker.id = %self.opts.worker_id,
            concurrency = self.opts.concurrency,
            "worker started"
        );

        // Whether anything since the last claim may let the next one take a
        // job: a wake-up, the poll, or more room in the slots.
        let mut claim_due = true;
        loop {
            let free = slots.free();
            if free > 0 && claim_due {
                let claim = self
                    .queue
                    .claim(&self.opts.worker_id, free, self.opts.lease);
                tokio::pin!(claim);
                let claimed = tokio::select! {
                    biased;
                    claimed = &mut claim => claimed,
                    () = shutdown.cancelled() => {
                        self.give_back_claim(claim).await;
                        break;
                    }
                };
                self.spawn_claimed(claimed, &mut slots, &completions, &hard_stop);
            }
            claim_due = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                room = slots.settle(), if !slots.is_empty() => room,
                () = wake.notified() => true,
                _ = poll.tick() => {
                    self.rescue_expired_leases().await;
                    // Also alerts that other processes owe, and sends that
                    // failed: the poll is the sweep's clock.
                    self.alerts_due.notify_one();
                    sweep_due.notify_one();
                    true
                }
            };
        }

        // The loop claims no more; each job task and each completion holds
        // its own sender, so the completer stops once the last has ended.
        drop(completions);
        self.drain(slots, hard_stop, completer).await;
        // Alerts still owed stay owed: the next worker to sweep sends them.
        alerts_stop.cancel();
        let _ = alerts.await;
        let _ = sweeps.await;
        listener_stop.cancel();
        let _ = listener.await;
        info!(worker.id = %self.opts.worker_id, "worker stopped");
    }

    fn spawn_claimed(
        &self,
        claimed: Result<Vec<Job>, QueueError>,
        slots: &mut Slots,
        completions: &Completions,
        hard_stop: &CancellationToken,
    ) {
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "claiming jobs failed; retrying on the next wake-up or poll");
                return;
            }
        };
        for job in jobs {
            let Some(lease) = job.lease() else {
                error!(job.id = job.id, "claimed job has no lease; skipping");
                continue;
            };
            // The recording id may only be learned by the pipeline, which
            // records it on this span then.
            let span = info_span!(
                "job",
                job.id = job.id,
                recording.id = tracing::field::Empty,
                attempt = job.attempts,
            );
            if let Some(id) = job.recording_id.as_deref() {
                span.record("recording.id", id);
            }
            let run = run_job(
                self.queue.clone(),
                completions.clone(),
                slots.behind().clone(),
                self.alerts_due.clone(),
                self.handler.clone(),
                self.opts.clone(),
                job,
                lease,
                hard_stop.child_token(),
            );
            slots.run(run.instrument(span));
        }
    }

    async fn rescue_expired_leases(&self) {
        match self.queue.rescue_expired_leases().await {
            Ok(0) => {}
            Ok(n) => warn!(jobs = n, "rescued jobs whose worker stopped heartbeating"),
            Err(e) => warn!(error = %e, "rescuing expired leases failed"),
        }
    }
}

/// Runs the handler's sweep whenever `wake` is notified, until `stop`
/// (cut off mid-sweep: what it claimed is taken over by another worker
/// once the claim runs out).
async fn sweep_until<H: JobHandler>(
    handler: Arc<H>,
    queue: Queue,
    alerter: Option<Alerter>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    on_each_wake(wake, stop, || handler.sweep(&queue, alerter.as_ref())).await;
}

/// Runs `sweep` each time `wake` is notified, until `stop`, which also cuts
/// a sweep off mid-way. The worker's background sweeps (owed alerts, owed
/// clean-ups) are all this loop around a claim-and-act pass.
pub(crate) async fn on_each_wake<F, Fut>(wake: Arc<Notify>, stop: CancellationToken, mut sweep: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = wake.notified() => {}
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = sweep() => {}
        }
    }
}
