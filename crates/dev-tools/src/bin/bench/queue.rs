//! `bench queue`: no-op jobs burned down by the real worker, and
//! PostgreSQL's floor for the same row changes (`--floor`).

use super::*;

/// Does nothing: the queue's own cost is what is measured.
pub(super) struct Noop;

impl JobHandler for Noop {
    async fn handle(&self, _job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        Ok(Outcome::Succeeded)
    }
}

pub(super) fn worker_options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        worker_id: default_worker_id(),
        concurrency,
        poll_interval: Duration::from_secs(5),
        lease: Duration::from_secs(60),
        shutdown_timeout: Duration::from_secs(5),
        backoff: Backoff {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(3600),
        },
        alerter: None,
    }
}

/// A worker process: runs until its stdin closes.
pub(super) async fn queue_worker(
    url: &str,
    concurrency: usize,
    pool_size: u32,
) -> anyhow::Result<()> {
    let mut config = config_for(url);
    config.database.max_connections = pool_size;
    let pool = db::pool(&config)?;
    let stop = CancellationToken::new();
    let worker = Worker::new(Queue::new(pool.clone()), Noop, worker_options(concurrency));
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 16];
    while stdin.read(&mut buf).await.unwrap_or(0) > 0 {}
    stop.cancel();
    run.await?;
    pool.close().await;
    Ok(())
}

pub(super) async fn queue(server: &str, a: &QueueArgs) -> anyhow::Result<()> {
    if a.floor {
        let rate = queue_floor(server, a.jobs).await?;
        println!("RESULT queue sql-floor {rate:.0}");
        return Ok(());
    }
    let jobs_per_s = queue_run(server, a).await?;
    println!(
        "RESULT queue recording-relay {jobs_per_s:.0} ({} processes x concurrency {}, pool {})",
        a.processes, a.concurrency, a.pool
    );
    Ok(())
}

/// Returns jobs per second.
pub(super) async fn queue_run(server: &str, a: &QueueArgs) -> anyhow::Result<f64> {
    let url = fresh_database(server, "bench_queue").await?;
    queue_run_on(server, &url, a).await
}

/// [`queue_run`] on a database that already exists: its other jobs stay,
/// and only this run's (`bench-*`) are counted.
pub(super) async fn queue_run_on(server: &str, url: &str, a: &QueueArgs) -> anyhow::Result<f64> {
    let pool = PgPool::connect(url).await?;
    let t0 = Instant::now();
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event)
         SELECT 'bench-' || g, 'call.recording.saved', '{}'::jsonb
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(a.jobs)?)
    .execute(&pool)
    .await?;
    let added = t0.elapsed();
    say(format!(
        "queue: {} jobs added in one statement in {} ms ({:.0} jobs/s)",
        a.jobs,
        ms(added),
        a.jobs as f64 / added.as_secs_f64()
    ));
    vacuum_analyze(url).await?;

    let me = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut workers: Vec<Child> = Vec::new();
    for _ in 0..a.processes {
        workers.push(
            Command::new(&me)
                .args(["--server", server, "queue-worker", "--database-url", url])
                .args(["--concurrency", &a.concurrency.to_string()])
                .args(["--pool", &a.pool.to_string()])
                .stdin(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?,
        );
    }
    // Cheap: both states have a partial index.
    loop {
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM recording_relay.recording_jobs WHERE state = 'pending')
                 OR EXISTS (SELECT 1 FROM recording_relay.recording_jobs WHERE state = 'running')",
        )
        .fetch_one(&pool)
        .await?;
        if !busy {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "the queue did not drain in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    let worker_cpu: f64 = workers
        .iter()
        .filter_map(|w| w.id().and_then(cpu_seconds))
        .sum();
    let backends: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&pool)
    .await?;
    let postgres_cpu: f64 = backends
        .iter()
        .filter_map(|&pid| cpu_seconds(u32::try_from(pid).ok()?))
        .sum();
    for w in &mut workers {
        drop(w.stdin.take());
    }
    for mut w in workers {
        w.wait().await?;
    }
    let (succeeded, max_attempts): (i64, Option<i32>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), max(attempts)
         FROM recording_relay.recording_jobs WHERE event_id LIKE 'bench-%'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    ensure!(
        succeeded == i64::try_from(a.jobs)?,
        "only {succeeded} of {} jobs succeeded",
        a.jobs
    );
    ensure!(
        max_attempts == Some(1),
        "a job ran more than once ({max_attempts:?} attempts)"
    );
    let jobs_per_s = a.jobs as f64 / took.as_secs_f64();
    say(format!(
        "queue: {} jobs done by {} processes x concurrency {} in {} ms: {jobs_per_s:.0} jobs/s \
         (every job succeeded exactly once); CPU: workers {worker_cpu:.1} s, their PostgreSQL \
         backends {postgres_cpu:.1} s",
        a.jobs,
        a.processes,
        a.concurrency,
        ms(took)
    ));
    Ok(jobs_per_s)
}

/// The least work PostgreSQL can do for N jobs in this table: the claim's
/// and the completion's row changes as two set-wise UPDATEs, one statement
/// and one commit each, no round trips, no worker. Returns jobs per second.
pub(super) async fn queue_floor(server: &str, jobs: u64) -> anyhow::Result<f64> {
    let url = fresh_database(server, "bench_queue_floor").await?;
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event)
         SELECT 'bench-' || g, 'call.recording.saved', '{}'::jsonb
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(jobs)?)
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await?;
    let t0 = Instant::now();
    sqlx::raw_sql(
        "UPDATE recording_relay.recording_jobs SET state = 'running', attempts = attempts + 1, locked_by = 'floor',
             locked_until = now() + interval '60 seconds', updated_at = now()
         WHERE state = 'pending' AND next_run_at <= now()",
    )
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql(
        "UPDATE recording_relay.recording_jobs SET state = 'succeeded', finished_at = now(), locked_by = NULL,
             locked_until = NULL, updated_at = now()
         WHERE state = 'running' AND locked_by = 'floor'",
    )
    .execute(&mut conn)
    .await?;
    let took = t0.elapsed();
    let rate = jobs as f64 / took.as_secs_f64();
    say(format!(
        "queue floor: {jobs} jobs claimed and completed by two set-wise UPDATEs in {} ms: \
         {rate:.0} jobs/s",
        ms(took)
    ));
    Ok(rate)
}
