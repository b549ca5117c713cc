//! Step 3: stream the file from Telnyx into the bucket, hashing and
//! counting it on the way, then verify the stored size. This file holds the
//! step and the upload itself (in one request, or resumable in chunks);
//! `store/plan.rs` says where the object goes and which file is fetched,
//! `store/adopt.rs` adopts an object already at the path only if its
//! SHA-256 is the source's (else replaces it), verifies what was stored
//! and whether it is proven the whole recording, which step 5 needs before
//! it deletes at Telnyx.

mod adopt;
mod plan;

use tracing::{info, warn};

use super::Run;
use super::errors::{storage_failure, telnyx_failure};
use super::transfer::{self, Digest, Tally};
use crate::config::AudioFormat;
use crate::jobs::{JobError, Outcome, QueueError};
use crate::providers::storage_api::{StorageError, TUS_CHUNK};

pub(crate) use self::plan::format_of;
pub use self::plan::object_path;

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
                Ok(()) => {}
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
        self.queue
            .save_tus_upload(&self.lease, Some(&upload))
            .await?;
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
        self.queue.save_tus_upload(&self.lease, None).await?;
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
}
