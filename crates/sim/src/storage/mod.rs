//! Local stand-in for Supabase Storage's storage-api server (`/storage/v1`).
//!
//! Checked against supabase/storage (`src/internal/errors/codes.ts`,
//! `storage-error.ts`, `src/http/error-handler.ts`, the object, bucket and tus
//! routes, `src/storage/uploader.ts`, `renderer/info.ts`) and
//! tus/tus-node-server (`packages/utils/src/constants.ts`):
//!
//! - Errors are JSON `{"statusCode":"<real code>","code","error","message"}`
//!   sent with HTTP 400, except a real 500 which stays 500.
//! - TUS errors are tus-node-server's: the real status code and a plain-text
//!   body (storage errors raised in its hooks are mapped to their real code,
//!   e.g. 409 "The resource already exists").
//! - `POST /object/copy` (`copyObject.ts`, `ObjectStorage.copyObject`): the
//!   source is looked up first (404), then the destination is created, which
//!   fails with 409 when it exists unless `x-upsert: true`; the source stays.
//! - Object info is flat (`id, name, version, bucket_id, size, content_type,
//!   cache_control, etag, metadata, last_modified, created_at`); older
//!   servers nested some of it under `metadata`, the current one does not.
//! - Signed URL tokens are HS256 JWTs `{url, iat, exp}` here too, signed with
//!   the simulator's own random key.
//! - An upload refused before its body is read (bad key, no bucket, mime
//!   type, declared size, duplicate) is answered at once on a connection
//!   kept alive with the body unread, for `unread_body_hold` (30 s; the real
//!   server resets after 30-60 s). A client that sends its next request on
//!   that connection waits, as it does against the real server.
//!
//! Differences the conformance suite (tests/storage_server, against the
//! real server) found, and what became of them:
//! - Refused uploads: the simulator used to read the whole body before
//!   answering, which hid the hang above. Now as the real server.
//! - A same-size object of other bytes at a path: both servers report only
//!   the size in `object/info`, so only hashing the bytes tells them apart;
//!   the simulator now has a test for it too.
//! - An interrupted TUS PATCH: the real file/S3 stores keep what arrived, so
//!   the offset can be any byte; the simulator keeps the last whole chunk
//!   (below). The suite checks the real behaviour, the daemon HEADs first
//!   either way.
//! - The real server needs `X-Forwarded-Prefix` behind `/storage/v1`, which
//!   Supabase's gateway adds; the simulator serves `/storage/v1` itself.
//! - The storage policy (RLS) exists only on the real server.
//!
//! Deliberate differences, so the daemon is held to the documented contract:
//! - `apikey` must equal the service key (the real storage-api ignores it;
//!   the gateway in front of it checks it). Failures use the storage-api
//!   AccessDenied shape.
//! - TUS chunks: every PATCH except the last must be exactly
//!   `tus_chunk_size` (6 MiB) and none may be larger (`strict_tus_chunks`).
//!   The real server accepts other sizes (its S3 store re-splits them), but
//!   Supabase documents 6 MiB as required.
//! - A PATCH that breaks off mid-chunk leaves the offset where it was (the
//!   last complete chunk); the real S3 store may keep a partial part. Clients
//!   must HEAD before resuming either way.
//! - The upload lock: a PATCH (or HEAD-less resume) arriving while another
//!   PATCH holds the upload asks the holder to release it, which ends the
//!   holder's request and drops its chunk (tus-node-server's
//!   `requestRelease`, meant for half-open connections such as a client
//!   that hung mid-body); it waits up to 3 s for the lock, then answers 500
//!   "failed to acquire lock before timeout" (the real wait is 30 s).
//! - Unsatisfiable ranges answer HTTP 416 (`content-range: bytes */size`).
//! - No multipart/form-data parsing, no image transforms, no RLS, no
//!   creation-with-upload (a body on the TUS POST is ignored).
//! - A refused TUS PATCH is answered after its body is drained, on a
//!   connection kept alive; the real server closes the connection.
//! - ETags are the first 32 hex digits of the SHA-256 (S3 uses MD5).

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    io::SeekFrom,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::BodyExt;
use hyper::{HeaderMap, Method, Request, Uri, body::Incoming};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};
use tokio_util::{
    io::ReaderStream,
    sync::{CancellationToken, DropGuard},
};
use uuid::Uuid;

use super::http::{
    Abort, ByteRange, Fault, FaultAction, FaultPlan, Resp, bearer, bind, bytes_response,
    cut_response, drain, empty_response, full_body, header_str, hmac_sha256, http_date,
    json_response, parse_query, parse_range, percent_decode, percent_encode, query_value,
    random_key, read_small_body, response, set_header, spawn_server, start_fault, stream_body,
};

const MIB: u64 = 1024 * 1024;
const TUS_VERSION: &str = "1.0.0";

/// Settings of a [`StorageSim`].
#[derive(Debug, Clone)]
pub struct StorageSimConfig {
    /// Accepted as `Authorization: Bearer <key>` and as `apikey: <key>`.
    pub service_key: String,
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// The project-wide upload limit. Default 50 MiB (52 428 800 bytes), the
    /// free plan's "50 MB" and the self-hosted `FILE_SIZE_LIMIT` default.
    /// A bucket's own `file_size_limit` can only lower it.
    pub global_file_size_limit: u64,
    /// When set, objects and in-flight uploads are files under this
    /// directory (`tmp/`, `objects/`), so large uploads do not sit in RAM.
    /// It is a byte store, not persistence: the simulator starts empty and
    /// deletes the files it wrote when it stops.
    pub data_dir: Option<PathBuf>,
    /// Required TUS chunk size (Supabase: 6 MiB).
    pub tus_chunk_size: u64,
    /// Reject TUS chunks that are not `tus_chunk_size` (except the last).
    pub strict_tus_chunks: bool,
    /// How long an unfinished TUS upload URL stays usable (then 410).
    pub tus_upload_ttl: Duration,
    /// Seed of the random fault generator, so a chaos run can be replayed.
    pub fault_seed: u64,
    /// How long a refused upload's body stays unread on its kept-alive
    /// connection before the connection is closed (the real server resets
    /// it after 30-60 s). A request sent on that connection meanwhile waits.
    pub unread_body_hold: Duration,
    /// Stops the simulator when cancelled (so does dropping every handle).
    pub cancel: CancellationToken,
    /// The origin (`http://HOST:PORT`) its base URL and upload locations
    /// name; by default its own address. A proxy in front of it (the chaos
    /// run's partitions) sets its own, so that every request crosses it.
    pub public_origin: Option<String>,
}

impl Default for StorageSimConfig {
    fn default() -> Self {
        Self {
            service_key: "sim-service-role-key".to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            global_file_size_limit: 50 * MIB,
            data_dir: None,
            tus_chunk_size: 6 * MIB,
            strict_tus_chunks: true,
            tus_upload_ttl: Duration::from_secs(24 * 3600),
            fault_seed: 0x5707_a6e5,
            unread_body_hold: Duration::from_secs(30),
            cancel: CancellationToken::new(),
            public_origin: None,
        }
    }
}

/// A bucket as the simulator holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketInfo {
    pub id: String,
    pub name: String,
    pub public: bool,
    pub file_size_limit: Option<u64>,
    pub allowed_mime_types: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What tests see of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub id: String,
    pub size: u64,
    pub sha256_hex: String,
    pub content_type: String,
    pub cache_control: String,
    /// Successful writes of this path ever (kept across deletes), so a test
    /// can assert that a recording was never uploaded twice.
    pub upload_count: u32,
}

/// Handle on a running storage simulator. Clones share the same server; the
/// server stops when the config's token is cancelled or the last clone drops.
#[derive(Clone)]
pub struct StorageSim {
    shared: Arc<Shared>,
}

struct Shared {
    state: Arc<State>,
    addr: SocketAddr,
    _stop: DropGuard,
}

impl fmt::Debug for StorageSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSim")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// Shared by request handlers and the handle: settings plus one mutex that
/// is never held across an await.
struct State {
    service_key: String,
    global_limit: u64,
    data_dir: Option<PathBuf>,
    tus_chunk: u64,
    strict_chunks: bool,
    tus_ttl: Duration,
    origin: String,
    signing_key: [u8; 32],
    unread_body_hold: Duration,
    cancel: CancellationToken,
    inner: Mutex<Inner>,
}

type Key = (String, String);

struct Inner {
    buckets: BTreeMap<String, BucketInfo>,
    objects: BTreeMap<Key, Obj>,
    write_counts: HashMap<Key, u32>,
    uploads: HashMap<String, Tus>,
    upload_faults: FaultPlan,
    other_faults: FaultPlan,
    tus_patches: u64,
    /// Bytes per second a PATCH body is read at (`None`: as fast as it comes).
    tus_patch_rate: Option<u64>,
    requests: Vec<String>,
}

#[derive(Clone)]
struct Obj {
    id: Uuid,
    version: Uuid,
    size: u64,
    sha256_hex: String,
    content_type: String,
    cache_control: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    data: Data,
}

#[derive(Clone)]
enum Data {
    Mem(Bytes),
    File(PathBuf),
}

/// An unfinished (or finished, kept for HEAD) resumable upload.
struct Tus {
    bucket: String,
    object: String,
    content_type: String,
    cache_control: String,
    length: u64,
    /// Bytes durably received: always a whole number of chunks.
    offset: u64,
    /// Hash of bytes `0..offset`, carried between PATCHes.
    hasher: Sha256,
    part: Part,
    /// A PATCH is writing; stands in for tus-node-server's upload lock.
    busy: bool,
    /// Cancelled to ask the PATCH holding the lock to let go, as
    /// tus-node-server's locker does when another request wants the upload
    /// (`requestRelease`): the holder's request ends, its chunk is dropped.
    release: CancellationToken,
    completed: bool,
    expired: bool,
    expires_at: DateTime<Utc>,
}

enum Part {
    Mem(Vec<u8>),
    File(PathBuf),
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not wedge the simulator for the rest.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limit_for(&self, bucket: &BucketInfo) -> u64 {
        bucket
            .file_size_limit
            .map_or(self.global_limit, |b| b.min(self.global_limit))
    }

    fn tmp_path(&self) -> Option<PathBuf> {
        self.data_dir
            .as_ref()
            .map(|d| d.join("tmp").join(Uuid::new_v4().to_string()))
    }

    fn object_path(&self, version: Uuid) -> Option<PathBuf> {
        self.data_dir
            .as_ref()
            .map(|d| d.join("objects").join(version.to_string()))
    }
}

impl Drop for State {
    // The simulator's objects exist only as long as it does (nothing is
    // reloaded from `data_dir`), so their files go with it: repeated
    // benchmark runs must not pile up gigabytes.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for obj in std::mem::take(&mut inner.objects).into_values() {
            remove_data(obj.data);
        }
        for upload in std::mem::take(&mut inner.uploads).into_values() {
            if let Part::File(p) = upload.part {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl StorageSim {
    /// Binds and starts serving. Must be called inside a Tokio runtime.
    pub fn start(cfg: StorageSimConfig) -> io::Result<StorageSim> {
        if let Some(dir) = &cfg.data_dir {
            std::fs::create_dir_all(dir.join("tmp"))?;
            std::fs::create_dir_all(dir.join("objects"))?;
        }
        let cancel = cfg.cancel.child_token();
        let listener = bind(cfg.addr)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            service_key: cfg.service_key,
            global_limit: cfg.global_file_size_limit,
            data_dir: cfg.data_dir,
            tus_chunk: cfg.tus_chunk_size.max(1),
            strict_chunks: cfg.strict_tus_chunks,
            tus_ttl: cfg.tus_upload_ttl,
            origin: cfg
                .public_origin
                .unwrap_or_else(|| format!("http://{addr}")),
            signing_key: random_key(),
            unread_body_hold: cfg.unread_body_hold,
            cancel: cancel.clone(),
            inner: Mutex::new(Inner {
                buckets: BTreeMap::new(),
                objects: BTreeMap::new(),
                write_counts: HashMap::new(),
                uploads: HashMap::new(),
                upload_faults: FaultPlan::new(cfg.fault_seed),
                other_faults: FaultPlan::new(cfg.fault_seed.wrapping_add(1)),
                tus_patches: 0,
                tus_patch_rate: None,
                requests: Vec::new(),
            }),
        });
        let server_state = Arc::clone(&state);
        spawn_server(listener, cancel.clone(), move |req| {
            handle(Arc::clone(&server_state), req)
        })?;
        Ok(StorageSim {
            shared: Arc::new(Shared {
                state,
                addr,
                _stop: cancel.drop_guard(),
            }),
        })
    }

    /// `http://127.0.0.1:PORT` (the daemon's `SUPABASE_URL`); routes live
    /// under `/storage/v1`.
    pub fn base_url(&self) -> String {
        self.shared.state.origin.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Creates a bucket directly; false if it already exists.
    pub fn create_bucket(
        &self,
        id: &str,
        public: bool,
        file_size_limit: Option<u64>,
        allowed_mime_types: Option<Vec<String>>,
    ) -> bool {
        insert_bucket(
            &self.shared.state,
            id,
            id,
            public,
            file_size_limit,
            allowed_mime_types,
        )
    }

    pub fn bucket(&self, id: &str) -> Option<BucketInfo> {
        self.shared.state.lock().buckets.get(id).cloned()
    }

    pub fn object(&self, bucket: &str, path: &str) -> Option<StoredObject> {
        let g = self.shared.state.lock();
        let key = (bucket.to_owned(), path.to_owned());
        let o = g.objects.get(&key)?;
        Some(StoredObject {
            id: o.id.to_string(),
            size: o.size,
            sha256_hex: o.sha256_hex.clone(),
            content_type: o.content_type.clone(),
            cache_control: o.cache_control.clone(),
            upload_count: g.write_counts.get(&key).copied().unwrap_or(0),
        })
    }

    /// The object's bytes, read whole (file-backed objects are read from
    /// disk); meant for small objects.
    pub fn object_bytes(&self, bucket: &str, path: &str) -> Option<Vec<u8>> {
        let data = {
            let g = self.shared.state.lock();
            g.objects
                .get(&(bucket.to_owned(), path.to_owned()))?
                .data
                .clone()
        };
        match data {
            Data::Mem(b) => Some(b.to_vec()),
            Data::File(p) => std::fs::read(p).ok(),
        }
    }

    /// Object names in `bucket`, sorted.
    pub fn list_objects(&self, bucket: &str) -> Vec<String> {
        let g = self.shared.state.lock();
        g.objects
            .keys()
            .filter(|(b, _)| b == bucket)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// PATCH requests received on upload URLs, including rejected and
    /// faulted ones.
    pub fn tus_patch_count(&self) -> u64 {
        self.shared.state.lock().tus_patches
    }

    /// Requests received whose path starts with `path_prefix`, e.g.
    /// `"/storage/v1/object/"`.
    pub fn request_count(&self, path_prefix: &str) -> usize {
        self.shared
            .state
            .lock()
            .requests
            .iter()
            .filter(|p| p.starts_with(path_prefix))
            .count()
    }

    /// Makes a TUS upload answer 410 Gone from now on, as an expired one
    /// does. Takes the upload id or its whole `Location` URL; false if
    /// unknown.
    pub fn expire_upload(&self, id_or_location: &str) -> bool {
        let id = id_or_location.rsplit('/').next().unwrap_or(id_or_location);
        let part = {
            let mut g = self.shared.state.lock();
            let Some(u) = g.uploads.get_mut(id) else {
                return false;
            };
            u.expired = true;
            std::mem::replace(&mut u.part, Part::Mem(Vec::new()))
        };
        if let Part::File(p) = part {
            let _ = std::fs::remove_file(p);
        }
        true
    }

    /// The next `n` upload requests (object POST/PUT, TUS POST/PATCH) get
    /// `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.shared.state.lock().upload_faults.push(n, fault);
    }

    /// The next `n` other requests (buckets, info, sign, downloads, TUS
    /// HEAD/DELETE) get `fault`.
    pub fn fail_next_other(&self, n: usize, fault: Fault) {
        self.shared.state.lock().other_faults.push(n, fault);
    }

    /// Upload requests get one of `kinds` with `probability`, drawn from a
    /// generator seeded by `fault_seed`. 0 or no kinds turns it off.
    pub fn set_random_faults(&self, probability: f64, kinds: Vec<Fault>) {
        self.shared
            .state
            .lock()
            .upload_faults
            .set_random(probability, kinds);
    }

    /// Requests other than uploads (object info, signing, deletion,
    /// listing, buckets, downloads, TUS HEAD/DELETE) get one of `kinds` with
    /// `probability`, drawn from a generator seeded by `fault_seed + 1`.
    /// 0 or no kinds turns it off.
    pub fn set_random_other_faults(&self, probability: f64, kinds: Vec<Fault>) {
        self.shared
            .state
            .lock()
            .other_faults
            .set_random(probability, kinds);
    }

    /// Reads TUS PATCH bodies at most this many bytes per second (`None`:
    /// no limit), as over a slow uplink, so a resumable upload stays in
    /// flight long enough to be caught mid-way.
    pub fn set_tus_patch_rate(&self, bytes_per_second: Option<u64>) {
        self.shared.state.lock().tus_patch_rate = bytes_per_second.filter(|r| *r > 0);
    }

    /// Objects with a resumable upload whose PATCH is being received now.
    pub fn tus_uploads_in_flight(&self) -> Vec<String> {
        self.shared
            .state
            .lock()
            .uploads
            .values()
            .filter(|u| u.busy)
            .map(|u| u.object.clone())
            .collect()
    }

    pub fn clear_faults(&self) {
        let mut g = self.shared.state.lock();
        g.upload_faults.clear();
        g.other_faults.clear();
    }

    /// Stops the server now (in-flight requests are dropped).
    pub fn shutdown(&self) {
        self.shared.state.cancel.cancel();
    }
}

fn insert_bucket(
    state: &State,
    id: &str,
    name: &str,
    public: bool,
    file_size_limit: Option<u64>,
    allowed_mime_types: Option<Vec<String>>,
) -> bool {
    let now = Utc::now();
    let mut g = state.lock();
    if g.buckets.contains_key(id) {
        return false;
    }
    g.buckets.insert(
        id.to_owned(),
        BucketInfo {
            id: id.to_owned(),
            name: name.to_owned(),
            public,
            file_size_limit,
            allowed_mime_types,
            created_at: now,
            updated_at: now,
        },
    );
    true
}

mod buckets;
mod errors;
mod objects;
mod routing;
mod signed_urls;
mod tus;
mod uploads;
use self::buckets::*;
use self::errors::*;
use self::objects::*;
use self::routing::*;
use self::signed_urls::*;
use self::tus::*;
use self::uploads::*;

#[cfg(test)]
mod tests;
