//! The worker loop: wake on NOTIFY (or the fallback poll), claim as many jobs
//! as there are free slots, run each under a heartbeated lease, record the
//! result with a fenced update, and drain on shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use futures_util::FutureExt;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::backoff::Backoff;
use super::queue::NOTIFY_CHANNEL;
use super::{Job, JobContext, JobError, JobHandler, JobState, Lease, Outcome, Queue, QueueError};
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

/// How one claimed job's run ended, before it is written back.
enum RunEnd {
    Finished(Result<Outcome, JobError>),
    /// The shutdown grace period ran out: give the job back.
    Interrupted,
    /// Another worker owns the job now; write nothing.
    LeaseLost,
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
        let hard_stop = CancellationToken::new();
        let mut in_flight = JoinSet::new();
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            worker.id = %self.opts.worker_id,
            concurrency = self.opts.concurrency,
            "worker started"
        );

        loop {
            let free = self.opts.concurrency.saturating_sub(in_flight.len());
            if free > 0 {
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
                self.spawn_claimed(claimed, &mut in_flight, &completions, &hard_stop);
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    log_join_error(joined);
                    // Free every slot that is already free, so the next claim
                    // takes as many jobs as it can in one statement.
                    while let Some(joined) = in_flight.try_join_next() {
                        log_join_error(joined);
                    }
                }
                () = wake.notified() => {}
                _ = poll.tick() => {
                    self.rescue_expired_leases().await;
                    // Also alerts that other processes owe, and sends that
                    // failed: the poll is the sweep's clock.
                    self.alerts_due.notify_one();
                }
            }
        }

        self.drain(in_flight, hard_stop).await;
        // Every job task has ended, so every completion has been answered;
        // the completer stops once its last sender is gone.
        drop(completions);
        let _ = completer.await;
        // Alerts still owed stay owed: the next worker to sweep sends them.
        alerts_stop.cancel();
        let _ = alerts.await;
        listener_stop.cancel();
        let _ = listener.await;
        info!(worker.id = %self.opts.worker_id, "worker stopped");
    }

    /// A claim in flight when shutdown starts still commits (dropping the
    /// future does not stop the statement; the pool drains the connection),
    /// so wait for it and give back what it took, the attempt uncounted.
    /// Bounded: a claim stuck on a lock must not hold up shutdown forever;
    /// whatever it takes after that comes back when its lease expires.
    async fn give_back_claim(&self, claim: impl Future<Output = Result<Vec<Job>, QueueError>>) {
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
            match self.queue.release(&lease).await {
                Ok(_) => info!(job.id = job.id, "job claimed as shutdown began; released"),
                Err(e) => {
                    warn!(job.id = job.id, error = %e, "could not release a job claimed as shutdown began; it returns when its lease expires");
                }
            }
        }
    }

    fn spawn_claimed(
        &self,
        claimed: Result<Vec<Job>, QueueError>,
        in_flight: &mut JoinSet<()>,
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
                self.alerts_due.clone(),
                self.handler.clone(),
                self.opts.clone(),
                job,
                lease,
                hard_stop.child_token(),
            );
            in_flight.spawn(run.instrument(span));
        }
    }

    async fn rescue_expired_leases(&self) {
        match self.queue.rescue_expired_leases().await {
            Ok(0) => {}
            Ok(n) => warn!(jobs = n, "rescued jobs whose worker stopped heartbeating"),
            Err(e) => warn!(error = %e, "rescuing expired leases failed"),
        }
    }

    async fn drain(&self, mut in_flight: JoinSet<()>, hard_stop: CancellationToken) {
        if in_flight.is_empty() {
            return;
        }
        info!(
            jobs = in_flight.len(),
            timeout = ?self.opts.shutdown_timeout,
            "shutting down: waiting for in-flight jobs"
        );
        let finished = tokio::time::timeout(self.opts.shutdown_timeout, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if finished.is_ok() {
            return;
        }
        warn!(
            jobs = in_flight.len(),
            "shutdown grace period over: releasing unfinished jobs"
        );
        hard_stop.cancel();
        // Each job releases itself on cancellation: one short UPDATE.
        let released = tokio::time::timeout(Duration::from_secs(5), async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if released.is_err() {
            error!(
                jobs = in_flight.len(),
                "could not release every job; their leases will expire"
            );
            in_flight.abort_all();
        }
    }
}

fn log_join_error(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        error!(error = %e, "job task failed unexpectedly");
    }
}

/// Batches the fenced completions of one worker: job tasks hand their lease
/// over and wait for the answer, and one task writes whatever has queued up
/// in a single statement ([`Queue::complete_batch`]), while the next batch
/// queues behind it. Under load that is one round trip and one commit for
/// many jobs; an idle worker's single completion goes out at once. A job
/// keeps its slot until its completion is committed, exactly as before.
#[derive(Clone)]
struct Completions {
    tx: mpsc::Sender<Completion>,
}

struct Completion {
    lease: Lease,
    /// `Some(matched)`, or `None` when the batch statement failed.
    reply: oneshot::Sender<Option<bool>>,
}

/// Upper bound of one completion statement.
const MAX_COMPLETION_BATCH: usize = 1000;

impl Completions {
    fn start(queue: Queue, concurrency: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Completion>(concurrency.max(1));
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, MAX_COMPLETION_BATCH).await > 0 {
                let leases: Vec<Lease> = batch.iter().map(|c| c.lease.clone()).collect();
                match queue.complete_batch(&leases).await {
                    Ok(matched) => {
                        for (c, ok) in batch.drain(..).zip(matched) {
                            let _ = c.reply.send(Some(ok));
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, jobs = batch.len(), "batched completion failed; completing one by one");
                        for c in batch.drain(..) {
                            let _ = c.reply.send(None);
                        }
                    }
                }
            }
        });
        (Self { tx }, task)
    }

    /// The fenced completion of one job: `false` when the lease was lost.
    /// Falls back to a statement of its own when the batch could not be
    /// written, so the caller sees that statement's real error.
    async fn complete(&self, queue: &Queue, lease: &Lease) -> Result<bool, QueueError> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .tx
            .send(Completion {
                lease: lease.clone(),
                reply,
            })
            .await;
        if sent.is_ok()
            && let Ok(Some(matched)) = answer.await
        {
            return Ok(matched);
        }
        queue.complete(lease).await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_job<H: JobHandler>(
    queue: Queue,
    completions: Completions,
    alerts_due: Arc<Notify>,
    handler: Arc<H>,
    opts: Arc<WorkerOptions>,
    job: Job,
    lease: Lease,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let ctx = JobContext {
        queue: queue.clone(),
        lease: lease.clone(),
    };
    debug!("job started");
    let work = AssertUnwindSafe(handler.handle(job, ctx)).catch_unwind();
    let end = tokio::select! {
        result = work => RunEnd::Finished(result.unwrap_or_else(|panic| {
            Err(JobError::retryable(format!("handler panicked: {}", panic_message(&panic))))
        })),
        () = cancel.cancelled() => RunEnd::Interrupted,
        () = keep_lease_alive(&queue, &lease, opts.lease) => RunEnd::LeaseLost,
    };
    let ended = record(&queue, &completions, &opts, &lease, end, started.elapsed()).await;
    if matches!(ended, Some(JobState::Failed | JobState::Unmatched)) {
        alerts_due.notify_one();
    }
}

/// Heartbeats every third of the lease; returns only when the lease is lost:
/// refused by the database, or not renewed for so long (the database is
/// unreachable) that another worker may be rescuing the job by now.
async fn keep_lease_alive(queue: &Queue, lease: &Lease, duration: Duration) {
    let mut every = tokio::time::interval(duration / 3);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    every.tick().await; // the first tick is immediate; the claim just set the lease
    let mut renewed = tokio::time::Instant::now();
    // Stop before the lease can expire, with a margin for clock skew and
    // the rescuer's poll.
    let give_up_after = duration - duration / 6;
    loop {
        every.tick().await;
        match queue.heartbeat(lease, duration).await {
            Ok(true) => renewed = tokio::time::Instant::now(),
            Ok(false) => return,
            Err(e) if renewed.elapsed() >= give_up_after => {
                warn!(error = %e, "heartbeats failing for most of the lease; giving the job up");
                return;
            }
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Writes the result back, retrying briefly over a database blip. If it
/// still fails, the lease expires and the rescuer returns the job. Returns
/// the state written, if this call wrote one.
async fn record(
    queue: &Queue,
    completions: &Completions,
    opts: &WorkerOptions,
    lease: &Lease,
    end: RunEnd,
    took: Duration,
) -> Option<JobState> {
    let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    if matches!(end, RunEnd::LeaseLost) {
        warn!(
            took_ms,
            "lease lost (expired or cancelled): another worker owns the job now"
        );
        return None;
    }
    let write = || write_result(queue, completions, opts, lease, &end);
    let written = write
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_times(4),
        )
        .await;
    let state = match written {
        Ok(Some(state)) => state,
        Ok(None) => {
            warn!(
                took_ms,
                "lease lost before the result was recorded; nothing written"
            );
            return None;
        }
        Err(e) => {
            error!(took_ms, error = %e, "could not record the job's result; it runs again when its lease expires");
            return None;
        }
    };
    crate::metrics::metrics().job_finished(outcome_label(&end, state), took);
    match end {
        RunEnd::Finished(Ok(Outcome::Succeeded)) => info!(took_ms, "job succeeded"),
        RunEnd::Finished(Ok(Outcome::Unmatched { reason })) => {
            error!(took_ms, reason = %reason, "job unmatched: recording stored, no intake found");
        }
        RunEnd::Finished(Ok(Outcome::Duplicate { reason })) => {
            info!(took_ms, reason = %reason, "job is a duplicate; nothing stored");
        }
        RunEnd::Finished(Err(e)) if state == JobState::Pending => {
            warn!(took_ms, error = %e, "job attempt failed; will retry");
        }
        RunEnd::Finished(Err(e)) => error!(took_ms, error = %e, kind = e.kind(), "job failed"),
        RunEnd::Interrupted => info!(took_ms, "job released at shutdown"),
        RunEnd::LeaseLost => {}
    }
    Some(state)
}

fn outcome_label(end: &RunEnd, state: JobState) -> &'static str {
    match (end, state) {
        (RunEnd::Interrupted, _) => "released",
        (RunEnd::Finished(Err(_)), JobState::Pending) => "retry",
        (_, state) => state.as_str(),
    }
}

/// The fenced update for one result; `None` when the lease was lost first.
async fn write_result(
    queue: &Queue,
    completions: &Completions,
    opts: &WorkerOptions,
    lease: &Lease,
    end: &RunEnd,
) -> Result<Option<JobState>, QueueError> {
    let if_written = |ok: bool, state: JobState| ok.then_some(state);
    Ok(match end {
        RunEnd::Finished(Ok(Outcome::Succeeded)) => if_written(
            completions.complete(queue, lease).await?,
            JobState::Succeeded,
        ),
        RunEnd::Finished(Ok(Outcome::Unmatched { reason })) => if_written(
            queue
                .finish_unsuccessfully(lease, JobState::Unmatched, "unmatched", reason)
                .await?,
            JobState::Unmatched,
        ),
        RunEnd::Finished(Ok(Outcome::Duplicate { reason })) => if_written(
            queue
                .finish_unsuccessfully(lease, JobState::Duplicate, "duplicate", reason)
                .await?,
            JobState::Duplicate,
        ),
        RunEnd::Finished(Err(e @ JobError::Permanent { .. })) => if_written(
            queue
                .finish_unsuccessfully(lease, JobState::Failed, e.kind(), &e.to_string())
                .await?,
            JobState::Failed,
        ),
        RunEnd::Finished(Err(e @ JobError::Retryable { retry_after, .. })) => {
            let delay = opts.backoff.delay(lease.attempt, *retry_after);
            queue.retry(lease, e, delay).await?
        }
        RunEnd::Interrupted => if_written(queue.release(lease).await?, JobState::Pending),
        RunEnd::LeaseLost => None,
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Turns NOTIFYs into wake-ups. Runs on its own connection and reconnects
/// forever; after a reconnect it wakes the worker once, since notifications
/// sent while disconnected are lost (the poll covers the gap too).
async fn forward_notifications(pool: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    let mut delays = reconnect_delays();
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    warn!(error = %e, retry_in = ?delay, "LISTEN connection failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        delays = reconnect_delays();
        wake.notify_one();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = listener.try_recv() => match r {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => {
                        warn!("LISTEN connection lost; reconnecting");
                        wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
