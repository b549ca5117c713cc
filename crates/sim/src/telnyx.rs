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

/// Audio content of a simulated recording.
#[derive(Clone, PartialEq, Eq)]
pub enum SimAudio {
    /// Exactly these bytes.
    Bytes(Bytes),
    /// `len` deterministic bytes: a 44-byte WAV header (8 kHz, 16-bit mono
    /// PCM) for that length, then a 440 Hz tone with seeded noise. Produced
    /// on demand from any offset, so a 200 MB recording never sits in memory.
    Generated { len: u64, seed: u64 },
}

impl fmt::Debug for SimAudio {
    // Derived Debug would dump megabytes of audio into a failing assertion.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "SimAudio::Bytes({} bytes)", b.len()),
            Self::Generated { len, seed } => {
                write!(f, "SimAudio::Generated {{ len: {len}, seed: {seed} }}")
            }
        }
    }
}

const WAV_HEADER_LEN: u64 = 44;
const SAMPLE_RATE: u32 = 8000;
/// 8000 Hz / 440 Hz repeats exactly every 200 samples.
const TONE_PERIOD: usize = 200;
const CHUNK: usize = 64 * 1024;

fn tone_table() -> &'static [i16; TONE_PERIOD] {
    static TABLE: OnceLock<[i16; TONE_PERIOD]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|k| {
            let phase = 2.0 * std::f64::consts::PI * 440.0 * k as f64 / f64::from(SAMPLE_RATE);
            (6000.0 * phase.sin()) as i16
        })
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn sample(table: &[i16; TONE_PERIOD], seed: u64, k: u64) -> [u8; 2] {
    let tone = i32::from(table[(k % TONE_PERIOD as u64) as usize]);
    let noise = (splitmix64(seed ^ k.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 53) as i32 - 1024;
    // |tone| <= 6000 and |noise| <= 1024, so this always fits in i16.
    ((tone + noise) as i16).to_le_bytes()
}

impl SimAudio {
    /// Deterministic generated audio of `len` bytes.
    pub fn generated(len: u64, seed: u64) -> Self {
        Self::Generated { len, seed }
    }

    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Generated { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The canonical 44-byte header of a 8 kHz 16-bit mono PCM WAV file of
    /// `total_len` bytes (sizes saturate at 4 GiB, as WAV cannot say more).
    pub fn wav_header(total_len: u64) -> [u8; 44] {
        let riff = u32::try_from(total_len.saturating_sub(8)).unwrap_or(u32::MAX);
        let data = u32::try_from(total_len.saturating_sub(WAV_HEADER_LEN)).unwrap_or(u32::MAX);
        let mut h = [0u8; 44];
        h[0..4].copy_from_slice(b"RIFF");
        h[4..8].copy_from_slice(&riff.to_le_bytes());
        h[8..12].copy_from_slice(b"WAVE");
        h[12..16].copy_from_slice(b"fmt ");
        h[16..20].copy_from_slice(&16u32.to_le_bytes());
        h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
        h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
        h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
        h[28..32].copy_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // byte rate
        h[32..34].copy_from_slice(&2u16.to_le_bytes()); // block align
        h[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits per sample
        h[36..40].copy_from_slice(b"data");
        h[40..44].copy_from_slice(&data.to_le_bytes());
        h
    }

    /// Fills `buf` with the content starting at `offset`. Bytes past the end
    /// are left untouched; callers stay within [`len`](Self::len).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        match self {
            Self::Bytes(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
            }
            Self::Generated { len, seed } => fill_generated(*len, *seed, offset, buf),
        }
    }

    /// The whole content in memory; for small recordings in tests.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(self.len()).unwrap_or(usize::MAX)];
        self.read_at(0, &mut v);
        v
    }

    /// SHA-256 of the content, hex, computed in chunks.
    pub fn sha256_hex(&self) -> String {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < self.len() {
            let n =
                usize::try_from((self.len() - offset).min(buf.len() as u64)).unwrap_or(buf.len());
            self.read_at(offset, &mut buf[..n]);
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        hex::encode(hasher.finalize())
    }

    /// The whole content as a stream of 64 KiB chunks (e.g. for
    /// `reqwest::Body::wrap_stream`).
    pub fn stream(&self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.stream_range(0, self.len())
    }

    /// Bytes `start..end` (end exclusive, clamped to the length) as a stream.
    pub fn stream_range(
        &self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let audio = self.clone();
        let end = end.min(audio.len());
        futures_util::stream::unfold(start, move |pos| {
            let audio = audio.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let n = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
                let chunk = match &audio {
                    Self::Bytes(b) => {
                        let p = usize::try_from(pos).unwrap_or(usize::MAX).min(b.len());
                        b.slice(p..(p + n).min(b.len()))
                    }
                    Self::Generated { .. } => {
                        let mut buf = vec![0u8; n];
                        audio.read_at(pos, &mut buf);
                        Bytes::from(buf)
                    }
                };
                Some((Ok(chunk), pos + n as u64))
            }
        })
    }
}

fn fill_generated(len: u64, seed: u64, offset: u64, buf: &mut [u8]) {
    let avail = usize::try_from(len.saturating_sub(offset)).unwrap_or(usize::MAX);
    let buf_len = buf.len().min(avail);
    let buf = &mut buf[..buf_len];
    let mut i = 0;
    let mut pos = offset;
    if pos < WAV_HEADER_LEN {
        let header = SimAudio::wav_header(len);
        while i < buf.len() && pos < WAV_HEADER_LEN {
            buf[i] = header[pos as usize];
            i += 1;
            pos += 1;
        }
    }
    let table = tone_table();
    // Samples are two bytes; a range may start on the second one.
    if i < buf.len() && (pos - WAV_HEADER_LEN) % 2 == 1 {
        buf[i] = sample(table, seed, (pos - WAV_HEADER_LEN) / 2)[1];
        i += 1;
        pos += 1;
    }
    while i + 1 < buf.len() {
        let s = sample(table, seed, (pos - WAV_HEADER_LEN) / 2);
        buf[i] = s[0];
        buf[i + 1] = s[1];
        i += 2;
        pos += 2;
    }
    if i < buf.len() {
        buf[i] = sample(table, seed, (pos - WAV_HEADER_LEN) / 2)[0];
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
            origin: format!("http://{addr}"),
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

    /// Stops the server now (in-flight requests are dropped).
    pub fn shutdown(&self) {
        self.shared.state.cancel.cancel();
    }
}

fn amz_date(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

fn url_signature(key: &[u8], file: &str, date: &str, expires: u64) -> String {
    hex::encode(hmac_sha256(
        key,
        format!("GET\n/downloads/{file}\n{date}\n{expires}").as_bytes(),
    ))
}

fn mint_url(state: &State, id: &str, format: &str, now: DateTime<Utc>) -> String {
    // X-Amz-Date has whole seconds; rounding it up keeps X-Amz-Expires
    // equal to the TTL (600, as Telnyx's URLs say) while the URL still lives
    // at least the full TTL.
    let floor = now.trunc_subsecs(0);
    let date_t = if floor == now {
        floor
    } else {
        floor + chrono::Duration::seconds(1)
    };
    let expires = state.ttl.as_secs_f64().ceil().max(1.0) as u64;
    let date = amz_date(date_t);
    let file = format!("{id}.{format}");
    let sig = url_signature(&state.signing_key, &file, &date, expires);
    format!(
        "{}/downloads/{}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=SIMKEY%2F{}%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}",
        state.origin,
        percent_encode(&file, false),
        date.get(..8).unwrap_or(&date),
    )
}

/// `/downloads/{id}.{wav|mp3}` → (id, format).
fn parse_download_path(path: &str) -> Option<(String, String)> {
    let file = percent_decode(path.strip_prefix("/downloads/")?, false);
    let (id, format) = file.rsplit_once('.')?;
    (!id.is_empty() && (format == "wav" || format == "mp3"))
        .then(|| (id.to_owned(), format.to_owned()))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Abort> {
    let path = req.uri().path().to_owned();
    let is_download = path.starts_with("/downloads/");
    let (fault, behaviour) = {
        let mut g = state.lock();
        g.requests.push(path.clone());
        if is_download {
            if let Some((id, _)) = parse_download_path(&path) {
                *g.downloads.entry(id).or_insert(0) += 1;
            }
            (g.download_faults.next(), g.behaviour.clone())
        } else {
            (g.api_faults.next(), g.behaviour.clone())
        }
    };
    let cut = match start_fault(fault, &state.cancel).await {
        FaultAction::None => None,
        FaultAction::Reset => return Err(Abort),
        FaultAction::CutAfter(n) => Some(n),
        FaultAction::Status(s) => {
            let mut resp = if is_download {
                s3_fault(s)
            } else {
                api_fault(s)
            };
            if s == 429 {
                rate_limit_headers(&mut resp, &behaviour);
            }
            return Ok(resp);
        }
    };
    let resp = if is_download {
        download(&state, &req)
    } else {
        api(&state, &req)
    };
    Ok(match cut {
        Some(n) => cut_response(resp, n),
        None => resp,
    })
}

fn telnyx_error(
    status: u16,
    code: &str,
    title: &str,
    detail: &str,
    parameter: Option<&str>,
) -> Resp {
    let mut err = json!({
        "code": code,
        "title": title,
        "detail": detail,
        "meta": { "url": format!("https://developers.telnyx.com/docs/overview/errors/{code}") },
    });
    if let Some(p) = parameter {
        err["source"] = json!({ "parameter": p });
    }
    json_response(status, &json!({ "errors": [err] }))
}

fn not_found() -> Resp {
    telnyx_error(
        404,
        "10005",
        "Resource not found",
        "The requested resource or URL could not be found.",
        None,
    )
}

fn bad_request(detail: &str, parameter: &str) -> Resp {
    telnyx_error(400, "10015", "Bad Request", detail, Some(parameter))
}

fn api_fault(status: u16) -> Resp {
    let (code, title, detail) = match status {
        400 => (
            "10015",
            "Bad Request",
            "The request failed because it was not well-formed.",
        ),
        401 => (
            "10009",
            "Authentication failed",
            "The required authentication headers were either invalid or not included in the request.",
        ),
        403 => (
            "10010",
            "Authorization failed",
            "You do not have permission to perform the requested action on the specified resource or resources.",
        ),
        404 => (
            "10005",
            "Resource not found",
            "The requested resource or URL could not be found.",
        ),
        408 => ("10008", "Request timeout", "The request timed out."),
        429 => (
            "10011",
            "Too many requests",
            "You have exceeded the maximum number of allowed requests.",
        ),
        _ => ("10007", "Unexpected error", "An unexpected error occured."),
    };
    telnyx_error(status, code, title, detail, None)
}

fn rate_limit_headers(resp: &mut Resp, b: &TelnyxSimBehaviour) {
    set_header(resp, "x-ratelimit-limit", "100");
    set_header(resp, "x-ratelimit-remaining", "0");
    if let Some(reset) = &b.ratelimit_reset {
        set_header(resp, "x-ratelimit-reset", reset);
    }
    if let Some(after) = &b.retry_after {
        set_header(resp, "retry-after", after);
    }
}

fn s3_error(status: u16, code: &str, message: &str) -> Resp {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{}</RequestId></Error>",
        uuid::Uuid::new_v4().simple()
    );
    bytes_response(status, "application/xml", body)
}

fn s3_fault(status: u16) -> Resp {
    match status {
        403 => s3_error(403, "AccessDenied", "Access Denied"),
        404 => s3_error(404, "NoSuchKey", "The specified key does not exist."),
        500 => s3_error(
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        503 | 429 => s3_error(status, "SlowDown", "Please reduce your request rate."),
        _ => s3_error(
            status,
            "ServiceUnavailable",
            "The service is unavailable. Please try again.",
        ),
    }
}

fn api(state: &State, req: &Request<Incoming>) -> Resp {
    if bearer(req.headers()) != Some(state.api_key.as_str()) {
        return api_fault(401);
    }
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v2/recordings") else {
        return not_found();
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return match *req.method() {
            Method::GET => list(state, req.uri().query()),
            _ => not_found(),
        };
    }
    let Some(id) = rest.strip_prefix('/').map(|s| percent_decode(s, false)) else {
        return not_found();
    };
    if id.contains('/') {
        return not_found();
    }
    let now = Utc::now();
    let mut g = state.lock();
    let behaviour = g.behaviour.clone();
    let Some(entry) = g.recordings.get_mut(&id).filter(|e| !e.deleted) else {
        return not_found();
    };
    match *req.method() {
        Method::GET => {
            let data = recording_json(state, &behaviour, entry, now);
            json_response(200, &json!({ "data": data }))
        }
        Method::DELETE => {
            entry.deleted = true;
            entry.updated_at = now;
            let data = recording_json(state, &behaviour, entry, now);
            g.deleted.push(id);
            json_response(200, &json!({ "data": data }))
        }
        _ => not_found(),
    }
}

fn recording_json(state: &State, b: &TelnyxSimBehaviour, e: &Entry, now: DateTime<Utc>) -> Value {
    let r = &e.rec;
    let ts = |t: DateTime<Utc>| b.timestamps.format(t);
    let recorded = r.format.extension();
    let mut urls = serde_json::Map::new();
    for format in ["mp3", "wav"] {
        if format == recorded || !b.only_recorded_format {
            urls.insert(
                format.to_owned(),
                mint_url(state, &r.id, format, now).into(),
            );
        }
    }
    let mut data = json!({
        "record_type": "recording",
        "id": r.id,
        "call_session_id": r.call_session_id,
        "call_control_id": r.call_control_id,
        "call_leg_id": r.call_leg_id,
        "connection_id": r.connection_id,
        "conference_id": null,
        "channels": r.channels,
        "duration_millis": r.duration_millis,
        "from": r.from,
        "to": r.to,
        "recording_started_at": ts(r.recording_started_at),
        "recording_ended_at": ts(r.recording_ended_at),
        "created_at": ts(r.created_at),
        "updated_at": ts(e.updated_at),
        "status": "completed",
        "source": "call",
        "download_urls": urls,
    });
    if !b.numbers
        && let Some(obj) = data.as_object_mut()
    {
        obj.remove("from");
        obj.remove("to");
    }
    data
}

/// The list parameters the simulator implements. The spec also has
/// `conference_id`, `conference_region`, `sip_call_id`, `start_time` and
/// `end_time` filters; they are refused here rather than ignored, so a test
/// can never pass on a filter that filtered nothing.
const LIST_PARAMS: &[&str] = &[
    "page[number]",
    "page[size]",
    "filter[call_session_id]",
    "filter[call_leg_id]",
    "filter[call_control_id]",
    "filter[connection_id]",
    "filter[from]",
    "filter[to]",
    "filter[created_at][gte]",
    "filter[created_at][lte]",
];

/// Filters the spec types as `format: uuid`.
const UUID_FILTERS: &[&str] = &["filter[call_session_id]", "filter[call_leg_id]"];

fn unprocessable(detail: &str, parameter: &str) -> Resp {
    telnyx_error(422, "10015", "Invalid parameter", detail, Some(parameter))
}

fn list(state: &State, query: Option<&str>) -> Resp {
    let q = parse_query(query);
    let behaviour = state.lock().behaviour.clone();
    if behaviour.refuse_unknown_filters
        && let Some((key, _)) = q.iter().find(|(k, _)| !LIST_PARAMS.contains(&k.as_str()))
    {
        return bad_request("unknown or unsupported query parameter", key);
    }
    if behaviour.uuid_filters {
        for key in UUID_FILTERS {
            if let Some(v) = query_value(&q, key)
                && uuid::Uuid::try_parse(v).is_err()
            {
                return unprocessable("must be a valid UUID", key);
            }
        }
    }
    let page_number = match query_value(&q, "page[number]").map(str::parse::<u64>) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            return bad_request(
                "page[number] must be an integer greater than or equal to 1",
                "page[number]",
            );
        }
    };
    let page_size = match query_value(&q, "page[size]").map(str::parse::<u64>) {
        None => 20,
        Some(Ok(n)) if (1..=250).contains(&n) => n,
        Some(_) => {
            return bad_request(
                "page[size] must be an integer between 1 and 250",
                "page[size]",
            );
        }
    };
    let mut bounds = [None, None];
    for (slot, key) in bounds
        .iter_mut()
        .zip(["filter[created_at][gte]", "filter[created_at][lte]"])
    {
        if let Some(v) = query_value(&q, key) {
            match DateTime::parse_from_rfc3339(v) {
                Ok(t) => *slot = Some(t.with_timezone(&Utc)),
                Err(_) => return bad_request("must be an ISO 8601 datetime", key),
            }
        }
    }
    let [gte, lte] = bounds;
    let exact = |key: &str| query_value(&q, key).map(str::to_owned);
    let (session, leg, control, connection, from, to) = (
        exact("filter[call_session_id]"),
        exact("filter[call_leg_id]"),
        exact("filter[call_control_id]"),
        exact("filter[connection_id]"),
        exact("filter[from]"),
        exact("filter[to]"),
    );
    let now = Utc::now();
    let g = state.lock();
    let mut hits: Vec<&Entry> = g
        .recordings
        .values()
        .filter(|e| !e.deleted)
        .filter(|e| {
            let r = &e.rec;
            session.as_ref().is_none_or(|v| *v == r.call_session_id)
                && leg.as_ref().is_none_or(|v| *v == r.call_leg_id)
                && control.as_ref().is_none_or(|v| *v == r.call_control_id)
                && connection.as_ref().is_none_or(|v| *v == r.connection_id)
                && from.as_ref().is_none_or(|v| *v == r.from)
                && to.as_ref().is_none_or(|v| *v == r.to)
                && gte.is_none_or(|t| r.created_at >= t)
                && lte.is_none_or(|t| r.created_at <= t)
        })
        .collect();
    hits.sort_by(|a, b| (a.rec.created_at, &a.rec.id).cmp(&(b.rec.created_at, &b.rec.id)));
    let total = hits.len() as u64;
    let skip = usize::try_from((page_number - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
    let data: Vec<Value> = hits
        .iter()
        .skip(skip)
        .take(usize::try_from(page_size).unwrap_or(250))
        .map(|e| recording_json(state, &behaviour, e, now))
        .collect();
    json_response(
        200,
        &json!({
            "data": data,
            "meta": {
                "page_number": page_number,
                "page_size": page_size,
                "total_pages": total.div_ceil(page_size),
                "total_results": total,
            },
        }),
    )
}

fn download(state: &State, req: &Request<Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return s3_error(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
    }
    let Some((id, format)) = parse_download_path(req.uri().path()) else {
        return s3_error(404, "NoSuchKey", "The specified key does not exist.");
    };
    let q = parse_query(req.uri().query());
    let (Some(date), Some(expires), Some(sig)) = (
        query_value(&q, "X-Amz-Date"),
        query_value(&q, "X-Amz-Expires").and_then(|v| v.parse::<u64>().ok()),
        query_value(&q, "X-Amz-Signature"),
    ) else {
        return s3_error(
            403,
            "AccessDenied",
            "Query-string authentication requires the X-Amz-Date, X-Amz-Expires and X-Amz-Signature parameters",
        );
    };
    let expected = url_signature(&state.signing_key, &format!("{id}.{format}"), date, expires);
    if expected != sig {
        return s3_error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        );
    }
    let Ok(minted) = NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ").map(|t| t.and_utc())
    else {
        return s3_error(
            403,
            "AuthorizationQueryParametersError",
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
        );
    };
    // Checked arithmetic: an absurd X-Amz-Expires must not panic the server.
    let deadline = i64::try_from(expires)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .and_then(|d| minted.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if Utc::now() >= deadline {
        return s3_error(403, "AccessDenied", "Request has expired");
    }
    let (content, behaviour) = {
        let g = state.lock();
        // Only the recorded format's file exists, unless told otherwise.
        match g.recordings.get(&id).filter(|e| {
            !e.deleted && (!g.behaviour.only_recorded_format || e.rec.format.extension() == format)
        }) {
            Some(e) => (e.rec.content.clone(), g.behaviour.clone()),
            None => return s3_error(404, "NoSuchKey", "The specified key does not exist."),
        }
    };
    let content_type = if format == "mp3" {
        "audio/mpeg"
    } else {
        "audio/wav"
    };
    let size = content.len();
    let range = parse_range(super::http::header_str(req.headers(), "range"), size);
    let (code, start, end) = match range {
        ByteRange::Full => (200, 0, size),
        ByteRange::Partial { start, end } => (206, start, end + 1),
        ByteRange::Unsatisfiable => {
            let mut resp = s3_error(
                416,
                "InvalidRange",
                "The requested range is not satisfiable",
            );
            set_header(&mut resp, "content-range", &format!("bytes */{size}"));
            return resp;
        }
    };
    let sent_end = end.saturating_sub(behaviour.download_short_by).max(start);
    let mut resp = response(
        code,
        content_type,
        stream_body(content.stream_range(start, sent_end)),
    );
    if behaviour.download_length {
        set_header(&mut resp, "content-length", &(end - start).to_string());
    }
    set_header(&mut resp, "accept-ranges", "bytes");
    if code == 206 {
        set_header(
            &mut resp,
            "content-range",
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use reqwest::{Client, StatusCode};
    use std::time::Instant;

    const KEY: &str = "KEY_test";

    fn client() -> Client {
        // no_proxy: a proxy from the environment must not see loopback tests.
        Client::builder().no_proxy().build().expect("client")
    }

    fn sim_with(ttl: Duration) -> TelnyxSim {
        TelnyxSim::start(TelnyxSimConfig {
            api_key: KEY.to_owned(),
            download_url_ttl: ttl,
            ..TelnyxSimConfig::default()
        })
        .expect("start")
    }

    fn sim() -> TelnyxSim {
        sim_with(Duration::from_secs(600))
    }

    async fn get_json(c: &Client, url: &str, key: &str) -> (StatusCode, Value) {
        let resp = c.get(url).bearer_auth(key).send().await.expect("send");
        let status = resp.status();
        (status, resp.json().await.expect("json"))
    }

    fn assert_telnyx_error(body: &Value, code: &str, title: &str) {
        assert_eq!(body["errors"][0]["code"], code, "{body}");
        assert_eq!(body["errors"][0]["title"], title, "{body}");
        assert!(body["errors"][0]["detail"].is_string(), "{body}");
    }

    async fn list_query(sim: &TelnyxSim, q: &[(&str, &str)]) -> (StatusCode, Value) {
        let resp = client()
            .get(format!("{}/recordings", sim.base_url()))
            .bearer_auth(KEY)
            .query(q)
            .send()
            .await
            .expect("send");
        let status = resp.status();
        (status, resp.json().await.expect("json"))
    }

    #[tokio::test]
    async fn download_urls_offer_only_the_recorded_format_unless_told() {
        let sim = sim();
        let mut rec = SimRecording::sample("3f0c2a51-6f7e-4d2b-9a1c-0e5d4b3a2f10");
        rec.format = AudioFormat::Mp3;
        rec.content = SimAudio::Bytes(Bytes::from_static(b"ID3\x04\x00fake mp3 frames"));
        sim.add_recording(rec.clone());
        let c = client();
        let url = format!("{}/recordings/{}", sim.base_url(), rec.id);
        let (_, body) = get_json(&c, &url, KEY).await;
        let urls = &body["data"]["download_urls"];
        assert!(urls.get("wav").is_none(), "{urls}");
        let mp3 = urls["mp3"].as_str().expect("mp3").to_owned();
        let resp = c.get(&mp3).send().await.expect("send");
        assert_eq!(resp.headers()["content-type"], "audio/mpeg");
        assert_eq!(resp.bytes().await.expect("bytes"), rec.content.to_vec());
        let wav = sim.download_url(&rec.id, "wav");
        assert_eq!(
            c.get(&wav).send().await.expect("send").status(),
            StatusCode::NOT_FOUND
        );

        sim.set_behaviour(TelnyxSimBehaviour {
            only_recorded_format: false,
            ..TelnyxSimBehaviour::default()
        });
        let (_, body) = get_json(&c, &url, KEY).await;
        assert!(body["data"]["download_urls"]["wav"].is_string());
        assert!(body["data"]["download_urls"]["mp3"].is_string());
    }

    #[tokio::test]
    async fn numbers_and_timestamp_shapes_follow_the_switches() {
        let sim = sim();
        let rec = SimRecording::sample("8d1e6f3a-2b4c-4a5d-8e7f-1a2b3c4d5e6f");
        sim.add_recording(rec.clone());
        let c = client();
        let url = format!("{}/recordings/{}", sim.base_url(), rec.id);
        sim.set_behaviour(TelnyxSimBehaviour {
            numbers: false,
            ..TelnyxSimBehaviour::default()
        });
        let (_, body) = get_json(&c, &url, KEY).await;
        assert!(body["data"].get("from").is_none() && body["data"].get("to").is_none());
        let (_, listed) = list_query(&sim, &[]).await;
        assert!(listed["data"][0].get("to").is_none(), "{listed}");

        let t = rec.recording_started_at;
        let expected = [
            t.to_rfc3339_opts(SecondsFormat::Millis, true),
            t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            t.format("%Y-%m-%d %H:%M:%S%.3f+0000").to_string(),
            t.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
        ];
        for (shape, want) in SimTimestamps::ALL.into_iter().zip(expected) {
            sim.set_behaviour(TelnyxSimBehaviour {
                timestamps: shape,
                ..TelnyxSimBehaviour::default()
            });
            let (_, body) = get_json(&c, &url, KEY).await;
            assert_eq!(
                body["data"]["recording_started_at"],
                want.as_str(),
                "{shape:?}"
            );
            if shape != SimTimestamps::Rfc3339 {
                assert!(
                    DateTime::parse_from_rfc3339(&want).is_err(),
                    "{want} is meant not to be RFC 3339"
                );
            }
        }
    }

    #[tokio::test]
    async fn uuid_filters_answer_422_and_unknown_filters_400() {
        let sim = sim();
        let rec = SimRecording::sample("5b2a9c1d-7e3f-4a6b-8c9d-0e1f2a3b4c5d");
        sim.add_recording(rec.clone());

        let (status, body) = list_query(&sim, &[("filter[call_session_id]", "sess-1")]).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body["errors"][0]["source"]["parameter"],
            "filter[call_session_id]"
        );
        let (status, _) = list_query(&sim, &[("filter[call_leg_id]", "leg-1")]).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (status, body) =
            list_query(&sim, &[("filter[call_session_id]", &rec.call_session_id)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["meta"]["total_results"], 1);
        let (_, body) = list_query(&sim, &[("filter[connection_id]", "nope")]).await;
        assert_eq!(body["meta"]["total_results"], 0);

        for key in [
            "filter[session_id]",
            "filter[created_at][gt]",
            "filter[sip_call_id]",
            "limit",
        ] {
            let (status, body) = list_query(&sim, &[(key, "x")]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{key}");
            assert_eq!(body["errors"][0]["source"]["parameter"], key);
        }

        sim.set_behaviour(TelnyxSimBehaviour {
            uuid_filters: false,
            refuse_unknown_filters: false,
            ..TelnyxSimBehaviour::default()
        });
        let (status, body) = list_query(&sim, &[("filter[call_session_id]", "sess-1")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["meta"]["total_results"], 0);
        let (status, _) = list_query(&sim, &[("limit", "x")]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn rate_limit_answers_carry_the_configured_hints() {
        let sim = sim();
        sim.set_behaviour(TelnyxSimBehaviour {
            retry_after: Some("7".into()),
            ratelimit_reset: None,
            ..TelnyxSimBehaviour::default()
        });
        sim.fail_next(1, Fault::Status(429));
        let resp = client()
            .get(format!("{}/recordings", sim.base_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert!(resp.headers().get("x-ratelimit-reset").is_none());
    }

    #[test]
    fn generated_audio_is_a_deterministic_seekable_wav() {
        let audio = SimAudio::generated(100_001, 7);
        let all = audio.to_vec();
        assert_eq!(all.len(), 100_001);
        assert_eq!(&all[0..4], b"RIFF");
        assert_eq!(&all[8..16], b"WAVEfmt ");
        assert_eq!(
            u32::from_le_bytes([all[4], all[5], all[6], all[7]]),
            100_001 - 8
        );
        assert_eq!(&all[36..40], b"data");
        assert_eq!(
            u32::from_le_bytes([all[40], all[41], all[42], all[43]]),
            100_001 - 44
        );
        assert_eq!(
            u32::from_le_bytes([all[24], all[25], all[26], all[27]]),
            8000
        );
        for (offset, len) in [
            (0, 10),
            (40, 10),
            (45, 3),
            (46, 4),
            (99_990, 11),
            (12_345, 6789),
        ] {
            let mut buf = vec![0u8; len];
            audio.read_at(offset as u64, &mut buf);
            assert_eq!(buf, &all[offset..offset + len], "offset {offset}");
        }
        assert_eq!(audio.to_vec(), all, "same seed, same bytes");
        assert_ne!(
            SimAudio::generated(100_001, 8).to_vec(),
            all,
            "seed matters"
        );
        assert_eq!(audio.sha256_hex(), hex::encode(Sha256::digest(&all)));
        let bytes = SimAudio::Bytes(Bytes::from(all.clone()));
        assert_eq!(bytes.sha256_hex(), audio.sha256_hex());
        assert_eq!(
            SimAudio::generated(10, 1).to_vec(),
            SimAudio::wav_header(10)[..10]
        );
        let sample = SimRecording::sample("rec-1");
        assert_eq!(sample.content.len(), 44 + 8000 * 2 * 60);
        assert_eq!(sample.duration_millis, 60_000);
    }

    #[tokio::test]
    async fn generated_stream_matches_read_at() {
        let audio = SimAudio::generated(300_007, 3);
        let mut got = Vec::new();
        let mut s = std::pin::pin!(audio.stream_range(5, 250_000));
        while let Some(chunk) = s.next().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(got, audio.to_vec()[5..250_000]);
    }

    #[tokio::test]
    async fn get_recording_requires_the_bearer_key() {
        let sim = sim();
        let rec = SimRecording::sample("rec-get");
        sim.add_recording(rec.clone());
        let c = client();
        let url = format!("{}/recordings/rec-get", sim.base_url());
        assert!(sim.base_url().starts_with("http://127.0.0.1:") && sim.base_url().ends_with("/v2"));

        let (status, body) = get_json(&c, &url, KEY).await;
        assert_eq!(status, StatusCode::OK);
        let d = &body["data"];
        assert_eq!(d["record_type"], "recording");
        assert_eq!(d["id"], "rec-get");
        assert_eq!(d["call_session_id"], rec.call_session_id);
        assert_eq!(d["call_control_id"], rec.call_control_id);
        assert_eq!(d["call_leg_id"], rec.call_leg_id);
        assert_eq!(d["channels"], "single");
        assert_eq!(d["duration_millis"], 60_000);
        assert_eq!(d["from"], "+15551230001");
        assert_eq!(d["to"], "+15557650002");
        assert_eq!(d["status"], "completed");
        assert_eq!(d["source"], "call");
        let created: DateTime<Utc> = d["created_at"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("created_at");
        assert_eq!(created, rec.created_at);
        assert!(d["recording_started_at"].is_string() && d["updated_at"].is_string());
        let u = d["download_urls"]["wav"].as_str().expect("url");
        assert!(
            u.starts_with(&format!("http://{}/downloads/rec-get.wav?", sim.addr())),
            "{u}"
        );
        assert!(
            u.contains("X-Amz-Expires=600") && u.contains("X-Amz-Signature="),
            "{u}"
        );
        assert!(
            d["download_urls"].get("mp3").is_none(),
            "only the recorded format: {d}"
        );

        let (status, body) = get_json(&c, &url, "KEY_wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_telnyx_error(&body, "10009", "Authentication failed");
        let resp = c.get(&url).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

        let (status, body) =
            get_json(&c, &format!("{}/recordings/nope", sim.base_url()), KEY).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_telnyx_error(&body, "10005", "Resource not found");
        assert_eq!(sim.request_count("/v2/recordings"), 4);
    }

    const EVEN: &str = "6c7e1b52-3f0a-4d36-9a0e-5c1f2b7d8e01";
    const ODD: &str = "0b5d2c4e-8f1a-4e6b-b7c3-9d2e1f0a3b42";

    #[tokio::test]
    async fn list_filters_orders_and_pages() {
        let sim = sim();
        let base = Utc::now().trunc_subsecs(3) - chrono::Duration::hours(1);
        for i in 0..5i64 {
            let mut r = SimRecording::sample(format!("rec-{i}"));
            // Added out of order to check the created_at ordering.
            r.created_at = base + chrono::Duration::minutes(10 * (4 - i));
            r.call_session_id = if i % 2 == 0 { EVEN } else { ODD }.into();
            r.to = format!("+1555000000{i}");
            sim.add_recording(r);
        }
        let c = client();
        let list = |q: Vec<(&'static str, String)>| {
            let c = c.clone();
            let url = format!("{}/recordings", sim.base_url());
            async move {
                let resp = c
                    .get(url)
                    .bearer_auth(KEY)
                    .query(&q)
                    .send()
                    .await
                    .expect("send");
                let status = resp.status();
                (status, resp.json::<Value>().await.expect("json"))
            }
        };
        let ids = |body: &Value| -> Vec<String> {
            body["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|d| d["id"].as_str().unwrap_or("").to_owned())
                .collect()
        };

        let (status, body) = list(vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ids(&body), ["rec-4", "rec-3", "rec-2", "rec-1", "rec-0"]);
        assert_eq!(
            body["meta"],
            json!({"page_number": 1, "page_size": 20, "total_pages": 1, "total_results": 5})
        );

        let (_, body) = list(vec![("filter[call_session_id]", EVEN.into())]).await;
        assert_eq!(ids(&body), ["rec-4", "rec-2", "rec-0"]);
        let (_, body) = list(vec![("filter[to]", "+15550000003".into())]).await;
        assert_eq!(ids(&body), ["rec-3"]);
        let leg = sim.recording("rec-1").expect("rec-1").call_leg_id;
        let (_, body) = list(vec![("filter[call_leg_id]", leg)]).await;
        assert_eq!(ids(&body), ["rec-1"]);
        let (_, body) = list(vec![("filter[from]", "+19999999999".into())]).await;
        assert_eq!(ids(&body), Vec::<String>::new());
        assert_eq!(body["meta"]["total_results"], 0);

        let t = |m: i64| {
            (base + chrono::Duration::minutes(m)).to_rfc3339_opts(SecondsFormat::Millis, true)
        };
        let (_, body) = list(vec![
            ("filter[created_at][gte]", t(10)),
            ("filter[created_at][lte]", t(30)),
        ])
        .await;
        assert_eq!(ids(&body), ["rec-3", "rec-2", "rec-1"]);

        let (_, body) = list(vec![
            ("page[size]", "2".into()),
            ("page[number]", "2".into()),
        ])
        .await;
        assert_eq!(ids(&body), ["rec-2", "rec-1"]);
        assert_eq!(
            body["meta"],
            json!({"page_number": 2, "page_size": 2, "total_pages": 3, "total_results": 5})
        );
        let (_, body) = list(vec![
            ("page[size]", "2".into()),
            ("page[number]", "3".into()),
        ])
        .await;
        assert_eq!(ids(&body), ["rec-0"]);

        let (status, body) = list(vec![("page[size]", "251".into())]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_telnyx_error(&body, "10015", "Bad Request");
        assert_eq!(body["errors"][0]["source"]["parameter"], "page[size]");
        let (status, _) = list(vec![("page[size]", "250".into())]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = list(vec![("page[number]", "0".into())]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = list(vec![("filter[created_at][gte]", "yesterday".into())]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn delete_returns_the_recording_then_it_is_gone() {
        let sim = sim();
        sim.add_recording(SimRecording::sample("rec-del"));
        sim.add_recording(SimRecording::sample("rec-keep"));
        let c = client();
        let url = format!("{}/recordings/rec-del", sim.base_url());
        let (_, before) = get_json(&c, &url, KEY).await;
        let wav = before["data"]["download_urls"]["wav"]
            .as_str()
            .expect("wav")
            .to_owned();

        let resp = c.delete(&url).bearer_auth(KEY).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["data"]["id"], "rec-del");
        assert_eq!(sim.deleted_ids(), ["rec-del"]);

        let (status, body) = get_json(&c, &url, KEY).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_telnyx_error(&body, "10005", "Resource not found");
        let resp = c.delete(&url).bearer_auth(KEY).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let (_, listed) = get_json(&c, &format!("{}/recordings", sim.base_url()), KEY).await;
        assert_eq!(listed["meta"]["total_results"], 1);

        let resp = c.get(&wav).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(
            resp.text()
                .await
                .expect("text")
                .contains("<Code>NoSuchKey</Code>")
        );
        assert_eq!(sim.deleted_ids(), ["rec-del"]);
    }

    #[tokio::test]
    async fn presigned_downloads_serve_bytes_and_ranges_without_auth() {
        let sim = sim();
        let mut rec = SimRecording::sample("rec-dl");
        rec.content = SimAudio::generated(2 * 1024 * 1024 + 3, 99);
        sim.add_recording(rec.clone());
        let c = client();
        let (_, body) = get_json(&c, &format!("{}/recordings/rec-dl", sim.base_url()), KEY).await;
        let wav = body["data"]["download_urls"]["wav"]
            .as_str()
            .expect("wav")
            .to_owned();
        assert!(body["data"]["download_urls"].get("mp3").is_none());
        let mp3 = sim.download_url("rec-dl", "mp3");

        let resp = c.get(&wav).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "audio/wav");
        assert_eq!(
            resp.headers()["content-length"],
            (2 * 1024 * 1024 + 3).to_string().as_str()
        );
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        let got = resp.bytes().await.expect("bytes");
        assert_eq!(hex::encode(Sha256::digest(&got)), rec.content.sha256_hex());

        // Recorded as wav: there is no mp3 file behind a (validly signed) URL.
        let resp = c.get(&mp3).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.text().await.expect("text").contains("NoSuchKey"));
        // The lax switch serves both, the same bytes under each type.
        sim.set_behaviour(TelnyxSimBehaviour {
            only_recorded_format: false,
            ..TelnyxSimBehaviour::default()
        });
        let resp = c.get(&mp3).send().await.expect("send");
        assert_eq!(resp.headers()["content-type"], "audio/mpeg");
        assert_eq!(resp.bytes().await.expect("bytes").len(), got.len());
        sim.set_behaviour(TelnyxSimBehaviour::default());

        let all = rec.content.to_vec();
        let len = all.len();
        for (range, start, end) in [
            ("bytes=10-19", 10, 19),
            ("bytes=2097150-", 2_097_150, len - 1),
            ("bytes=-5", len - 5, len - 1),
        ] {
            let resp = c
                .get(&wav)
                .header("range", range)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(
                resp.headers()["content-range"],
                format!("bytes {start}-{end}/{len}").as_str()
            );
            assert_eq!(
                resp.headers()["content-length"],
                (end - start + 1).to_string().as_str()
            );
            assert_eq!(resp.bytes().await.expect("bytes"), &all[start..=end]);
        }
        let resp = c
            .get(&wav)
            .header("range", format!("bytes={len}-"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{len}").as_str()
        );

        // The bearer token is not needed, and a wrong one is ignored like S3 does.
        let resp = c
            .get(&wav)
            .bearer_auth("whatever")
            .header("range", "bytes=0-3")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.bytes().await.expect("bytes"), &b"RIFF"[..]);
        assert_eq!(sim.download_count("rec-dl"), 8);
        assert_eq!(sim.request_count("/downloads/"), 8);
    }

    #[tokio::test]
    async fn presigned_urls_expire_and_reject_tampering() {
        let sim = sim_with(Duration::from_secs(1));
        sim.add_recording(SimRecording::sample("rec-exp"));
        let c = client();
        let (_, body) = get_json(&c, &format!("{}/recordings/rec-exp", sim.base_url()), KEY).await;
        let wav = body["data"]["download_urls"]["wav"]
            .as_str()
            .expect("wav")
            .to_owned();
        assert!(
            wav.contains("X-Amz-Expires=1") || wav.contains("X-Amz-Expires=2"),
            "{wav}"
        );

        let resp = c
            .get(&wav)
            .header("range", "bytes=0-3")
            .send()
            .await
            .expect("send");
        assert_eq!(
            resp.status(),
            StatusCode::PARTIAL_CONTENT,
            "fresh URL works"
        );

        let tampered = wav.replace("rec-exp.wav", "rec-exp.mp3");
        let resp = c.get(&tampered).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()["content-type"], "application/xml");
        assert!(
            resp.text()
                .await
                .expect("text")
                .contains("<Code>SignatureDoesNotMatch</Code>")
        );
        let resp = c
            .get(wav.split('?').next().unwrap_or_default())
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);

        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let resp = c
                .get(&wav)
                .header("range", "bytes=0-3")
                .send()
                .await
                .expect("send");
            if resp.status() == StatusCode::FORBIDDEN {
                let text = resp.text().await.expect("text");
                assert!(
                    text.contains(
                        "<Code>AccessDenied</Code><Message>Request has expired</Message>"
                    ),
                    "{text}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "URL never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A fresh GET mints a fresh URL that works again.
        let fresh = sim.download_url("rec-exp", "wav");
        let resp = c
            .get(&fresh)
            .header("range", "bytes=0-3")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    }

    #[tokio::test]
    async fn api_faults_reach_the_client() {
        let sim = sim();
        sim.add_recording(SimRecording::sample("rec-f"));
        let c = client();
        let url = format!("{}/recordings/rec-f", sim.base_url());

        sim.fail_next(1, Fault::Status(429));
        let resp = c.get(&url).bearer_auth(KEY).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["x-ratelimit-reset"], "1");
        assert_telnyx_error(
            &resp.json().await.expect("json"),
            "10011",
            "Too many requests",
        );

        sim.fail_next(2, Fault::Status(503));
        for _ in 0..2 {
            let (status, body) = get_json(&c, &url, KEY).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_telnyx_error(&body, "10007", "Unexpected error");
        }

        sim.fail_next(1, Fault::Reset);
        let err = c
            .get(&url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect_err("reset");
        assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");

        sim.fail_next(1, Fault::Hang(Duration::from_millis(400)));
        let quick = Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(100))
            .build()
            .expect("client");
        let err = quick
            .get(&url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect_err("timeout");
        assert!(err.is_timeout(), "{err:?}");

        sim.fail_next(1, Fault::ResetMidBody { after_bytes: 20 });
        let resp = c
            .get(&url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect("headers arrive");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.is_err(), "body breaks off");

        // Faults on the API leave downloads alone, and run out.
        sim.fail_next(1, Fault::Status(500));
        let wav = sim.download_url("rec-f", "wav");
        assert_eq!(
            c.get(&wav).send().await.expect("send").status(),
            StatusCode::OK
        );
        assert_eq!(
            get_json(&c, &url, KEY).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(get_json(&c, &url, KEY).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn download_faults_reach_the_client() {
        let sim = sim();
        let mut rec = SimRecording::sample("rec-df");
        rec.content = SimAudio::generated(512 * 1024, 5);
        sim.add_recording(rec);
        let c = client();
        let wav = sim.download_url("rec-df", "wav");

        sim.fail_next_downloads(
            1,
            Fault::ResetMidBody {
                after_bytes: 100_000,
            },
        );
        let resp = c.get(&wav).send().await.expect("headers arrive");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], "524288");
        let mut got = 0usize;
        let mut stream = resp.bytes_stream();
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => got += b.len(),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the body must break off");
        assert!(got <= 100_000, "got {got}");

        sim.fail_next_downloads(1, Fault::Status(500));
        let resp = c.get(&wav).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            resp.text()
                .await
                .expect("text")
                .contains("<Code>InternalError</Code>")
        );

        sim.fail_next_downloads(1, Fault::Reset);
        assert!(c.get(&wav).send().await.is_err());

        // API requests are not affected by download faults.
        sim.fail_next_downloads(1, Fault::Status(503));
        assert_eq!(
            get_json(&c, &format!("{}/recordings/rec-df", sim.base_url()), KEY)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            c.get(&wav).send().await.expect("send").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );

        let resp = c.get(&wav).send().await.expect("send");
        assert_eq!(resp.bytes().await.expect("bytes").len(), 512 * 1024);
        assert_eq!(sim.download_count("rec-df"), 5);
    }

    #[tokio::test]
    async fn random_faults_follow_the_seed() {
        let run = || async {
            let sim = sim();
            sim.add_recording(SimRecording::sample("rec-r"));
            sim.set_random_faults(0.5, vec![Fault::Status(500), Fault::Status(503)]);
            let c = client();
            let url = format!("{}/recordings/rec-r", sim.base_url());
            let mut statuses = Vec::new();
            for _ in 0..20 {
                statuses.push(get_json(&c, &url, KEY).await.0.as_u16());
            }
            sim.clear_faults();
            assert_eq!(get_json(&c, &url, KEY).await.0, StatusCode::OK);
            statuses
        };
        let (a, b) = (run().await, run().await);
        assert_eq!(a, b, "same seed, same faults");
        assert!(
            a.contains(&200) && (a.contains(&500) || a.contains(&503)),
            "{a:?}"
        );
    }

    #[test]
    fn start_outside_a_runtime_is_an_error_not_a_panic() {
        let err = TelnyxSim::start(TelnyxSimConfig::default()).expect_err("no runtime");
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
        let err =
            crate::StorageSim::start(crate::StorageSimConfig::default()).expect_err("no runtime");
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
    }

    #[tokio::test]
    async fn stops_on_cancel_and_on_drop() {
        let token = CancellationToken::new();
        let sim = TelnyxSim::start(TelnyxSimConfig {
            cancel: token.clone(),
            ..TelnyxSimConfig::default()
        })
        .expect("start");
        let addr = sim.addr();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        token.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());

        let sim = TelnyxSim::start(TelnyxSimConfig::default()).expect("start");
        let addr = sim.addr();
        let clone = sim.clone();
        drop(sim);
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_ok(),
            "a clone keeps it alive"
        );
        drop(clone);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
