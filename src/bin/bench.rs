//! Benchmark harness (issue #6). Not part of the daemon.
//!
//! `cargo build --release --bins && target/release/bench <scenario>`, or
//! `bench/run-all.sh` for every scenario with its peers and the table.
//!
//! - `queue`: N no-op jobs, bulk-inserted with one INSERT … SELECT
//!   generate_series, burned down by P worker processes (this binary's
//!   hidden `queue-worker`: the real `jobs::Worker`, claim/lease/fenced
//!   completion, with a handler that does nothing). The peers
//!   (graphile-worker, pg-boss) run from `bench/queue.sh`.
//! - `latency`: sequential enqueue → handler start through LISTEN/NOTIFY.
//! - `ingest`: signed webhooks against the release `recording-relay listen`
//!   process, closed loop beside `pgbench` running the same INSERT with the
//!   same concurrency on the same database, then fixed rates.
//! - `relay`: recordings relayed from the Telnyx simulator into the storage
//!   simulator by the release `recording-relay work` process, beside a raw
//!   loopback copy of the same bytes (`bench/raw-copy.sh`, curl).
//! - `smoke`: all of the above, small, to prove the harness works.
//!
//! Every scenario makes a fresh `bench_*` database and runs `VACUUM ANALYZE`
//! before it starts. Lines starting with `TABLE|` are the results table's
//! rows (`bench/run-all.sh` collects them); nothing here asserts a speed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use recording_relay::config::Config;
use recording_relay::db;
use recording_relay::jobs::backoff::Backoff;
use recording_relay::jobs::worker::default_worker_id;
use recording_relay::jobs::{
    Job, JobContext, JobError, JobHandler, NewJob, Outcome, Queue, Worker, WorkerOptions,
};
use recording_relay::sim::{
    SimAudio, SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig,
};
use recording_relay::testing;
use recording_relay::webhook::event::Envelope;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "recording-relay benchmarks (see BENCHMARKS.md)"
)]
struct Cli {
    /// PostgreSQL server; each scenario creates its own `bench_*` database.
    #[arg(
        long,
        env = "BENCH_SERVER_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    server: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Queue throughput: N no-op jobs through P worker processes.
    Queue(QueueArgs),
    /// Pickup latency: sequential enqueue → handler start.
    Latency {
        #[arg(long, default_value_t = 1000)]
        samples: usize,
    },
    /// Webhook ingest against the release listener, beside pgbench.
    Ingest(IngestArgs),
    /// Streaming relay through the simulators, beside a raw curl copy.
    Relay(RelayArgs),
    /// Every scenario, small: proves the harness works in seconds.
    Smoke,
    /// One worker process of the `queue` scenario (internal).
    #[command(hide = true)]
    QueueWorker {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        pool: u32,
    },
}

#[derive(clap::Args, Clone)]
struct QueueArgs {
    #[arg(long, default_value_t = 200_000)]
    jobs: u64,
    /// Worker processes (graphile-worker's perf test runs 4).
    #[arg(long, default_value_t = 4)]
    processes: usize,
    /// Jobs in flight per process (`worker.concurrency`).
    #[arg(long, default_value_t = 24)]
    concurrency: usize,
    /// Pool size per process (`database.max_connections`).
    #[arg(long, default_value_t = 10)]
    pool: u32,
    /// Measure PostgreSQL's floor instead: the same row changes as two
    /// set-wise UPDATEs, no worker.
    #[arg(long)]
    floor: bool,
}

#[derive(clap::Args, Clone)]
struct IngestArgs {
    /// Fixed request rates to try, one step each.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,4000")]
    rates: Vec<u32>,
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Connections of the closed-loop run and pgbench clients.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    closed_secs: u64,
}

#[derive(clap::Args, Clone)]
struct RelayArgs {
    #[arg(long, default_value_t = 10)]
    recordings: usize,
    /// Size of each recording in MB (10^6 bytes).
    #[arg(long, default_value_t = 200)]
    size_mb: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let server = cli.server.trim_end_matches('/').to_owned();
        match cli.scenario {
            Scenario::Queue(a) => queue(&server, &a).await,
            Scenario::Latency { samples } => latency(&server, samples).await,
            Scenario::Ingest(a) => ingest(&server, &a).await,
            Scenario::Relay(a) => relay(&server, &a).await,
            Scenario::Smoke => smoke(&server).await,
            Scenario::QueueWorker {
                database_url,
                concurrency,
                pool,
            } => queue_worker(&database_url, concurrency, pool).await,
        }
    })
}

// ------------------------------------------------------------------ common

fn say(line: impl AsRef<str>) {
    println!("bench: {}", line.as_ref());
}

/// One row of the results table (collected by bench/run-all.sh).
fn table_row(
    scenario: &str,
    measure: &str,
    ours: &str,
    reference: &str,
    ratio: &str,
    target: &str,
) {
    println!("TABLE|{scenario}|{measure}|{ours}|{reference}|{ratio}|{target}");
}

/// Drops and recreates `name`, with the stand-in host tables and the
/// daemon's migrations, then `VACUUM ANALYZE`. Returns its URL.
async fn fresh_database(server: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let url = format!("{server}/{name}");
    let pool = PgPool::connect(&url).await?;
    db::create_demo_host_schema(&pool).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    vacuum_analyze(&url).await?;
    Ok(url)
}

async fn vacuum_analyze(url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await?;
    Ok(())
}

fn config_for(url: &str) -> Config {
    let mut c = Config::default();
    c.database.url = Some(url.to_owned().into());
    c
}

/// The daemon beside this binary. Under `cargo run --bin bench` (which
/// builds only this binary) it is built first, with the same profile, so a
/// stale daemon is never measured.
fn daemon_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let me = std::env::current_exe()?;
    let daemon = me.with_file_name("recording-relay");
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = me
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "release");
        BUILT
            .get_or_init(|| {
                let mut build = std::process::Command::new(cargo);
                build.args(["build", "--quiet", "--bin", "recording-relay"]);
                if release {
                    build.arg("--release");
                }
                match build.current_dir(env!("CARGO_MANIFEST_DIR")).status() {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(format!("building recording-relay failed: {s}")),
                    Err(e) => Err(format!("running cargo: {e}")),
                }
            })
            .clone()
            .map_err(anyhow::Error::msg)?;
    }
    ensure!(
        daemon.exists(),
        "{} is missing: run `cargo build --release --bins` first",
        daemon.display()
    );
    Ok(daemon)
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn ratio(ours: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}", ours / reference)
    } else {
        "-".to_owned()
    }
}

/// Peak resident set (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time (user + system) a process used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A signed `call.recording.saved` body, as Telnyx sends it.
fn webhook_body(event_id: &str, call_session_id: &str) -> Vec<u8> {
    testing::recording_saved_event(event_id, call_session_id)
        .to_string()
        .into_bytes()
}

fn new_job(event_id: &str, call_session_id: &str) -> NewJob {
    let body = webhook_body(event_id, call_session_id);
    Envelope::parse(&body)
        .expect("a well-formed event")
        .into_job(12)
}

// ------------------------------------------------------------------- queue

/// Does nothing: the queue's own cost is what is measured.
struct Noop;

impl JobHandler for Noop {
    async fn handle(&self, _job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        Ok(Outcome::Succeeded)
    }
}

fn worker_options(concurrency: usize) -> WorkerOptions {
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
async fn queue_worker(url: &str, concurrency: usize, pool_size: u32) -> anyhow::Result<()> {
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

async fn queue(server: &str, a: &QueueArgs) -> anyhow::Result<()> {
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
async fn queue_run(server: &str, a: &QueueArgs) -> anyhow::Result<f64> {
    let url = fresh_database(server, "bench_queue").await?;
    let pool = PgPool::connect(&url).await?;
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
    vacuum_analyze(&url).await?;

    let me = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut workers: Vec<Child> = Vec::new();
    for _ in 0..a.processes {
        workers.push(
            Command::new(&me)
                .args(["--server", server, "queue-worker", "--database-url", &url])
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
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), max(attempts) FROM recording_relay.recording_jobs",
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
async fn queue_floor(server: &str, jobs: u64) -> anyhow::Result<f64> {
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

// ----------------------------------------------------------------- latency

/// Tells the bench when each job's handler started.
struct Starts(mpsc::UnboundedSender<(String, Instant)>);

impl JobHandler for Starts {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        let _ = self.0.send((job.event_id, Instant::now()));
        Ok(Outcome::Succeeded)
    }
}

async fn latency(server: &str, samples: usize) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_latency").await?;
    let config = config_for(&url);
    let pool = db::pool(&config)?;
    let queue = Queue::new(pool.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    // Production defaults: concurrency 4, a 5 s fallback poll, so every
    // pickup below comes from the NOTIFY.
    let opts = WorkerOptions::from_config(&config, default_worker_id());
    let worker = tokio::spawn(Worker::new(queue.clone(), Starts(tx), opts).run(stop.clone()));

    let mut measure = async |n: usize, label: &str| -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{label}-{i}");
            let job = new_job(&id, &format!("session-{id}"));
            let t0 = Instant::now();
            queue.enqueue(&job).await?;
            let (got, started) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a job was not picked up within 10 s")?
                .context("the worker stopped")?;
            ensure!(got == id, "picked up {got}, expected {id}");
            out.push(started.duration_since(t0));
        }
        Ok(out)
    };
    measure(20, "warmup").await?;
    let mut lat = measure(samples, "latency").await?;
    stop.cancel();
    worker.await?;
    pool.close().await;
    lat.sort();
    let (p50, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        *lat.last().unwrap_or(&Duration::ZERO),
    );
    say(format!(
        "latency: {samples} sequential enqueue -> handler start: p50 {} ms, p99 {} ms, max {} ms",
        ms(p50),
        ms(p99),
        ms(max)
    ));
    table_row(
        "latency",
        "pickup p50",
        &format!("{} ms", ms(p50)),
        "-",
        "-",
        "< 5 ms",
    );
    table_row(
        "latency",
        "pickup p99",
        &format!("{} ms", ms(p99)),
        "-",
        "-",
        "< 20 ms",
    );
    table_row(
        "latency",
        "pickup max",
        &format!("{} ms", ms(max)),
        "-",
        "-",
        "-",
    );
    Ok(())
}

// ------------------------------------------------------------------ ingest

/// The webhook INSERT exactly as `Queue::enqueue` runs it, for pgbench.
/// Unique event ids from the client id and a random uuid.
const PGBENCH_SCRIPT: &str = "INSERT INTO recording_relay.recording_jobs (event_id, event_type, occurred_at, event, recording_id, call_session_id, call_control_id, call_leg_id, connection_id, client_state, from_number, to_number, duration_millis, channels, recording_started_at, recording_ended_at, max_attempts) VALUES ('pgbench-' || :client_id || '-' || gen_random_uuid(), 'call.recording.saved', '2025-11-19T10:34:00Z'::timestamptz, :event::jsonb, NULL, :session, 'v3:' || :session, 'leg-' || :session, '1494404757140276705', NULL, NULL, NULL, NULL, 'single', '2025-11-19T10:30:00Z'::timestamptz, '2025-11-19T10:33:00Z'::timestamptz, 12) ON CONFLICT DO NOTHING RETURNING id;\n";

/// pgbench's tps with `clients` connections for `secs`, or `None` when
/// pgbench is not installed.
async fn pgbench(url: &str, clients: usize, secs: u64) -> anyhow::Result<Option<f64>> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("webhook-insert.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let event = String::from_utf8(webhook_body("pgbench", "pgbench-session"))?;
    let out = match Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &clients.to_string(), "-T", &secs.to_string()])
        .args([
            "-D",
            &format!("event={event}"),
            "-D",
            "session=pgbench-session",
        ])
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output()
        .await
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    Ok(Some(tps))
}

struct Listener {
    child: Child,
    addr: String,
    _logs: tempfile::TempDir,
}

/// Starts `recording-relay listen` (release) on a free loopback port.
async fn start_listener(url: &str, key: &SigningKey) -> anyhow::Result<Listener> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let logs = tempfile::tempdir()?;
    let log = std::fs::File::create(logs.path().join("listen.log"))?;
    let child = Command::new(daemon_binary()?)
        .arg("listen")
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", &addr)
        .env("TELNYX_PUBLIC_KEY", testing::public_key_base64(key))
        .env_remove("RECORDING_RELAY_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting recording-relay listen")?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(logs.path().join("listen.log")).unwrap_or_default();
            bail!("the listener did not become ready:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Listener {
        child,
        addr,
        _logs: logs,
    })
}

impl Listener {
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SIGTERM: the daemon drains and exits 0.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        ensure!(status.success(), "the listener exited with {status}");
        Ok(())
    }
}

/// Pre-signed requests, so the load generator only sends.
fn signed_requests(
    key: &SigningKey,
    prefix: &str,
    n: usize,
) -> Vec<(Bytes, [(&'static str, String); 2])> {
    let now = testing::unix_now();
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}-{}", uuid::Uuid::new_v4().simple());
            let body = webhook_body(&id, &format!("session-{id}"));
            let headers = testing::signature_headers(key, now, &body);
            (Bytes::from(body), headers)
        })
        .collect()
}

#[derive(Default)]
struct Outcomes {
    latencies: Vec<Duration>,
    errors: usize,
    over_2s: usize,
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    (body, headers): (Bytes, [(&'static str, String); 2]),
) -> bool {
    let mut req = http.post(url).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    match req.body(body).send().await {
        Ok(r) => {
            let ok = r.status() == reqwest::StatusCode::OK;
            let _ = r.bytes().await;
            ok
        }
        Err(_) => false,
    }
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// `clients` connections, each sending the next request when the last is
/// answered, for `secs`. Returns requests per second answered 200.
async fn closed_loop(
    addr: &str,
    key: &SigningKey,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(f64, Outcomes)> {
    let http = http_client()?;
    let url = format!("http://{addr}/webhooks/telnyx");
    // Enough for 10k req/s over the whole run (a client that runs out stops
    // early; the rate is counted over the time actually taken).
    let per_client = (10_000 * secs as usize / clients).max(100);
    let end = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let reqs = signed_requests(key, &format!("closed-{c}"), per_client);
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            for req in reqs {
                if Instant::now() >= end {
                    break;
                }
                let t = Instant::now();
                let ok = send(&http, &url, req).await;
                let took = t.elapsed();
                if ok {
                    out.latencies.push(took);
                } else {
                    out.errors += 1;
                }
                if took > Duration::from_secs(2) {
                    out.over_2s += 1;
                }
            }
            out
        }));
    }
    let mut all = Outcomes::default();
    for t in tasks {
        let o = t.await?;
        all.latencies.extend(o.latencies);
        all.errors += o.errors;
        all.over_2s += o.over_2s;
    }
    let rate = all.latencies.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((rate, all))
}

/// Open loop: requests start on schedule whatever the answers do; latency
/// counts from the scheduled start (no coordinated omission).
async fn fixed_rate(
    addr: &str,
    key: &SigningKey,
    rate: u32,
    secs: u64,
) -> anyhow::Result<(f64, Outcomes)> {
    let http = http_client()?;
    let url = Arc::new(format!("http://{addr}/webhooks/telnyx"));
    let n = rate as usize * secs as usize;
    let reqs = signed_requests(key, &format!("rate{rate}"), n);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(n);
    for (i, req) in reqs.into_iter().enumerate() {
        let at = t0 + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(at).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let ok = send(&http, &url, req).await;
            (ok, at.elapsed())
        }));
    }
    let mut out = Outcomes::default();
    for t in tasks {
        let (ok, took) = t.await?;
        if ok {
            out.latencies.push(took);
        } else {
            out.errors += 1;
        }
        if took > Duration::from_secs(2) {
            out.over_2s += 1;
        }
    }
    let achieved = out.latencies.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((achieved, out))
}

fn summarize(o: &mut Outcomes) -> (Duration, Duration, Duration) {
    o.latencies.sort();
    (
        percentile(&o.latencies, 50.0),
        percentile(&o.latencies, 99.0),
        o.latencies.last().copied().unwrap_or_default(),
    )
}

async fn ingest(server: &str, a: &IngestArgs) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_ingest").await?;
    let key = testing::signing_key();

    // pgbench right before and right after the daemon's closed loop, so
    // noise from the shared machine hits both sides alike.
    let before = pgbench(&url, a.clients, a.closed_secs).await?;
    let listener = start_listener(&url, &key).await?;
    // A short warm-up: connections, prepared statements.
    let _ = closed_loop(&listener.addr, &key, a.clients, 1).await?;
    let listener_pid = listener.child.id().context("listener pid")?;
    let cpu_before = (cpu_seconds(listener_pid), cpu_seconds(std::process::id()));
    let (rate, mut o) = closed_loop(&listener.addr, &key, a.clients, a.closed_secs).await?;
    let cpu_after = (cpu_seconds(listener_pid), cpu_seconds(std::process::id()));
    let per_request = |before: Option<f64>, after: Option<f64>| {
        let served = o.latencies.len().max(1) as f64;
        after
            .zip(before)
            .map_or(0.0, |(a, b)| (a - b) / served * 1e6)
    };
    let listener_us = per_request(cpu_before.0, cpu_after.0);
    let generator_us = per_request(cpu_before.1, cpu_after.1);
    let after = pgbench(&url, a.clients, a.closed_secs).await?;
    let (p50, p99, max) = summarize(&mut o);
    let pg = before.zip(after).map(|(b, a)| (b + a) / 2.0);
    match (before, after) {
        (Some(b), Some(a2)) => say(format!(
            "ingest: pgbench, same INSERT, {} clients, {} s: {b:.0} inserts/s before, {a2:.0} after",
            a.clients, a.closed_secs
        )),
        _ => say("ingest: pgbench is not installed; no ceiling to compare with"),
    }
    say(format!(
        "ingest: closed loop, {} connections, {} s: {rate:.0} req/s, p50 {} ms, p99 {} ms, max {} ms, \
         {} errors; CPU per request: listener {listener_us:.0} us, load generator {generator_us:.0} us",
        a.clients,
        a.closed_secs,
        ms(p50),
        ms(p99),
        ms(max),
        o.errors
    ));
    let pg_tps = pg.unwrap_or(0.0);
    table_row(
        "ingest",
        &format!(
            "max sustained, {} connections (req/s vs pgbench inserts/s, mean of before/after)",
            a.clients
        ),
        &format!("{rate:.0}"),
        &if pg.is_some() {
            format!("{pg_tps:.0}")
        } else {
            "-".to_owned()
        },
        &ratio(rate, pg_tps),
        ">= 0.70",
    );

    for &r in &a.rates {
        let (achieved, mut o) = fixed_rate(&listener.addr, &key, r, a.step_secs).await?;
        let (p50, p99, max) = summarize(&mut o);
        say(format!(
            "ingest: {r} req/s offered for {} s: {achieved:.0} req/s answered 200, p50 {} ms, \
             p99 {} ms, max {} ms, {} errors, {} over 2 s",
            a.step_secs,
            ms(p50),
            ms(p99),
            ms(max),
            o.errors,
            o.over_2s
        ));
        let target = if r == 2000 {
            "p99 < 50 ms, none > 2 s"
        } else {
            "none > 2 s"
        };
        table_row(
            "ingest",
            &format!("{r} req/s offered"),
            &format!(
                "{achieved:.0} req/s, p50 {} / p99 {} / max {} ms, {} errors, {} > 2 s",
                ms(p50),
                ms(p99),
                ms(max),
                o.errors,
                o.over_2s
            ),
            "-",
            "-",
            target,
        );
    }
    listener.stop().await?;
    let pool = PgPool::connect(&url).await?;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE event_id NOT LIKE 'pgbench-%'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    say(format!("ingest: {stored} webhooks stored in all"));
    Ok(())
}

// ------------------------------------------------------------------- relay

const SERVICE_KEY: &str = "bench-service-role-key";
const TELNYX_KEY: &str = "KEY_bench";
const BUCKET: &str = "call-recordings";

async fn relay(server: &str, a: &RelayArgs) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_relay").await?;
    let size = a.size_mb * 1_000_000;
    let total_mb = (size * a.recordings as u64) as f64 / 1e6;
    let stop = CancellationToken::new();
    // The storage simulator's files go to memory (/dev/shm) when it is
    // there: writing gigabytes back to a shared disk would stall the
    // database's commits, which the raw copy does not make, and measure the
    // disk rather than the relay. At most one run's objects exist at once.
    let shm = Path::new("/dev/shm");
    let data_dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_KEY.to_owned(),
        cancel: stop.child_token(),
        ..TelnyxSimConfig::default()
    })?;
    let storage = StorageSim::start(StorageSimConfig {
        service_key: SERVICE_KEY.to_owned(),
        data_dir: Some(data_dir.path().to_owned()),
        global_file_size_limit: size.max(64 << 20) * 2,
        cancel: stop.child_token(),
        ..StorageSimConfig::default()
    })?;
    storage.create_bucket(BUCKET, false, None, None);

    let pool = PgPool::connect(&url).await?;
    let mut recordings = Vec::new();
    for i in 0..a.recordings {
        let mut rec =
            SimRecording::sample(format!("bench-rec-{i}-{}", uuid::Uuid::new_v4().simple()));
        rec.content = SimAudio::generated(size, i as u64 + 1);
        let intake: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO public.intakes (room_name) VALUES ($1) RETURNING id")
                .bind(format!("bench-{i}"))
                .fetch_one(&pool)
                .await?;
        telnyx.add_recording(rec.clone());
        recordings.push((rec, intake));
    }

    // The raw copy right before and right after the daemon, so noise from
    // the shared machine (and disk writeback) hits both sides alike.
    let raw_before = raw_copy(&telnyx, &storage, &recordings, size, data_dir.path()).await?;

    // The daemon: `recording-relay work`, release, its own process.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nconcurrency = {}\npoll_interval = \"1s\"\n",
            a.recordings.max(1)
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("work.log"))?;
    let mut daemon = Command::new(daemon_binary()?)
        .args(["--config"])
        .arg(&config)
        .arg("work")
        .env("DATABASE_URL", &url)
        .env("TELNYX_API_KEY", TELNYX_KEY)
        .env("TELNYX_API_URL", telnyx.base_url())
        .env("SUPABASE_URL", storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY)
        .env("STORAGE_BUCKET", BUCKET)
        .env_remove("RUST_LOG")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting recording-relay work")?;
    let pid = daemon.id().context("daemon pid")?;
    // Ready once it LISTENs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listening: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND query ILIKE 'LISTEN%')",
        )
        .fetch_one(&pool)
        .await?;
        if listening {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the worker did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = peak_rss_mib(pid).unwrap_or(0.0);
    let idle_cpu = cpu_seconds(pid).unwrap_or(0.0);
    let queue = Queue::new(pool.clone());
    let t0 = Instant::now();
    for (i, (rec, intake)) in recordings.iter().enumerate() {
        // Telnyx's shape: no recording id; the leg and start time pick the
        // recording of the call, client_state names the intake.
        let mut event = testing::recording_saved_event(&format!("relay-{i}"), &rec.call_session_id);
        let p = &mut event["data"]["payload"];
        p["call_leg_id"] = rec.call_leg_id.clone().into();
        p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
        p["client_state"] = base64::engine::general_purpose::STANDARD
            .encode(intake.to_string())
            .into();
        let job = Envelope::parse(event.to_string().as_bytes())?.into_job(12);
        queue.enqueue(&job).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let (open, error): (i64, Option<String>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'running')), max(last_error)
             FROM recording_relay.recording_jobs",
        )
        .fetch_one(&pool)
        .await?;
        if let Some(error) = error {
            bail!("a relay job failed an attempt: {error}");
        }
        if open == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed = t0.elapsed();
    let peak = peak_rss_mib(pid).unwrap_or(0.0);
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - idle_cpu;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), daemon.wait()).await??;
    ensure!(status.success(), "the worker exited with {status}");

    let states: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state::text, last_error FROM recording_relay.recording_jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    for (state, err) in &states {
        ensure!(state == "succeeded", "a relay job ended {state}: {err:?}");
    }
    for (rec, intake) in &recordings {
        let path = format!("intakes/{intake}/{}.wav", rec.id);
        let o = storage
            .object(BUCKET, &path)
            .with_context(|| format!("{path} is missing"))?;
        ensure!(
            o.size == size && o.sha256_hex == rec.content.sha256_hex(),
            "{path} differs from the source"
        );
    }
    pool.close().await;
    let paths: Vec<String> = recordings
        .iter()
        .map(|(rec, intake)| format!("intakes/{intake}/{}.wav", rec.id))
        .collect();
    delete_objects(&storage, &paths).await?;
    let raw_after = raw_copy(&telnyx, &storage, &recordings, size, data_dir.path()).await?;
    let raw = (raw_before + raw_after) / 2;
    let raw_mbs = total_mb / raw.as_secs_f64();
    say(format!(
        "relay: raw copy (curl | curl) of {} x {} MB: {} ms before, {} ms after: {raw_mbs:.0} MB/s",
        a.recordings,
        a.size_mb,
        ms(raw_before),
        ms(raw_after)
    ));
    let relay_mbs = total_mb / relayed.as_secs_f64();
    say(format!(
        "relay: recording-relay work, {} x {} MB: {} ms, {relay_mbs:.0} MB/s; daemon CPU {cpu:.2} s; \
         peak RSS {peak:.1} MiB (idle {idle_rss:.1} MiB); every object verified by SHA-256",
        a.recordings,
        a.size_mb,
        ms(relayed)
    ));
    table_row(
        "relay",
        &format!(
            "{} x {} MB concurrently (MB/s vs raw curl copy)",
            a.recordings, a.size_mb
        ),
        &format!("{relay_mbs:.0} MB/s ({:.1} s)", relayed.as_secs_f64()),
        &format!(
            "{raw_mbs:.0} MB/s ({:.1} s, mean of before/after)",
            raw.as_secs_f64()
        ),
        &ratio(relay_mbs, raw_mbs),
        ">= 0.80",
    );
    table_row(
        "relay",
        "daemon peak RSS (VmHWM)",
        &format!("{peak:.1} MiB"),
        "-",
        "-",
        "< 100 MB",
    );
    stop.cancel();
    Ok(())
}

/// Copies every recording with curl (download piped into upload), all at
/// once; checks the sizes, deletes the copies and flushes them to disk, so
/// the next run starts from the same state. Returns the copy's wall time.
async fn raw_copy(
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    recordings: &[(SimRecording, uuid::Uuid)],
    size: u64,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let pairs = dir.join("pairs.txt");
    let lines: Vec<String> = recordings
        .iter()
        .enumerate()
        .map(|(i, (rec, _))| {
            format!(
                "{} {}/storage/v1/object/{BUCKET}/raw/{i}.wav",
                telnyx.download_url(&rec.id, "wav"),
                storage.base_url()
            )
        })
        .collect();
    std::fs::write(&pairs, lines.join("\n") + "\n")?;
    sync_disks().await;
    let t0 = Instant::now();
    let status = Command::new(bench_dir().join("raw-copy.sh"))
        .arg(&pairs)
        .env("SERVICE_KEY", SERVICE_KEY)
        .stdout(Stdio::null())
        .status()
        .await
        .context("running bench/raw-copy.sh")?;
    let took = t0.elapsed();
    ensure!(status.success(), "bench/raw-copy.sh failed: {status}");
    let mut paths = Vec::new();
    for i in 0..recordings.len() {
        let path = format!("raw/{i}.wav");
        let o = storage
            .object(BUCKET, &path)
            .context("a raw copy is missing")?;
        ensure!(o.size == size, "raw copy {i} has {} bytes", o.size);
        paths.push(path);
    }
    delete_objects(storage, &paths).await?;
    Ok(took)
}

async fn delete_objects(storage: &StorageSim, paths: &[String]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for path in paths {
        let res = http
            .delete(format!(
                "{}/storage/v1/object/{BUCKET}/{path}",
                storage.base_url()
            ))
            .bearer_auth(SERVICE_KEY)
            .header("apikey", SERVICE_KEY)
            .send()
            .await?;
        ensure!(
            res.status().is_success(),
            "deleting {path}: {}",
            res.status()
        );
    }
    sync_disks().await;
    Ok(())
}

/// Writes dirty pages out, so one run's writeback does not slow the next.
async fn sync_disks() {
    let _ = Command::new("sync").status().await;
}

// ------------------------------------------------------------------- smoke

async fn smoke(server: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let jobs_per_s = queue_run(
        server,
        &QueueArgs {
            jobs: 2000,
            processes: 2,
            concurrency: 24,
            pool: 10,
            floor: false,
        },
    )
    .await?;
    table_row(
        "smoke",
        "queue, 2000 jobs",
        &format!("{jobs_per_s:.0} jobs/s"),
        "-",
        "-",
        "-",
    );
    latency(server, 100).await?;
    ingest(
        server,
        &IngestArgs {
            rates: vec![100],
            step_secs: 1,
            clients: 4,
            closed_secs: 1,
        },
    )
    .await?;
    relay(
        server,
        &RelayArgs {
            recordings: 1,
            size_mb: 20,
        },
    )
    .await?;
    if t0.elapsed() > Duration::from_secs(600) {
        bail!("smoke took over 10 minutes");
    }
    say(format!(
        "smoke: every scenario ran, in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}
