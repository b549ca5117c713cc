//! Client for Supabase Storage (the storage-api server): the client, object
//! info, downloads, deletes, server-side copies and signed URLs. Uploads
//! (POST and TUS) are in `uploads.rs`, buckets in `buckets.rs`, and what the
//! server's error answers mean in `errors.rs`.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::config::Config;
use crate::providers::urls::{encode_path, encode_segment};

mod buckets;
mod errors;
mod uploads;

pub use buckets::{Bucket, RECORDINGS_BUCKET};

pub use buckets::BucketSpec;
pub use errors::StorageError;
pub(crate) use errors::error_chain;
use errors::{check, transport};
pub use uploads::TUS_CHUNK;

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
    pub(crate) fn authenticated_url(&self, path: &str) -> Result<String, StorageError> {
        Ok(self.url(&self.object_route("/authenticated", path)?))
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
}
