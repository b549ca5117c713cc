//! Moving bytes: Telnyx's download stream goes straight into the upload,
//! hashed and counted on the way, in constant memory whatever the size.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::StreamReader;

/// Largest piece read from the download at once.
const READ_SIZE: usize = 64 * 1024;

/// SHA-256 and length of the bytes that went through, and their first
/// bytes (up to `wav::HEAD_LEN`, for the WAV header check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub sha256: String,
    pub size: u64,
    pub head: Vec<u8>,
}

/// Hash state shared between the body stream (owned by the HTTP client) and
/// the pipeline, which reads the result once the upload succeeded.
#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<(Sha256, u64, Vec<u8>)>>);

impl Tally {
    fn add(&self, chunk: &[u8]) {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        guard.0.update(chunk);
        guard.1 += chunk.len() as u64;
        let room = super::wav::HEAD_LEN.saturating_sub(guard.2.len());
        guard.2.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }

    pub fn finish(&self) -> Digest {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Digest {
            sha256: hex::encode(guard.0.clone().finalize()),
            size: guard.1,
            head: guard.2.clone(),
        }
    }
}

/// A response body as a byte stream with transport errors as io errors,
/// stripped of URLs (presigned URLs carry credentials).
pub(crate) fn body_stream(
    res: reqwest::Response,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    res.bytes_stream()
        .map_err(|e| io::Error::other(crate::providers::storage_api::error_chain(&e.without_url())))
}

/// Passes a stream through, hashing and counting every chunk.
pub(crate) fn tallied<S>(
    stream: S,
    tally: Tally,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    stream.inspect_ok(move |chunk| tally.add(chunk))
}

/// Hashes a whole stream (a stored object read back).
pub(crate) async fn digest_of<S>(stream: S) -> io::Result<Digest>
where
    S: Stream<Item = io::Result<Bytes>> + Send,
{
    let tally = Tally::default();
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        tally.add(&chunk?);
    }
    Ok(tally.finish())
}

/// A download shared by the consecutive PATCH bodies of a resumable upload.
pub(crate) type SharedReader = Arc<tokio::sync::Mutex<Pin<Box<dyn AsyncRead + Send>>>>;

pub(crate) fn shared_reader<S>(stream: S) -> SharedReader
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    Arc::new(tokio::sync::Mutex::new(Box::pin(StreamReader::new(stream))))
}

/// The next `len` bytes of `reader` as a request body. Ending early is an
/// error, so a short source can never complete a chunk.
pub(crate) fn chunk_body(reader: SharedReader, len: u64) -> reqwest::Body {
    let stream = futures_util::stream::try_unfold((reader, len), |(reader, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let want = usize::try_from(left.min(READ_SIZE as u64)).unwrap_or(READ_SIZE);
        let mut buf = vec![0u8; want];
        let n = reader.lock().await.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the recording download ended early",
            ));
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), (reader, left - n as u64))))
    });
    reqwest::Body::wrap_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn tally_matches_a_direct_hash() {
        let tally = Tally::default();
        let passed: Vec<Bytes> = tallied(chunks(&[b"hello ", b"world"]), tally.clone())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(passed.concat(), b"hello world");
        let d = tally.finish();
        assert_eq!(d.size, 11);
        assert_eq!(d.head, b"hello world");
        assert_eq!(
            d.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(digest_of(chunks(&[b"hello world"])).await.unwrap(), d);
    }
}
