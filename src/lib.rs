//! recording-relay: Telnyx call recordings into private Supabase Storage,
//! linked to ZScribe intakes, with PostgreSQL as the only coordinator.
//! `docs/DESIGN.md` in the repository has the design and the provider facts
//! it rests on, with their sources.
//!
//! How a recording travels, and where each part lives:
//!
//! - [`webhook`]: the hyper listener. [`webhook::verify`] checks Telnyx's
//!   Ed25519 signature on the raw body, [`webhook::event`] reads the
//!   envelope leniently; one `recording_jobs` row is inserted and the answer
//!   comes after COMMIT.
//! - [`call`]: the facts of one recorded call, one struct wherever they
//!   travel (the webhook's job, the job row, Telnyx's recording).
//! - [`jobs`]: the durable queue. All queue SQL ([`jobs::queue`]), the retry
//!   schedule ([`jobs::backoff`]) and the worker loop ([`jobs::worker`]:
//!   LISTEN/NOTIFY + poll, `SKIP LOCKED` claims, fenced leases, heartbeats,
//!   drain).
//! - [`pipeline`]: the steps of one job (resolve, match, store, link,
//!   delete). [`pipeline::intakes`] holds the SQL against ZScribe's tables
//!   (matching, reservations, linking), [`pipeline::transfer`] streams bytes
//!   from Telnyx into the upload, hashed and counted on the way.
//! - [`telnyx`]: the Recordings API client and its error classes.
//! - [`storage`]: the Supabase Storage client (POST and TUS uploads, object
//!   info, signed URLs, buckets), classifying errors by the body's code.
//! - `object_paths`: the one object path form that may be played, an
//!   intake's own folder (issue #19).
//! - [`playback`]: signed URLs and a player page for the UI's users, on an
//!   address of its own; off unless configured. [`playback::auth`] and
//!   [`playback::jwks`] check Supabase user tokens, [`playback::recording`]
//!   derives what the player may show, [`playback::audit`] records every URL
//!   handed out before it leaves.
//! - [`reconcile`]: enqueues recordings Telnyx made that no job knows
//!   (missed webhooks).
//! - [`retention`]: prunes old jobs, keeps every pointer to patient data
//!   (or deletes it with its object after a configured period and an alert).
//! - [`alerts`]: a POST to an operator's webhook (and an error line) for each
//!   job that ends badly, whoever ended it: the row owes it until sent.
//!
//! Around them:
//!
//! - [`app`]: wires listener, worker and playback into one process with one
//!   shutdown token, and talks to systemd (`READY`, `STOPPING`, watchdog).
//! - [`server`]: the accept loop the webhook, playback and metrics listeners
//!   share (connection limits in all and per source, idle and age limits,
//!   header-read timeout, bounded shutdown).
//! - [`config`]: defaults, TOML file, systemd credentials, environment,
//!   validated once.
//! - [`db`]: pool, session settings, migrations, schema and pooler checks.
//! - [`cli`]: subcommands and exit codes. [`check`]: `recording-relay check`,
//!   one line per dependency.
//! - [`metrics`]: `GET /metrics` (counters and histograms per process, queue
//!   gauges read from the database at most every few seconds).
//! - [`health`]: the pool of its own through which `/readyz` and the queue
//!   gauges reach the database, so probes never take a webhook's or a
//!   heartbeat's connection.
//! - [`telemetry`]: log set-up, and masking of phone numbers and URLs.
//!
//! The provider clients ([`telnyx`], [`storage`], and [`urls`] under both)
//! are leaves: they know the configuration, not jobs or metrics. What a
//! provider's error means for a job, and counting it, is the pipeline's.
//!
//! [`reconcile`]: ops::reconcile
//! [`retention`]: ops::retention
//! [`alerts`]: ops::alerts
//! [`check`]: ops::check
//! [`telnyx`]: providers::telnyx_api
//! [`storage`]: providers::storage_api
//! [`urls`]: providers::urls

pub mod app;
pub mod call;
pub mod cli;
pub mod config;
pub mod db;
pub mod health;
pub mod jobs;
pub mod metrics;
mod object_paths;
pub mod ops;
pub mod pipeline;
pub mod playback;
pub mod providers;
mod server;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod webhook;
