//! The bucket recordings go into ([`RECORDINGS_BUCKET`]: private, audio
//! only, size-limited), and reading or creating a bucket
//! (`recording-relay setup-bucket`).

use serde::{Deserialize, Serialize};

use super::errors::{check, transport};
use super::{StorageClient, StorageError};
use crate::providers::urls::encode_segment;

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

impl StorageClient {
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
}
