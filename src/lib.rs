//! recording-relay: Telnyx call recordings into private Supabase Storage,
//! linked to ZScribe intakes, with PostgreSQL as the only coordinator.
//!
//! How a recording travels, and where each part lives:
//!
//! - [`webhook`]: the hyper listener. Verifies Telnyx's Ed25519 signature on
//!   the raw body, inserts one `recording_jobs` row, answers after COMMIT.
//! - [`call`]: the facts of one recorded call, one struct wherever they
//!   travel (the webhook's job, the job row, Telnyx's recording).
//! - [`jobs`]: the durable queue. All queue SQL ([`jobs::queue`]), the retry
//!   schedule ([`jobs::backoff`]) and the worker loop ([`jobs::worker`]:
//!   LISTEN/NOTIFY + poll, `SKIP LOCKED` claims, leases, heartbeats, drain).
//! - [`pipeline`]: the steps of one job (resolve, match, store, link, delete),
//!   using one client per upstream: [`telnyx`] and [`storage`].
//! - [`alerts`]: a POST to an operator's webhook when a job ends badly.
//! - [`retention`]: prunes old jobs, keeps every pointer to patient data
//!   (or deletes it with its object after a configured period and an alert).
//! - [`config`]: defaults, TOML file, systemd credentials, environment.
//! - [`db`]: pool, migrations, schema checks.
//! - [`app`]: wires listener and worker into one process with one shutdown token.
//! - [`playback`]: signed URLs and a player page for the UI's users (JWT auth,
//!   organization-scoped), on an address of its own; off unless configured.
//! - [`cli`]: subcommands and exit codes. [`telemetry`]: logs and masking.
//!
//! The provider clients ([`telnyx`], [`storage`], and [`urls`] under both)
//! are leaves: they know the configuration, not jobs or metrics. What a
//! provider's error means for a job, and counting it, is the pipeline's.

pub mod alerts;
pub mod app;
pub mod call;
pub mod check;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod jobs;
pub mod metrics;
pub mod pipeline;
pub mod playback;
pub mod reconcile;
pub mod retention;
pub mod server;
pub mod sim;
pub mod storage;
pub mod telemetry;
pub mod telnyx;
#[doc(hidden)]
pub mod testing;
pub mod urls;
pub mod webhook;
