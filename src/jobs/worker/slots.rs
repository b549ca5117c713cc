//! A worker's slots: the jobs whose handler runs (at most `concurrency`),
//! and behind them the successes whose completion is still being written.
//!
//! A slot is free as soon as its handler is done, so the next claim goes
//! out while the last batch of completions commits. When a job kept its
//! slot until its completion had committed, each worker alternated one claim
//! with one completion and PostgreSQL idled between them (`bench queue`,
//! BENCHMARKS.md). The completions waiting are bounded too: when as many
//! wait as there are slots, the worker stops claiming, so a database slow
//! to take completions slows the claims as well.

use tokio::task::{JoinError, JoinSet};
use tracing::error;

use super::run::Completing;

pub(super) struct Slots {
    concurrency: usize,
    running: JoinSet<Option<Completing>>,
    completing: JoinSet<()>,
}

impl Slots {
    pub(super) fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: JoinSet::new(),
            completing: JoinSet::new(),
        }
    }

    /// How many jobs the next claim may take.
    pub(super) fn free(&self) -> usize {
        let running = self.running.len();
        let waiting = running + self.completing.len();
        self.concurrency
            .saturating_sub(running)
            .min((2 * self.concurrency).saturating_sub(waiting))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty() && self.completing.is_empty()
    }

    pub(super) fn running(&self) -> usize {
        self.running.len()
    }

    /// Starts a claimed job's run; what it returns on success is written
    /// once the run has given its slot back.
    pub(super) fn run<F>(&mut self, run: F)
    where
        F: Future<Output = Option<Completing>> + Send + 'static,
    {
        self.running.spawn(run);
    }

    /// Waits until a run or a completion ends, then takes in every other one
    /// that has ended too, so the next claim takes as many jobs as it can in
    /// one statement. Cancel-safe: it only awaits `join_next`.
    pub(super) async fn settle(&mut self) {
        tokio::select! {
            Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                self.ended(joined);
            }
            Some(joined) = self.completing.join_next(), if !self.completing.is_empty() => {
                log_join_error(joined);
            }
            else => return,
        }
        while let Some(joined) = self.running.try_join_next() {
            self.ended(joined);
        }
        while let Some(joined) = self.completing.try_join_next() {
            log_join_error(joined);
        }
    }

    /// Waits for every run (at shutdown); their successes join the
    /// completions.
    pub(super) async fn runs_ended(&mut self) {
        while let Some(joined) = self.running.join_next().await {
            self.ended(joined);
        }
    }

    pub(super) fn abort_runs(&mut self) {
        self.running.abort_all();
    }

    /// Waits for every completion (at shutdown).
    pub(super) async fn completions_written(&mut self) {
        while let Some(joined) = self.completing.join_next().await {
            log_join_error(joined);
        }
    }

    pub(super) fn completing(&self) -> usize {
        self.completing.len()
    }

    fn ended(&mut self, joined: Result<Option<Completing>, JoinError>) {
        match joined {
            Ok(Some(completing)) => {
                self.completing.spawn(completing.write());
            }
            Ok(None) => {}
            Err(e) => log_join_error(Err(e)),
        }
    }
}

fn log_join_error(joined: Result<(), JoinError>) {
    if let Err(e) = joined {
        error!(error = %e, "job task failed unexpectedly");
    }
}
