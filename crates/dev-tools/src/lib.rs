//! recording-relay's developer tools; nothing here ships in the daemon.
//!
//! - [`testing`]: the test kit of the daemon's unit and integration tests
//!   (test databases with the host schema, signed webhooks).
//! - [`demo`]: the whole flow on one machine, told as a story (`cargo demo`).
//! - Binaries: `demo`, `bench` (BENCHMARKS.md) and `chaos` (RELIABILITY.md).

pub mod demo;
pub mod testing;
