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
//!   loopback copy of the same bytes: the faster of curl piped into curl
//!   (`bench/raw-copy.sh`) and a stream copy in this process.
//! - `backlog`: the same, for a queue of 1,000 recordings of 1-20 MB at the
//!   daemon's default concurrency, the raw copy at that concurrency too.
//! - `playable`: webhook → intake linked through the release `serve`
//!   process, the stand-ins behind paced links (`pace.rs`), beside the
//!   transfer's floor over the same links.
//! - `dbcost`: what one relayed recording costs the database, counted by
//!   `pg_stat_statements` on a private cluster, and the idle daemon's load.
//! - `instructions`: the listener's instructions per webhook, counted by
//!   callgrind: the ingest figure that does not move with the load.
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
use recording_relay::webhook::event::Envelope;
use recording_relay_dev_tools::testing;
use recording_relay_sim::{
    SimAudio, SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig,
};
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
    /// Streaming relay through the simulators, beside a raw copy.
    Relay(RelayArgs),
    /// A backlog of mixed-size recordings drained at the default
    /// concurrency, beside a raw copy at the same concurrency.
    Backlog(BacklogArgs),
    /// Time to playable: webhook → intake linked, through the real
    /// `serve` process over paced links, beside the transfer's floor.
    Playable(PlayableArgs),
    /// Every scenario, small: proves the harness works in seconds.
    Smoke,
    /// What relaying a recording costs the database (pg_stat_statements,
    /// on a private cluster): statements, rows, WAL, buffers; idle load.
    Dbcost(DbCostArgs),
    /// The listener's instructions per webhook under callgrind.
    Instructions(InstructionsArgs),
    /// The queue with millions of finished jobs and retention running, vs
    /// an empty table.
    History(HistoryArgs),
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
struct HistoryArgs {
    /// Finished jobs in the table before the measures.
    #[arg(long, default_value_t = 5_000_000)]
    rows: u64,
    /// No-op jobs claimed for the throughput measure (each table).
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Sequential pickups for the latency measure (each table).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
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
    /// Pin the load generator and pgbench to the last CPU and the listener
    /// to the others (`taskset`).
    #[arg(long)]
    pin: bool,
}

#[derive(clap::Args, Clone)]
struct RelayArgs {
    #[arg(long, default_value_t = 10)]
    recordings: usize,
    /// Size of each recording in MB (10^6 bytes).
    #[arg(long, default_value_t = 200)]
    size_mb: u64,
}

#[derive(clap::Args, Clone)]
struct BacklogArgs {
    #[arg(long, default_value_t = 1000)]
    recordings: usize,
    /// Smallest recording, MB (10^6 bytes).
    #[arg(long, default_value_t = 1)]
    min_mb: u64,
    /// Largest recording, MB.
    #[arg(long, default_value_t = 20)]
    max_mb: u64,
    /// `worker.concurrency`; the daemon's default when not given.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Serve the stand-ins through links of this bandwidth per connection,
    /// each way (MB/s); plain loopback when not given.
    #[arg(long)]
    mb_per_second: Option<u64>,
}

#[derive(clap::Args, Clone)]
struct PlayableArgs {
    /// Recording sizes in MB (10^6 bytes), one series each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    sizes_mb: Vec<u64>,
    /// Measured samples per size (p99 of fewer than 100 is their maximum).
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Unmeasured samples per size first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Bandwidth of each stand-in's link, each way, in MB/s.
    #[arg(long, default_value_t = 40)]
    mb_per_second: u64,
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
            Scenario::Backlog(a) => backlog(&server, &a).await,
            Scenario::Playable(a) => playable(&server, &a).await,
            Scenario::Smoke => smoke(&server).await,
            Scenario::History(a) => history(&server, &a).await,
            Scenario::Dbcost(a) => dbcost(&a).await,
            Scenario::Instructions(a) => instructions(&server, &a).await,
            Scenario::QueueWorker {
                database_url,
                concurrency,
                pool,
            } => queue_worker(&database_url, concurrency, pool).await,
        }
    })
}

mod common;
mod dbcost;
mod history;
mod ingest;
mod instructions;
mod latency;
mod pace;
mod playable;
mod queue;
mod relay;
mod smoke;
use self::common::*;
use self::dbcost::*;
use self::history::*;
use self::ingest::*;
use self::instructions::*;
use self::latency::*;
use self::playable::*;
use self::queue::*;
use self::relay::*;
use self::smoke::*;
