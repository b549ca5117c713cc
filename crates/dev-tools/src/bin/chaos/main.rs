//! Chaos test of recording-relay (issue #7).
//!
//! The promise under test: every webhook that got a 2xx ends as exactly one
//! verified object linked to its intake (or a visible terminal state),
//! whatever crashes in between.
//!
//! One run:
//! 1. creates a fresh database `chaos_<random>` with the stand-in host
//!    schema and the migrations, a patient and an intake for most calls
//!    (a few have none and must end `unmatched`; some patients are called
//!    twice within ten minutes), and the recordings at an in-process Telnyx
//!    simulator (small WAVs, a few above 6 MiB for TUS);
//! 2. starts N real `recording-relay serve` processes against it, and the
//!    Telnyx and Storage simulators in this process (so they outlive the
//!    daemons), with random faults: timeouts, 5xx, 429, resets;
//! 3. sends the signed webhooks over the daemons' listeners: by default
//!    each call's `call.initiated` naming its intake in `X-Intake-Id`
//!    (ZScribe's way, no `client_state`), mostly before its
//!    `call.recording.saved`, some after (`--link client-state`: the
//!    Call Control variant instead), with
//!    redeliveries of the same `data.id` (some concurrent) in random order,
//!    retrying non-2xx answers and connection errors like Telnyx;
//! 4. meanwhile SIGKILLs a random daemon every few seconds and starts it
//!    again, and restarts PostgreSQL once; an operator cancels a random
//!    running job and requeues it at once, every few seconds, and requeues
//!    every failed job now and then (`operators.rs`);
//!    Optionally (issue #22): SIGSTOPs a worker mid-upload until another
//!    daemon finished its job (`--pauses`, `pause.rs`), runs `listen` and
//!    `work` processes beside `serve` (`--split`), and `work` processes
//!    whose clock is off (`--skewed`, libfaketime);
//! 5. waits until every job is final, verifies the promise (`verify.rs`)
//!    and prints the figures. Exit 0: every check passed; 1: a check
//!    failed; 3: the run itself could not be carried out.
//!
//! `cargo run --release --bin chaos -- --events 2000 --daemons 3`
//! (`--help` for the knobs). The daemons are the `recording-relay` binary
//! next to this one; under `cargo run` it is built first.

mod daemons;
mod failover;
mod operators;
mod outage;
mod partition;
mod pause;
mod plan;
mod postgres;
mod proxy;
mod sender;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use recording_relay::db;
use recording_relay::jobs::Job;
use recording_relay::providers::storage_api::RECORDINGS_BUCKET;
use recording_relay_dev_tools::testing;
use recording_relay_sim::{Fault, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemons::{Crash, Daemon, DaemonEnv, Kill, Role, Tuning};
use crate::sender::{SendStats, Sender};

const TELNYX_KEY: &str = "KEY_chaos_telnyx";
const STORAGE_KEY: &str = "chaos-service-role-key";
const BUCKET: &str = "call-recordings";

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Chaos test of recording-relay: kills, a PostgreSQL restart and provider faults, then checks the promise"
)]
struct Args {
    /// Calls (recordings) to send, each a `call.recording.saved` (and with
    /// `--link sip-header` its `call.initiated`).
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// `recording-relay serve` processes.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// Seed of the plan and the simulators' faults (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The PostgreSQL server (its database part is replaced by the run's).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Cluster restarted mid-run, VERSION/NAME (default: newest version's
    /// main). On a machine shared with other users of PostgreSQL, point
    /// this and --database-url at a cluster of the run's own.
    #[arg(long, env = "CHAOS_PG_CLUSTER")]
    pg_cluster: Option<String>,
    #[arg(long)]
    no_pg_restart: bool,
    /// Keep PostgreSQL down this long (stop, wait, start) instead of a plain
    /// restart: long enough, live daemons lose their leases too.
    #[arg(long, default_value = "0s", value_parser = duration)]
    pg_down_for: Duration,
    /// When to restart PostgreSQL, from the first webhook (default: half-way
    /// through sending).
    #[arg(long, value_parser = duration)]
    pg_restart_at: Option<Duration>,
    /// Mean time between operator actions while webhooks are sent: a
    /// cancel + requeue pair on a running job, every fifth a requeue of
    /// all failed jobs (0s: none).
    #[arg(long, default_value = "2s", value_parser = duration)]
    operator_every: Duration,
    /// Mean time between SIGKILLs (0s: none).
    #[arg(long, default_value = "4s", value_parser = duration)]
    kill_every: Duration,
    /// Calls sent per second (their events spread over the same window).
    #[arg(long, default_value_t = 15.0)]
    rate: f64,
    /// Fraction of events delivered twice (half of them concurrently).
    #[arg(long, default_value_t = 0.10)]
    duplicates: f64,
    /// Fraction of calls with no intake (expected `unmatched`).
    #[arg(long, default_value_t = 0.02)]
    unmatched: f64,
    /// Fraction of recordings above 6 MiB (resumable uploads).
    #[arg(long, default_value_t = 0.02)]
    large: f64,
    /// How calls name their intake: `sip-header` (ZScribe's way: each
    /// call's `call.initiated` carries `X-Intake-Id`, no `client_state`) or
    /// `client-state` (some calls name it in `client_state`, the rest match
    /// by phone and time; no call events).
    #[arg(long, value_enum, default_value_t = plan::Link::SipHeader)]
    link: plan::Link,
    /// With `--link client-state`: fraction of calls naming their intake
    /// in `client_state`.
    #[arg(long, default_value_t = 0.20)]
    client_state: f64,
    /// With `--link sip-header`: fraction of calls that are a patient's
    /// second call within ten minutes.
    #[arg(long, default_value_t = 0.05)]
    repeat: f64,
    /// With `--link sip-header`: fraction of calls whose `call.initiated`
    /// is first sent after the recording's webhook.
    #[arg(long, default_value_t = 0.10)]
    initiated_after: f64,
    /// Probability that a Telnyx request (API or download) fails.
    #[arg(long, default_value_t = 0.20)]
    telnyx_faults: f64,
    /// Probability that a Storage upload request fails.
    #[arg(long, default_value_t = 0.10)]
    storage_faults: f64,
    /// Probability that any other Storage request fails: object info,
    /// deletion, TUS HEAD and the rest (issue #22; Telnyx's faults already
    /// reach every request: recording, list, delete, download).
    #[arg(long, default_value_t = 0.10)]
    storage_other_faults: f64,
    /// SIGSTOP a worker mid-upload this many times, one at a time, until
    /// another daemon has finished the job; then SIGCONT it (`pause.rs`).
    /// Slows TUS PATCH bodies to 4 MiB/s so uploads are caught in flight.
    #[arg(long, default_value_t = 0)]
    pauses: usize,
    /// A split deployment too: this many `recording-relay listen` and as
    /// many `recording-relay work` processes besides the `serve` ones,
    /// killed and restarted like them.
    #[arg(long, default_value_t = 0)]
    split: usize,
    /// This many more `work` processes whose wall clock is --skew off
    /// (libfaketime), alternately ahead and behind.
    #[arg(long, default_value_t = 0)]
    skewed: usize,
    /// Seconds the --skewed processes' clocks are off.
    #[arg(long, default_value_t = 300)]
    skew: i64,
    /// The daemons' worker.lease.
    #[arg(long, default_value = "6s", value_parser = duration)]
    lease: Duration,
    /// The daemons' worker.poll_interval.
    #[arg(long, default_value = "1s", value_parser = duration)]
    poll: Duration,
    /// The daemons' http.request_timeout and read_idle_timeout.
    #[arg(long, default_value = "2s", value_parser = duration)]
    http_timeout: Duration,
    /// The daemons' worker.concurrency.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How long to wait, after the last webhook, for every job to be final.
    #[arg(long, default_value = "10m", value_parser = duration)]
    settle_timeout: Duration,
    /// The daemon binary (default: `recording-relay` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Daemon logs and config (default: `target/chaos/<database>`, removed
    /// when every check passed).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the database and the daemon logs even when every check passed
    /// (a failed run always keeps them).
    #[arg(long)]
    keep: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Cut a link for `--cut-for` through loopback proxies (issue #22,
    /// `partition.rs`): `db` freezes the first `--cut-daemons` daemons' way
    /// to PostgreSQL, `providers` every daemon's to Storage and Telnyx,
    /// `storage` makes Storage refuse every connection.
    #[arg(long, value_enum)]
    cut: Option<partition::Link>,
    /// With `--cut db`: how many daemons are cut off (0: all).
    #[arg(long, default_value_t = 0)]
    cut_daemons: usize,
    /// When to cut, from the first webhook (default: a third of the way
    /// through sending).
    #[arg(long, value_parser = duration)]
    cut_at: Option<Duration>,
    #[arg(long, default_value = "20s", value_parser = duration)]
    cut_for: Duration,
    /// Run on a private primary and a streaming replica of it, and fail
    /// over to the replica at `--failover-at` (issue #22, `failover.rs`);
    /// then `recording-relay reconcile`. Replaces --database-url and the
    /// PostgreSQL restart.
    #[arg(long)]
    failover: bool,
    /// When to fail over, from the first webhook (default: half-way
    /// through sending).
    #[arg(long, value_parser = duration)]
    failover_at: Option<Duration>,
    /// How long the replica's link is frozen before the primary dies: what
    /// the primary commits meanwhile is lost (asynchronous replication).
    #[arg(long, default_value = "3s", value_parser = duration)]
    failover_lag: Duration,
    /// Synchronous replication (`synchronous_standby_names = '*'`): then
    /// nothing acknowledged may be lost.
    #[arg(long)]
    failover_sync: bool,
    /// The daemons' retry.base.
    #[arg(long, default_value = "200ms", value_parser = duration)]
    retry_base: Duration,
    /// The daemons' retry.cap.
    #[arg(long, default_value = "2s", value_parser = duration)]
    retry_cap: Duration,
    /// The daemons' retry.max_attempts.
    #[arg(long, default_value_t = 12)]
    max_attempts: i32,
    /// Lifetime of the Telnyx stand-in's download URLs (Telnyx: 10 minutes).
    #[arg(long, default_value = "10m", value_parser = duration)]
    telnyx_url_ttl: Duration,
    /// The daemons keep recordings at Telnyx (`pipeline.delete_from_telnyx
    /// = false`), so reconcile can find those an asynchronous failover
    /// forgot.
    #[arg(long)]
    keep_at_telnyx: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: the run could not be carried out: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn say(msg: &str) {
    println!(
        "[chaos {}] {msg}",
        chrono::Utc::now().format("%H:%M:%S%.3f")
    );
}

/// The daemon binary. Under `cargo run` it is built first (same profile as
/// this binary), since `cargo run --bin chaos` builds only this one.
fn relay_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the chaos binary")?;
    let dir = exe.parent().context("the chaos binary has no directory")?;
    let bin = dir.join("recording-relay");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "recording-relay", "--bin", "recording-relay"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
            cmd.current_dir(dir);
        }
        let status = cmd.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --bin recording-relay failed");
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release --workspace --bins`) or pass --relay-bin",
            bin.display()
        );
    }
    if cfg!(debug_assertions) {
        say("warning: debug build; the daemons are debug builds too (use --release for figures)");
    }
    Ok(bin)
}

async fn job_counts(pool: &PgPool) -> Option<(i64, i64, Vec<(String, i64)>)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state::text, count(*) FROM recording_relay.recording_jobs GROUP BY state ORDER BY state",
    )
    .fetch_all(pool)
    .await
    .ok()?;
    let total = rows.iter().map(|r| r.1).sum();
    let open = rows
        .iter()
        .filter(|r| r.0 == "pending" || r.0 == "running")
        .map(|r| r.1)
        .sum();
    Some((total, open, rows))
}

/// What the chaos loop did and saw, read by the progress line and the
/// verdict.
#[derive(Default)]
struct Incidents {
    kills: Mutex<Vec<Kill>>,
    crashes: Mutex<Vec<Crash>>,
}

/// Kills a random daemon every `every` (jittered) and restarts it, and
/// restarts any daemon that died on its own, until `stop`.
async fn chaos_loop(
    env: DaemonEnv,
    mut daemons: Vec<Daemon>,
    every: Duration,
    stop: CancellationToken,
    incidents: Arc<Incidents>,
    paused: pause::Paused,
    pool: PgPool,
) -> Vec<Daemon> {
    let jitter = |d: Duration| d.mul_f64(0.5 + fastrand::f64());
    let mut next_kill = Instant::now() + jitter(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        for d in &mut daemons {
            match env.check_alive(d) {
                Ok(Some(crash)) => {
                    say(&format!(
                        "daemon {} (pid {}) exited on its own: {}; restarted (log {})",
                        crash.slot,
                        crash.pid,
                        crash.status,
                        d.log_path().display()
                    ));
                    incidents
                        .crashes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(crash);
                }
                Ok(None) => {}
                Err(e) => say(&format!("daemon {}: {e:#}", d.slot)),
            }
        }
        if every.is_zero() || daemons.is_empty() || Instant::now() < next_kill {
            continue;
        }
        // A stopped process (`pause.rs`) is left alone until it is woken.
        let stopped = paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let running: Vec<usize> = (0..daemons.len())
            .filter(|&i| !stopped.contains(&daemons[i].pid()))
            .collect();
        let Some(&slot) = running.get(fastrand::usize(..running.len().max(1))) else {
            continue;
        };
        match env.kill_and_restart(&mut daemons[slot]).await {
            Ok(mut kill) => {
                kill.held = held_by(&pool, kill.pid).await;
                incidents
                    .kills
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(kill);
            }
            Err(e) => say(&format!("killing daemon {slot} failed: {e:#}")),
        }
        next_kill = Instant::now() + jitter(every);
    }
    daemons
}

/// The jobs a (dead) process still holds: `running` under a worker id that
/// names its pid. Read twice, 100 ms apart, keeping what both saw: a
/// statement the process sent just before it died may still commit in its
/// backend. After that nothing changes them until another daemon rescues
/// them (a lease later) or an operator cancels them. Each read waits at
/// most a second: while PostgreSQL is down the loop must go on restarting
/// daemons, and an unknown set is recorded as such.
async fn held_by(pool: &PgPool, pid: u32) -> Option<Vec<i64>> {
    let read = || async {
        let rows = tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query_as::<_, (i64, String)>(
                "SELECT id, locked_by FROM recording_relay.recording_jobs WHERE state = 'running'",
            )
            .fetch_all(pool),
        )
        .await
        .ok()?
        .ok()?;
        Some(
            rows.into_iter()
                .filter(|(_, w)| daemons::pid_of_worker(w) == Some(pid))
                .map(|(id, _)| id)
                .collect::<Vec<i64>>(),
        )
    };
    let first = read().await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = read().await?;
    Some(first.into_iter().filter(|id| second.contains(id)).collect())
}

async fn wait_healthy(addrs: &[std::net::SocketAddr], patience: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = Instant::now() + patience;
    for addr in addrs {
        loop {
            let ok = client
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("daemon on {addr} did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.events == 0 || args.daemons == 0 {
        bail!("--events and --daemons must be at least 1");
    }
    let began = chrono::Utc::now();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let binary = relay_binary(args.relay_bin.clone())?;
    let send_over = Duration::from_secs_f64(args.events as f64 / args.rate.max(0.01));

    // The database.
    let mut pair = if args.failover {
        Some(failover::Pair::start(args.failover_sync).await?)
    } else {
        None
    };
    let server_url = pair
        .as_ref()
        .map_or_else(|| args.database_url.clone(), failover::Pair::server_url);
    let (db_name, db_url) = postgres::create_database(&server_url).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db_url)
        .await
        .context("connecting to the run's database")?;
    recording_relay_dev_tools::testing::create_host_schema(&pool).await?;
    db::migrate(&pool).await?;
    sqlx::raw_sql(operators::AUDIT_SQL)
        .execute(&pool)
        .await
        .context("installing the audit of job writes")?;
    if args.cut.is_some() {
        sqlx::raw_sql(partition::CLAIMS_SQL)
            .execute(&pool)
            .await
            .context("installing the record of claims")?;
    }
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => binary
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .join("chaos")
            .join(&db_name),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;

    // The plan and the host's rows.
    let mut plan = plan::generate(&plan::PlanOptions {
        events: args.events,
        seed,
        send_over,
        duplicates: args.duplicates,
        unmatched: args.unmatched,
        large: args.large,
        client_state: args.client_state,
        link: args.link,
        repeat: args.repeat,
        initiated_after: args.initiated_after,
    });
    plan::insert_host_rows(&pool, &mut plan.calls).await?;
    let calls = Arc::new(std::mem::take(&mut plan.calls));
    let count = |e: plan::Expect| calls.iter().filter(|c| c.expect == e).count();
    let pg_cluster = args
        .pg_cluster
        .clone()
        .unwrap_or_else(postgres::default_cluster);
    let pg_restart_at = (!args.no_pg_restart && pair.is_none())
        .then(|| args.pg_restart_at.unwrap_or(send_over / 2));
    say(&format!(
        "seed {seed}; database {db_name}; {} events over {:.0} s to {} daemons ({}); \
         {} matched by phone and time, {} by client_state, {} by X-Intake-Id ({} patients called twice, \
         {} call.initiated after the recording), {} without intake; {} above 6 MiB; \
         {} redeliveries ({} concurrent); a SIGKILL every ~{:?}; PostgreSQL {pg_cluster} restart at {}; \
         faults: Telnyx {:.0}%, Storage uploads {:.0}%; lease {:?}, poll {:?}, HTTP timeouts {:?}; logs in {}",
        calls.len(),
        send_over.as_secs_f64(),
        args.daemons,
        binary.display(),
        count(plan::Expect::PhoneAndTime),
        count(plan::Expect::ClientState),
        count(plan::Expect::SipHeader),
        calls.iter().filter(|c| c.repeats.is_some()).count(),
        calls.iter().filter(|c| c.initiated_after).count(),
        count(plan::Expect::NoIntake),
        calls.iter().filter(|c| c.large).count(),
        plan.deliveries.iter().filter(|d| d.redelivery).count(),
        plan.concurrent_duplicates,
        args.kill_every,
        pg_restart_at.map_or("never".to_owned(), |t| format!("+{:.0} s", t.as_secs_f64())),
        args.telnyx_faults * 100.0,
        args.storage_faults * 100.0,
        args.lease,
        args.poll,
        args.http_timeout,
        work_dir.display(),
    ));

    // The proxies a cut goes through (first pointed nowhere: the
    // simulators name them in their URLs, so they start first).
    let mut links = partition::Links::default();
    let nowhere = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    if matches!(
        args.cut,
        Some(partition::Link::Providers | partition::Link::Storage)
    ) {
        links.storage = Some(proxy::Proxy::start(nowhere).await?);
    }
    if args.cut == Some(partition::Link::Providers) {
        links.telnyx = Some(proxy::Proxy::start(nowhere).await?);
    }
    let origin = |p: &Option<proxy::Proxy>| p.as_ref().map(|p| format!("http://{}", p.addr));

    // The simulators, in this process so they survive the daemons.
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_KEY.to_owned(),
        fault_seed: seed,
        public_origin: origin(&links.telnyx),
        download_url_ttl: args.telnyx_url_ttl,
        ..TelnyxSimConfig::default()
    })?;
    let storage_dir = tempfile::tempdir_in(&work_dir)?;
    let storage = StorageSim::start(StorageSimConfig {
        service_key: STORAGE_KEY.to_owned(),
        data_dir: Some(storage_dir.path().to_owned()),
        fault_seed: seed.wrapping_add(1),
        public_origin: origin(&links.storage),
        ..StorageSimConfig::default()
    })?;
    if let Some(p) = &links.telnyx {
        p.switch_to(telnyx.addr());
    }
    if let Some(p) = &links.storage {
        p.switch_to(storage.addr());
    }
    let cut_daemons = match args.cut_daemons {
        0 => args.daemons,
        n => n.min(args.daemons),
    };
    let mut slot_database_urls = Vec::new();
    if args.cut == Some(partition::Link::Db) {
        let server = partition::address_of(&db_url, 5432).await?;
        for _ in 0..cut_daemons {
            let p = proxy::Proxy::start(server).await?;
            slot_database_urls.push(partition::through(&db_url, p.addr)?);
            links.db.push(p);
        }
    }
    storage.create_bucket(
        BUCKET,
        false,
        Some(RECORDINGS_BUCKET.file_size_limit),
        Some(RECORDINGS_BUCKET.mime_types()),
    );
    for call in calls.iter() {
        telnyx.add_recording(call.recording.clone());
    }
    let sources = {
        let calls = calls.clone();
        tokio::task::spawn_blocking(move || {
            calls
                .iter()
                .map(|c| c.recording.content.sha256_hex())
                .collect::<Vec<_>>()
        })
    };

    // The physical reference of an outage's drain, before the daemons
    // delete the recordings at Telnyx.
    let raw_copy = if args.cut == Some(partition::Link::Storage) {
        let raw = outage::raw_copy(
            &telnyx,
            &storage,
            STORAGE_KEY,
            &calls,
            args.daemons * args.concurrency,
        )
        .await?;
        say(&format!(
            "raw copy of every recording at concurrency {}: {:.1} s, {} bytes",
            raw.concurrency, raw.seconds, raw.bytes
        ));
        Some(raw)
    } else {
        None
    };

    // The daemons.
    let key = testing::signing_key();
    let config = work_dir.join("config.toml");
    let tuning = Tuning {
        lease: args.lease,
        poll: args.poll,
        concurrency: args.concurrency,
        http_timeout: args.http_timeout,
        // A recording whose `call.initiated` is late waits for it this long
        // after it ended: the calls ended up to 150 s before the plan was
        // made (`plan.rs`), so this outlasts the sending; capped at the
        // daemon's limit.
        link_wait: (send_over + Duration::from_secs(240)).min(Duration::from_secs(3600)),
        retry_base: args.retry_base,
        retry_cap: args.retry_cap,
        max_attempts: args.max_attempts,
        delete_from_telnyx: !args.keep_at_telnyx,
    };
    std::fs::write(&config, daemons::config_toml(&tuning))?;
    let env = DaemonEnv {
        binary,
        config,
        database_url: db_url.clone(),
        slot_database_urls,
        public_key: testing::public_key_base64(&key),
        telnyx_api_key: TELNYX_KEY.to_owned(),
        telnyx_url: telnyx.base_url(),
        storage_url: storage.base_url(),
        storage_key: STORAGE_KEY.to_owned(),
        log_dir: work_dir.clone(),
    };
    let mut daemons = Vec::new();
    for slot in 0..args.daemons {
        daemons.push(env.spawn(slot, daemons::free_port()?)?);
    }
    let mut more = Vec::new();
    for _ in 0..args.split {
        more.extend([(Role::Listen, None), (Role::Work, None)]);
    }
    for i in 0..args.skewed {
        let skew = if i % 2 == 0 { args.skew } else { -args.skew };
        more.push((Role::Work, Some(skew)));
    }
    for (role, skew) in more {
        let slot = daemons.len();
        daemons.push(env.spawn_as(slot, daemons::free_port()?, role, skew)?);
    }
    if args.split + args.skewed > 0 {
        say(&format!(
            "besides: {} `listen` and {} `work` processes; {} `work` processes with clocks {} s off",
            args.split, args.split, args.skewed, args.skew
        ));
    }
    // The split and skewed processes, each with what its log must show.
    let halves: Vec<(PathBuf, &str)> = daemons
        .iter()
        .filter_map(|d| match d.role {
            Role::Serve => None,
            Role::Listen => Some((d.log_path().to_owned(), "outcome=\"stored\"")),
            Role::Work => Some((d.log_path().to_owned(), "job succeeded")),
        })
        .collect();
    let listeners: Vec<_> = daemons
        .iter()
        .filter(|d| d.role.listens())
        .map(|d| d.addr)
        .collect();
    let cut_pids: Vec<u32> = daemons.iter().take(cut_daemons).map(Daemon::pid).collect();
    wait_healthy(&listeners, Duration::from_secs(60)).await?;
    say(&format!("{} daemons ready on {listeners:?}", daemons.len()));

    // Faults on, then the storm.
    let hang = args.http_timeout * 2;
    telnyx.set_random_faults(
        args.telnyx_faults,
        vec![
            Fault::Status(500),
            Fault::Status(429),
            Fault::Hang(hang),
            Fault::Reset,
            Fault::ResetMidBody { after_bytes: 512 },
        ],
    );
    storage.set_random_faults(
        args.storage_faults,
        vec![
            Fault::Status(500),
            Fault::Hang(args.http_timeout / 2),
            Fault::Hang(hang),
            Fault::ResetMidBody {
                after_bytes: 64 * 1024,
            },
        ],
    );
    storage.set_random_other_faults(
        args.storage_other_faults,
        vec![
            Fault::Status(500),
            Fault::Status(503),
            Fault::Hang(hang),
            Fault::Reset,
            Fault::ResetMidBody { after_bytes: 16 },
        ],
    );
    say(&format!(
        "faults on other Storage requests (info, delete, TUS HEAD): {:.0}%",
        args.storage_other_faults * 100.0
    ));
    if args.pauses > 0 {
        storage.set_tus_patch_rate(Some(4 * 1024 * 1024));
    }
    let start = Instant::now();
    let links = Arc::new(links);
    let cutting = args.cut.map(|link| {
        tokio::spawn(
            partition::Cut {
                link,
                links: links.clone(),
                at: args.cut_at.unwrap_or(send_over / 3),
                length: args.cut_for,
                listeners: listeners.iter().take(cut_daemons).copied().collect(),
                key: key.clone(),
                calls: calls.clone(),
                pool: pool.clone(),
                pids: cut_pids.clone(),
            }
            .run(start),
        )
    });
    let mut failing_over = pair.take().map(|mut pair| {
        let (at, lag, sync) = (
            args.failover_at.unwrap_or(send_over / 2),
            args.failover_lag,
            args.failover_sync,
        );
        tokio::spawn(async move {
            tokio::time::sleep_until(start + at).await;
            let r = pair.fail_over(lag, sync).await;
            (pair, r)
        })
    });
    let mut failover_report = None;
    let mut failover_figures = Vec::new();
    let stats = Arc::new(Mutex::new(SendStats::default()));
    let sending = tokio::spawn(
        Sender {
            key,
            listeners,
            timeout: Duration::from_secs(2),
            tries: 10,
            in_flight: 64,
        }
        .run(calls.clone(), plan.deliveries.clone(), start, stats.clone()),
    );
    let stop = CancellationToken::new();
    let incidents = Arc::new(Incidents::default());
    let reconcile_env = env.clone();
    let paused = pause::Paused::default();
    let pauses = Arc::new(Mutex::new(Vec::new()));
    let pausing = (args.pauses > 0).then(|| {
        tokio::spawn(pause::run(
            pool.clone(),
            storage.clone(),
            pause::PauseOptions {
                count: args.pauses,
                lease: args.lease,
                longest: args.lease * 4 + Duration::from_secs(150),
                log_dir: work_dir.clone(),
            },
            paused.clone(),
            stop.clone(),
            pauses.clone(),
        ))
    });
    let chaos = tokio::spawn(chaos_loop(
        env,
        daemons,
        args.kill_every,
        stop.clone(),
        incidents.clone(),
        paused,
        pool.clone(),
    ));
    let operators_stop = CancellationToken::new();
    let actions = Arc::new(Mutex::new(operators::Actions::default()));
    let operating = tokio::spawn(operators::run(
        recording_relay::jobs::Queue::new(pool.clone()),
        storage.clone(),
        args.operator_every,
        operators_stop.clone(),
        actions.clone(),
    ));
    let restarting = pg_restart_at.map(|at| {
        let (cluster, url, down_for) = (pg_cluster.clone(), db_url.clone(), args.pg_down_for);
        tokio::spawn(async move {
            tokio::time::sleep_until(start + at).await;
            say(&format!("restarting PostgreSQL {cluster}"));
            let r = postgres::restart(&cluster, &url, down_for).await;
            match &r {
                Ok(r) => say(&format!(
                    "PostgreSQL back: pg_ctlcluster {:.2} s, unavailable {:.2} s",
                    r.command.as_secs_f64(),
                    r.unavailable.as_secs_f64()
                )),
                Err(e) => say(&format!("PostgreSQL restart failed: {e:#}")),
            }
            r
        })
    });

    // Wait until everything sent is final.
    let mut sent_at = None;
    let mut last_progress = Instant::now();
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent = sending.is_finished();
        if sent && sent_at.is_none() {
            sent_at = Some(Instant::now());
            // Requeues of failed jobs would keep the run from settling.
            operators_stop.cancel();
            say(&format!(
                "all deliveries done after {:.1} s",
                start.elapsed().as_secs_f64()
            ));
        }
        let restarted = restarting
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
            && cutting
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            && (args.failover == failover_report.is_some());
        if let Some(task) = failing_over.take_if(|t| sent && t.is_finished()) {
            let (kept, result) = task.await.context("the failover task panicked")?;
            pair = Some(kept);
            let f = result?;
            let lost = failover::lost_acknowledged(&pool, &calls, &stats).await?;
            // Idempotent, so an operator runs it again when Telnyx fails
            // it (the run's random faults).
            // The plan's calls ended up to an hour before it was made.
            let since = start.elapsed() + Duration::from_secs(2 * 3600);
            let mut tries = 0;
            let out = loop {
                tries += 1;
                match failover::reconcile(&reconcile_env, since).await {
                    Ok(out) => break out,
                    Err(e) if tries < 10 => say(&format!("reconcile failed, again: {e:#}")),
                    Err(e) => return Err(e),
                }
            };
            // Every attempt's enqueues, not only the last report's: an
            // attempt that Telnyx failed half-way has committed the jobs it
            // made, and the next one finds them known.
            let enqueued = failover::reconciled_jobs(&pool)
                .await?
                .max(failover::enqueued(&out));
            say(&format!("reconcile: {}", out.trim()));
            say(&format!(
                "after the failover: {} acknowledged webhooks have no job; reconcile enqueued {enqueued}",
                lost.len()
            ));
            failover_figures.push(format!(
                "failover ({}): replication frozen {} (lag {:?}), primary killed {}, replica promoted in {:.2} s, \
                 database unavailable {:.2} s; acknowledged webhooks lost {} (before reconcile), \
                 recordings reconcile enqueued {enqueued}",
                if f.synchronous { "synchronous" } else { "asynchronous" },
                f.replication_frozen,
                args.failover_lag,
                f.primary_killed,
                f.promoted_after_s,
                f.unavailable_s,
                lost.len(),
            ));
            failover_report = Some((f, lost, enqueued));
        }
        let counts = job_counts(&pool).await;
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let (acked, reqs) = {
                let s = stats.lock().unwrap_or_else(PoisonError::into_inner);
                (s.acked.len(), s.requests)
            };
            let n_kills = incidents
                .kills
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            say(&format!(
                "+{:.0} s: {reqs} requests, {acked} events acknowledged; kills {n_kills}; jobs {:?}",
                start.elapsed().as_secs_f64(),
                counts.as_ref().map(|c| &c.2)
            ));
        }
        if let (true, true, Some((total, 0, _))) = (sent, restarted, &counts)
            && *total > 0
        {
            break true;
        }
        if sent_at.is_some_and(|t| t.elapsed() > args.settle_timeout) {
            break false;
        }
    };
    let chaos_for = start.elapsed();
    stop.cancel();
    operators_stop.cancel();
    operating.await.context("the operator loop panicked")?;
    if let Some(task) = pausing {
        task.await.context("the pause loop panicked")?;
    }
    let mut daemons = chaos.await.context("the kill loop panicked")?;
    let restart = match restarting {
        Some(task) => Some(task.await.context("the restart task panicked")?),
        None => None,
    };
    let cut = match cutting {
        Some(task) => Some(task.await.context("the cut task panicked")?),
        None => None,
    };
    // Let injected hangs that outlived their clients land (a stalled upload
    // may still write after its client gave up), then look again.
    tokio::time::sleep(hang + Duration::from_secs(1)).await;
    let deadline = Instant::now() + args.lease * 3 + Duration::from_secs(10);
    while settled && Instant::now() < deadline {
        if matches!(job_counts(&pool).await, Some((_, 0, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(&format!(
        "{} after {:.1} s; verifying",
        if settled {
            "every job is final"
        } else {
            "settle timeout"
        },
        chaos_for.as_secs_f64()
    ));

    // Evidence.
    let jobs: Vec<Job> = sqlx::query_as("SELECT * FROM recording_relay.recording_jobs ORDER BY id")
        .fetch_all(&pool)
        .await
        .context("reading the jobs")?;
    let intakes: Vec<(uuid::Uuid, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, recording_id, recording_object_path FROM public.intakes")
            .fetch_all(&pool)
            .await
            .context("reading the intakes")?;
    let owed_deletes: std::collections::HashMap<i64, String> = sqlx::query_as(
        "SELECT id, coalesce(telnyx_delete_error, '') FROM recording_relay.recording_jobs
         WHERE telnyx_delete_due_at IS NOT NULL AND telnyx_deleted_at IS NULL",
    )
    .fetch_all(&pool)
    .await
    .context("reading the owed deletes at Telnyx")?
    .into_iter()
    .collect();
    let sources = sources.await.context("hashing the sources")?;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(PoisonError::into_inner));
    let kills = incidents
        .kills
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let crashes = incidents
        .crashes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let restart_ok = restart.as_ref().and_then(|r| r.as_ref().ok()).cloned();
    let mut outcome = verify::verify(&verify::Evidence {
        calls: &calls,
        sources: &sources,
        stats: &stats,
        kills: &kills,
        crashes: &crashes,
        restart: restart_ok.as_ref(),
        jobs: &jobs,
        intakes: &intakes,
        storage: &storage,
        bucket: BUCKET,
        telnyx: &telnyx,
        lease: args.lease,
        poll: args.poll,
        owed_deletes: &owed_deletes,
        deletes_at_telnyx: !args.keep_at_telnyx,
    });
    let actions = std::mem::take(&mut *actions.lock().unwrap_or_else(PoisonError::into_inner));
    let stale = operators::stale_writes(&pool)
        .await
        .context("reading the audit of job writes")?;
    outcome.checks.push(verify::Check {
        name: "no write through a stale lease (every job update audited)",
        passed: stale.is_empty(),
        details: stale.into_iter().take(12).collect(),
    });
    let mut cut_figures = Vec::new();
    if let Some(cut) = &cut {
        let (checks, figures) = partition::checks(
            &pool,
            cut,
            &cut_pids,
            args.lease + args.poll + args.retry_cap,
        )
        .await?;
        outcome.checks.extend(checks);
        cut_figures = figures;
        if let (Some(partition::Link::Storage), Some(healed)) = (cut.link, cut.healed) {
            let (checks, figures) = outage::checks(
                &pool,
                healed,
                args.cut_for,
                &telnyx,
                raw_copy.unwrap_or_default(),
                (args.retry_base, args.retry_cap, args.max_attempts),
            )
            .await?;
            outcome.checks.extend(checks);
            cut_figures.extend(figures);
        }
    }
    if let Some((f, lost, enqueued)) = &failover_report {
        outcome.checks.push(failover::check(f, lost, *enqueued));
    } else if args.failover {
        outcome.checks.push(verify::Check {
            name: "the failover happened and reconcile ran",
            passed: false,
            details: Vec::new(),
        });
    }
    let pauses = std::mem::take(&mut *pauses.lock().unwrap_or_else(PoisonError::into_inner));
    if args.pauses > 0 {
        outcome
            .checks
            .extend(pause::checks(&pauses, args.pauses, args.lease));
    }
    if !halves.is_empty() {
        let idle: Vec<String> = halves
            .iter()
            .filter(|(log, sign)| {
                std::fs::read_to_string(log).map_or(true, |text| !text.contains(sign))
            })
            .map(|(log, sign)| format!("{}: no line with {sign}", log.display()))
            .collect();
        outcome.checks.push(verify::Check {
            name: "every `listen` process stored webhooks, every `work` process finished jobs",
            passed: idle.is_empty(),
            details: idle,
        });
    }
    if let Some(Err(e)) = &restart {
        outcome.checks.push(verify::Check {
            name: "PostgreSQL was restarted mid-run",
            passed: false,
            details: vec![format!("{e:#}")],
        });
    }
    outcome.checks.push(verify::Check {
        name: "every job final within the settle timeout",
        passed: settled,
        details: if settled {
            Vec::new()
        } else {
            vec![format!("still open after {:?}", args.settle_timeout)]
        },
    });
    let stopped = daemons::stop_all(&mut daemons, Duration::from_secs(20)).await;
    let unclean: Vec<String> = stopped
        .iter()
        .filter(|(_, code)| *code != Some(0))
        .map(|(slot, code)| format!("daemon {slot} exit code {code:?} after SIGTERM"))
        .collect();
    outcome.checks.push(verify::Check {
        name: "every daemon stopped cleanly on SIGTERM (exit 0)",
        passed: unclean.is_empty(),
        details: unclean,
    });

    let total = start.elapsed();
    let mut extra = vec![
        format!(
            "run started {began}, seed {seed}; chaos phase {:.1} s, whole run {:.1} s",
            chaos_for.as_secs_f64(),
            total.as_secs_f64()
        ),
        format!(
            "redeliveries: {} ({} concurrent with the first delivery, the rest later)",
            plan.deliveries.iter().filter(|d| d.redelivery).count(),
            plan.concurrent_duplicates
        ),
        format!(
            "operators: {} uploads refused with 403 at the start (incident); {} cancel+requeue pairs \
             on running jobs ({} cancels refused: the job had finished), {} requeues of failed jobs \
             ({} jobs), {} errors{}",
            actions.refused_uploads,
            actions.pairs.len(),
            actions.cancels_refused,
            actions.requeue_failed_runs,
            actions.failed_jobs_requeued,
            actions.errors.len(),
            actions
                .errors
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ),
    ];
    extra.extend(cut_figures);
    extra.extend(failover_figures);
    print!("{}", verify::render(&outcome, &extra));
    let passed = outcome.checks.iter().all(|c| c.passed);
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "started": began,
            "seed": seed,
            "events": args.events,
            "daemons": args.daemons,
            "chaos_phase_s": chaos_for.as_secs_f64(),
            "total_s": total.as_secs_f64(),
            "passed": passed,
            "figures": outcome.figures,
            "operators": actions,
            "pauses": pauses,
            "checks": outcome.checks,
            "cut": cut,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    pool.close().await;
    drop((storage, telnyx));
    drop(storage_dir);
    if passed && !args.keep {
        postgres::drop_database(&server_url, &db_name).await?;
        if args.work_dir.is_none() {
            std::fs::remove_dir_all(&work_dir)
                .with_context(|| format!("removing {}", work_dir.display()))?;
        }
        say(&format!(
            "PASSED; database {db_name} dropped, daemon logs removed"
        ));
    } else if passed {
        say(&format!(
            "PASSED; database {db_name} kept; daemon logs in {}",
            work_dir.display()
        ));
    } else {
        say(&format!(
            "FAILED (seed {seed}); database {db_name} kept for inspection; daemon logs in {}",
            work_dir.display()
        ));
    }
    drop(pair);
    Ok(passed)
}
