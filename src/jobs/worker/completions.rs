//! The batching of one worker's fenced completions into one statement.

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::jobs::queue::Completed;
use crate::jobs::{Lease, Queue, QueueError};

/// Batches the fenced completions of one worker: job tasks hand their lease
/// over and wait for the answer, and one task writes whatever has queued up
/// in a single statement ([`Queue::complete_batch`]), while the next batch
/// queues behind it. Under load that is one round trip and one commit for
/// many jobs; an idle worker's single completion goes out at once. The job's
/// slot is free meanwhile (`slots.rs`); its lease fences the write.
#[derive(Clone)]
pub(super) struct Completions {
    tx: mpsc::Sender<Completion>,
}

struct Completion {
    lease: Lease,
    /// What the batch did with this lease, or `None` when the batch
    /// statement failed.
    reply: oneshot::Sender<Option<Completed>>,
}

/// Upper bound of one completion statement.
const MAX_COMPLETION_BATCH: usize = 1000;

impl Completions {
    pub(super) fn start(queue: Queue, concurrency: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Completion>(concurrency.max(1));
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, MAX_COMPLETION_BATCH).await > 0 {
                let leases: Vec<Lease> = batch.iter().map(|c| c.lease.clone()).collect();
                match queue.complete_batch(&leases).await {
                    Ok(completed) => {
                        for (c, done) in batch.drain(..).zip(completed) {
                            let _ = c.reply.send(Some(done));
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

    /// The fenced completion of one job: `LeaseLost` when the lease was
    /// lost. Falls back to a statement of its own when the batch could not
    /// be written, so the caller sees that statement's real error.
    pub(super) async fn complete(&self, queue: &Queue, lease: &Lease) -> Result<(), QueueError> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .tx
            .send(Completion {
                lease: lease.clone(),
                reply,
            })
            .await;
        if sent.is_ok()
            && let Ok(Some(done)) = answer.await
        {
            return done.into_result();
        }
        queue.complete(lease).await
    }
}
