//! A worker's slots: the jobs whose handler runs (at most `concurrency`),
//! and behind them the successes whose completion is still being written.
//!
//! A slot is free as soon as its handler is done: the job's task hands its
//! completion to [`Behind`] at that moment and ends, so the next claim goes
//! out while the last batch of completions commits. When a job kept its
//! slot until its completion had committed, each worker alternated one
//! claim with one completion and PostgreSQL idled between them (`bench
//! queue`, BENCHMARKS.md, "Each change of issue #23"). What waits behind is
//! bounded too: the worker holds at most `2 × concurrency` leases (running
//! or completing), so a database slow to take completions slows the claims
//! as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

/// How many jobs the next claim may take: a free slot for each, and no
/// more than `2 × concurrency` leases held in all.
fn free_slots(concurrency: usize, running: usize, completing: usize) -> usize {
    concurrency
        .saturating_sub(running)
        .min((2 * concurrency).saturating_sub(running + completing))
}

pub(super) struct Slots {
    concurrency: usize,
    running: JoinSet<()>,
    behind: Behind,
}

/// The completions being written behind the slots. A job's own task
/// spawns its completion here the moment its handler succeeds, so the
/// write never waits on the claim loop.
#[derive(Clone)]
pub(super) struct Behind {
    tasks: TaskTracker,
    /// Counted down before `written` is notified, so that the claim loop,
    /// woken, sees the room the completion left.
    pending: Arc<AtomicUsize>,
    written: Arc<Notify>,
    /// Given up at the end of the shutdown window.
    give_up: CancellationToken,
}

impl Behind {
    pub(super) fn write<F>(&self, completion: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let (pending, written, give_up) = (
            self.pending.clone(),
            self.written.clone(),
            self.give_up.clone(),
        );
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                () = completion => {}
                () = give_up.cancelled() => {}
            }
            pending.fetch_sub(1, Ordering::SeqCst);
            written.notify_one();
        });
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

impl Slots {
    pub(super) fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: JoinSet::new(),
            behind: Behind {
                tasks: TaskTracker::new(),
                pending: Arc::default(),
                written: Arc::default(),
                give_up: CancellationToken::new(),
            },
        }
    }

    pub(super) fn behind(&self) -> &Behind {
        &self.behind
    }

    pub(super) fn free(&self) -> usize {
        free_slots(self.concurrency, self.running.len(), self.behind.pending())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty() && self.behind.pending() == 0
    }

    pub(super) fn running(&self) -> usize {
        self.running.len()
    }

    pub(super) fn completing(&self) -> usize {
        self.behind.pending()
    }

    /// Starts a claimed job's run.
    pub(super) fn run<F>(&mut self, run: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.running.spawn(run);
    }

    /// Waits until a run or a completion ends, then reaps every other run
    /// that has ended too, so the next claim takes as many jobs as it can
    /// in one statement. Returns whether that made room for a claim: a
    /// completion written while the slots had room already does not (a
    /// claim for it would be one more statement per job, and an empty one).
    /// Cancel-safe: it only awaits `join_next` and a `Notify`.
    pub(super) async fn settle(&mut self) -> bool {
        let before = self.free();
        tokio::select! {
            Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                log_join_error(joined);
            }
            () = self.behind.written.notified(), if self.behind.pending() > 0 => {}
            else => return false,
        }
        while let Some(joined) = self.running.try_join_next() {
            log_join_error(joined);
        }
        self.free() > before
    }

    /// Waits for every run (at shutdown).
    pub(super) async fn runs_ended(&mut self) {
        while let Some(joined) = self.running.join_next().await {
            log_join_error(joined);
        }
    }

    /// Waits for every completion (at shutdown, once no run is left to
    /// add one).
    pub(super) async fn completions_written(&self) {
        self.behind.tasks.close();
        self.behind.tasks.wait().await;
    }

    /// The end of the shutdown window: what still runs or waits is given
    /// up, and its lease expires for another worker.
    pub(super) fn give_up(&mut self) {
        self.running.abort_all();
        self.behind.give_up.cancel();
    }
}

fn log_join_error(joined: Result<(), JoinError>) {
    if let Err(e) = joined {
        error!(error = %e, "job task failed unexpectedly");
    }
}

#[cfg(test)]
mod tests {
    use super::free_slots;

    #[test]
    fn a_slot_is_free_once_its_handler_is_done_up_to_twice_the_concurrency_in_leases() {
        assert_eq!(free_slots(4, 0, 0), 4);
        assert_eq!(free_slots(4, 4, 0), 0, "every handler busy");
        assert_eq!(
            free_slots(4, 0, 4),
            4,
            "completions waiting leave slots free"
        );
        assert_eq!(free_slots(4, 2, 4), 2, "at most 8 leases");
        assert_eq!(free_slots(4, 1, 7), 0);
        assert_eq!(free_slots(4, 0, 9), 0, "over the bound: nothing");
        assert_eq!(free_slots(1, 0, 1), 1);
        assert_eq!(free_slots(1, 0, 2), 0);
    }
}
