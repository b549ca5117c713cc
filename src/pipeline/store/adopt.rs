//! An object already at the recording's path is adopted only if its bytes
//! are the source's, else replaced; every stored object is then verified
//! against what went through, and proven (or not) the whole recording,
//! which step 5 needs before it deletes at Telnyx.

use tracing::{info, warn};

use super::super::errors::{storage_failure, telnyx_failure};
use super::super::transfer::{self, Digest};
use super::super::{Run, wav};
use super::format_of;
use crate::config::AudioFormat;
use crate::jobs::JobError;
use crate::providers::storage_api::StorageError;

impl Run<'_> {
    /// An object is already at `path` (an earlier attempt's upload that
    /// finished unobserved, a 409, a resumed upload): it is this recording
    /// only if its bytes are the source's. The same size is not enough: a
    /// different recording can have it. Both are streamed and hashed, so
    /// memory stays constant. Anything else at the daemon's own path is
    /// replaced by the recording (and logged); it is never linked.
    ///
    /// Returns what the bucket holds and the source's declared length (its
    /// `Content-Length`; `None` when the download had none).
    pub(super) async fn adopt_existing(
        &mut self,
        path: &str,
        format: AudioFormat,
    ) -> Result<(Digest, Option<u64>), JobError> {
        let stored = self
            .p
            .storage
            .download(path)
            .await
            .map_err(storage_failure)?;
        let stored = transfer::digest_of(transfer::body_stream(stored))
            .await
            .map_err(|e| {
                JobError::retryable(format!("reading back the stored object failed: {e}"))
            })?;
        let url = self.download_url(format).await?;
        let source = self
            .p
            .telnyx
            .download(&url, 0)
            .await
            .map_err(telnyx_failure)?;
        let declared = source.content_length();
        let source = transfer::digest_of(transfer::body_stream(source))
            .await
            .map_err(|e| {
                JobError::retryable(format!("reading the recording to compare failed: {e}"))
            })?;
        if stored == source {
            info!(
                bytes = stored.size,
                sha256 = %stored.sha256,
                "adopted the object already stored: its bytes are the recording's"
            );
            return Ok((stored, declared));
        }
        if self.replaced {
            return Err(JobError::retryable(format!(
                "object {path} differs from the recording again right after it was replaced"
            )));
        }
        warn!(
            path,
            stored.bytes = stored.size,
            stored.sha256 = %stored.sha256,
            source.bytes = source.size,
            source.sha256 = %source.sha256,
            "the object at this recording's path holds other bytes: replacing it with the recording"
        );
        self.replaced = true;
        match self.p.storage.delete_object(path).await {
            Ok(()) | Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(storage_failure(e)),
        }
        if self.job.tus_upload_url.is_some() {
            self.queue.save_tus_upload(&self.lease, None).await?;
            self.job.tus_upload_url = None;
        }
        // Bounded by `replaced`: a second foreign object ends the attempt.
        Box::pin(self.upload_fresh(path, format)).await
    }

    /// The bucket must hold exactly the bytes that went through, and as many
    /// as the source has; otherwise the object is removed so the next attempt
    /// uploads it cleanly.
    pub(super) async fn verify_and_save(
        &mut self,
        path: &str,
        digest: Digest,
        source_size: Option<u64>,
    ) -> Result<(), JobError> {
        let info = self
            .p
            .storage
            .object_info(path)
            .await
            .map_err(storage_failure)?
            .ok_or_else(|| {
                JobError::retryable(format!("object {path} is missing right after its upload"))
            })?;
        let expected = source_size.unwrap_or(digest.size);
        if info.size != digest.size || info.size != expected {
            if let Err(e) = self.p.storage.delete_object(path).await {
                warn!(error = %e, "could not delete the mismatched object");
            }
            return Err(JobError::retryable(format!(
                "stored object has {} bytes, {} went through, the source has {expected}; \
                 deleted it to upload again",
                info.size, digest.size
            )));
        }
        let size =
            i64::try_from(digest.size).map_err(|_| JobError::permanent("object size overflows"))?;
        let unproven = unproven(format_of(path), source_size, &digest);
        if let Some(reason) = &unproven {
            warn!(
                path,
                reason, "stored, but not proven the whole recording: it stays at Telnyx"
            );
        }
        self.queue
            .save_stored(&self.lease, &digest.sha256, size, unproven.as_deref())
            .await?;
        self.job.stored_at = Some(chrono::Utc::now());
        self.job.source_complete = unproven.is_none();
        self.job.telnyx_kept_reason = unproven;
        crate::metrics::metrics().bytes_relayed.inc_by(digest.size);
        info!(path, bytes = digest.size, sha256 = %digest.sha256, "recording stored and verified");
        Ok(())
    }
}

/// Why the stored bytes are not proven the whole recording, or `None` when
/// they are: the source's length must be known (its `Content-Length`; a
/// resumed upload's total comes from the full download compared at the
/// end) and equal to the bytes stored, and a WAV file's own header must
/// declare exactly that many. A download without a length that the host
/// cut short ends cleanly: without these, it would be stored, linked and
/// then deleted at Telnyx, the only whole copy.
fn unproven(
    format: Option<AudioFormat>,
    source_length: Option<u64>,
    digest: &Digest,
) -> Option<String> {
    match source_length {
        None => {
            return Some(
                "the download gave no length, so a body cut short cannot be told from a whole one"
                    .to_owned(),
            );
        }
        Some(len) if len != digest.size => {
            return Some(format!(
                "the source declared {len} bytes, {} were stored",
                digest.size
            ));
        }
        Some(_) => {}
    }
    match format {
        Some(AudioFormat::Wav) => wav::check(&digest.head, digest.size)
            .err()
            .map(|e| format!("WAV header: {e}")),
        // MP3 declares no total length (frames, an optional Xing/VBRI
        // header that many encoders omit): the source length is the proof.
        Some(AudioFormat::Mp3) => None,
        None => Some("the object's format is unknown".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of_bytes(bytes: &[u8]) -> Digest {
        Digest {
            sha256: String::new(),
            size: bytes.len() as u64,
            head: bytes[..bytes.len().min(wav::HEAD_LEN)].to_vec(),
        }
    }

    #[test]
    fn only_a_known_length_and_an_agreeing_header_prove_a_recording_whole() {
        let whole = recording_relay_sim::SimAudio::generated(10_000, 1).to_vec();
        let cut = &whole[..6_000];
        use AudioFormat::{Mp3, Wav};
        let n = |b: &[u8]| Some(b.len() as u64);
        assert_eq!(
            unproven(Some(Wav), n(&whole), &digest_of_bytes(&whole)),
            None
        );
        assert_eq!(unproven(Some(Mp3), n(cut), &digest_of_bytes(cut)), None);
        let no_length = unproven(Some(Wav), None, &digest_of_bytes(&whole)).unwrap();
        assert!(no_length.contains("no length"), "{no_length}");
        let cut_wav = unproven(Some(Wav), n(cut), &digest_of_bytes(cut)).unwrap();
        assert!(
            cut_wav.contains("WAV header: the RIFF header declares 10000"),
            "{cut_wav}"
        );
        let short = unproven(Some(Mp3), Some(10_000), &digest_of_bytes(cut)).unwrap();
        assert!(short.contains("declared 10000 bytes, 6000"), "{short}");
    }
}
