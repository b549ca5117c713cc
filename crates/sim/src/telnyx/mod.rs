//! Local stand-in for Telnyx's call recordings API (`/v2/recordings`) and the
//! presigned S3 URLs its `download_urls` point at.
//!
//! Shapes follow Telnyx's OpenAPI spec and error catalogue: errors are
//! `{"errors":[{"code","title","detail"}]}` with codes 10009 (authentication
//! failed), 10005 (resource not found), 10011 (too many requests), 10007
//! (unexpected error) and 10015 (bad request). Download URLs behave like S3
//! presigned URLs: no bearer token, `X-Amz-Date` + `X-Amz-Expires`, S3 XML
//! errors, `Range` support.
//!
//! Strict where Telnyx is, each behaviour behind a switch of
//! [`TelnyxSimBehaviour`] (set at start or with
//! [`TelnyxSim::set_behaviour`]): `download_urls` carries only the format
//! the recording was made in; `from`/`to` can be left out (older schema,
//! Telnyx's own examples); timestamps can come in other ISO 8601 shapes than
//! RFC 3339; UUID filters (`filter[call_session_id]`, `filter[call_leg_id]`)
//! answer 422 when malformed; unknown query parameters are refused (400);
//! a 429 can carry `Retry-After` as well as `x-ratelimit-reset`.
//!
//! Simplifications, on purpose: a recording's bytes are whatever the test
//! gave, served under its format's content type; filters match exactly;
//! expiry has one-second resolution (a URL lives between `download_url_ttl`
//! and `download_url_ttl` + 1 s, since `X-Amz-Date` has whole seconds).

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use crate::AudioFormat;
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, SubsecRound, Utc};
use futures_util::Stream;
use hyper::{Method, Request, body::Incoming};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::http::{
    Abort, ByteRange, Fault, FaultAction, FaultPlan, Resp, bearer, bind, bytes_response,
    cut_response, hmac_sha256, json_response, parse_query, parse_range, percent_decode,
    percent_encode, query_value, random_key, response, set_header, spawn_server, start_fault,
    stream_body,
};

mod api;
mod audio;
mod download;
#[cfg(test)]
mod tests;

use api::handle;
pub use audio::SimAudio;
use audio::{SAMPLE_RATE, WAV_HEADER_LEN};
use download::mint_url;

/// Settings of a [`TelnyxSim`].
#[derive(Debug, Clone)]
pub struct TelnyxSimConfig {
    /// The API key the simulator accepts as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Lifetime of the presigned download URLs minted by `GET /recordings…`
    /// (Telnyx: 10 minutes).
    pub download_url_ttl: Duration,
    /// Seed of the random fault generator, so a chaos run can be replayed.
    pub fault_seed: u64,
    /// Stops the simulator when cancelled (so does dropping every handle).
    pub cancel: CancellationToken,
    /// How strictly it behaves like Telnyx; changeable while running.
    pub behaviour: TelnyxSimBehaviour,
    /// The origin (`http://HOST:PORT`) its API base and download URLs name;
    /// by default its own address. A proxy in front of it (the chaos run's
    /// partitions) sets its own, so that downloads cross the proxy too.
    pub public_origin: Option<String>,
}

impl Default for TelnyxSimConfig {
    fn default() -> Self {
        Self {
            api_key: "KEY_sim_telnyx".to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            download_url_ttl: Duration::from_secs(600),
            fault_seed: 0x7e1e_5eed,
            cancel: CancellationToken::new(),
            behaviour: TelnyxSimBehaviour::default(),
            public_origin: None,
        }
    }
}

/// One switch per behaviour of Telnyx's that the relay must cope with. The
/// default is Telnyx as its OpenAPI spec and docs describe it (newest
/// schema, with numbers and RFC 3339 timestamps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelnyxSimBehaviour {
    /// `download_urls` holds only the recording's own format, fixed when
    /// the recording started (Telnyx). Off: both, as this simulator once
    /// assumed; the other format then serves the same bytes.
    pub only_recorded_format: bool,
    /// `from`/`to` in recordings (newest spec). Off: the older schema and
    /// Telnyx's "retrieve a recording" example, which have no numbers.
    pub numbers: bool,
    /// The shape of every timestamp in recordings.
    pub timestamps: SimTimestamps,
    /// `filter[call_session_id]` and `filter[call_leg_id]` are UUIDs; a
    /// malformed one is answered 422, as Telnyx does.
    pub uuid_filters: bool,
    /// A query parameter the spec does not list is refused (400), so a
    /// misspelt filter cannot silently list everything.
    pub refuse_unknown_filters: bool,
    /// `Retry-After` on 429 answers (seconds or an HTTP date), as the
    /// official SDKs honour.
    pub retry_after: Option<String>,
    /// `x-ratelimit-reset` on 429 answers (seconds).
    pub ratelimit_reset: Option<String>,
    /// `Content-Length` on downloads. Off: the body is sent chunked with no
    /// length anywhere, as a host streaming a file may send it.
    pub download_length: bool,
    /// Every download body ends this many bytes early, and ends cleanly: a
    /// cut file on the host. With a length the client sees the shortfall;
    /// without one nothing in HTTP does.
    pub download_short_by: u64,
    /// Every `DELETE /v2/recordings/{id}` is answered with this status and
    /// deletes nothing: a Telnyx that keeps refusing the clean-up.
    pub delete_status: Option<u16>,
}

impl Default for TelnyxSimBehaviour {
    fn default() -> Self {
        Self {
            only_recorded_format: true,
            numbers: true,
            timestamps: SimTimestamps::Rfc3339,
            uuid_filters: true,
            refuse_unknown_filters: true,
            retry_after: None,
            ratelimit_reset: Some("1".to_owned()),
            delete_status: None,
            download_length: true,
            download_short_by: 0,
        }
    }
}

/// Timestamp shapes: the spec says only "ISO 8601 formatted date" of a
/// plain string, so more than RFC 3339 can come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimTimestamps {
    /// `2019-01-23T18:10:02.574Z`, as in the spec's examples.
    Rfc3339,
    /// `2019-01-23T18:10:02.574`: no offset (UTC meant).
    NoOffset,
    /// `2019-01-23 18:10:02.574+0000`: space separator, offset without colon.
    SpaceCompactOffset,
    /// `20190123T181002.574Z`: ISO 8601 basic format.
    Basic,
}

impl SimTimestamps {
    pub const ALL: [SimTimestamps; 4] = [
        SimTimestamps::Rfc3339,
        SimTimestamps::NoOffset,
        SimTimestamps::SpaceCompactOffset,
        SimTimestamps::Basic,
    ];

    pub fn format(self, t: DateTime<Utc>) -> String {
        match self {
            SimTimestamps::Rfc3339 => t.to_rfc3339_opts(SecondsFormat::Millis, true),
            SimTimestamps::NoOffset => t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            SimTimestamps::SpaceCompactOffset => t.format("%Y-%m-%d %H:%M:%S%.3f+0000").to_string(),
            SimTimestamps::Basic => t.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
        }
    }
}

/// A recording the simulator serves, as tests add it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRecording {
    pub id: String,
    pub call_session_id: String,
    pub call_control_id: String,
    pub call_leg_id: String,
    pub connection_id: String,
    pub from: String,
    pub to: String,
    pub duration_millis: u64,
    /// `"single"` or `"dual"`.
    pub channels: String,
    pub recording_started_at: DateTime<Utc>,
    pub recording_ended_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The format it was recorded in: the only one `download_urls` offers
    /// (with [`TelnyxSimBehaviour::only_recorded_format`]).
    pub format: AudioFormat,
    pub content: SimAudio,
}

impl SimRecording {
    /// A one-minute single-channel recording created now, with a 960 044-byte
    /// generated WAV (60 s of 8 kHz 16-bit mono) seeded from `id`, and fresh
    /// random call ids. Timestamps have millisecond precision, like the API's
    /// JSON, so they survive a round trip unchanged.
    pub fn sample(id: impl Into<String>) -> Self {
        let id = id.into();
        let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let now = Utc::now().trunc_subsecs(3);
        let duration_millis = 60_000;
        Self {
            call_session_id: uuid::Uuid::new_v4().to_string(),
            call_control_id: format!("v3:{}", uuid::Uuid::new_v4().simple()),
            call_leg_id: uuid::Uuid::new_v4().to_string(),
            connection_id: "1684641123236054244".to_owned(),
            from: "+15551230001".to_owned(),
            to: "+15557650002".to_owned(),
            duration_millis,
            channels: "single".to_owned(),
            recording_started_at: now - chrono::Duration::milliseconds(61_000),
            recording_ended_at: now - chrono::Duration::milliseconds(1_000),
            created_at: now,
            format: AudioFormat::Wav,
            content: SimAudio::generated(
                WAV_HEADER_LEN + u64::from(SAMPLE_RATE) * 2 * duration_millis / 1000,
                seed,
            ),
            id,
        }
    }
}

/// Handle on a running Telnyx simulator. Clones share the same server; the
/// server stops when the config's token is cancelled or the last clone drops.
#[derive(Clone)]
pub struct TelnyxSim {
    shared: Arc<Shared>,
}

struct Shared {
    state: Arc<State>,
    addr: SocketAddr,
    _stop: DropGuard,
}

/// What request handlers share with the handle. Immutable settings plus one
/// mutex; the mutex is never held across an await.
struct State {
    api_key: String,
    ttl: Duration,
    origin: String,
    signing_key: [u8; 32],
    cancel: CancellationToken,
    inner: Mutex<Inner>,
}

struct Inner {
    behaviour: TelnyxSimBehaviour,
    recordings: BTreeMap<String, Entry>,
    deleted: Vec<String>,
    api_faults: FaultPlan,
    download_faults: FaultPlan,
    requests: Vec<String>,
    downloads: HashMap<String, usize>,
    /// Downloads refused because their URL had expired.
    expired_downloads: usize,
}

struct Entry {
    rec: SimRecording,
    deleted: bool,
    updated_at: DateTime<Utc>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not wedge the simulator for the rest.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for TelnyxSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelnyxSim")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl TelnyxSim {
    /// Binds and starts serving. Must be called inside a Tokio runtime.
    pub fn start(cfg: TelnyxSimConfig) -> io::Result<TelnyxSim> {
        let cancel = cfg.cancel.child_token();
        let listener = bind(cfg.addr)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            api_key: cfg.api_key,
            ttl: cfg.download_url_ttl,
            origin: cfg
                .public_origin
                .unwrap_or_else(|| format!("http://{addr}")),
            signing_key: random_key(),
            cancel: cancel.clone(),
            inner: Mutex::new(Inner {
                behaviour: cfg.behaviour,
                recordings: BTreeMap::new(),
                deleted: Vec::new(),
                api_faults: FaultPlan::new(cfg.fault_seed),
                download_faults: FaultPlan::new(cfg.fault_seed.wrapping_add(1)),
                requests: Vec::new(),
                downloads: HashMap::new(),
                expired_downloads: 0,
            }),
        });
        let server_state = Arc::clone(&state);
        spawn_server(listener, cancel.clone(), move |req| {
            handle(Arc::clone(&server_state), req)
        })?;
        Ok(TelnyxSim {
            shared: Arc::new(Shared {
                state,
                addr,
                _stop: cancel.drop_guard(),
            }),
        })
    }

    /// The API base, e.g. `http://127.0.0.1:PORT/v2` (the daemon's
    /// `TELNYX_API_URL`).
    pub fn base_url(&self) -> String {
        format!("{}/v2", self.shared.state.origin)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Adds (or replaces, un-deleting) a recording.
    pub fn add_recording(&self, rec: SimRecording) {
        let now = Utc::now();
        self.shared.state.lock().recordings.insert(
            rec.id.clone(),
            Entry {
                rec,
                deleted: false,
                updated_at: now,
            },
        );
    }

    /// A recording as added, deleted or not.
    pub fn recording(&self, id: &str) -> Option<SimRecording> {
        self.shared
            .state
            .lock()
            .recordings
            .get(id)
            .map(|e| e.rec.clone())
    }

    /// Mints a presigned download URL now, as `GET /recordings/{id}` would.
    /// `format` is `"wav"` or `"mp3"`.
    pub fn download_url(&self, id: &str, format: &str) -> String {
        mint_url(&self.shared.state, id, format, Utc::now())
    }

    /// Changes how strictly the simulator behaves, from the next request on.
    pub fn set_behaviour(&self, behaviour: TelnyxSimBehaviour) {
        self.shared.state.lock().behaviour = behaviour;
    }

    pub fn behaviour(&self) -> TelnyxSimBehaviour {
        self.shared.state.lock().behaviour.clone()
    }

    /// The next `n` API requests (not downloads) get `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.shared.state.lock().api_faults.push(n, fault);
    }

    /// The next `n` download requests get `fault`.
    pub fn fail_next_downloads(&self, n: usize, fault: Fault) {
        self.shared.state.lock().download_faults.push(n, fault);
    }

    /// Every request (API and download) gets one of `kinds` with
    /// `probability`, drawn from a generator seeded by `fault_seed`.
    /// A probability of 0 or no kinds turns random faults off.
    pub fn set_random_faults(&self, probability: f64, kinds: Vec<Fault>) {
        let mut g = self.shared.state.lock();
        g.api_faults.set_random(probability, kinds.clone());
        g.download_faults.set_random(probability, kinds);
    }

    /// Drops queued and random faults.
    pub fn clear_faults(&self) {
        let mut g = self.shared.state.lock();
        g.api_faults.clear();
        g.download_faults.clear();
    }

    /// Requests received whose path (without query) starts with
    /// `path_prefix`, e.g. `"/v2/recordings"` or `"/downloads/"`. Counts
    /// every request, including faulted and rejected ones.
    pub fn request_count(&self, path_prefix: &str) -> usize {
        self.shared
            .state
            .lock()
            .requests
            .iter()
            .filter(|p| p.starts_with(path_prefix))
            .count()
    }

    /// Ids deleted through `DELETE /v2/recordings/{id}`, in order.
    pub fn deleted_ids(&self) -> Vec<String> {
        self.shared.state.lock().deleted.clone()
    }

    /// Download requests (wav or mp3) for `id`, including faulted, expired
    /// and failed ones: every attempt the client made.
    pub fn download_count(&self, id: &str) -> usize {
        self.shared
            .state
            .lock()
            .downloads
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Downloads refused with "Request has expired": a client that used a
    /// URL past its lifetime instead of asking the API for a fresh one.
    pub fn expired_download_count(&self) -> usize {
        self.shared.state.lock().expired_downloads
    }

    /// Stops the server now (in-flight requests are dropped).
    pub fn shutdown(&self) {
        self.shared.state.cancel.cancel();
    }
}
