//! Step 3: stream the file from Telnyx into the bucket, hashing and
//! counting it on the way, then verify the stored size. An object already
//! at the path is adopted only if its SHA-256 is the source's, else
//! replaced. Then whether the stored bytes are proven the whole recording
//! (see [`unproven`]), which step 5 needs before it deletes at Telnyx.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use uuid::Uuid;

use super::errors::{storage_failure, telnyx_failure};
use super::transfer::{self, Digest, Tally};
use super::{Run, wav, written};
use crate::config::AudioFormat;
use crate::jobs::{JobError, Outcome, QueueError};
use crate::providers::storage_api::{StorageError, TUS_CHUNK};
use crate::providers::telnyx_api::{DownloadUrls, Recording};

/// Download URLs fetched this recently are reused within one attempt
/// (Telnyx's expire after 10 minutes).
const FRESH_FOR: Duration = Duration::from_secs(60);

/// Where a recording lives in the bucket. Unmatched recordings are kept
/// apart so an operator can find and attach them.
pub fn object_path(intake: Option<Uuid>, recording_id: &str, format: AudioFormat) -> String {
    let file = format!("{}.{}", sanitize(recording_id), format.extension());
    match intake {
        Some(intake) => format!("intakes/{intake}/{file}"),
        None => format!("unmatched/{file}"),
    }
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The format of a planned object, from its path.
pub(super) fn format_of(path: &str) -> Option<AudioFormat> {
    match path.rsplit_once('.')?.1 {
        "wav" => Some(AudioFormat::Wav),
        "mp3" => Some(AudioFormat::Mp3),
        _ => None,
    }
}

/// Which of the offered files to fetch. Telnyx fixes the format when the
/// recording starts and then offers only that one, so the configured
/// format is a preference, not a requirement. An object already planned
/// keeps its format while it is offered, so a retry never switches files
/// under a half-finished upload.
fn pick_format(
    urls: &DownloadUrls,
    planned: Option<AudioFormat>,
    configured: AudioFormat,
) -> Option<AudioFormat> {
    let offered = |f: AudioFormat| match f {
        AudioFormat::Wav => urls.wav.is_some(),
        AudioFormat::Mp3 => urls.mp3.is_some(),
    };
    let other = match configured {
        AudioFormat::Wav => AudioFormat::Mp3,
        AudioFormat::Mp3 => AudioFormat::Wav,
    };
    [planned, Some(configured), Some(other)]
        .into_iter()
        .flatten()
        .find(|f| offered(*f))
}

impl Run<'_> {
    /// Step 3. `Some(outcome)` when another job already owns the object.
    /// `unmatched`: why no intake matched (the object goes under
    /// `unmatched/`), saved with the planned path.
    pub(super) async fn store(
        &mut self,
        unmatched: Option<&str>,
    ) -> Result<Option<Outcome>, JobError> {
        let format = self.format_to_fetch().await?;
        let path = object_path(self.job.intake_id, self.recording_id()?, format);
        if self.job.object_path.as_deref() == Some(path.as_str()) {
            // An earlier attempt got as far as uploading: its object may be
            // complete even though the attempt did not see it finish.
            if self
                .p
                .storage
                .object_info(&path)
                .await
                .map_err(storage_failure)?
                .is_some()
            {
                let (digest, expected) = self.adopt_existing(&path, format).await?;
                return self
                    .verify_and_save(&path, digest, expected)
                    .await
                    .map(|()| None);
            }
        } else {
            match self
                .queue
                .plan_object(&self.lease, &path, format.content_type(), unmatched)
                .await
            {
                Ok(ok) => written(ok)?,
                Err(QueueError::AlreadyOwned { job_id, .. }) => {
                    return Ok(Some(Outcome::Duplicate {
                        reason: format!("object {path} belongs to job {job_id}"),
                    }));
                }
                Err(e) => return Err(e.into()),
            }
            self.job.object_path = Some(path.clone());
            self.job.tus_upload_url = None;
        }

        let (digest, expected) = match self.job.tus_upload_url.clone() {
            Some(upload) => self.resume_resumable(&path, format, &upload).await?,
            None => self.upload_fresh(&path, format).await?,
        };
        self.verify_and_save(&path, digest, expected)
            .await
            .map(|()| None)
    }

    /// The recording with download URLs no older than [`FRESH_FOR`].
    async fn fresh_recording(&mut self) -> Result<Recording, JobError> {
        if let Some((at, rec)) = &self.fresh
            && at.elapsed() < FRESH_FOR
        {
            return Ok(rec.clone());
        }
        let rec = self
            .p
            .telnyx
            .get_recording(self.recording_id()?)
            .await
            .map_err(telnyx_failure)?;
        self.fresh = Some((Instant::now(), rec.clone()));
        Ok(rec)
    }

    /// The format whose file this attempt fetches (see [`pick_format`]).
    async fn format_to_fetch(&mut self) -> Result<AudioFormat, JobError> {
        let rec = self.fresh_recording().await?;
        let planned = self.job.object_path.as_deref().and_then(format_of);
        pick_format(&rec.download_urls, planned, self.p.opts.format).ok_or_else(|| {
            JobError::retryable(format!(
                "Telnyx offers no download URL for recording {} yet (status {})",
                rec.id,
                rec.status.as_deref().unwrap_or("unknown")
            ))
        })
    }

    async fn download_url(&mut self, format: AudioFormat) -> Result<String, JobError> {
        let rec = self.fresh_recording().await?;
        let urls = rec.download_urls;
        let url = match format {
            AudioFormat::Wav => urls.wav,
            AudioFormat::Mp3 => urls.mp3,
        };
        url.ok_or_else(|| {
            JobError::retryable(format!(
                "Telnyx no longer offers the {} file of recording {}",
                format.extension(),
                rec.id
            ))
        })
    }

    /// Uploads from the start. Returns what went up and the source's size.
    async fn upload_fresh(
        &mut self,
        path: &str,
        format: AudioFormat,
    ) -> Result<(Digest, Option<u64>), JobError> {
        let content_type = format.content_type();
        let url = self.download_url(format).await?;
        let download = self
            .p
            .telnyx
            .download(&url, 0)
            .await
            .map_err(telnyx_failure)?;
        let length = download.content_length();
        if let Some(total) = length.filter(|len| *len > self.p.opts.resumable_threshold_bytes) {
            let digest = self.start_resumable(path, format, download, total).await?;
            return Ok((digest, Some(total)));
        }
        let tally = Tally::default();
        let body = reqwest::Body::wrap_stream(transfer::tallied(
            transfer::body_stream(download),
            tally.clone(),
        ));
        match self
            .p
            .storage
            .upload(path, content_type, body, length)
            .await
        {
            Ok(()) => Ok((tally.finish(), length)),
            // Ours from an attempt whose bookkeeping was lost (e.g. a job row
            // recreated by an operator): adopt it rather than upload twice.
            Err(StorageError::Duplicate) => self.adopt_existing(path, format).await,
            Err(e) => Err(storage_failure(e)),
        }
    }

    async fn start_resumable(
        &mut self,
        path: &str,
        format: AudioFormat,
        download: reqwest::Response,
        total: u64,
    ) -> Result<Digest, JobError> {
        let upload = match self
            .p
            .storage
            .tus_create(path, format.content_type(), total)
            .await
        {
            Ok(url) => url,
            Err(StorageError::Duplicate) => {
                return self
                    .adopt_existing(path, format)
                    .await
                    .map(|(digest, _)| digest);
            }
            Err(e) => return Err(storage_failure(e)),
        };
        written(
            self.queue
                .save_tus_upload(&self.lease, Some(&upload))
                .await?,
        )?;
        self.job.tus_upload_url = Some(upload.clone());
        let tally = Tally::default();
        let stream = transfer::tallied(transfer::body_stream(download), tally.clone());
        self.send_chunks(&upload, transfer::shared_reader(stream), 0, total)
            .await?;
        Ok(tally.finish())
    }

    /// Continues a resumable upload at the server's offset, downloading only
    /// the missing bytes (Range).
    async fn resume_resumable(
        &mut self,
        path: &str,
        format: AudioFormat,
        upload: &str,
    ) -> Result<(Digest, Option<u64>), JobError> {
        let Some((offset, length)) = self
            .p
            .storage
            .tus_offset(upload)
            .await
            .map_err(storage_failure)?
        else {
            warn!("resumable upload expired at the server; starting over");
            return self.restart_upload(path, format).await;
        };
        if length == Some(offset) {
            // Every byte arrived; the last PATCH's answer was lost. The server
            // commits the object with that PATCH, or discards the upload.
            if self
                .p
                .storage
                .object_info(path)
                .await
                .map_err(storage_failure)?
                .is_some()
            {
                return self.adopt_existing(path, format).await;
            }
            return self.restart_upload(path, format).await;
        }
        let url = self.download_url(format).await?;
        let download = self
            .p
            .telnyx
            .download(&url, offset)
            .await
            .map_err(telnyx_failure)?;
        let remaining = download.content_length().ok_or_else(|| {
            JobError::retryable("the recording download has no length; cannot resume")
        })?;
        // Both numbers come from upstream headers: an overflow is a bad
        // answer to retry, not a panic.
        let total = offset.checked_add(remaining).ok_or_else(|| {
            JobError::retryable("resumable upload offset plus download length overflows")
        })?;
        if length.is_some_and(|l| l != total) {
            warn!("the upload was opened for another length; starting over");
            return self.restart_upload(path, format).await;
        }
        info!(offset, total, "resuming the upload");
        let reader = transfer::shared_reader(transfer::body_stream(download));
        self.send_chunks(upload, reader, offset, total).await?;
        // The bytes before `offset` went up in an earlier attempt: compare
        // what the bucket holds with the source rather than trust a
        // partial hash.
        self.adopt_existing(path, format).await
    }

    async fn restart_upload(
        &mut self,
        path: &str,
        format: AudioFormat,
    ) -> Result<(Digest, Option<u64>), JobError> {
        written(self.queue.save_tus_upload(&self.lease, None).await?)?;
        self.job.tus_upload_url = None;
        self.upload_fresh(path, format).await
    }

    async fn send_chunks(
        &self,
        upload: &str,
        reader: transfer::SharedReader,
        mut offset: u64,
        total: u64,
    ) -> Result<(), JobError> {
        while offset < total {
            let len = TUS_CHUNK.min(total - offset);
            let body = transfer::chunk_body(reader.clone(), len);
            let acknowledged = self
                .p
                .storage
                .tus_patch(upload, offset, body, len)
                .await
                .map_err(storage_failure)?;
            if acknowledged != offset + len {
                return Err(JobError::retryable(format!(
                    "storage acknowledged offset {acknowledged}, expected {}",
                    offset + len
                )));
            }
            offset = acknowledged;
        }
        Ok(())
    }

    /// An object is already at `path` (an earlier attempt's upload that
    /// finished unobserved, a 409, a resumed upload): it is this recording
    /// only if its bytes are the source's. The same size is not enough: a
    /// different recording can have it. Both are streamed and hashed, so
    /// memory stays constant. Anything else at the daemon's own path is
    /// replaced by the recording (and logged); it is never linked.
    ///
    /// Returns what the bucket holds and the source's declared length (its
    /// `Content-Length`; `None` when the download had none).
    async fn adopt_existing(
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
            written(self.queue.save_tus_upload(&self.lease, None).await?)?;
            self.job.tus_upload_url = None;
        }
        // Bounded by `replaced`: a second foreign object ends the attempt.
        Box::pin(self.upload_fresh(path, format)).await
    }

    /// The bucket must hold exactly the bytes that went through, and as many
    /// as the source has; otherwise the object is removed so the next attempt
    /// uploads it cleanly.
    async fn verify_and_save(
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
        written(
            self.queue
                .save_stored(&self.lease, &digest.sha256, size, unproven.as_deref())
                .await?,
        )?;
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

    #[test]
    fn the_format_fetched_is_the_one_offered() {
        let url = || Some("https://x.invalid/f".to_owned());
        let wav = DownloadUrls {
            wav: url(),
            mp3: None,
        };
        let mp3 = DownloadUrls {
            wav: None,
            mp3: url(),
        };
        let both = DownloadUrls {
            wav: url(),
            mp3: url(),
        };
        use AudioFormat::{Mp3, Wav};
        assert_eq!(pick_format(&mp3, None, Wav), Some(Mp3));
        assert_eq!(pick_format(&wav, None, Mp3), Some(Wav));
        assert_eq!(pick_format(&both, None, Mp3), Some(Mp3));
        assert_eq!(pick_format(&both, None, Wav), Some(Wav));
        // A planned object keeps its format while it is offered ...
        assert_eq!(pick_format(&both, Some(Wav), Mp3), Some(Wav));
        // ... and is re-planned when it is not (jobs planned before this
        // rule named a file Telnyx never had).
        assert_eq!(pick_format(&mp3, Some(Wav), Wav), Some(Mp3));
        assert_eq!(pick_format(&DownloadUrls::default(), None, Wav), None);
        assert_eq!(format_of("intakes/x/r.mp3"), Some(Mp3));
        assert_eq!(format_of("unmatched/r.wav"), Some(Wav));
        assert_eq!(format_of("unmatched/r"), None);
    }

    #[test]
    fn object_paths_are_stable_and_safe() {
        let intake = Uuid::nil();
        assert_eq!(
            object_path(Some(intake), "d8991cb0-c531", AudioFormat::Wav),
            "intakes/00000000-0000-0000-0000-000000000000/d8991cb0-c531.wav"
        );
        assert_eq!(
            object_path(None, "../x", AudioFormat::Mp3),
            "unmatched/___x.mp3"
        );
    }
}
