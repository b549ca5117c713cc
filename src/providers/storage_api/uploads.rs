//! Writing an object's bytes: one streaming POST, or a resumable (TUS)
//! upload whose URL the job keeps so a restarted daemon resumes. Both go
//! through the client's unpooled connections (see `StorageClient::uploads`).

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use super::errors::{check, transport};
use super::{StorageClient, StorageError};
use crate::providers::urls::encode_path;

/// Every PATCH but the last carries exactly this much (the server enforces it).
pub const TUS_CHUNK: u64 = 6 * 1024 * 1024;

impl StorageClient {
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

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
