//! recording-relay: Telnyx call recordings into private Supabase Storage,
//! linked to ZScribe intakes, with PostgreSQL as the only coordinator.
//! `docs/DESIGN.md` in the repository has the design and the provider facts
//! it rests on, with their sources.
//!
//! How a recording travels, and where each part lives:
//!
//! - [`webhook`]: the hyper listener. [`webhook::verify`] checks Telnyx's
//!   Ed25519 signature on the raw body, [`webhook::event`] reads the
//!   envelope leniently, `webhook/body.rs` holds bodies against a byte
//!   budget and each source's share; one `recording_jobs` row is inserted
//!   and the answer comes after COMMIT.
//! - [`call`]: the facts of one recorded call, one struct wherever they
//!   travel (the webhook's job, the job row, Telnyx's recording).
//! - [`jobs`]: the durable queue. Every statement on `recording_jobs` is in
//!   [`jobs::queue`], one concept a file (lifecycle, progress, operator,
//!   retention, alerts, gauges, look-ups); the retry schedule
//!   ([`jobs::backoff`]) and the worker ([`jobs::worker`]: LISTEN/NOTIFY +
//!   poll, `SKIP LOCKED` claims, fenced leases, heartbeats, drain). A lost
//!   lease is an error ([`jobs::QueueError::LeaseLost`]).
//! - [`pipeline`]: the steps of one job (resolve, match, store, move, link,
//!   delete), in order in `pipeline/mod.rs`. The matching rules are plain
//!   code (`pipeline/rules.rs`, tested as a table of cases); the SQL
//!   against ZScribe's tables is `pipeline/intakes.rs`;
//!   `pipeline/transfer.rs` streams bytes from Telnyx into the upload,
//!   hashed and counted on the way.
//! - [`providers`]: the clients of Telnyx's Recordings API
//!   ([`providers::telnyx_api`]) and Supabase Storage
//!   ([`providers::storage_api`]), and the URL helpers they share
//!   ([`providers::urls`]). Leaves: they know the configuration, not jobs
//!   or metrics; what a provider's error means for a job, and counting it,
//!   is the pipeline's.
//! - `object_paths.rs`: the one object path form that may be played, an
//!   intake's own folder (issue #19).
//! - [`playback`]: signed URLs and a player page for the UI's users, on an
//!   address of its own; off unless configured. [`playback::auth`] and
//!   [`playback::jwks`] check Supabase user tokens, [`playback::recording`]
//!   derives what the player may show, [`playback::audit`] records every URL
//!   handed out before it leaves.
//! - [`ops`]: the operator's tasks. [`ops::reconcile`] enqueues recordings
//!   Telnyx made that no job knows (missed webhooks); [`ops::retention`]
//!   prunes old jobs and keeps every pointer to patient data (or deletes it
//!   with its object after a configured period and an alert);
//!   [`ops::alerts`] sends each alert a job owes, whoever ended it;
//!   [`ops::check`] is `recording-relay check`, one line per dependency.
//!
//! Around them:
//!
//! - [`app`]: wires listener, worker and playback into one process with one
//!   shutdown token, and talks to systemd (`READY`, `STOPPING`, watchdog).
//! - `server.rs`: the accept loop the webhook, playback and metrics
//!   listeners share (connection limits in all and per source, idle and age
//!   limits, header-read timeout, bounded shutdown).
//! - [`config`]: defaults, TOML file, systemd credentials, environment,
//!   validated once; one file per section.
//! - [`db`]: pools and their checks (session settings, pooler detection),
//!   migration (history carry-over, known edits), expected indexes.
//! - [`cli`]: subcommands, and their errors mapped to exit codes once.
//! - [`metrics`]: a leaf the others report into; renders `GET /metrics`
//!   from counters, histograms and the queue gauges [`health`] hands it.
//! - [`health`]: the pool of its own through which `/readyz` and the queue
//!   gauges reach the database, so probes never take a webhook's or a
//!   heartbeat's connection.
//! - [`telemetry`]: log set-up, and masking of phone numbers and URLs.

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
