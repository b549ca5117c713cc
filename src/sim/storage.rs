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
            origin: format!("http://{addr}"),
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

// ---------------------------------------------------------------- errors

fn storage_error(status_code: u16, code: &str, error: &str, message: &str) -> Resp {
    // storage-api's error handler: everything but a 500 is sent as HTTP 400.
    let http = if status_code == 500 { 500 } else { 400 };
    json_response(
        http,
        &json!({ "statusCode": status_code.to_string(), "code": code, "error": error, "message": message }),
    )
}

fn access_denied(message: &str) -> Resp {
    storage_error(403, "AccessDenied", "Unauthorized", message)
}

fn no_such_bucket() -> Resp {
    storage_error(404, "NoSuchBucket", "Bucket not found", "Bucket not found")
}

fn no_such_key() -> Resp {
    storage_error(404, "NoSuchKey", "not_found", "Object not found")
}

fn duplicate() -> Resp {
    storage_error(
        409,
        "ResourceAlreadyExists",
        "Duplicate",
        "The resource already exists",
    )
}

fn too_large() -> Resp {
    storage_error(
        413,
        "EntityTooLarge",
        "Payload too large",
        "The object exceeded the maximum allowed size",
    )
}

fn invalid_mime(mime: &str) -> Resp {
    storage_error(
        415,
        "InvalidMimeType",
        "invalid_mime_type",
        &format!("mime type {mime} is not supported"),
    )
}

fn internal_error() -> Resp {
    storage_error(500, "InternalError", "internal", "Internal server error")
}

/// A storage-api error, kept small and rendered late: as JSON on the REST
/// routes, as tus text (real status, message body) on the TUS routes, the
/// way storage-api's `onResponseError` hook maps them.
enum StorageErr {
    AccessDenied(&'static str),
    NoSuchBucket,
    NoSuchKey,
    Duplicate,
    InvalidMime(String),
    Internal,
}

impl StorageErr {
    fn json(self) -> Resp {
        match self {
            StorageErr::AccessDenied(m) => access_denied(m),
            StorageErr::NoSuchBucket => no_such_bucket(),
            StorageErr::NoSuchKey => no_such_key(),
            StorageErr::Duplicate => duplicate(),
            StorageErr::InvalidMime(m) => invalid_mime(&m),
            StorageErr::Internal => internal_error(),
        }
    }

    fn tus(self) -> Resp {
        match self {
            StorageErr::AccessDenied(m) => tus_text(403, m),
            StorageErr::NoSuchBucket => tus_text(404, "Bucket not found"),
            StorageErr::NoSuchKey => tus_text(404, "Object not found"),
            StorageErr::Duplicate => tus_text(409, "The resource already exists"),
            StorageErr::InvalidMime(m) => tus_text(415, &format!("mime type {m} is not supported")),
            StorageErr::Internal => tus_text(500, "Internal server error"),
        }
    }
}

/// Fastify's schema-validation error, which bypasses the storage shape.
fn validation(message: &str) -> Resp {
    json_response(
        400,
        &json!({ "statusCode": "400", "code": "FST_ERR_VALIDATION", "error": "Bad Request", "message": message }),
    )
}

fn tus_text(status: u16, message: &str) -> Resp {
    let mut resp = bytes_response(status, "text/plain; charset=utf-8", message.to_owned());
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

fn fault_response(status: u16, tus: bool) -> Resp {
    if tus {
        return tus_text(status, "Something went wrong with that request\n");
    }
    match status {
        // The gateway's and the database pool's answers keep their status.
        429 => json_response(
            429,
            &json!({ "statusCode": "429", "code": "SlowDown", "error": "too_many_connections", "message": "Too many connections issued to the database" }),
        ),
        s if s >= 500 => json_response(
            s,
            &json!({ "statusCode": s.to_string(), "code": "InternalError", "error": "internal", "message": "Internal server error" }),
        ),
        s => storage_error(s, "InvalidRequest", "InvalidRequest", "Simulated failure"),
    }
}

// ---------------------------------------------------------------- routing

enum Route {
    CreateBucket,
    GetBucket(String),
    Upload {
        bucket: String,
        name: String,
        put: bool,
    },
    Delete {
        bucket: String,
        name: String,
    },
    Info {
        bucket: String,
        name: String,
    },
    Download {
        bucket: String,
        name: String,
        public: bool,
    },
    Sign {
        bucket: String,
        name: String,
    },
    Signed {
        bucket: String,
        name: String,
    },
    TusCreate,
    TusHead(String),
    TusPatch(String),
    TusDelete(String),
    NotFound,
}

impl Route {
    fn is_upload(&self) -> bool {
        matches!(
            self,
            Route::Upload { .. } | Route::TusCreate | Route::TusPatch(_)
        )
    }

    fn is_tus(&self) -> bool {
        matches!(
            self,
            Route::TusCreate | Route::TusHead(_) | Route::TusPatch(_) | Route::TusDelete(_)
        )
    }

    fn needs_auth(&self) -> bool {
        !matches!(
            self,
            Route::Signed { .. } | Route::Download { public: true, .. } | Route::NotFound
        )
    }
}

fn split_object(rest: &str) -> Option<(String, String)> {
    let (b, n) = rest.split_once('/')?;
    let (b, n) = (percent_decode(b, false), percent_decode(n, false));
    (!b.is_empty() && !n.is_empty()).then_some((b, n))
}

fn route(method: &Method, path: &str) -> Route {
    if let Some(rest) = path.strip_prefix("/bucket") {
        return match (rest.trim_end_matches('/'), method) {
            ("", &Method::POST) => Route::CreateBucket,
            (r, &Method::GET) => match r.strip_prefix('/') {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    Route::GetBucket(percent_decode(id, false))
                }
                _ => Route::NotFound,
            },
            _ => Route::NotFound,
        };
    }
    if let Some(rest) = path.strip_prefix("/upload/resumable") {
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return if method == Method::POST {
                Route::TusCreate
            } else {
                Route::NotFound
            };
        }
        return match rest.strip_prefix('/') {
            Some(id) if !id.contains('/') => match *method {
                Method::HEAD => Route::TusHead(id.to_owned()),
                Method::PATCH => Route::TusPatch(id.to_owned()),
                Method::DELETE => Route::TusDelete(id.to_owned()),
                _ => Route::NotFound,
            },
            _ => Route::NotFound,
        };
    }
    let Some(rest) = path.strip_prefix("/object/") else {
        return Route::NotFound;
    };
    let obj = |r: &str| split_object(r);
    if let Some(r) = rest.strip_prefix("sign/") {
        return match (obj(r), method) {
            (Some((bucket, name)), &Method::POST) => Route::Sign { bucket, name },
            (Some((bucket, name)), &Method::GET) => Route::Signed { bucket, name },
            _ => Route::NotFound,
        };
    }
    if *method == Method::GET {
        let info = rest
            .strip_prefix("info/authenticated/")
            .or_else(|| rest.strip_prefix("info/"));
        if let Some(r) = info {
            return obj(r).map_or(Route::NotFound, |(bucket, name)| Route::Info {
                bucket,
                name,
            });
        }
        let (r, public) = if let Some(r) = rest.strip_prefix("authenticated/") {
            (r, false)
        } else if let Some(r) = rest.strip_prefix("public/") {
            (r, true)
        } else {
            (rest, false)
        };
        return obj(r).map_or(Route::NotFound, |(bucket, name)| Route::Download {
            bucket,
            name,
            public,
        });
    }
    match (obj(rest), method) {
        (Some((bucket, name)), &Method::POST) => Route::Upload {
            bucket,
            name,
            put: false,
        },
        (Some((bucket, name)), &Method::PUT) => Route::Upload {
            bucket,
            name,
            put: true,
        },
        (Some((bucket, name)), &Method::DELETE) => Route::Delete { bucket, name },
        _ => Route::NotFound,
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Abort> {
    let path = req.uri().path().to_owned();
    let route = match path.strip_prefix("/storage/v1") {
        Some(rest) => route(req.method(), rest),
        None => Route::NotFound,
    };
    let fault = {
        let mut g = state.lock();
        g.requests.push(path.clone());
        if matches!(route, Route::TusPatch(_)) {
            g.tus_patches += 1;
        }
        if route.is_upload() {
            g.upload_faults.next()
        } else {
            g.other_faults.next()
        }
    };
    let (mut upload_cut, mut response_cut) = (None, None);
    match start_fault(fault, &state.cancel).await {
        FaultAction::None => {}
        FaultAction::Reset => return Err(Abort),
        FaultAction::Status(s) => {
            let mut body = req.into_body();
            drain(&mut body).await;
            return Ok(fault_response(s, route.is_tus()));
        }
        FaultAction::CutAfter(n) if route.is_upload() => upload_cut = Some(n),
        FaultAction::CutAfter(n) => response_cut = Some(n),
    }
    let resp = dispatch(&state, route, req, upload_cut).await?;
    Ok(match response_cut {
        Some(n) => cut_response(resp, n),
        None => resp,
    })
}

async fn dispatch(
    state: &Arc<State>,
    route: Route,
    req: Request<Incoming>,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    let (parts, mut body) = req.into_parts();
    let headers = &parts.headers;
    if route.needs_auth()
        && let Err(e) = check_auth(state, headers)
    {
        if matches!(route, Route::Upload { .. }) {
            return Ok(refuse_unread(state, body, e.json()));
        }
        drain(&mut body).await;
        return Ok(e.json());
    }
    match route {
        Route::NotFound => {
            drain(&mut body).await;
            Ok(json_response(
                404,
                &json!({ "message": format!("Route {}:{} not found", parts.method, parts.uri.path()), "error": "Not Found", "statusCode": 404 }),
            ))
        }
        Route::CreateBucket => create_bucket(state, body).await,
        Route::GetBucket(id) => Ok(get_bucket(state, &id)),
        Route::Upload { bucket, name, put } => {
            upload(state, headers, body, &bucket, &name, put, cut).await
        }
        Route::Delete { bucket, name } => Ok(delete_object(state, &bucket, &name).await),
        Route::Info { bucket, name } => Ok(info(state, &bucket, &name)),
        Route::Download {
            bucket,
            name,
            public,
        } => Ok(download(state, headers, &bucket, &name, public).await),
        Route::Sign { bucket, name } => sign(state, body, &bucket, &name).await,
        Route::Signed { bucket, name } => {
            Ok(signed_download(state, &parts.uri, headers, &bucket, &name).await)
        }
        Route::TusCreate => Ok(tus_create(state, headers, body).await),
        Route::TusHead(id) => Ok(tus_head(state, &id)),
        Route::TusPatch(id) => tus_patch(state, headers, body, &id, cut).await,
        Route::TusDelete(id) => Ok(tus_delete(state, &id)),
    }
}

fn check_auth(state: &State, headers: &HeaderMap) -> Result<(), StorageErr> {
    // Messages are the ones jsonwebtoken gives storage-api for these cases.
    match bearer(headers) {
        None | Some("") => return Err(StorageErr::AccessDenied("jwt must be provided")),
        Some(t) if t != state.service_key => {
            return Err(StorageErr::AccessDenied("invalid signature"));
        }
        Some(_) => {}
    }
    match header_str(headers, "apikey") {
        None | Some("") => Err(StorageErr::AccessDenied("No API key found in request")),
        Some(k) if k != state.service_key => Err(StorageErr::AccessDenied("Invalid API key")),
        Some(_) => Ok(()),
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------- buckets

/// `"50MB"`-style sizes as the bucket API accepts them (1024-based units).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult = match s[split..].trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1024,
        "MB" => MIB,
        "GB" => 1024 * MIB,
        _ => return None,
    };
    n.checked_mul(mult)
}

async fn create_bucket(state: &State, body: Incoming) -> Result<Resp, Abort> {
    let bytes = read_small_body(body, 64 * 1024).await?;
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(validation("body must be object"));
    };
    let Some(name) = v.get("name").and_then(Value::as_str) else {
        return Ok(validation("body must have required property 'name'"));
    };
    let id = v.get("id").and_then(Value::as_str).unwrap_or(name);
    if id.is_empty() || id.contains('/') {
        return Ok(storage_error(
            400,
            "InvalidBucketName",
            "Invalid Input",
            "Bucket name invalid",
        ));
    }
    let public = v.get("public").and_then(Value::as_bool).unwrap_or(false);
    let file_size_limit = match v.get("file_size_limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Some(n),
            None => return Ok(validation("body/file_size_limit must be >= 0")),
        },
        Some(Value::String(s)) => match parse_size(s) {
            Some(n) => Some(n),
            None => {
                return Ok(storage_error(
                    400,
                    "InvalidRequest",
                    "InvalidRequest",
                    "Invalid file size format, hint: use 20GB / 20MB / 30KB / 3B",
                ));
            }
        },
        Some(_) => return Ok(validation("body/file_size_limit must be integer or string")),
    };
    let allowed_mime_types = match v.get("allowed_mime_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Some(_) => return Ok(validation("body/allowed_mime_types must be array")),
    };
    if !insert_bucket(state, id, name, public, file_size_limit, allowed_mime_types) {
        return Ok(duplicate());
    }
    Ok(json_response(200, &json!({ "name": name })))
}

fn get_bucket(state: &State, id: &str) -> Resp {
    let g = state.lock();
    let Some(b) = g.buckets.get(id) else {
        return no_such_bucket();
    };
    json_response(
        200,
        &json!({
            "id": b.id,
            "name": b.name,
            "owner": "",
            "public": b.public,
            "type": "STANDARD",
            "file_size_limit": b.file_size_limit,
            "allowed_mime_types": b.allowed_mime_types,
            "created_at": ts(b.created_at),
            "updated_at": ts(b.updated_at),
        }),
    )
}

/// storage-api's `validateMimeType`: `type/*` or an exact `type/subtype`.
fn mime_allowed(mime: &str, allowed: &[String]) -> bool {
    let Some((t, sub)) = mime.split_once('/') else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| a.split_once('/'))
        .any(|(at, asub)| at == t && (asub == "*" || asub == sub))
}

fn check_mime(bucket: &BucketInfo, mime: &str) -> Result<(), StorageErr> {
    match bucket.allowed_mime_types.as_deref() {
        Some(allowed) if !allowed.is_empty() && !mime_allowed(mime, allowed) => {
            Err(StorageErr::InvalidMime(mime.to_owned()))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- uploads

/// A temp file that deletes itself unless kept, so every early return and
/// dropped connection cleans up after a partial upload.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Sink {
    Mem(Vec<u8>),
    File(BufWriter<tokio::fs::File>, TempFile),
}

impl Sink {
    async fn open(state: &State) -> io::Result<Sink> {
        match state.tmp_path() {
            None => Ok(Sink::Mem(Vec::new())),
            Some(p) => {
                let guard = TempFile(Some(p.clone()));
                let file = tokio::fs::File::create(&p).await?;
                Ok(Sink::File(
                    BufWriter::with_capacity(MIB as usize, file),
                    guard,
                ))
            }
        }
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Mem(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
            Sink::File(f, _) => f.write_all(data).await,
        }
    }

    async fn finish(self) -> io::Result<Data> {
        match self {
            Sink::Mem(v) => Ok(Data::Mem(Bytes::from(v))),
            Sink::File(mut f, guard) => {
                f.flush().await?;
                drop(f);
                guard
                    .keep()
                    .map(Data::File)
                    .ok_or_else(|| io::Error::other("temp file vanished"))
            }
        }
    }
}

struct Received {
    size: u64,
    sha256_hex: String,
    data: Data,
}

enum RecvError {
    TooLarge,
    /// The client went away, or a `ResetMidBody` fault fired.
    Aborted,
    Io(io::Error),
}

/// Streams a request body into memory or a temp file, hashing on the way
/// and stopping at `limit` bytes, so nothing is buffered whole.
async fn receive(
    state: &State,
    body: &mut Incoming,
    limit: u64,
    cut: Option<u64>,
) -> Result<Received, RecvError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut sink = Sink::open(state).await.map_err(RecvError::Io)?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| RecvError::Aborted)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if cut.is_some_and(|c| size >= c) {
            return Err(RecvError::Aborted);
        }
        if size > limit {
            return Err(RecvError::TooLarge);
        }
        hasher.update(&data);
        sink.write(&data).await.map_err(RecvError::Io)?;
    }
    if cut.is_some() {
        // The body was shorter than the cut point: drop the connection anyway.
        return Err(RecvError::Aborted);
    }
    let data = sink.finish().await.map_err(RecvError::Io)?;
    Ok(Received {
        size,
        sha256_hex: hex::encode(hasher.finalize()),
        data,
    })
}

fn remove_data(data: Data) {
    if let Data::File(p) = data {
        let _ = std::fs::remove_file(p);
    }
}

/// Publishes a fully received object. Visibility changes only here, so a
/// broken-off upload never shows.
fn commit(
    state: &State,
    bucket: &str,
    name: &str,
    content_type: String,
    cache_control: String,
    upsert: bool,
    rec: Received,
) -> Result<Uuid, StorageErr> {
    let version = Uuid::new_v4();
    // Rename before locking; it is a cheap metadata operation.
    let data = match rec.data {
        Data::File(tmp) => match state.object_path(version) {
            Some(dst) => match std::fs::rename(&tmp, &dst) {
                Ok(()) => Data::File(dst),
                Err(e) => {
                    tracing::warn!(error = %e, "storage simulator could not store an object");
                    let _ = std::fs::remove_file(tmp);
                    return Err(StorageErr::Internal);
                }
            },
            None => Data::File(tmp),
        },
        mem => mem,
    };
    let key = (bucket.to_owned(), name.to_owned());
    let now = Utc::now();
    let outcome = {
        let mut g = state.lock();
        if !g.buckets.contains_key(bucket) {
            Err(StorageErr::NoSuchBucket)
        } else if !upsert && g.objects.contains_key(&key) {
            // Re-checked here: two concurrent uploads without upsert must
            // not both win.
            Err(StorageErr::Duplicate)
        } else {
            let (id, created_at) = g
                .objects
                .get(&key)
                .map_or((Uuid::new_v4(), now), |o| (o.id, o.created_at));
            let obj = Obj {
                id,
                version,
                size: rec.size,
                sha256_hex: rec.sha256_hex,
                content_type,
                cache_control,
                created_at,
                updated_at: now,
                data: data.clone(),
            };
            let old = g.objects.insert(key.clone(), obj).map(|o| o.data);
            *g.write_counts.entry(key).or_insert(0) += 1;
            Ok((id, old))
        }
    };
    match outcome {
        Ok((id, old)) => {
            if let Some(old) = old {
                remove_data(old);
            }
            Ok(id)
        }
        Err(e) => {
            remove_data(data);
            Err(e)
        }
    }
}

/// storage-api refuses an upload (key, bucket, mime type, declared size,
/// duplicate, RLS) before it reads the body, and answers on a connection it
/// keeps alive with the body unread. The body is held here, unread, so
/// hyper neither drains it nor reads the connection's next request; once
/// it is dropped, hyper closes the connection (it cannot drain cheaply), as
/// the real server resets it.
fn refuse_unread(state: &State, body: Incoming, resp: Resp) -> Resp {
    let (hold, cancel) = (state.unread_body_hold, state.cancel.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = cancel.cancelled() => {}
        }
        drop(body);
    });
    resp
}

async fn upload(
    state: &State,
    headers: &HeaderMap,
    mut body: Incoming,
    bucket: &str,
    name: &str,
    put: bool,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    // PUT is storage-api's update route, which always upserts.
    let upsert = put || header_str(headers, "x-upsert") == Some("true");
    let content_type = header_str(headers, "content-type")
        .filter(|s| !s.is_empty())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let cache_control = header_str(headers, "cache-control")
        .unwrap_or("no-cache")
        .to_owned();
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let checked = {
        let g = state.lock();
        match g.buckets.get(bucket) {
            None => Err(StorageErr::NoSuchBucket),
            Some(b) => check_mime(b, &content_type).and_then(|()| {
                if !upsert
                    && g.objects
                        .contains_key(&(bucket.to_owned(), name.to_owned()))
                {
                    Err(StorageErr::Duplicate)
                } else {
                    Ok(state.limit_for(b))
                }
            }),
        }
    };
    let limit = match checked {
        Ok(limit) => limit,
        Err(e) => return Ok(refuse_unread(state, body, e.json())),
    };
    if declared.is_some_and(|n| n > limit) && cut.is_none() {
        return Ok(refuse_unread(state, body, too_large()));
    }
    let rec = match receive(state, &mut body, limit, cut).await {
        Ok(rec) => rec,
        Err(RecvError::Aborted) => return Err(Abort),
        Err(RecvError::TooLarge) => {
            drain(&mut body).await;
            return Ok(too_large());
        }
        Err(RecvError::Io(e)) => {
            tracing::warn!(error = %e, "storage simulator could not buffer an upload");
            drain(&mut body).await;
            return Ok(internal_error());
        }
    };
    Ok(
        match commit(
            state,
            bucket,
            name,
            content_type,
            cache_control,
            upsert,
            rec,
        ) {
            Ok(id) => json_response(
                200,
                &json!({ "Key": format!("{bucket}/{name}"), "Id": id.to_string() }),
            ),
            Err(e) => e.json(),
        },
    )
}

// ---------------------------------------------------------------- objects

async fn delete_object(state: &State, bucket: &str, name: &str) -> Resp {
    let removed = state
        .lock()
        .objects
        .remove(&(bucket.to_owned(), name.to_owned()));
    match removed {
        None => no_such_key(),
        Some(obj) => {
            if let Data::File(p) = obj.data {
                let _ = tokio::fs::remove_file(p).await;
            }
            json_response(200, &json!({ "message": "Successfully deleted" }))
        }
    }
}

fn etag(obj: &Obj) -> String {
    format!(
        "\"{}\"",
        obj.sha256_hex.get(..32).unwrap_or(&obj.sha256_hex)
    )
}

fn info(state: &State, bucket: &str, name: &str) -> Resp {
    let g = state.lock();
    if !g.buckets.contains_key(bucket) {
        return no_such_bucket();
    }
    let Some(o) = g.objects.get(&(bucket.to_owned(), name.to_owned())) else {
        return no_such_key();
    };
    let mut resp = json_response(
        200,
        &json!({
            "id": o.id.to_string(),
            "name": name,
            "version": o.version.to_string(),
            "bucket_id": bucket,
            "size": o.size,
            "content_type": o.content_type,
            "cache_control": o.cache_control,
            "etag": etag(o),
            "metadata": null,
            "last_modified": ts(o.updated_at),
            "created_at": ts(o.created_at),
        }),
    );
    set_header(&mut resp, "etag", &etag(o));
    set_header(&mut resp, "last-modified", &http_date(o.updated_at));
    resp
}

fn find_object(state: &State, bucket: &str, name: &str, public: bool) -> Result<Obj, StorageErr> {
    let g = state.lock();
    if public && !g.buckets.get(bucket).is_some_and(|b| b.public) {
        // A private bucket has no public URLs: the real answer is this.
        return Err(StorageErr::NoSuchBucket);
    }
    g.objects
        .get(&(bucket.to_owned(), name.to_owned()))
        .cloned()
        .ok_or(StorageErr::NoSuchKey)
}

async fn download(
    state: &State,
    headers: &HeaderMap,
    bucket: &str,
    name: &str,
    public: bool,
) -> Resp {
    match find_object(state, bucket, name, public) {
        Ok(obj) => serve_object(obj, header_str(headers, "range")).await,
        Err(e) => e.json(),
    }
}

async fn open_range(
    path: &PathBuf,
    start: u64,
    len: u64,
) -> io::Result<impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(start)).await?;
    Ok(ReaderStream::with_capacity(file.take(len), 64 * 1024))
}

/// Answers with an object's bytes, honouring a single `Range` the way an
/// `<audio>` element uses it to seek.
async fn serve_object(obj: Obj, range: Option<&str>) -> Resp {
    let size = obj.size;
    let (code, start, end) = match parse_range(range, size) {
        ByteRange::Full => (200, 0, size),
        ByteRange::Partial { start, end } => (206, start, end + 1),
        ByteRange::Unsatisfiable => {
            let mut resp = json_response(
                416,
                &json!({ "statusCode": "416", "code": "InvalidRange", "error": "invalid_range", "message": "invalid range provided" }),
            );
            set_header(&mut resp, "content-range", &format!("bytes */{size}"));
            return resp;
        }
    };
    let body = match &obj.data {
        Data::Mem(b) => {
            let (s, e) = (
                usize::try_from(start).unwrap_or(b.len()).min(b.len()),
                usize::try_from(end).unwrap_or(b.len()).min(b.len()),
            );
            full_body(b.slice(s..e))
        }
        Data::File(p) => match open_range(p, start, end - start).await {
            Ok(s) => stream_body(s),
            Err(e) => {
                tracing::warn!(error = %e, "storage simulator could not read an object");
                return internal_error();
            }
        },
    };
    let mut resp = response(code, &obj.content_type, body);
    set_header(&mut resp, "content-length", &(end - start).to_string());
    set_header(&mut resp, "accept-ranges", "bytes");
    set_header(&mut resp, "etag", &etag(&obj));
    set_header(&mut resp, "last-modified", &http_date(obj.updated_at));
    set_header(&mut resp, "cache-control", &obj.cache_control);
    if code == 206 {
        set_header(
            &mut resp,
            "content-range",
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    resp
}

// ---------------------------------------------------------------- signed URLs

fn make_token(state: &State, url: &str, expires_in: i64) -> String {
    let iat = Utc::now().timestamp();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({ "url": url, "iat": iat, "exp": iat.saturating_add(expires_in) }).to_string(),
    );
    let sig = URL_SAFE_NO_PAD.encode(hmac_sha256(
        &state.signing_key,
        format!("{header}.{payload}").as_bytes(),
    ));
    format!("{header}.{payload}.{sig}")
}

/// The token's `url` claim, or jsonwebtoken's message for why it fails.
fn verify_token(state: &State, token: &str) -> Result<String, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("jwt malformed");
    };
    let expected = URL_SAFE_NO_PAD.encode(hmac_sha256(
        &state.signing_key,
        format!("{h}.{p}").as_bytes(),
    ));
    if expected != s {
        return Err("invalid signature");
    }
    let claims: Value = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("jwt malformed")?;
    if claims
        .get("exp")
        .and_then(Value::as_i64)
        .is_some_and(|exp| Utc::now().timestamp() >= exp)
    {
        return Err("jwt expired");
    }
    claims
        .get("url")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or("jwt malformed")
}

async fn sign(state: &State, body: Incoming, bucket: &str, name: &str) -> Result<Resp, Abort> {
    let bytes = read_small_body(body, 64 * 1024).await?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let expires_in = match v.get("expiresIn") {
        None => return Ok(validation("body must have required property 'expiresIn'")),
        Some(x) => match x.as_i64() {
            Some(n) if n >= 1 => n,
            Some(_) => return Ok(validation("body/expiresIn must be >= 1")),
            None => return Ok(validation("body/expiresIn must be integer")),
        },
    };
    if let Err(e) = find_object(state, bucket, name, false) {
        return Ok(e.json());
    }
    let token = make_token(state, &format!("{bucket}/{name}"), expires_in);
    Ok(json_response(
        200,
        &json!({
            "signedURL": format!("/object/sign/{}/{}?token={token}", percent_encode(bucket, false), percent_encode(name, true)),
        }),
    ))
}

async fn signed_download(
    state: &State,
    uri: &Uri,
    headers: &HeaderMap,
    bucket: &str,
    name: &str,
) -> Resp {
    let q = parse_query(uri.query());
    let Some(token) = query_value(&q, "token") else {
        return validation("querystring must have required property 'token'");
    };
    let url = match verify_token(state, token) {
        Ok(url) => url,
        Err(msg) => return storage_error(400, "InvalidJWT", "InvalidJWT", msg),
    };
    if url != format!("{bucket}/{name}") {
        return storage_error(
            400,
            "InvalidSignature",
            "InvalidSignature",
            "Invalid signature",
        );
    }
    match find_object(state, bucket, name, false) {
        Ok(obj) => serve_object(obj, header_str(headers, "range")).await,
        Err(e) => e.json(),
    }
}

// ---------------------------------------------------------------- TUS

/// Parses `Upload-Metadata` (`key base64value` pairs, comma separated).
fn parse_metadata(value: &str) -> Option<HashMap<String, String>> {
    let mut map = HashMap::new();
    for pair in value.split(',') {
        let pair = pair.trim();
        let (k, v) = pair.split_once(' ').unwrap_or((pair, ""));
        if k.is_empty() {
            return None;
        }
        let v = v.trim();
        let decoded = STANDARD
            .decode(v)
            .or_else(|_| STANDARD_NO_PAD.decode(v))
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        if map.insert(k.to_owned(), decoded).is_some() {
            return None;
        }
    }
    Some(map)
}

const INVALID_METADATA: &str = "Upload-Metadata is invalid. It MUST consist of one or more comma-separated key-value pairs. The key and value MUST be separated by a space. The key MUST NOT contain spaces and commas and MUST NOT be empty. The key SHOULD be ASCII encoded and the value MUST be Base64 encoded. All keys MUST be unique";

async fn tus_create(state: &State, headers: &HeaderMap, mut body: Incoming) -> Resp {
    drain(&mut body).await;
    if header_str(headers, "tus-resumable") != Some(TUS_VERSION) {
        return tus_text(412, "Unsupported version\n");
    }
    if headers.contains_key("upload-defer-length") {
        return tus_text(
            501,
            "creation-defer-length extension is not (yet) supported.\n",
        );
    }
    let Some(length) = header_str(headers, "upload-length").and_then(|v| v.parse::<u64>().ok())
    else {
        return tus_text(
            400,
            "Upload-Length or Upload-Defer-Length header required\n",
        );
    };
    let Some(meta_header) = header_str(headers, "upload-metadata") else {
        return tus_text(400, "Metadata header is required");
    };
    let Some(meta) = parse_metadata(meta_header) else {
        return tus_text(400, INVALID_METADATA);
    };
    let bucket = meta.get("bucketName").cloned().unwrap_or_default();
    let object = meta.get("objectName").cloned().unwrap_or_default();
    if bucket.is_empty() || bucket.contains('/') {
        return tus_text(400, "Bucket name invalid");
    }
    if object.is_empty() {
        return tus_text(400, &format!("Invalid key: {object}"));
    }
    let content_type = meta
        .get("contentType")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    // storage-api's onCreate: a number means max-age, anything else no-cache.
    let cache_control = match meta.get("cacheControl") {
        Some(v)
            if !v.is_empty()
                && v.trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit()) =>
        {
            format!("max-age={v}")
        }
        _ => "no-cache".to_owned(),
    };
    let upsert = header_str(headers, "x-upsert") == Some("true");
    let version = Uuid::new_v4();
    let id = URL_SAFE_NO_PAD.encode(format!("{bucket}/{object}/{version}"));
    {
        let mut g = state.lock();
        let Some(b) = g.buckets.get(&bucket) else {
            return tus_text(404, "Bucket not found");
        };
        // tus-node-server's order: size limit, then the storage hooks
        // (duplicate check, then mime type).
        if length > state.limit_for(b) {
            return tus_text(413, "Maximum size exceeded\n");
        }
        if !upsert && g.objects.contains_key(&(bucket.clone(), object.clone())) {
            return tus_text(409, "The resource already exists");
        }
        if let Err(e) = check_mime(b, &content_type) {
            return e.tus();
        }
        let part = match state.tmp_path() {
            Some(p) => Part::File(p),
            None => Part::Mem(Vec::new()),
        };
        let ttl = chrono::Duration::from_std(state.tus_ttl).unwrap_or(chrono::Duration::MAX);
        g.uploads.insert(
            id.clone(),
            Tus {
                bucket,
                object,
                content_type,
                cache_control,
                length,
                offset: 0,
                hasher: Sha256::new(),
                part,
                busy: false,
                completed: false,
                expired: false,
                expires_at: Utc::now()
                    .checked_add_signed(ttl)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            },
        );
    }
    let mut resp = empty_response(201);
    set_header(
        &mut resp,
        "location",
        &format!("{}/storage/v1/upload/resumable/{id}", state.origin),
    );
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

fn is_gone(u: &Tus) -> bool {
    u.expired || (!u.completed && Utc::now() >= u.expires_at)
}

fn tus_head(state: &State, id: &str) -> Resp {
    let g = state.lock();
    // HEAD answers carry no body, so only the status tells what went wrong.
    let mut resp = match g.uploads.get(id) {
        None => empty_response(404),
        Some(u) if is_gone(u) => empty_response(410),
        Some(u) => {
            let mut resp = empty_response(200);
            set_header(&mut resp, "upload-offset", &u.offset.to_string());
            set_header(&mut resp, "upload-length", &u.length.to_string());
            resp
        }
    };
    set_header(&mut resp, "cache-control", "no-store");
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

fn tus_delete(state: &State, id: &str) -> Resp {
    let part = {
        let mut g = state.lock();
        match g.uploads.get(id) {
            None => return tus_text(404, "The file for this url was not found\n"),
            Some(u) if u.completed => {
                return tus_text(400, "Cannot terminate an already completed upload");
            }
            Some(_) => g.uploads.remove(id).map(|u| u.part),
        }
    };
    if let Some(Part::File(p)) = part {
        let _ = std::fs::remove_file(p);
    }
    let mut resp = empty_response(204);
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

/// Clears an upload's `busy` flag however the PATCH ends, including when
/// hyper drops the request future because the client went away.
struct BusyGuard<'a> {
    state: &'a State,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.state.lock().uploads.get_mut(&self.id) {
            u.busy = false;
        }
    }
}

struct PatchStart {
    bucket: String,
    object: String,
    content_type: String,
    cache_control: String,
    length: u64,
    offset: u64,
    hasher: Sha256,
    file: Option<PathBuf>,
    completed: bool,
}

enum ChunkError {
    TooLarge,
    WrongSize,
    Aborted,
    Io(io::Error),
}

async fn tus_patch(
    state: &State,
    headers: &HeaderMap,
    mut body: Incoming,
    id: &str,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    let client_offset = header_str(headers, "upload-offset").and_then(|v| v.parse::<u64>().ok());
    let early = if header_str(headers, "tus-resumable") != Some(TUS_VERSION) {
        Some(tus_text(412, "Unsupported version\n"))
    } else if header_str(headers, "content-type") != Some("application/offset+octet-stream") {
        Some(tus_text(403, "Content-Type header required\n"))
    } else if client_offset.is_none() {
        Some(tus_text(403, "Upload-Offset header required\n"))
    } else {
        None
    };
    if let Some(resp) = early {
        drain(&mut body).await;
        return Ok(resp);
    }
    let client_offset = client_offset.unwrap_or_default();
    let upsert = header_str(headers, "x-upsert") == Some("true");

    // Take the upload's lock, waiting a little for a PATCH whose client has
    // gone but whose request the server has not finished tearing down.
    let deadline = Instant::now() + Duration::from_secs(3);
    let start = loop {
        let step = {
            let mut g = state.lock();
            let exists = |g: &Inner, u: &Tus| {
                g.objects
                    .contains_key(&(u.bucket.clone(), u.object.clone()))
            };
            match g.uploads.get(id) {
                None => Err(tus_text(404, "The file for this url was not found\n")),
                Some(u) if is_gone(u) => {
                    Err(tus_text(410, "The file for this url no longer exists\n"))
                }
                // storage-api re-checks upload permission on every PATCH.
                Some(u) if !upsert && !u.completed && exists(&g, u) => {
                    Err(tus_text(409, "The resource already exists"))
                }
                Some(u) if u.busy => Ok(None),
                Some(_) => match g.uploads.get_mut(id) {
                    Some(u) => {
                        u.busy = true;
                        Ok(Some(PatchStart {
                            bucket: u.bucket.clone(),
                            object: u.object.clone(),
                            content_type: u.content_type.clone(),
                            cache_control: u.cache_control.clone(),
                            length: u.length,
                            offset: u.offset,
                            hasher: u.hasher.clone(),
                            file: match &u.part {
                                Part::File(p) => Some(p.clone()),
                                Part::Mem(_) => None,
                            },
                            completed: u.completed,
                        }))
                    }
                    None => Err(tus_text(404, "The file for this url was not found\n")),
                },
            }
        };
        match step {
            Ok(Some(start)) => break start,
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(None) => {
                drain(&mut body).await;
                return Ok(tus_text(500, "failed to acquire lock before timeout"));
            }
            Err(resp) => {
                drain(&mut body).await;
                return Ok(resp);
            }
        }
    };
    let _busy = BusyGuard {
        state,
        id: id.to_owned(),
    };

    let ok = |offset: u64, complete: bool| {
        let mut resp = empty_response(204);
        set_header(&mut resp, "upload-offset", &offset.to_string());
        set_header(&mut resp, "tus-resumable", TUS_VERSION);
        if complete {
            set_header(&mut resp, "tus-complete", "1");
        }
        resp
    };
    if start.completed {
        drain(&mut body).await;
        return Ok(if client_offset == start.length {
            ok(start.length, true)
        } else {
            tus_text(409, "Upload-Offset conflict\n")
        });
    }
    if client_offset != start.offset {
        drain(&mut body).await;
        return Ok(tus_text(409, "Upload-Offset conflict\n"));
    }
    let remaining = start.length - start.offset;
    let chunk_rule = |n: u64| chunk_size_ok(state, remaining, n);
    let wrong_size = || {
        tus_text(
            400,
            &format!(
                "chunk size must be exactly {} bytes, except for a shorter last chunk\n",
                state.tus_chunk
            ),
        )
    };
    if let Some(n) = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        let early = if n > remaining {
            Some(tus_text(413, "upload's size exceeded\n"))
        } else if !chunk_rule(n) && cut.is_none() {
            Some(wrong_size())
        } else {
            None
        };
        if let Some(resp) = early {
            drain(&mut body).await;
            return Ok(resp);
        }
    }

    let mut hasher = start.hasher.clone();
    let received = receive_chunk(state, &mut body, &start, &mut hasher, remaining, cut).await;
    let (n, mem_chunk) = match received {
        Ok(r) => r,
        Err(ChunkError::Aborted) => return Err(Abort),
        Err(ChunkError::TooLarge) => {
            drain(&mut body).await;
            return Ok(tus_text(413, "upload's size exceeded\n"));
        }
        Err(ChunkError::WrongSize) => {
            drain(&mut body).await;
            return Ok(wrong_size());
        }
        Err(ChunkError::Io(e)) => {
            tracing::warn!(error = %e, "storage simulator could not store a chunk");
            drain(&mut body).await;
            return Ok(tus_text(500, "Something went wrong receiving the file\n"));
        }
    };
    let new_offset = start.offset + n;
    let finished = new_offset == start.length;
    let part = {
        let mut g = state.lock();
        let Some(u) = g.uploads.get_mut(id) else {
            return Ok(tus_text(404, "The file for this url was not found\n"));
        };
        u.offset = new_offset;
        u.hasher = hasher.clone();
        if let (Part::Mem(v), Some(chunk)) = (&mut u.part, mem_chunk) {
            v.extend_from_slice(&chunk);
        }
        finished.then(|| std::mem::replace(&mut u.part, Part::Mem(Vec::new())))
    };
    let Some(part) = part else {
        return Ok(ok(new_offset, false));
    };
    let rec = Received {
        size: start.length,
        sha256_hex: hex::encode(hasher.finalize()),
        data: match part {
            Part::Mem(v) => Data::Mem(Bytes::from(v)),
            Part::File(p) => Data::File(p),
        },
    };
    let committed = commit(
        state,
        &start.bucket,
        &start.object,
        start.content_type,
        start.cache_control,
        upsert,
        rec,
    );
    let mut g = state.lock();
    match committed {
        Ok(_) => {
            if let Some(u) = g.uploads.get_mut(id) {
                u.completed = true;
            }
            Ok(ok(new_offset, true))
        }
        Err(e) => {
            // The data is gone with the failed commit, so the upload is too:
            // the client starts over (HEAD then answers 404).
            g.uploads.remove(id);
            Ok(e.tus())
        }
    }
}

/// Supabase's rule: every chunk is exactly the chunk size, except a shorter
/// last one.
fn chunk_size_ok(state: &State, remaining: u64, n: u64) -> bool {
    !state.strict_chunks
        || n == state.tus_chunk.min(remaining)
        || (n == remaining && n < state.tus_chunk)
}

/// Receives one PATCH body. Memory mode returns the bytes to append; file
/// mode writes at the upload's offset (truncating anything a broken-off
/// PATCH left behind) and returns only the count.
async fn receive_chunk(
    state: &State,
    body: &mut Incoming,
    start: &PatchStart,
    hasher: &mut Sha256,
    remaining: u64,
    cut: Option<u64>,
) -> Result<(u64, Option<Vec<u8>>), ChunkError> {
    let max_chunk = if state.strict_chunks {
        state.tus_chunk.min(remaining)
    } else {
        remaining
    };
    let mut file = match &start.file {
        None => None,
        Some(p) => {
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .await
                .map_err(ChunkError::Io)?;
            f.set_len(start.offset).await.map_err(ChunkError::Io)?;
            f.seek(SeekFrom::Start(start.offset))
                .await
                .map_err(ChunkError::Io)?;
            Some(BufWriter::with_capacity(MIB as usize, f))
        }
    };
    let mut mem = file.is_none().then(Vec::new);
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ChunkError::Aborted)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        n += data.len() as u64;
        if cut.is_some_and(|c| n >= c) {
            return Err(ChunkError::Aborted);
        }
        if n > remaining {
            return Err(ChunkError::TooLarge);
        }
        if n > max_chunk {
            return Err(ChunkError::WrongSize);
        }
        hasher.update(&data);
        match (&mut file, &mut mem) {
            (Some(f), _) => f.write_all(&data).await.map_err(ChunkError::Io)?,
            (None, Some(v)) => v.extend_from_slice(&data),
            (None, None) => {}
        }
    }
    if cut.is_some() {
        return Err(ChunkError::Aborted);
    }
    if !chunk_size_ok(state, remaining, n) {
        return Err(ChunkError::WrongSize);
    }
    if let Some(mut f) = file {
        f.flush().await.map_err(ChunkError::Io)?;
    }
    Ok((n, mem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimAudio;
    use futures_util::StreamExt;
    use reqwest::{Client, RequestBuilder, StatusCode};

    const KEY: &str = "service-key-test";
    const BUCKET: &str = "call-recordings";
    const CHUNK: usize = 6 * 1024 * 1024;

    /// Serializes the tests that hold many MiB at once, so the RSS check in
    /// `large_uploads_stream_to_disk` measures the upload, not its neighbours.
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn client() -> Client {
        // no_proxy: a proxy from the environment must not see loopback tests.
        // No pool: a refused upload's connection is left with its body
        // unread (see `a_refused_upload_leaves_its_connection_unread`).
        Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client")
    }

    fn start_with(cfg: StorageSimConfig) -> StorageSim {
        let sim = StorageSim::start(StorageSimConfig {
            service_key: KEY.to_owned(),
            ..cfg
        })
        .expect("start");
        assert!(sim.create_bucket(BUCKET, false, None, Some(vec!["audio/*".to_owned()])));
        sim
    }

    fn start() -> StorageSim {
        start_with(StorageSimConfig::default())
    }

    fn url(sim: &StorageSim, path: &str) -> String {
        format!("{}/storage/v1{path}", sim.base_url())
    }

    fn authed(rb: RequestBuilder) -> RequestBuilder {
        rb.bearer_auth(KEY).header("apikey", KEY)
    }

    async fn status_json(rb: RequestBuilder) -> (StatusCode, Value) {
        let resp = rb.send().await.expect("send");
        let status = resp.status();
        let text = resp.text().await.expect("text");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Asserts storage-api's error convention: HTTP 400 (500 stays 500)
    /// and the real code in the body.
    fn assert_storage_error(got: &(StatusCode, Value), code: &str, error: &str, message: &str) {
        let (status, body) = got;
        let http = if code == "500" { 500 } else { 400 };
        assert_eq!(status.as_u16(), http, "{body}");
        assert_eq!(body["statusCode"], code, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert_eq!(body["message"], message, "{body}");
    }

    async fn put_object(
        c: &Client,
        sim: &StorageSim,
        name: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        status_json(
            authed(c.post(url(sim, &format!("/object/{BUCKET}/{name}"))))
                .header("content-type", "audio/wav")
                .header("x-upsert", "false")
                .body(body),
        )
        .await
    }

    /// A scratch directory removed on drop, even when the test fails.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("storage-sim-{tag}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    #[tokio::test]
    async fn buckets_create_get_and_errors() {
        let sim = start();
        let c = client();
        let body = json!({"id": "recs", "name": "recs", "public": false, "file_size_limit": 1000, "allowed_mime_types": ["audio/wav", "audio/mpeg"]});
        let (status, created) = status_json(authed(c.post(url(&sim, "/bucket"))).json(&body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(created, json!({"name": "recs"}));

        let dup = status_json(authed(c.post(url(&sim, "/bucket"))).json(&body)).await;
        assert_storage_error(&dup, "409", "Duplicate", "The resource already exists");

        let (status, got) = status_json(authed(c.get(url(&sim, "/bucket/recs")))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got["id"], "recs");
        assert_eq!(got["name"], "recs");
        assert_eq!(got["public"], false);
        assert_eq!(got["file_size_limit"], 1000);
        assert_eq!(
            got["allowed_mime_types"],
            json!(["audio/wav", "audio/mpeg"])
        );
        assert!(got["created_at"].is_string() && got["updated_at"].is_string());
        let info = sim.bucket("recs").expect("bucket");
        assert_eq!(info.file_size_limit, Some(1000));

        let missing = status_json(authed(c.get(url(&sim, "/bucket/nope")))).await;
        assert_storage_error(&missing, "404", "Bucket not found", "Bucket not found");
        assert_eq!(missing.1["code"], "NoSuchBucket");

        let (status, body) =
            status_json(authed(c.post(url(&sim, "/bucket"))).json(&json!({"public": true}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["statusCode"], "400");
        let (status, _) = status_json(
            authed(c.post(url(&sim, "/bucket")))
                .json(&json!({"name": "sized", "file_size_limit": "2MB"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            sim.bucket("sized").and_then(|b| b.file_size_limit),
            Some(2 * MIB)
        );
        assert!(
            !sim.create_bucket("recs", true, None, None),
            "already exists"
        );
    }

    #[tokio::test]
    async fn bad_keys_answer_400_with_a_403_body() {
        let sim = start();
        let c = client();
        let target = url(&sim, "/bucket/call-recordings");
        let wrong = status_json(c.get(&target).bearer_auth("nope").header("apikey", KEY)).await;
        assert_storage_error(&wrong, "403", "Unauthorized", "invalid signature");
        let no_auth = status_json(c.get(&target).header("apikey", KEY)).await;
        assert_storage_error(&no_auth, "403", "Unauthorized", "jwt must be provided");
        let no_apikey = status_json(c.get(&target).bearer_auth(KEY)).await;
        assert_storage_error(
            &no_apikey,
            "403",
            "Unauthorized",
            "No API key found in request",
        );
        let bad_apikey = status_json(c.get(&target).bearer_auth(KEY).header("apikey", "x")).await;
        assert_storage_error(&bad_apikey, "403", "Unauthorized", "Invalid API key");
        // An upload with a bad key is refused and nothing is stored.
        let up = status_json(
            c.post(url(&sim, "/object/call-recordings/a.wav"))
                .bearer_auth("nope")
                .header("apikey", KEY)
                .body(vec![0u8; 100_000]),
        )
        .await;
        assert_storage_error(&up, "403", "Unauthorized", "invalid signature");
        assert!(sim.list_objects(BUCKET).is_empty());
        let (status, body) = status_json(authed(c.get(url(&sim, "/nothing/here")))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "Not Found");
    }

    #[tokio::test]
    async fn upload_info_download_and_delete() {
        let sim = start();
        let c = client();
        let content = SimAudio::generated(300_000, 1).to_vec();
        let name = "org 1/2024/call #1.wav";
        let path = format!("/object/{BUCKET}/{}", percent_encode(name, true));
        let (status, body) = status_json(
            authed(c.post(url(&sim, &path)))
                .header("content-type", "audio/wav")
                .header("cache-control", "max-age=3600")
                .header("x-upsert", "false")
                .body(content.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["Key"], format!("{BUCKET}/{name}"));
        let id = body["Id"].as_str().expect("Id").to_owned();
        assert!(Uuid::parse_str(&id).is_ok());

        let stored = sim.object(BUCKET, name).expect("stored");
        assert_eq!(stored.size, 300_000);
        assert_eq!(stored.sha256_hex, hex::encode(Sha256::digest(&content)));
        assert_eq!(stored.content_type, "audio/wav");
        assert_eq!(stored.cache_control, "max-age=3600");
        assert_eq!(stored.upload_count, 1);
        assert_eq!(stored.id, id);
        assert_eq!(sim.object_bytes(BUCKET, name).expect("bytes"), content);
        assert_eq!(sim.list_objects(BUCKET), [name]);

        let info_path = format!("/object/info/{BUCKET}/{}", percent_encode(name, true));
        let (status, info) = status_json(authed(c.get(url(&sim, &info_path)))).await;
        assert_eq!(status, StatusCode::OK, "{info}");
        assert_eq!(info["id"], id);
        assert_eq!(info["name"], name);
        assert_eq!(info["bucket_id"], BUCKET);
        assert_eq!(info["size"], 300_000);
        assert_eq!(info["content_type"], "audio/wav");
        assert_eq!(info["cache_control"], "max-age=3600");
        assert!(info["etag"].as_str().is_some_and(|e| e.starts_with('"')));
        assert!(
            info["last_modified"].is_string()
                && info["created_at"].is_string()
                && info["version"].is_string()
        );
        let auth_info = format!(
            "/object/info/authenticated/{BUCKET}/{}",
            percent_encode(name, true)
        );
        assert_eq!(
            status_json(authed(c.get(url(&sim, &auth_info)))).await.1["size"],
            300_000
        );

        let dl = format!(
            "/object/authenticated/{BUCKET}/{}",
            percent_encode(name, true)
        );
        let resp = authed(c.get(url(&sim, &dl))).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "audio/wav");
        assert_eq!(resp.bytes().await.expect("bytes"), content);
        let resp = authed(c.get(url(&sim, &dl)))
            .header("range", "bytes=100-199")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(resp.headers()["content-range"], "bytes 100-199/300000");
        assert_eq!(resp.bytes().await.expect("bytes"), &content[100..200]);
        let no_key = status_json(c.get(url(&sim, &dl))).await;
        assert_storage_error(&no_key, "403", "Unauthorized", "jwt must be provided");

        let (status, body) = status_json(authed(c.delete(url(&sim, &path)))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"message": "Successfully deleted"}));
        let gone = status_json(authed(c.get(url(&sim, &info_path)))).await;
        assert_storage_error(&gone, "404", "not_found", "Object not found");
        let again = status_json(authed(c.delete(url(&sim, &path)))).await;
        assert_storage_error(&again, "404", "not_found", "Object not found");
        assert!(sim.object(BUCKET, name).is_none());
        let other_bucket = status_json(authed(c.get(url(&sim, "/object/info/nope/x.wav")))).await;
        assert_storage_error(&other_bucket, "404", "Bucket not found", "Bucket not found");
    }

    /// As on the real server: the refusal comes back at once, but a client
    /// that sends its next request on the same connection waits until the
    /// body hold ends; a fresh connection is answered.
    #[tokio::test]
    async fn a_refused_upload_leaves_its_connection_unread() {
        let sim = start_with(StorageSimConfig {
            unread_body_hold: Duration::from_secs(5),
            ..StorageSimConfig::default()
        });
        let pooled = Client::builder().no_proxy().build().unwrap();
        let upload = || {
            authed(pooled.post(url(&sim, &format!("/object/{BUCKET}/a.wav"))))
                .header("content-type", "audio/wav")
                .body(vec![7u8; 64 * 1024])
        };
        assert_eq!(upload().send().await.unwrap().status(), 200);
        let (status, body) = status_json(upload()).await;
        assert_storage_error(
            &(status, body),
            "409",
            "Duplicate",
            "The resource already exists",
        );
        let info = || authed(pooled.get(url(&sim, &format!("/object/info/{BUCKET}/a.wav"))));
        assert!(
            tokio::time::timeout(Duration::from_millis(500), info().send())
                .await
                .is_err(),
            "the next request on that connection waits"
        );
        let fresh = authed(client().get(url(&sim, &format!("/object/info/{BUCKET}/a.wav"))));
        assert_eq!(fresh.send().await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn upload_conflicts_mime_types_and_size_limits() {
        let sim = start();
        let c = client();
        assert_eq!(
            put_object(&c, &sim, "a.wav", vec![1; 10]).await.0,
            StatusCode::OK
        );
        let dup = put_object(&c, &sim, "a.wav", vec![2; 10]).await;
        assert_storage_error(&dup, "409", "Duplicate", "The resource already exists");
        assert_eq!(
            sim.object_bytes(BUCKET, "a.wav").expect("kept"),
            vec![1; 10]
        );

        let target = url(&sim, &format!("/object/{BUCKET}/a.wav"));
        let upsert = status_json(
            authed(c.post(&target))
                .header("content-type", "audio/wav")
                .header("x-upsert", "true")
                .body(vec![3; 10]),
        )
        .await;
        assert_eq!(upsert.0, StatusCode::OK);
        let put = status_json(
            authed(c.put(&target))
                .header("content-type", "audio/wav")
                .body(vec![4; 12]),
        )
        .await;
        assert_eq!(put.0, StatusCode::OK, "PUT overwrites");
        let stored = sim.object(BUCKET, "a.wav").expect("stored");
        assert_eq!((stored.size, stored.upload_count), (12, 3));

        let text = status_json(
            authed(c.post(url(&sim, &format!("/object/{BUCKET}/b.txt"))))
                .header("content-type", "text/plain")
                .body("hi"),
        )
        .await;
        assert_storage_error(
            &text,
            "415",
            "invalid_mime_type",
            "mime type text/plain is not supported",
        );
        assert_eq!(text.1["code"], "InvalidMimeType");
        let mp3 = status_json(
            authed(c.post(url(&sim, &format!("/object/{BUCKET}/b.mp3"))))
                .header("content-type", "audio/mpeg")
                .body("id3"),
        )
        .await;
        assert_eq!(mp3.0, StatusCode::OK, "audio/* allows audio/mpeg");

        assert!(sim.create_bucket("small", false, Some(1000), None));
        let big = status_json(
            authed(c.post(url(&sim, "/object/small/big.wav")))
                .header("content-type", "audio/wav")
                .body(vec![0u8; 2000]),
        )
        .await;
        assert_storage_error(
            &big,
            "413",
            "Payload too large",
            "The object exceeded the maximum allowed size",
        );
        let streamed = reqwest::Body::wrap_stream(SimAudio::generated(5000, 1).stream());
        let big = status_json(
            authed(c.post(url(&sim, "/object/small/chunked.wav")))
                .header("content-type", "audio/wav")
                .body(streamed),
        )
        .await;
        assert_storage_error(
            &big,
            "413",
            "Payload too large",
            "The object exceeded the maximum allowed size",
        );
        let fits = status_json(
            authed(c.post(url(&sim, "/object/small/ok.wav")))
                .header("content-type", "audio/wav")
                .body(vec![0u8; 1000]),
        )
        .await;
        assert_eq!(fits.0, StatusCode::OK);
        assert_eq!(sim.list_objects("small"), ["ok.wav"]);

        let no_bucket = status_json(
            authed(c.post(url(&sim, "/object/nope/a.wav")))
                .header("content-type", "audio/wav")
                .body("x"),
        )
        .await;
        assert_storage_error(&no_bucket, "404", "Bucket not found", "Bucket not found");
    }

    #[tokio::test]
    async fn public_urls_of_a_private_bucket_do_not_work() {
        let sim = start();
        let c = client();
        assert_eq!(
            put_object(&c, &sim, "p.wav", vec![7; 5]).await.0,
            StatusCode::OK
        );
        let private =
            status_json(c.get(url(&sim, &format!("/object/public/{BUCKET}/p.wav")))).await;
        assert_storage_error(&private, "404", "Bucket not found", "Bucket not found");

        assert!(sim.create_bucket("open", true, None, None));
        let up = status_json(
            authed(c.post(url(&sim, "/object/open/p.wav")))
                .header("content-type", "audio/wav")
                .body(vec![8; 5]),
        )
        .await;
        assert_eq!(up.0, StatusCode::OK);
        let resp = c
            .get(url(&sim, "/object/public/open/p.wav"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.expect("bytes"), vec![8; 5]);
    }

    async fn sign(
        c: &Client,
        sim: &StorageSim,
        name: &str,
        expires_in: Value,
    ) -> (StatusCode, Value) {
        status_json(
            authed(c.post(url(sim, &format!("/object/sign/{BUCKET}/{name}"))))
                .json(&json!({ "expiresIn": expires_in })),
        )
        .await
    }

    #[tokio::test]
    async fn signed_urls_serve_ranges_and_expire() {
        let sim = start();
        let c = client();
        let content = SimAudio::generated(100_000, 2).to_vec();
        assert_eq!(
            put_object(&c, &sim, "s/one.wav", content.clone()).await.0,
            StatusCode::OK
        );
        assert_eq!(
            put_object(&c, &sim, "s/two.wav", vec![1; 10]).await.0,
            StatusCode::OK
        );

        let (status, body) = sign(&c, &sim, "s/one.wav", json!(60)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let signed = body["signedURL"].as_str().expect("signedURL").to_owned();
        assert!(
            signed.starts_with(&format!("/object/sign/{BUCKET}/s/one.wav?token=")),
            "{signed}"
        );
        let full = format!("{}/storage/v1{signed}", sim.base_url());

        let resp = c.get(&full).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "audio/wav");
        assert_eq!(resp.headers()["content-length"], "100000");
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        assert_eq!(resp.bytes().await.expect("bytes"), content);
        for (range, start, end) in [
            ("bytes=0-1", 0, 1),
            ("bytes=99000-", 99_000, 99_999),
            ("bytes=-10", 99_990, 99_999),
        ] {
            let resp = c
                .get(&full)
                .header("range", range)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(
                resp.headers()["content-range"],
                format!("bytes {start}-{end}/100000").as_str()
            );
            assert_eq!(
                resp.headers()["content-length"],
                (end - start + 1).to_string().as_str()
            );
            assert_eq!(resp.headers()["accept-ranges"], "bytes");
            assert_eq!(resp.bytes().await.expect("bytes"), &content[start..=end]);
        }
        let resp = c
            .get(&full)
            .header("range", "bytes=100000-")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()["content-range"], "bytes */100000");

        let token = signed.split("token=").nth(1).expect("token");
        let other = format!(
            "{}/storage/v1/object/sign/{BUCKET}/s/two.wav?token={token}",
            sim.base_url()
        );
        let wrong_path = status_json(c.get(&other)).await;
        assert_storage_error(&wrong_path, "400", "InvalidSignature", "Invalid signature");
        let forged = format!("{full}x");
        let forged = status_json(c.get(&forged)).await;
        assert_storage_error(&forged, "400", "InvalidJWT", "invalid signature");
        let garbage = status_json(c.get(format!(
            "{}/storage/v1/object/sign/{BUCKET}/s/one.wav?token=abc",
            sim.base_url()
        )))
        .await;
        assert_storage_error(&garbage, "400", "InvalidJWT", "jwt malformed");

        let missing = sign(&c, &sim, "s/none.wav", json!(60)).await;
        assert_storage_error(&missing, "404", "not_found", "Object not found");
        assert_eq!(
            sign(&c, &sim, "s/one.wav", json!(0)).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            sign(&c, &sim, "s/one.wav", json!("soon")).await.0,
            StatusCode::BAD_REQUEST
        );

        let (_, body) = sign(&c, &sim, "s/two.wav", json!(1)).await;
        let short = format!(
            "{}/storage/v1{}",
            sim.base_url(),
            body["signedURL"].as_str().expect("signedURL")
        );
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let got = status_json(c.get(&short)).await;
            if got.0 == StatusCode::BAD_REQUEST {
                assert_storage_error(&got, "400", "InvalidJWT", "jwt expired");
                break;
            }
            assert_eq!(got.0, StatusCode::OK);
            assert!(Instant::now() < deadline, "signed URL never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    async fn tus_create(
        c: &Client,
        sim: &StorageSim,
        name: &str,
        len: u64,
        upsert: bool,
    ) -> reqwest::Response {
        let meta = format!(
            "bucketName {},objectName {},contentType {},cacheControl {}",
            b64(BUCKET),
            b64(name),
            b64("audio/wav"),
            b64("3600")
        );
        authed(c.post(url(sim, "/upload/resumable")))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", len.to_string())
            .header("upload-metadata", meta)
            .header("x-upsert", if upsert { "true" } else { "false" })
            .send()
            .await
            .expect("send")
    }

    async fn tus_patch_with(
        c: &Client,
        location: &str,
        offset: u64,
        chunk: Vec<u8>,
        upsert: bool,
    ) -> Result<reqwest::Response, reqwest::Error> {
        authed(c.patch(location))
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .header("x-upsert", if upsert { "true" } else { "false" })
            .body(chunk)
            .send()
            .await
    }

    async fn tus_patch(
        c: &Client,
        location: &str,
        offset: u64,
        chunk: Vec<u8>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        tus_patch_with(c, location, offset, chunk, false).await
    }

    async fn tus_offset(c: &Client, location: &str) -> (StatusCode, Option<u64>) {
        let resp = authed(c.head(location))
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .expect("send");
        let offset = resp
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        (resp.status(), offset)
    }

    fn location(resp: &reqwest::Response) -> String {
        resp.headers()["location"]
            .to_str()
            .expect("location")
            .to_owned()
    }

    #[tokio::test]
    async fn tus_upload_in_two_chunks_commits_the_object() {
        let _heavy = HEAVY.lock().await;
        let sim = start();
        let c = client();
        let audio = SimAudio::generated(CHUNK as u64 + 1000, 11);
        let all = audio.to_vec();
        let created = tus_create(&c, &sim, "tus/a.wav", audio.len(), false).await;
        assert_eq!(created.status(), StatusCode::CREATED);
        assert_eq!(created.headers()["tus-resumable"], "1.0.0");
        let loc = location(&created);
        assert!(
            loc.starts_with(&format!("{}/storage/v1/upload/resumable/", sim.base_url())),
            "{loc}"
        );

        let head = authed(c.head(&loc))
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .expect("send");
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()["upload-offset"], "0");
        assert_eq!(
            head.headers()["upload-length"],
            audio.len().to_string().as_str()
        );
        assert_eq!(head.headers()["cache-control"], "no-store");

        let first = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
            .await
            .expect("send");
        assert_eq!(first.status(), StatusCode::NO_CONTENT);
        assert_eq!(first.headers()["upload-offset"], CHUNK.to_string().as_str());
        assert_eq!(
            tus_offset(&c, &loc).await,
            (StatusCode::OK, Some(CHUNK as u64))
        );
        assert!(
            sim.object(BUCKET, "tus/a.wav").is_none(),
            "invisible until complete"
        );

        let last = tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..].to_vec())
            .await
            .expect("send");
        assert_eq!(last.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            last.headers()["upload-offset"],
            audio.len().to_string().as_str()
        );
        let stored = sim.object(BUCKET, "tus/a.wav").expect("committed");
        assert_eq!(stored.size, audio.len());
        assert_eq!(stored.sha256_hex, audio.sha256_hex());
        assert_eq!(stored.content_type, "audio/wav");
        assert_eq!(stored.cache_control, "max-age=3600");
        assert_eq!(stored.upload_count, 1);
        assert_eq!(sim.tus_patch_count(), 2);
        assert_eq!(
            tus_offset(&c, &loc).await,
            (StatusCode::OK, Some(audio.len()))
        );

        // Creating it again without upsert is refused up front.
        let dup = tus_create(&c, &sim, "tus/a.wav", 10, false).await;
        assert_eq!(dup.status(), StatusCode::CONFLICT);
        assert_eq!(
            dup.text().await.expect("text"),
            "The resource already exists"
        );
        let upsert = tus_create(&c, &sim, "tus/a.wav", 10, true).await;
        assert_eq!(upsert.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn tus_rejects_bad_chunks_offsets_and_uploads() {
        let _heavy = HEAVY.lock().await;
        let sim = start();
        let c = client();
        let len = CHUNK as u64 + 10;
        let loc = location(&tus_create(&c, &sim, "tus/b.wav", len, false).await);

        let small = tus_patch(&c, &loc, 0, vec![0u8; 1000]).await.expect("send");
        assert_eq!(
            small.status(),
            StatusCode::BAD_REQUEST,
            "a short non-final chunk"
        );
        let big = tus_patch(&c, &loc, 0, vec![0u8; CHUNK + 10])
            .await
            .expect("send");
        assert_eq!(big.status(), StatusCode::BAD_REQUEST, "a chunk over 6 MiB");
        assert_eq!(tus_offset(&c, &loc).await.1, Some(0));
        let wrong_offset = tus_patch(&c, &loc, 5, vec![0u8; 5]).await.expect("send");
        assert_eq!(wrong_offset.status(), StatusCode::CONFLICT);
        assert_eq!(
            wrong_offset.text().await.expect("text"),
            "Upload-Offset conflict\n"
        );
        let too_much = tus_patch(&c, &loc, 0, vec![0u8; CHUNK + 11])
            .await
            .expect("send");
        assert_eq!(too_much.status(), StatusCode::PAYLOAD_TOO_LARGE);

        let no_type = authed(c.patch(&loc))
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", "0")
            .body(vec![0u8; 10])
            .send()
            .await
            .expect("send");
        assert_eq!(no_type.status(), StatusCode::FORBIDDEN);
        let no_version = authed(c.patch(&loc))
            .header("upload-offset", "0")
            .header("content-type", "application/offset+octet-stream")
            .body(vec![0u8; 10])
            .send()
            .await
            .expect("send");
        assert_eq!(no_version.status(), StatusCode::PRECONDITION_FAILED);

        let unknown = format!("{}/storage/v1/upload/resumable/bm9wZQ", sim.base_url());
        assert_eq!(tus_offset(&c, &unknown).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            tus_patch(&c, &unknown, 0, vec![1])
                .await
                .expect("send")
                .status(),
            StatusCode::NOT_FOUND
        );

        assert!(sim.expire_upload(&loc));
        assert_eq!(tus_offset(&c, &loc).await.0, StatusCode::GONE);
        assert_eq!(
            tus_patch(&c, &loc, 0, vec![0u8; CHUNK])
                .await
                .expect("send")
                .status(),
            StatusCode::GONE
        );
        assert!(!sim.expire_upload("unknown"));

        let too_large = tus_create(&c, &sim, "tus/huge.wav", 51 * MIB, false).await;
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            too_large.text().await.expect("text"),
            "Maximum size exceeded\n"
        );
        let meta = format!(
            "bucketName {},objectName {},contentType {}",
            b64("nope"),
            b64("x.wav"),
            b64("audio/wav")
        );
        let no_bucket = authed(c.post(url(&sim, "/upload/resumable")))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "10")
            .header("upload-metadata", meta)
            .send()
            .await
            .expect("send");
        assert_eq!(no_bucket.status(), StatusCode::NOT_FOUND);
        let meta = format!(
            "bucketName {},objectName {},contentType {}",
            b64(BUCKET),
            b64("x.txt"),
            b64("text/plain")
        );
        let bad_mime = authed(c.post(url(&sim, "/upload/resumable")))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "10")
            .header("upload-metadata", meta)
            .send()
            .await
            .expect("send");
        assert_eq!(bad_mime.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            bad_mime.text().await.expect("text"),
            "mime type text/plain is not supported"
        );
        let bad_meta = authed(c.post(url(&sim, "/upload/resumable")))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "10")
            .header("upload-metadata", "bucketName !!!")
            .send()
            .await
            .expect("send");
        assert_eq!(bad_meta.status(), StatusCode::BAD_REQUEST);
        let no_len = authed(c.post(url(&sim, "/upload/resumable")))
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .expect("send");
        assert_eq!(no_len.status(), StatusCode::BAD_REQUEST);
        let no_auth = status_json(
            c.post(url(&sim, "/upload/resumable"))
                .header("tus-resumable", "1.0.0")
                .header("upload-length", "10"),
        )
        .await;
        assert_storage_error(&no_auth, "403", "Unauthorized", "jwt must be provided");
        assert!(sim.list_objects(BUCKET).is_empty());
    }

    #[tokio::test]
    async fn tus_resumes_after_a_dropped_patch() {
        let _heavy = HEAVY.lock().await;
        let sim = start();
        let c = client();
        let audio = SimAudio::generated(2 * CHUNK as u64 + 5, 12);
        let all = audio.to_vec();
        let loc = location(&tus_create(&c, &sim, "tus/r.wav", audio.len(), false).await);

        // The connection dies 1 MiB into the first chunk: nothing counts.
        sim.fail_next(
            1,
            Fault::ResetMidBody {
                after_bytes: 1024 * 1024,
            },
        );
        assert!(tus_patch(&c, &loc, 0, all[..CHUNK].to_vec()).await.is_err());
        assert_eq!(tus_offset(&c, &loc).await, (StatusCode::OK, Some(0)));

        let first = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
            .await
            .expect("send");
        assert_eq!(first.status(), StatusCode::NO_CONTENT);
        // Dropped mid second chunk: the offset stays at the last whole chunk.
        sim.fail_next(
            1,
            Fault::ResetMidBody {
                after_bytes: 3 * 1024 * 1024,
            },
        );
        assert!(
            tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..2 * CHUNK].to_vec())
                .await
                .is_err()
        );
        let (_, offset) = tus_offset(&c, &loc).await;
        assert_eq!(offset, Some(CHUNK as u64));
        // A server error on a chunk is also retried from HEAD's offset.
        sim.fail_next(1, Fault::Status(500));
        let failed = tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..2 * CHUNK].to_vec())
            .await
            .expect("send");
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);

        let mut offset = offset.unwrap_or_default();
        while offset < audio.len() {
            let end = (offset as usize + CHUNK).min(all.len());
            let resp = tus_patch(&c, &loc, offset, all[offset as usize..end].to_vec())
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            offset = resp.headers()["upload-offset"]
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .expect("offset");
        }
        let stored = sim.object(BUCKET, "tus/r.wav").expect("committed");
        assert_eq!(stored.sha256_hex, audio.sha256_hex());
        assert_eq!(stored.upload_count, 1);
        assert_eq!(sim.tus_patch_count(), 6);
    }

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn large_uploads_stream_to_disk() {
        let _heavy = HEAVY.lock().await;
        let tmp = temp_dir("stream");
        let dir = tmp.0.clone();
        let sim = start_with(StorageSimConfig {
            data_dir: Some(dir.clone()),
            global_file_size_limit: 200 * MIB,
            ..StorageSimConfig::default()
        });
        let c = client();
        let audio = SimAudio::generated(64 * MIB, 21);

        let before = rss_kib();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
        let sampler = {
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let resp = authed(c.post(url(&sim, &format!("/object/{BUCKET}/big.wav"))))
            .header("content-type", "audio/wav")
            .body(reqwest::Body::wrap_stream(audio.stream()))
            .send()
            .await
            .expect("send");
        sampler.abort();
        assert_eq!(resp.status(), StatusCode::OK);
        let grew_mib = peak
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(before)
            / 1024;
        // Buffering the body would add 64 MiB; streaming adds a few MiB of
        // buffers (3 MiB measured alone). Generous, as tests share a process.
        assert!(
            grew_mib < 48,
            "RSS grew {grew_mib} MiB during a 64 MiB upload"
        );

        let stored = sim.object(BUCKET, "big.wav").expect("stored");
        assert_eq!(stored.size, 64 * MIB);
        assert_eq!(stored.sha256_hex, audio.sha256_hex());
        let files: Vec<_> = std::fs::read_dir(dir.join("objects"))
            .expect("objects")
            .filter_map(Result::ok)
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].metadata().expect("meta").len(), 64 * MIB);
        assert_eq!(
            std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
            0,
            "no temp files left"
        );

        // Served back from disk, with ranges.
        let dl = url(&sim, &format!("/object/authenticated/{BUCKET}/big.wav"));
        let resp = authed(c.get(&dl))
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        let mut want = vec![0u8; 1000];
        audio.read_at(1000, &mut want);
        assert_eq!(resp.bytes().await.expect("bytes"), want);

        // A TUS upload into the same directory, overwriting (x-upsert on
        // every request, as storage-api checks it on each PATCH), which
        // frees the old file.
        let small = SimAudio::generated(CHUNK as u64 + 7, 22);
        let loc = location(&tus_create(&c, &sim, "big.wav", small.len(), true).await);
        let all = small.to_vec();
        let refused = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
            .await
            .expect("send");
        assert_eq!(
            refused.status(),
            StatusCode::CONFLICT,
            "PATCH without x-upsert"
        );
        for (offset, chunk) in [(0, &all[..CHUNK]), (CHUNK as u64, &all[CHUNK..])] {
            let resp = tus_patch_with(&c, &loc, offset, chunk.to_vec(), true)
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        }
        let stored = sim.object(BUCKET, "big.wav").expect("stored");
        assert_eq!((stored.size, stored.upload_count), (small.len(), 2));
        assert_eq!(sim.object_bytes(BUCKET, "big.wav").expect("bytes"), all);
        assert_eq!(
            std::fs::read_dir(dir.join("objects"))
                .expect("objects")
                .count(),
            1
        );
        drop(sim);
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::read_dir(dir.join("objects")).map_or(0, |d| d.count()) > 0 {
            assert!(
                Instant::now() < deadline,
                "stopping the simulator removes its files"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn upload_faults_store_nothing() {
        let tmp = temp_dir("faults");
        let dir = tmp.0.clone();
        let sim = start_with(StorageSimConfig {
            data_dir: Some(dir.clone()),
            ..StorageSimConfig::default()
        });
        let c = client();
        let body = SimAudio::generated(200_000, 3).to_vec();

        sim.fail_next(1, Fault::Status(500));
        let failed = put_object(&c, &sim, "f.wav", body.clone()).await;
        assert_storage_error(&failed, "500", "internal", "Internal server error");

        sim.fail_next(1, Fault::Status(503));
        assert_eq!(
            put_object(&c, &sim, "f.wav", body.clone()).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );

        sim.fail_next(1, Fault::Reset);
        let sent = authed(c.post(url(&sim, &format!("/object/{BUCKET}/f.wav"))))
            .header("content-type", "audio/wav")
            .body(body.clone())
            .send()
            .await;
        assert!(sent.is_err(), "reset");

        sim.fail_next(
            1,
            Fault::ResetMidBody {
                after_bytes: 50_000,
            },
        );
        let sent = authed(c.post(url(&sim, &format!("/object/{BUCKET}/f.wav"))))
            .header("content-type", "audio/wav")
            .body(body.clone())
            .send()
            .await;
        assert!(sent.is_err(), "reset mid-body");
        assert!(
            sim.object(BUCKET, "f.wav").is_none(),
            "a broken-off upload stores nothing"
        );

        sim.fail_next(1, Fault::Hang(Duration::from_millis(400)));
        let quick = Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(100))
            .build()
            .expect("client");
        let err = authed(quick.post(url(&sim, &format!("/object/{BUCKET}/h.wav"))))
            .header("content-type", "audio/wav")
            .body(vec![1u8; 10])
            .send()
            .await
            .expect_err("timeout");
        assert!(err.is_timeout(), "{err:?}");

        // Faults on uploads leave other requests alone, and run out.
        assert_eq!(
            status_json(authed(c.get(url(&sim, &format!("/bucket/{BUCKET}")))))
                .await
                .0,
            StatusCode::OK
        );
        let ok = put_object(&c, &sim, "f.wav", body.clone()).await;
        assert_eq!(ok.0, StatusCode::OK);
        assert_eq!(sim.object(BUCKET, "f.wav").expect("stored").upload_count, 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
            0,
            "temp files cleaned up"
        );

        // Faults on other requests.
        sim.fail_next_other(1, Fault::Status(500));
        let info = status_json(authed(
            c.get(url(&sim, &format!("/object/info/{BUCKET}/f.wav"))),
        ))
        .await;
        assert_storage_error(&info, "500", "internal", "Internal server error");
        sim.fail_next_other(1, Fault::ResetMidBody { after_bytes: 1000 });
        let resp = authed(c.get(url(&sim, &format!("/object/authenticated/{BUCKET}/f.wav"))))
            .send()
            .await
            .expect("headers");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut stream = resp.bytes_stream();
        let mut broke = false;
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                broke = true;
                break;
            }
        }
        assert!(broke, "download breaks off");

        // Random faults are seeded and can be switched off.
        sim.set_random_faults(1.0, vec![Fault::Status(500)]);
        assert_eq!(
            put_object(&c, &sim, "g.wav", vec![1]).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        sim.set_random_faults(0.0, vec![Fault::Status(500)]);
        assert_eq!(
            put_object(&c, &sim, "g.wav", vec![1]).await.0,
            StatusCode::OK
        );
        drop(sim);
    }

    #[tokio::test]
    async fn stops_on_cancel() {
        let token = CancellationToken::new();
        let sim = StorageSim::start(StorageSimConfig {
            cancel: token.clone(),
            ..StorageSimConfig::default()
        })
        .expect("start");
        let addr = sim.addr();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        token.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
