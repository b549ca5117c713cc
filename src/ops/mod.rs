//! The operator's side of the queue: what runs beside the relay of one
//! recording rather than in it. `reconcile.rs` enqueues recordings no
//! webhook announced, `missing.rs` looks up (or else reports) the
//! recordings of announced calls that never came, `retention.rs` prunes
//! old jobs, `alerts.rs` tells a human about jobs that ended badly, and
//! `check.rs` is `recording-relay check`, one line per dependency.
//!
//! They use the queue (`crate::jobs`) and the provider clients
//! (`crate::providers`); nothing in the queue, the pipeline or the
//! listener uses them, except the worker, which runs the alert sweep and
//! the look-up for missing recordings.

pub mod alerts;
pub mod check;
pub mod missing;
pub mod reconcile;
pub mod retention;
