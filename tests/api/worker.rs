//! The worker loop with test handlers (the real pipeline has its own tests).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::testing;
use futures_util::future::BoxFuture;
use recording_relay::jobs::backoff::Backoff;
use recording_relay::jobs::{
    Job, JobContext, JobError, JobHandler, JobState, NewJob, Outcome, Queue, Worker, WorkerOptions,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::eventually;

type HandlerFn =
    dyn Fn(Job, JobContext) -> BoxFuture<'static, Result<Outcome, JobError>> + Send + Sync;

#[derive(Clone)]
struct FnHandler(Arc<HandlerFn>);

impl JobHandler for FnHandler {
    fn handle(
        &self,
        job: Job,
        ctx: JobContext,
    ) -> impl std::future::Future<Output = Result<Outcome, JobError>> + Send {
        (self.0)(job, ctx)
    }
}

fn handler<F, Fut>(f: F) -> FnHandler
where
    F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome, JobError>> + Send + 'static,
{
    FnHandler(Arc::new(move |job, ctx| Box::pin(f(job, ctx))))
}

fn options(id: &str) -> WorkerOptions {
    WorkerOptions {
        worker_id: id.to_owned(),
        concurrency: 4,
        // Long on purpose: tests that pass must have been woken by NOTIFY.
        poll_interval: Duration::from_secs(3600),
        lease: Duration::from_secs(3),
        shutdown_timeout: Duration::from_millis(500),
        backoff: Backoff {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(60),
        },
        alerter: None,
    }
}

fn job(id: &str) -> NewJob {
    NewJob {
        event_id: id.to_owned(),
        event_type: "call.recording.saved".to_owned(),
        event: serde_json::json!({}),
        max_attempts: 5,
        ..NewJob::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("worker stops in time")
            .unwrap();
    }
}

fn start(queue: &Queue, h: FnHandler, opts: WorkerOptions) -> Running {
    let shutdown = CancellationToken::new();
    let worker = Worker::new(queue.clone(), h, opts);
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    Running { shutdown, handle }
}

async fn state_of(queue: &Queue, event_id: &str) -> Option<JobState> {
    queue
        .get_by_event_id(event_id)
        .await
        .unwrap()
        .map(|j| j.state)
}

async fn wait_for_state(queue: &Queue, event_id: &str, state: JobState) -> bool {
    eventually(Duration::from_secs(10), || async {
        state_of(queue, event_id).await == Some(state)
    })
    .await
}

#[sqlx::test(migrations = false)]
async fn notify_wakes_the_worker_without_waiting_for_the_poll(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let w = start(
        &queue,
        handler(move |_, _| {
            let s = s.clone();
            async move {
                s.notify_one();
                Ok(Outcome::Succeeded)
            }
        }),
        options("w1"),
    );
    assert!(eventually(Duration::from_secs(5), || is_listening(&queue)).await);

    let t0 = Instant::now();
    queue.enqueue(&job("ev-1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("picked up long before the one-hour poll");
    let pickup = t0.elapsed();
    assert!(wait_for_state(&queue, "ev-1", JobState::Succeeded).await);
    let job = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert!(job.locked_by.is_none() && job.finished_at.is_some());
    eprintln!("pickup latency: {pickup:?}");
    w.stop().await;
}

#[sqlx::test(migrations = false)]
async fn errors_are_recorded_by_kind(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let w = start(
        &queue,
        handler(|job, _| async move {
            match job.event_id.as_str() {
                "retry" => Err(JobError::Retryable {
                    message: "telnyx answered 503".into(),
                    retry_after: Some(Duration::from_secs(30)),
                }),
                "permanent" => Err(JobError::permanent("recording not found at Telnyx (404)")),
                "unmatched" => Ok(Outcome::Unmatched {
                    reason: "no intake for this call".into(),
                }),
                _ => panic!("boom"),
            }
        }),
        options("w1"),
    );
    for id in ["retry", "permanent", "unmatched", "panics"] {
        queue.enqueue(&job(id)).await.unwrap();
    }
    assert!(wait_for_state(&queue, "permanent", JobState::Failed).await);
    assert!(wait_for_state(&queue, "unmatched", JobState::Unmatched).await);
    let pending_with_error = |id: &'static str| {
        let queue = queue.clone();
        async move {
            queue
                .get_by_event_id(id)
                .await
                .unwrap()
                .is_some_and(|j| j.state == JobState::Pending && j.last_error.is_some())
        }
    };
    assert!(eventually(Duration::from_secs(10), || pending_with_error("retry")).await);
    assert!(eventually(Duration::from_secs(10), || pending_with_error("panics")).await);

    let retry = queue.get_by_event_id("retry").await.unwrap().unwrap();
    let wait = retry.next_run_at - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::seconds(25),
        "retry-after honoured: {wait}"
    );
    let panicked = queue.get_by_event_id("panics").await.unwrap().unwrap();
    assert!(
        panicked
            .last_error
            .unwrap()
            .contains("handler panicked: boom")
    );
    let permanent = queue.get_by_event_id("permanent").await.unwrap().unwrap();
    assert_eq!(permanent.attempts, 1);
    assert_eq!(
        permanent.last_error.as_deref(),
        Some("recording not found at Telnyx (404)")
    );
    w.stop().await;
}

#[sqlx::test(migrations = false)]
async fn shutdown_lets_quick_jobs_finish_and_releases_slow_ones(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let in_handler = Arc::new(AtomicUsize::new(0));
    let count = in_handler.clone();
    let w = start(
        &queue,
        handler(move |job, _| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let work = if job.event_id == "quick" { 200 } else { 60_000 };
                tokio::time::sleep(Duration::from_millis(work)).await;
                Ok(Outcome::Succeeded)
            }
        }),
        options("w1"),
    );
    queue.enqueue(&job("quick")).await.unwrap();
    queue.enqueue(&job("slow")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_handler.load(Ordering::SeqCst) == 2
        })
        .await
    );

    w.stop().await; // grace period 500 ms
    assert_eq!(state_of(&queue, "quick").await, Some(JobState::Succeeded));
    let slow = queue.get_by_event_id("slow").await.unwrap().unwrap();
    assert_eq!(slow.state, JobState::Pending, "released, not left running");
    assert_eq!(slow.attempts, 0, "a release does not count the attempt");
    assert!(slow.next_run_at <= chrono::Utc::now());
}

/// Sets its flag when dropped: shows a handler's future was abandoned.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[sqlx::test(migrations = false)]
async fn a_worker_that_loses_its_lease_stops_and_writes_nothing(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let w = start(
        &queue,
        handler(move |_, _| {
            let guard = DropFlag(d.clone());
            async move {
                std::future::pending::<()>().await;
                drop(guard);
                Ok(Outcome::Succeeded)
            }
        }),
        options("w1"),
    );
    queue.enqueue(&job("ev-1")).await.unwrap();
    assert!(wait_for_state(&queue, "ev-1", JobState::Running).await);
    // Another worker took the job over (as after a rescue).
    sqlx::query("UPDATE recording_relay.recording_jobs SET locked_by = 'w2'")
        .execute(queue.pool())
        .await
        .unwrap();
    // Heartbeats run every lease/3 = 1 s; the next one notices and the
    // handler is abandoned.
    assert!(
        eventually(Duration::from_secs(5), || async {
            dropped.load(Ordering::SeqCst)
        })
        .await
    );
    let j = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.locked_by.as_deref(), Some("w2"), "w1 wrote nothing");
    w.stop().await;
    let j = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert_eq!(
        j.locked_by.as_deref(),
        Some("w2"),
        "shutdown released nothing it did not own"
    );
}

#[sqlx::test(migrations = false)]
async fn a_crashed_workers_job_is_picked_up_by_another_after_the_lease(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    queue.enqueue(&job("ev-1")).await.unwrap();
    // "Crash": claim and never heartbeat.
    let claimed = queue
        .claim("crashed", 1, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);

    let mut opts = options("w2");
    opts.poll_interval = Duration::from_millis(200); // the rescuer runs on the poll tick
    let w = start(
        &queue,
        handler(|_, _| async { Ok(Outcome::Succeeded) }),
        opts,
    );
    let t0 = Instant::now();
    assert!(wait_for_state(&queue, "ev-1", JobState::Succeeded).await);
    let recovered_in = t0.elapsed();
    assert!(recovered_in < Duration::from_secs(5), "{recovered_in:?}");
    let job = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    assert_eq!(job.errors[0]["kind"], "lease_expired");
    w.stop().await;
}

async fn is_listening(queue: &Queue) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(queue.pool())
    .await
    .unwrap();
    n > 0
}

#[sqlx::test(migrations = false)]
async fn many_quick_jobs_complete_in_batches_each_exactly_once(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event)
         SELECT 'bulk-' || g, 'call.recording.saved', '{}' FROM generate_series(1, 300) g",
    )
    .execute(queue.pool())
    .await
    .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mut opts = options("w1");
    opts.concurrency = 16;
    let w = start(
        &queue,
        handler(move |_, _| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok(Outcome::Succeeded) }
        }),
        opts,
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            queue.count_by_state().await.unwrap() == vec![(JobState::Succeeded, 300)]
        })
        .await,
        "{:?}",
        queue.count_by_state().await.unwrap()
    );
    w.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 300);
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM recording_relay.recording_jobs")
            .fetch_one(queue.pool())
            .await
            .unwrap();
    assert_eq!(max_attempts, 1);
}

/// A worker of one slot whose handler, for `ev-1` only, locks the job's own
/// row from another transaction: that job's completion waits until the
/// test lets go ([`Held::release`]). Records the order the handler ran in.
struct Held {
    worker: Running,
    tx: Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>>,
    ran: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Held {
    async fn start(queue: &Queue) -> Held {
        let tx: Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>> =
            Arc::default();
        let ran = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (q, h, r) = (queue.clone(), tx.clone(), ran.clone());
        let mut opts = options("w1");
        opts.concurrency = 1;
        let worker = start(
            queue,
            handler(move |job, _| {
                let (q, h, r) = (q.clone(), h.clone(), r.clone());
                async move {
                    if job.event_id == "ev-1" {
                        let mut tx = q.pool().begin().await.unwrap();
                        sqlx::query(
                            "SELECT 1 FROM recording_relay.recording_jobs WHERE id = $1 FOR NO KEY UPDATE",
                        )
                        .bind(job.id)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                        *h.lock().await = Some(tx);
                    }
                    r.lock().unwrap().push(job.event_id.clone());
                    Ok(Outcome::Succeeded)
                }
            }),
            opts,
        );
        queue.enqueue(&job("ev-1")).await.unwrap();
        assert!(
            eventually(Duration::from_secs(10), || async {
                tx.lock().await.is_some()
            })
            .await
        );
        Held { worker, tx, ran }
    }

    async fn release(&self) {
        self.tx
            .lock()
            .await
            .take()
            .unwrap()
            .rollback()
            .await
            .unwrap();
    }

    fn ran(&self) -> Vec<String> {
        self.ran.lock().unwrap().clone()
    }
}

/// Found by `bench queue`: a job kept its slot until its completion had
/// committed, so each worker alternated one claim with one completion and
/// PostgreSQL idled between them. The slot is free once the handler is
/// done; the completion is written behind it, and a worker holds at most
/// twice as many leases as it has slots.
#[sqlx::test(migrations = false)]
async fn a_worker_runs_its_next_job_while_the_last_ones_completion_is_written(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let held = Held::start(&queue).await;
    queue.enqueue(&job("ev-2")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            held.ran().contains(&"ev-2".to_owned())
        })
        .await,
        "the second job ran while the first one's completion waited"
    );
    assert_eq!(state_of(&queue, "ev-1").await, Some(JobState::Running));
    // Two leases for one slot: no third claim until a completion commits.
    queue.enqueue(&job("ev-3")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state_of(&queue, "ev-3").await, Some(JobState::Pending));

    held.release().await;
    for ev in ["ev-1", "ev-2", "ev-3"] {
        assert!(
            wait_for_state(&queue, ev, JobState::Succeeded).await,
            "{ev}"
        );
    }
    assert_eq!(held.ran(), ["ev-1", "ev-2", "ev-3"]);
    held.worker.stop().await;
}

/// A completion still waiting when shutdown begins is written before the
/// worker returns (within the shutdown window), not left for the lease to
/// expire and the job to run again.
#[sqlx::test(migrations = false)]
async fn shutdown_writes_the_completions_still_owed(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let held = Held::start(&queue).await;
    let Held { worker, .. } = &held;
    worker.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !worker.handle.is_finished(),
        "the worker waits for the completion it owes"
    );
    assert_eq!(state_of(&queue, "ev-1").await, Some(JobState::Running));
    held.release().await;
    let Held { worker, .. } = held;
    worker.stop().await;
    assert_eq!(state_of(&queue, "ev-1").await, Some(JobState::Succeeded));
}

#[sqlx::test(migrations = false)]
async fn a_success_reported_after_the_lease_was_lost_writes_nothing(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let q = queue.clone();
    let w = start(
        &queue,
        handler(move |job, _| {
            let q = q.clone();
            async move {
                // Another worker takes the job over while this one works.
                sqlx::query(
                    "UPDATE recording_relay.recording_jobs SET locked_by = 'w2' WHERE id = $1",
                )
                .bind(job.id)
                .execute(q.pool())
                .await
                .unwrap();
                Ok(Outcome::Succeeded)
            }
        }),
        options("w1"),
    );
    queue.enqueue(&job("ev-1")).await.unwrap();
    // The handler ran and its completion went through the batch.
    assert!(
        eventually(Duration::from_secs(10), || async {
            queue
                .get_by_event_id("ev-1")
                .await
                .unwrap()
                .is_some_and(|j| j.locked_by.as_deref() == Some("w2"))
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.stop().await;
    let j = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert_eq!(
        j.state,
        JobState::Running,
        "the stale completion matched nothing"
    );
    assert_eq!(j.locked_by.as_deref(), Some("w2"));
    assert!(j.finished_at.is_none());
}

/// A claim waiting on a lock when shutdown starts commits once the lock is
/// free. The worker must wait for it and give back what it took, uncounted:
/// otherwise the job stays `running` for a whole lease, and one on its last
/// attempt ends `failed` without ever having run.
#[sqlx::test(migrations = false)]
async fn a_claim_in_flight_at_shutdown_is_released_with_the_attempt_uncounted(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    queue
        .enqueue(&NewJob {
            max_attempts: 1,
            ..job("ev-1")
        })
        .await
        .unwrap();
    // The claim's UPDATE (not its parse, which a table lock would hold up
    // instead) waits for an advisory lock this test holds.
    sqlx::raw_sql(
        "CREATE FUNCTION public.hold_claims() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.state = 'running' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER hold_claims BEFORE UPDATE ON recording_relay.recording_jobs
             FOR EACH ROW EXECUTE FUNCTION public.hold_claims();",
    )
    .execute(queue.pool())
    .await
    .unwrap();
    let mut locker = queue.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *locker)
        .await
        .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let w = start(
        &queue,
        handler(move |_, _| {
            r.store(true, Ordering::SeqCst);
            async { Ok(Outcome::Succeeded) }
        }),
        options("w1"),
    );
    let claims_waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'active'
               AND wait_event_type = 'Lock' AND query LIKE 'WITH picked AS%'",
        )
        .fetch_one(queue.pool())
        .await
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            claims_waiting().await == 1
        })
        .await,
        "the worker's claim waits on the advisory lock"
    );
    w.shutdown.cancel();
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *locker)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.handle)
        .await
        .expect("worker stops in time")
        .unwrap();
    let claims_running = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'active'
               AND query LIKE 'WITH picked AS%'",
        )
        .fetch_one(queue.pool())
        .await
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            claims_running().await == 0
        })
        .await
    );
    let job = queue.get_by_event_id("ev-1").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempts),
        (JobState::Pending, 0),
        "{:?}",
        job.last_error
    );
    assert!(job.locked_by.is_none());
    assert!(
        !ran.load(Ordering::SeqCst),
        "shutdown started before the claim returned"
    );
}

fn alerting(id: &str, sink: &crate::helpers::AlertSink) -> WorkerOptions {
    let mut opts = options(id);
    opts.alerter = Some(
        recording_relay::ops::alerts::Alerter::new(&sink.url(), Duration::from_secs(5)).unwrap(),
    );
    opts
}

/// Issue #19: only the worker that ended a job alerted, after it wrote the
/// result itself. A last attempt that the lease rescuer ended `failed`
/// (its worker crashed) never alerted.
#[sqlx::test(migrations = false)]
async fn a_last_attempt_failed_by_lease_rescue_alerts(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let mut last = job("ev-last");
    last.max_attempts = 1;
    queue.enqueue(&last).await.unwrap();
    // "Crash" on the last attempt: claim and never heartbeat.
    queue
        .claim("crashed", 1, Duration::from_millis(100))
        .await
        .unwrap();
    let sink = crate::helpers::AlertSink::start().await;
    let mut opts = alerting("w2", &sink);
    opts.poll_interval = Duration::from_millis(200); // the rescuer runs on the poll tick
    let w = start(
        &queue,
        handler(|_, _| async { Ok(Outcome::Succeeded) }),
        opts,
    );
    let alert = sink.next().await;
    let job = queue.get_by_event_id("ev-last").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(alert["job_id"], job.id);
    assert_eq!(alert["state"], "failed");
    assert!(
        alert["last_error"]
            .as_str()
            .unwrap()
            .contains("stopped heartbeating"),
        "{alert}"
    );
    w.stop().await;
}

/// Issue #19: a job ended `failed` by another process (or by this one,
/// whose commit of the result was lost in a connection reset, so it saw an
/// error and then a lost lease) never alerted: no process both wrote the
/// result and knew it had.
#[sqlx::test(migrations = false)]
async fn a_job_failed_by_a_process_that_died_before_alerting_still_alerts(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    queue.enqueue(&job("ev-other")).await.unwrap();
    let lease = queue
        .claim("gone", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0)
        .lease()
        .unwrap();
    queue
        .finish_unsuccessfully(&lease, JobState::Failed, "permanent", "recording gone")
        .await
        .unwrap();
    // ...and "gone" stops here, before any alert.
    let sink = crate::helpers::AlertSink::start().await;
    let w = start(
        &queue,
        handler(|_, _| async { Ok(Outcome::Succeeded) }),
        alerting("w2", &sink),
    );
    let alert = sink.next().await;
    assert_eq!(alert["job_id"], lease.job_id);
    assert_eq!(alert["state"], "failed");
    assert_eq!(alert["last_error"], "recording gone");
    w.stop().await;
}

/// A requeued job that fails again is a new failure: it alerts again, and
/// two workers alert each failure once.
#[sqlx::test(migrations = false)]
async fn each_failure_of_a_requeued_job_alerts_once(pool: PgPool) {
    let queue = Queue::new(testing::prepare(pool).await);
    let sink = crate::helpers::AlertSink::start().await;
    let fails = || handler(|_, _| async { Err(JobError::permanent("recording gone")) });
    let w1 = start(&queue, fails(), alerting("w1", &sink));
    let w2 = start(&queue, fails(), alerting("w2", &sink));
    queue.enqueue(&job("ev-again")).await.unwrap();
    let first = sink.next().await;
    assert_eq!(first["state"], "failed");
    let id = first["job_id"].as_i64().unwrap();
    queue.requeue(id).await.unwrap();
    let second = sink.next().await;
    assert_eq!(second["job_id"], id);
    let job = queue.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.errors.as_array().unwrap().len(), 3, "{:?}", job.errors);
    w1.stop().await;
    w2.stop().await;
    assert!(sink.try_next().is_none(), "one alert per failure");
}
