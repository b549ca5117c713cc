//! One claimed job's run: the handler under a heartbeated lease, a panic
//! caught as a retryable failure, and the result written back through the
//! lease (or nothing, when the lease was lost). A success is written after
//! the job has given its slot back (`slots.rs`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use super::WorkerOptions;
use super::completions::Completions;
use super::slots::Behind;
use crate::jobs::{
    Job, JobContext, JobError, JobHandler, JobState, Lease, Outcome, Queue, QueueError,
};

/// How one claimed job's run ended, before it is written back.
enum RunEnd {
    Finished(Result<Outcome, JobError>),
    /// The shutdown grace period ran out: give the job back.
    Interrupted,
    /// Another worker owns the job now; write nothing.
    LeaseLost,
}

/// Runs the handler and writes the result; a success is handed to `behind`
/// to be written there, and the slot is free at once.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_job<H: JobHandler>(
    queue: Queue,
    completions: Completions,
    behind: Behind,
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
    if matches!(end, RunEnd::Finished(Ok(Outcome::Succeeded))) {
        // Written through the batch ([`Completions`]) behind the slots, so
        // the worker claims the next jobs while the batch commits. The lease
        // stays the fence; until the batch commits the job is `running` in
        // the table, rescued like any other if this process dies.
        let took = started.elapsed();
        let write = async move {
            record(&queue, &completions, &opts, &lease, end, took).await;
        };
        behind.write(write.instrument(tracing::Span::current()));
        return;
    }
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
            Ok(()) => renewed = tokio::time::Instant::now(),
            Err(QueueError::LeaseLost) => return,
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

/// The fenced update for one result; `None` when the lease was lost first
/// (not an error to retry: another worker owns the job).
async fn write_result(
    queue: &Queue,
    completions: &Completions,
    opts: &WorkerOptions,
    lease: &Lease,
    end: &RunEnd,
) -> Result<Option<JobState>, QueueError> {
    let written = match end {
        RunEnd::Finished(Ok(Outcome::Succeeded)) => completions
            .complete(queue, lease)
            .await
            .map(|()| JobState::Succeeded),
        RunEnd::Finished(Ok(Outcome::Unmatched { reason })) => queue
            .finish_unsuccessfully(lease, JobState::Unmatched, "unmatched", reason)
            .await
            .map(|()| JobState::Unmatched),
        RunEnd::Finished(Ok(Outcome::Duplicate { reason })) => queue
            .finish_unsuccessfully(lease, JobState::Duplicate, "duplicate", reason)
            .await
            .map(|()| JobState::Duplicate),
        RunEnd::Finished(Err(e @ JobError::Permanent { .. })) => queue
            .finish_unsuccessfully(lease, JobState::Failed, e.kind(), &e.to_string())
            .await
            .map(|()| JobState::Failed),
        RunEnd::Finished(Err(e @ JobError::Retryable { retry_after, .. })) => {
            let delay = opts.backoff.delay(lease.attempt, *retry_after);
            queue.retry(lease, e, delay).await
        }
        RunEnd::Interrupted => queue.release(lease).await.map(|()| JobState::Pending),
        RunEnd::LeaseLost => return Ok(None),
    };
    match written {
        Ok(state) => Ok(Some(state)),
        Err(QueueError::LeaseLost) => Ok(None),
        Err(e) => Err(e),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
