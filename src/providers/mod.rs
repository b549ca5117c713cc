//! The clients of the two providers the relay talks to, and what they
//! share: `telnyx_api` (the Recordings API and its download URLs),
//! `storage_api` (Supabase Storage), `urls.rs` (escaping path segments,
//! cutting credentials off URLs).
//!
//! Leaves: they know the configuration, not jobs, metrics or intakes. What
//! a provider's error means for a job, and counting it, is the pipeline's.
//! `object_paths.rs` is not here: which object path may be played is the
//! relay's own rule about its bucket (an intake's folder), shared by the
//! pipeline and playback, not something Storage knows or asks.

pub mod storage_api;
pub mod telnyx_api;
pub mod urls;
