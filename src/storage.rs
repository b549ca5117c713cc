//! Client for Supabase Storage (the storage-api server): streaming uploads,
//! resumable (TUS) uploads, object info, server-side copies, signed URLs,
//! buckets.
//!
//! The server reports most errors as HTTP 400 with the real code in the JSON
//! body (`{"statusCode":"409","error":"Duplicate",...}`), so errors are
//! classified by that code, not by the HTTP status.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::urls::{UnsafePath, encode_path, encode_segment};

/// Every PATCH but the last carries exactly this much (the server enforces it).
pub const TUS_CHUNK: u64 = 6 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    #[error("object already exists in storage")]
    Duplicate,
    #[error("not found in storage: {0}")]
    NotFound(String),
    #[error("storage rejected the service key ({0}): check SUPABASE_SERVICE_ROLE_KEY")]
    Unauthorized(String),
    #[error("object too large for the bucket or the project's limit: {0}")]
    TooLarge(String),
    #[error("the bucket does not accept this content type: {0}")]
    MimeNotAllowed(String),
    #[error("resumable upload offset conflict: {0}")]
    OffsetConflict(String),
    #[error("storage answered {code}: {message}")]
    Server { code: u16, message: String },
    #[error("storage refused the request ({code}): {message}")]
    Rejected { code: u16, message: String },
    #[error("storage request failed: {0}")]
    Transport(String),
    #[error("unexpected storage response: {0}")]
    Decode(String),
    /// Refused before any request: the path would name another object.
    #[error("refused to address storage by this path: {0}")]
    UnsafePath(#[from] UnsafePath),
}

impl StorageError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::Server { .. }
                | StorageError::Transport(_)
                | StorageError::Decode(_)
                | StorageError::OffsetConflict(_)
        )
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::NotConfigured(_) => "not_configured",
            StorageError::Duplicate => "duplicate",
            StorageError::NotFound(_) => "not_found",
            StorageError::Unauthorized(_) => "unauthorized",
            StorageError::TooLarge(_) => "too_large",
            StorageError::MimeNotAllowed(_) => "mime_not_allowed",
            StorageError::OffsetConflict(_) => "offset_conflict",
            StorageError::Server { .. } => "server",
            StorageError::Rejected { .. } => "rejected",
            StorageError::Transport(_) => "transport",
            StorageError::Decode(_) => "decode",
            StorageError::UnsafePath(_) => "unsafe_path",
        }
    }
}

fn transport(e: reqwest::Error) -> StorageError {
    StorageError::Transport(error_chain(&e.without_url()))
}

/// The error and every cause under it, `: `-separated: reqwest's own text is
/// only "error sending request", which tells an operator nothing (was the
/// connection refused, reset, timed out?). URLs are already stripped.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// What `object/info` reports. Servers differ on whether size and type sit
/// at the top level or under `metadata`; both are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
}

impl ObjectInfo {
    fn from_json(v: &Value) -> Option<Self> {
        let meta = v.get("metadata");
        let size = v
            .get("size")
            .and_then(Value::as_u64)
            .or_else(|| meta.and_then(|m| m.get("size")).and_then(Value::as_u64))
            .or_else(|| {
                meta.and_then(|m| m.get("contentLength"))
                    .and_then(Value::as_u64)
            })?;
        let content_type = v
            .get("content_type")
            .and_then(Value::as_str)
            .or_else(|| meta.and_then(|m| m.get("mimetype")).and_then(Value::as_str))
            .map(str::to_owned);
        Some(Self { size, content_type })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bucket {
    pub id: String,
    pub name: String,
    pub public: bool,
    pub file_size_limit: Option<u64>,
    pub allowed_mime_types: Option<Vec<String>>,
}

/// The bucket recordings go into: private, audio only, size-limited.
/// `setup-bucket` creates it from this, and the demo and the tests make
/// their stand-in buckets from it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// Largest object accepted, in bytes (Supabase's free plan allows 50 MB
    /// in all).
    pub file_size_limit: u64,
    /// WAV under both names clients send, and MP3.
    pub allowed_mime_types: &'static [&'static str],
}

pub const RECORDINGS_BUCKET: BucketSpec = BucketSpec {
    file_size_limit: 50 * 1024 * 1024,
    allowed_mime_types: &["audio/wav", "audio/x-wav", "audio/mpeg"],
};

impl BucketSpec {
    pub fn mime_types(&self) -> Vec<String> {
        self.allowed_mime_types
            .iter()
            .map(|m| (*m).to_owned())
            .collect()
    }

    /// The private bucket `id` with this spec.
    pub fn bucket(&self, id: &str) -> Bucket {
        Bucket {
            id: id.to_owned(),
            name: id.to_owned(),
            public: false,
            file_size_limit: Some(self.file_size_limit),
            allowed_mime_types: Some(self.mime_types()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "statusCode")]
    status_code: Option<Value>,
    error: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StorageClient {
    http: reqwest::Client,
    /// For requests that carry an object's bytes (POST uploads, TUS
    /// PATCHes): never pooled. storage-api refuses an upload (duplicate,
    /// RLS, mime type, size) before reading its body and keeps the
    /// connection open with the body unread; a later request sent on that
    /// connection waits until the server resets it (30-60 s).
    ///
    /// No `Connection: close` either: the server then closes the socket
    /// right after its refusal, while the body is still being written, and
    /// the client reports "Broken pipe" instead of the refusal, turning a
    /// permanent error (mime type, size) into a retried one.
    uploads: reqwest::Client,
    /// The project URL, e.g. `https://<ref>.supabase.co` (no `/storage/v1`).
    base: String,
    key: SecretString,
    bucket: String,
    request_timeout: Duration,
}

impl StorageClient {
    /// The client `config` describes; the project URL and the service key
    /// are required.
    pub fn from_config(config: &Config) -> Result<Self, StorageError> {
        let url = config
            .supabase
            .url
            .as_deref()
            .ok_or(StorageError::NotConfigured("supabase.url"))?;
        let key = config
            .supabase
            .service_role_key
            .clone()
            .ok_or(StorageError::NotConfigured("supabase.service_role_key"))?;
        let http = &config.http;
        Self::new(
            url,
            key,
            &config.supabase.bucket,
            http.connect_timeout,
            http.request_timeout,
            http.read_idle_timeout,
        )
    }

    pub fn new(
        base: &str,
        key: SecretString,
        bucket: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
        read_idle: Duration,
    ) -> Result<Self, StorageError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(connect_timeout)
                .read_timeout(read_idle)
                .user_agent(concat!("recording-relay/", env!("CARGO_PKG_VERSION")))
        };
        let http = builder().build().map_err(transport)?;
        let uploads = builder()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(transport)?;
        Ok(Self {
            http,
            uploads,
            base: base.trim_end_matches('/').to_owned(),
            key,
            bucket: bucket.to_owned(),
            request_timeout,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn url(&self, route: &str) -> String {
        format!("{}/storage/v1{route}", self.base)
    }

    /// Every object URL is built here, so no path with a dot, empty,
    /// backslash or escaped segment reaches the server ([`encode_path`]):
    /// the service key would sign or fetch whatever it resolves to.
    fn object_route(&self, kind: &str, path: &str) -> Result<String, StorageError> {
        Ok(format!(
            "/object{kind}/{}/{}",
            encode_segment(&self.bucket)?,
            encode_path(path)?
        ))
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let key = self.key.expose_secret();
        req.bearer_auth(key).header("apikey", key)
    }

    /// The object's authenticated URL: what `intakes.recording_url` holds. It
    /// plays only with credentials; the UI turns it into a signed URL.
    pub fn authenticated_url(&self, path: &str) -> Result<String, StorageError> {
        Ok(self.url(&self.object_route("/authenticated", path)?))
    }

    /// Streams `body` into `path`. With a known length the request carries a
    /// Content-Length, so a source that ends early fails the upload instead
    /// of storing a truncated object.
    pub async fn upload(
        &self,
        path: &str,
        content_type: &str,
        body: reqwest::Body,
        length: Option<u64>,
    ) -> Result<(), StorageError> {
        let mut req = self
            .authed(self.uploads.post(self.url(&self.object_route("", path)?)))
            .header("content-type", content_type)
            .header("x-upsert", "false")
            .header("cache-control", "max-age=3600");
        if let Some(len) = length {
            req = req.header("content-length", len);
        }
        let res = req.body(body).send().await.map_err(transport)?;
        check(res).await.map(drop)
    }

    pub async fn object_info(&self, path: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let res = self
            .authed(self.http.get(self.url(&self.object_route("/info", path)?)))
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(transport)?;
        let res = match check(res).await {
            Ok(res) => res,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: Value = res
            .json()
            .await
            .map_err(|e| StorageError::Decode(e.without_url().to_string()))?;
        ObjectInfo::from_json(&v)
            .map(Some)
            .ok_or_else(|| StorageError::Decode("object info without a size".to_owned()))
    }

    /// Streams the stored object back (used to hash what is really stored
    /// when an earlier attempt's upload completed unobserved).
    pub async fn download(&self, path: &str) -> Result<reqwest::Response, StorageError> {
        let res = self
            .authed(
                self.http
                    .get(self.url(&self.object_route("/authenticated", path)?)),
            )
            .send()
            .await
            .map_err(transport)?;
        check(res).await
    }

    pub async fn delete_object(&self, path: &str) -> Result<(), StorageError> {
        let res = self
            .authed(self.http.delete(self.url(&self.object_route("", path)?)))
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(transport)?;
        check(res).await.map(drop)
    }

    /// Copies `source` to `destination` in the bucket, server-side (no byte
    /// passes through the daemon). Never overwrites: an object already at
    /// `destination` answers [`StorageError::Duplicate`] (409), a missing
    /// source [`StorageError::NotFound`] (404), so the caller decides what
    /// an existing destination is. The source stays; deleting it is the
    /// caller's next step, once the copy is verified.
    pub async fn copy_object(&self, source: &str, destination: &str) -> Result<(), StorageError> {
        // The keys travel in the body, not the URL: checked the same, so no
        // dot segment or escape names another object either way.
        encode_path(source)?;
        encode_path(destination)?;
        let res = self
            .authed(self.http.post(self.url("/object/copy")))
            .timeout(self.request_timeout)
            // storage-api upserts on a copy only with `x-upsert: true`.
            .header("x-upsert", "false")
            .json(&serde_json::json!({
                "bucketId": self.bucket,
                "sourceKey": source,
                "destinationKey": destination,
            }))
            .send()
            .await
            .map_err(transport)?;
        check(res).await.map(drop)
    }

    /// A time-limited URL that plays without credentials (and honours Range).
    pub async fn signed_url(
        &self,
        path: &str,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        let res = self
            .authed(self.http.post(self.url(&self.object_route("/sign", path)?)))
            .timeout(self.request_timeout)
            .json(&serde_json::json!({ "expiresIn": expires_in.as_secs().max(1) }))
            .send()
            .await
            .map_err(transport)?;
        let v: Value = check(res)
            .await?
            .json()
            .await
            .map_err(|e| StorageError::Decode(e.without_url().to_string()))?;
        let signed = v
            .get("signedURL")
            .or_else(|| v.get("signedUrl"))
            .and_then(Value::as_str)
            .ok_or_else(|| StorageError::Decode("no signedURL in the answer".to_owned()))?;
        Ok(self.url(signed))
    }

    pub async fn get_bucket(&self, id: &str) -> Result<Option<Bucket>, StorageError> {
        let res = self
            .authed(
                self.http
                    .get(self.url(&format!("/bucket/{}", encode_segment(id)?))),
            )
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(transport)?;
        match check(res).await {
            Ok(res) => res
                .json()
                .await
                .map(Some)
                .map_err(|e| StorageError::Decode(e.without_url().to_string())),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create_bucket(&self, bucket: &Bucket) -> Result<(), StorageError> {
        let res = self
            .authed(self.http.post(self.url("/bucket")))
            .timeout(self.request_timeout)
            .json(bucket)
            .send()
            .await
            .map_err(transport)?;
        check(res).await.map(drop)
    }

    /// Opens a resumable upload; returns its URL (kept on the job so a
    /// restarted daemon resumes instead of starting over).
    pub async fn tus_create(
        &self,
        path: &str,
        content_type: &str,
        length: u64,
    ) -> Result<String, StorageError> {
        // The object name travels in metadata, not the URL: checked the same.
        encode_path(path)?;
        let metadata = [
            ("bucketName", self.bucket.as_str()),
            ("objectName", path),
            ("contentType", content_type),
            ("cacheControl", "3600"),
        ]
        .iter()
        .map(|(k, v)| format!("{k} {}", base64_encode(v)))
        .collect::<Vec<_>>()
        .join(",");
        let res = self
            .authed(self.http.post(self.url("/upload/resumable")))
            .timeout(self.request_timeout)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", length)
            .header("upload-metadata", metadata)
            .header("x-upsert", "false")
            .send()
            .await
            .map_err(transport)?;
        let res = check(res).await?;
        let location = header_str(res.headers(), "location").ok_or_else(|| {
            StorageError::Decode("resumable upload created without a Location".to_owned())
        })?;
        Ok(self.absolute(location))
    }

    /// The server's offset and the upload's total length; `None` when the
    /// upload is gone (expired or unknown) and must start over.
    pub async fn tus_offset(
        &self,
        upload_url: &str,
    ) -> Result<Option<(u64, Option<u64>)>, StorageError> {
        let res = self
            .authed(self.http.head(upload_url))
            .timeout(self.request_timeout)
            .header("tus-resumable", "1.0.0")
            .header("x-upsert", "false")
            .send()
            .await
            .map_err(transport)?;
        if matches!(res.status(), StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Ok(None);
        }
        let res = check(res).await?;
        let length = header_str(res.headers(), "upload-length").and_then(|v| v.trim().parse().ok());
        Ok(Some((upload_offset(res.headers())?, length)))
    }

    /// Sends one chunk at `offset`; returns the new offset.
    pub async fn tus_patch(
        &self,
        upload_url: &str,
        offset: u64,
        body: reqwest::Body,
        length: u64,
    ) -> Result<u64, StorageError> {
        let res = self
            .authed(self.uploads.patch(upload_url))
            .header("tus-resumable", "1.0.0")
            .header("x-upsert", "false")
            .header("upload-offset", offset)
            .header("content-type", "application/offset+octet-stream")
            .header("content-length", length)
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        if res.status() == StatusCode::CONFLICT {
            return Err(StorageError::OffsetConflict(format!(
                "server is not at offset {offset}"
            )));
        }
        if matches!(res.status(), StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Err(StorageError::Server {
                code: res.status().as_u16(),
                message: "resumable upload expired; starting over".to_owned(),
            });
        }
        let res = check(res).await?;
        upload_offset(res.headers())
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else if location.starts_with("/storage/v1") {
            format!("{}{location}", self.base)
        } else {
            self.url(location)
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn upload_offset(headers: &HeaderMap) -> Result<u64, StorageError> {
    header_str(headers, "upload-offset")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| StorageError::Decode("no Upload-Offset in the answer".to_owned()))
}

/// Classifies a non-2xx answer by the code in its body.
async fn check(res: reqwest::Response) -> Result<reqwest::Response, StorageError> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let text = res.text().await.unwrap_or_default();
    let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
    let code = body
        .as_ref()
        .and_then(|b| b.status_code.as_ref())
        .and_then(|c| match c {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .unwrap_or(status.as_u16());
    let message = body
        .map(|b| {
            let error = b.error.unwrap_or_default();
            let message = b.message.unwrap_or_default();
            if error.is_empty() || message.contains(&error) {
                message
            } else {
                format!("{error}: {message}")
            }
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| text.chars().take(200).collect());
    Err(match code {
        409 => StorageError::Duplicate,
        404 => StorageError::NotFound(message),
        401 | 403 => StorageError::Unauthorized(message),
        413 => StorageError::TooLarge(message),
        415 => StorageError::MimeNotAllowed(message),
        408 | 429 | 500..=599 => StorageError::Server { code, message },
        _ => StorageError::Rejected { code, message },
    })
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn object_info_reads_either_shape() {
        let flat = json!({"size": 10, "content_type": "audio/wav"});
        let nested = json!({"metadata": {"size": 10, "mimetype": "audio/wav"}});
        for v in [flat, nested] {
            assert_eq!(
                ObjectInfo::from_json(&v),
                Some(ObjectInfo {
                    size: 10,
                    content_type: Some("audio/wav".into())
                })
            );
        }
    }

    /// What reqwest says alone ("error sending request") hides why; the
    /// causes under it are what `last_error` needs.
    #[test]
    fn transport_errors_keep_their_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
        assert_eq!(
            error_chain(&e),
            "error sending request: connection reset by peer"
        );
    }
}
