//! Local HTTP simulators of the two providers the daemon talks to, for tests
//! and the `demo` command (Telnyx and Supabase are not reachable from CI).
//!
//! - [`TelnyxSim`]: the call recordings API (`GET/DELETE /v2/recordings…`)
//!   and the presigned S3 URLs of `download_urls`, with expiry and `Range`.
//! - [`StorageSim`]: Supabase's storage-api (`/storage/v1`): buckets,
//!   standard and resumable (TUS 1.0.0) uploads, object info, signed URLs.
//!
//! Both bind `127.0.0.1:0` by default, run on the caller's Tokio runtime
//! and stop when their config's `CancellationToken` is cancelled or the last
//! handle is dropped. Handles are cheap clones used by tests to add data,
//! inspect what the daemon did and inject [`Fault`]s.
//!
//! Behaviour was checked against the real servers' source (supabase/storage,
//! tus-node-server) and Telnyx's OpenAPI spec; each file's header lists
//! where the simulator deliberately differs.

mod http;
pub mod storage;
pub mod telnyx;

pub use http::Fault;

/// The formats Telnyx records in, as `download_urls` keys them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    Wav,
    Mp3,
}

impl AudioFormat {
    pub fn extension(self) -> &'static str {
        match self {
            AudioFormat::Wav => "wav",
            AudioFormat::Mp3 => "mp3",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Mp3 => "audio/mpeg",
        }
    }
}
pub use storage::{BucketInfo, StorageSim, StorageSimConfig, StoredObject};
pub use telnyx::{
    SimAudio, SimRecording, SimTimestamps, TelnyxSim, TelnyxSimBehaviour, TelnyxSimConfig,
};
