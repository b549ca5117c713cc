//! The steps of one job. Each step is idempotent and recorded on the job
//! before the next starts, so a retry resumes where the last attempt
//! stopped and never makes a second copy:
//!
//! 1. resolve: recording id, numbers, duration, times from the Recordings
//!    API (the real webhook lacks them);
//! 2. match: the intake, via `client_state` or phone number + time;
//! 3. store: stream the file from Telnyx into the bucket, hash and count it
//!    on the way, verify the stored size; an object already at the path is
//!    adopted only if its SHA-256 is the source's, else replaced;
//! 4. link: point the intake at the object;
//! 5. delete at Telnyx (optional, only after 3 and 4).

mod errors;
pub mod intakes;
pub mod transfer;

use std::time::{Duration, Instant};

use tracing::{info, warn};
use uuid::Uuid;

use self::errors::{storage_failure, telnyx_failure};
use self::intakes::{Claim, Found, MatchInput};
use self::transfer::{Digest, Tally};
use crate::config::{AudioFormat, Config, Party, PipelineConfig};
use crate::jobs::{
    Job, JobContext, JobError, JobHandler, Lease, Outcome, Queue, QueueError, Resolution,
};
use crate::storage::{StorageClient, StorageError, TUS_CHUNK};
use crate::telemetry::mask_phone;
use crate::telnyx::{DownloadUrls, Recording, TelnyxClient, TelnyxError};

/// Download URLs fetched this recently are reused within one attempt
/// (Telnyx's expire after 10 minutes).
const FRESH_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Telnyx(#[from] TelnyxError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct Pipeline {
    telnyx: TelnyxClient,
    storage: StorageClient,
    opts: PipelineConfig,
}

impl Pipeline {
    pub fn new(telnyx: TelnyxClient, storage: StorageClient, opts: PipelineConfig) -> Self {
        Self {
            telnyx,
            storage,
            opts,
        }
    }

    pub fn from_config(config: &Config) -> Result<Self, PipelineError> {
        Ok(Self::new(
            TelnyxClient::from_config(config)?,
            StorageClient::from_config(config)?,
            config.pipeline.clone(),
        ))
    }
}

impl JobHandler for Pipeline {
    async fn handle(&self, job: Job, ctx: JobContext) -> Result<Outcome, JobError> {
        let mut run = Run {
            p: self,
            job,
            queue: ctx.queue,
            lease: ctx.lease,
            fresh: None,
            replaced: false,
        };
        run.execute().await
    }
}

/// One attempt at one job.
struct Run<'a> {
    p: &'a Pipeline,
    job: Job,
    queue: Queue,
    lease: Lease,
    /// The recording as last fetched in this attempt, with fresh URLs.
    fresh: Option<(Instant, Recording)>,
    /// A foreign object at the recording's path was already replaced in
    /// this attempt: a second one is not chased in a loop.
    replaced: bool,
}

/// What a fenced step write returning `false` means.
fn lease_lost() -> JobError {
    JobError::retryable("lease lost during the job; another worker owns it now")
}

fn written(ok: bool) -> Result<(), JobError> {
    if ok { Ok(()) } else { Err(lease_lost()) }
}

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

/// Which tenant's intakes a job may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `pipeline.connection_organizations` is empty: no tenants.
    Unscoped,
    Organization(Uuid),
    /// Tenants are configured and this call's connection is none of theirs
    /// (or the job has none).
    Unknown,
}

impl Scope {
    fn of(
        connection: Option<&str>,
        organizations: &std::collections::HashMap<String, Uuid>,
    ) -> Scope {
        if organizations.is_empty() {
            return Scope::Unscoped;
        }
        connection
            .and_then(|c| organizations.get(c))
            .map_or(Scope::Unknown, |org| Scope::Organization(*org))
    }
}

/// The format of a planned object, from its path.
fn format_of(path: &str) -> Option<AudioFormat> {
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
    async fn execute(&mut self) -> Result<Outcome, JobError> {
        if self.job.resolved_at.is_none()
            && let Some(outcome) = self.resolve().await?
        {
            return Ok(outcome);
        }
        let unmatched = match (self.job.intake_id, &self.job.object_path) {
            (Some(_), _) => None,
            // Stored under unmatched/ already (a requeued unmatched job):
            // match again. A match links the intake to the object where it
            // is, so nothing is copied, moved or orphaned; no match ends the
            // job unmatched again with the new reason.
            (None, Some(_)) if self.job.stored_at.is_some() => self.match_intake().await?,
            // Planned as unmatched by an earlier attempt, upload unfinished:
            // keep that path rather than match late and leave an orphan
            // (possibly partial) copy behind, and give the reason saved with
            // it. Not `last_error`: that is whatever interrupted the earlier
            // attempt (a timeout, a crash).
            (None, Some(_)) => Some(
                self.job
                    .unmatched_reason
                    .clone()
                    .unwrap_or_else(|| "no intake matched in an earlier attempt".to_owned()),
            ),
            (None, None) => self.match_intake().await?,
        };
        if self.job.stored_at.is_none()
            && let Some(outcome) = self.store(unmatched.as_deref()).await?
        {
            return Ok(outcome);
        }
        if let Some(reason) = unmatched {
            return Ok(Outcome::Unmatched { reason });
        }
        if self.job.linked_at.is_none() {
            self.link().await?;
        }
        if self.p.opts.delete_from_telnyx && self.job.telnyx_deleted_at.is_none() {
            self.delete_at_telnyx().await?;
        }
        Ok(Outcome::Succeeded)
    }

    fn recording_id(&self) -> Result<&str, JobError> {
        self.job
            .recording_id
            .as_deref()
            .ok_or_else(|| JobError::permanent("job has no recording id after resolution"))
    }

    /// Step 1. `Some(outcome)` ends the job early (a duplicate).
    async fn resolve(&mut self) -> Result<Option<Outcome>, JobError> {
        let recording = match (&self.job.recording_id, &self.job.call_session_id) {
            (Some(id), _) => self
                .p
                .telnyx
                .get_recording(id)
                .await
                .map_err(telnyx_failure)?,
            (None, Some(session)) => {
                let listed = self
                    .p
                    .telnyx
                    .recordings_of_call(session)
                    .await
                    .map_err(telnyx_failure)?;
                match pick_recording(listed, &self.job) {
                    Pick::Found(recording) => *recording,
                    Pick::NotYet => {
                        return Err(JobError::retryable(format!(
                            "Telnyx lists no recording of call session {session} \
                             with this event's leg and start time yet"
                        )));
                    }
                    Pick::Ambiguous(n) => {
                        return Err(JobError::permanent(format!(
                            "{n} recordings of call session {session} fit this event; \
                             enqueue the right one by recording id (reconcile)"
                        )));
                    }
                }
            }
            (None, None) => {
                return Err(JobError::permanent(
                    "the event names neither a recording id nor a call session id",
                ));
            }
        };
        let resolution = Resolution {
            recording_id: recording.id.clone(),
            from_number: recording.from.clone(),
            to_number: recording.to.clone(),
            duration_millis: recording.duration_millis,
            recording_started_at: recording.recording_started_at,
            recording_ended_at: recording.recording_ended_at,
            channels: recording.channels.clone(),
            connection_id: recording.connection_id.clone(),
        };
        match self.queue.save_resolution(&self.lease, &resolution).await {
            Ok(ok) => written(ok)?,
            Err(QueueError::AlreadyOwned { recording, job_id }) => {
                return Ok(Some(Outcome::Duplicate {
                    reason: format!("recording {recording} is relayed by job {job_id}"),
                }));
            }
            Err(e) => return Err(e.into()),
        }
        if self.job.recording_id.is_none() {
            tracing::Span::current().record("recording.id", recording.id.as_str());
        }
        let j = &mut self.job;
        j.recording_id = Some(resolution.recording_id);
        j.from_number = resolution.from_number.or(j.from_number.take());
        j.to_number = resolution.to_number.or(j.to_number.take());
        j.duration_millis = resolution.duration_millis.or(j.duration_millis);
        j.recording_started_at = resolution.recording_started_at.or(j.recording_started_at);
        j.recording_ended_at = resolution.recording_ended_at.or(j.recording_ended_at);
        // The job's own (the webhook's) connection wins, as in the SQL.
        j.connection_id = j.connection_id.take().or(resolution.connection_id);
        info!(
            recording.id = %recording.id,
            to = %j.to_number.as_deref().map(mask_phone).unwrap_or_default(),
            duration_ms = j.duration_millis,
            "recording resolved"
        );
        self.fresh = Some((Instant::now(), recording));
        Ok(None)
    }

    /// Step 2. `Ok(None)`: matched. `Ok(Some(reason))`: store as unmatched
    /// (no intake after the configured attempts, or an ambiguous one).
    /// Retryable error before that.
    async fn match_intake(&mut self) -> Result<Option<String>, JobError> {
        let recording_id = self.recording_id()?.to_owned();
        let opts = &self.p.opts;
        let j = &self.job;
        let around = j
            .recording_started_at
            .or(j.occurred_at)
            .unwrap_or(j.created_at);
        let number = match opts.patient_party {
            Party::To => j.to_number.as_deref(),
            Party::From => j.from_number.as_deref(),
        };
        let scope = Scope::of(j.connection_id.as_deref(), &opts.connection_organizations);
        // Fail closed: a connection that maps to no tenant could be any
        // tenant's, and a phone number alone would then cross tenants.
        let by_phone = match scope {
            Scope::Unknown => None,
            Scope::Unscoped | Scope::Organization(_) => number,
        };
        let input = MatchInput {
            job_id: j.id,
            recording_id: &recording_id,
            call_session_id: j.call_session_id.as_deref(),
            client_state: j.client_state.as_deref(),
            number: by_phone,
            party: opts.patient_party,
            organization: match scope {
                Scope::Organization(org) => Some(org),
                Scope::Unscoped | Scope::Unknown => None,
            },
            around,
            window: opts.match_window,
        };
        let found = intakes::find_intake(self.queue.pool(), &input)
            .await
            .map_err(QueueError::from)?;
        let (intake, method) = match found {
            Found::Intake(intake, method) => (intake, method),
            Found::Ambiguous(why) => return Ok(Some(why)),
            Found::Nothing(detail) => {
                let named = j
                    .client_state
                    .as_deref()
                    .and_then(intakes::intake_id_from_client_state);
                let client_state = match (&j.client_state, named) {
                    (None, _) => "the call has no client_state".to_owned(),
                    (Some(_), None) => "its client_state names no intake id".to_owned(),
                    (Some(_), Some(id)) => {
                        format!("its client_state names intake {id}, which does not exist")
                    }
                };
                let why = match (scope, by_phone) {
                    (Scope::Unknown, _) => format!(
                        "connection {} is not in pipeline.connection_organizations, so only \
                         client_state can match (no phone match across tenants), and {client_state}",
                        j.connection_id.as_deref().unwrap_or("(none)")
                    ),
                    (_, None) if j.from_number.is_none() && j.to_number.is_none() => format!(
                        "Telnyx gave no from/to numbers for this recording (older Recordings \
                         API schema), so only client_state can match, and {client_state}; set \
                         client_state to the intake id when dialing"
                    ),
                    (_, None) => format!(
                        "the recording has no number for the patient's party \
                         (pipeline.patient_party), so only client_state can match, and \
                         {client_state}"
                    ),
                    (_, Some(number)) => format!(
                        "no intake matches (patient number {}, created within {} of {around}): {detail}",
                        mask_phone(number),
                        humantime::format_duration(opts.match_window)
                    ),
                };
                // An intake a client_state names may not be committed yet;
                // with nothing else to go on, no later attempt can match.
                if by_phone.is_none() && named.is_none() {
                    warn!(reason = %why, "storing the recording as unmatched");
                    return Ok(Some(why));
                }
                return self.unmatched_or_retry(why);
            }
            Found::Undecided(why) => {
                return self.unmatched_or_retry(format!(
                    "no unambiguous intake (patient number {}): {why}",
                    number
                        .map(mask_phone)
                        .unwrap_or_else(|| "unknown".to_owned()),
                ));
            }
        };
        let duration = duration_secs(j);
        match intakes::claim_intake(
            &self.queue,
            &self.lease,
            intake,
            method,
            &recording_id,
            duration,
        )
        .await?
        {
            Claim::Claimed => {}
            Claim::LeaseLost => return Err(lease_lost()),
            Claim::TakenBy(other) => {
                return self.unmatched_or_retry(format!(
                    "intake {intake} already holds recording {other}"
                ));
            }
            Claim::Gone => return self.unmatched_or_retry(format!("intake {intake} was deleted")),
        }
        self.job.intake_id = Some(intake);
        info!(intake.id = %intake, method = method.as_str(), "intake matched");
        Ok(None)
    }

    /// Retries matching a few times (the intake may not be saved yet), then
    /// gives up so the recording is stored as unmatched.
    fn unmatched_or_retry(&self, why: String) -> Result<Option<String>, JobError> {
        if self.job.attempts < self.p.opts.match_attempts {
            return Err(JobError::Retryable {
                message: format!("{why}; trying again"),
                retry_after: Some(self.p.opts.match_retry_delay),
            });
        }
        warn!(reason = %why, "storing the recording as unmatched");
        Ok(Some(why))
    }

    /// Step 3. `Some(outcome)` when another job already owns the object.
    /// `unmatched`: why no intake matched (the object goes under
    /// `unmatched/`), saved with the planned path.
    async fn store(&mut self, unmatched: Option<&str>) -> Result<Option<Outcome>, JobError> {
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
    /// Returns what the bucket holds and the source's size.
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
            return Ok((stored, Some(source.size)));
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
        written(
            self.queue
                .save_stored(&self.lease, &digest.sha256, size)
                .await?,
        )?;
        self.job.stored_at = Some(chrono::Utc::now());
        crate::metrics::metrics().bytes_relayed.inc_by(digest.size);
        info!(path, bytes = digest.size, sha256 = %digest.sha256, "recording stored and verified");
        Ok(())
    }

    /// Step 4.
    async fn link(&mut self) -> Result<(), JobError> {
        let (Some(intake), Some(path)) = (self.job.intake_id, self.job.object_path.clone()) else {
            return Err(JobError::permanent(
                "cannot link: no intake or no stored object",
            ));
        };
        let recording_id = self.recording_id()?.to_owned();
        let url = self.p.storage.authenticated_url(&path);
        let duration = duration_secs(&self.job);
        // Retrying cannot bring an intake back or take it from another
        // recording: stop at once and say where the recording is.
        match intakes::link(
            &self.queue,
            &self.lease,
            intake,
            &recording_id,
            duration,
            &path,
            &url,
        )
        .await?
        {
            intakes::Linked::Linked => {}
            intakes::Linked::LeaseLost => return Err(lease_lost()),
            intakes::Linked::Gone => {
                return Err(JobError::permanent(format!(
                    "cannot link: intake {intake} was deleted after the match; \
                     the recording is stored at {path}"
                )));
            }
            intakes::Linked::TakenBy(other) => {
                return Err(JobError::permanent(format!(
                    "cannot link: intake {intake} now holds recording {other}; \
                     this recording is stored at {path}"
                )));
            }
        }
        self.job.linked_at = Some(chrono::Utc::now());
        crate::metrics::metrics().recording_linked(self.job.created_at);
        info!(intake.id = %intake, "intake linked to the recording");
        Ok(())
    }

    /// Step 5.
    async fn delete_at_telnyx(&mut self) -> Result<(), JobError> {
        let recording_id = self.recording_id()?.to_owned();
        self.p
            .telnyx
            .delete_recording(&recording_id)
            .await
            .map_err(telnyx_failure)?;
        written(self.queue.save_telnyx_deleted(&self.lease).await?)?;
        info!("recording deleted at Telnyx");
        Ok(())
    }
}

/// `intakes.recording_duration` is whole seconds.
fn duration_secs(job: &Job) -> Option<i32> {
    job.duration_millis
        // The duration comes from Telnyx's API: a negative one is not
        // written, and an absurd one saturates instead of overflowing (a
        // panic in debug builds, a negative number in release).
        .filter(|ms| *ms >= 0)
        .map(|ms| i32::try_from(ms.saturating_add(500) / 1000).unwrap_or(i32::MAX))
}

/// Why the listed recordings do not identify this event's recording.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    Found(Box<Recording>),
    /// Nothing listed fits yet (the list can lag the webhook).
    NotYet,
    /// Several fit and nothing in the event tells them apart.
    Ambiguous(usize),
}

/// Of a call's recordings, the one this event is about. A call can have
/// several (pause/resume, transfers), so what the event says (leg, start
/// time) must match; taking "the only one listed" could take a sibling
/// recording and drop this one as a duplicate of it.
fn pick_recording(listed: Vec<Recording>, job: &Job) -> Pick {
    let fits = |r: &Recording| {
        let same_leg = match (&job.call_leg_id, &r.call_leg_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let same_start = match (job.recording_started_at, r.recording_started_at) {
            (Some(a), Some(b)) => (a - b).num_milliseconds().abs() <= 1000,
            _ => true,
        };
        same_leg && same_start
    };
    let mut fitting: Vec<Recording> = listed.into_iter().filter(fits).collect();
    match fitting.len() {
        0 => Pick::NotYet,
        1 => Pick::Found(Box::new(fitting.remove(0))),
        n => Pick::Ambiguous(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording(id: &str, leg: &str, start_secs: i64) -> Recording {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "call_leg_id": leg,
            "recording_started_at": chrono::DateTime::from_timestamp(1_700_000_000 + start_secs, 0),
        }))
        .unwrap()
    }

    fn job_with(leg: Option<&str>, start_secs: Option<i64>) -> Job {
        let now = chrono::Utc::now();
        Job {
            id: 1,
            event_id: "e".into(),
            event_type: "call.recording.saved".into(),
            occurred_at: None,
            event: serde_json::json!({}),
            recording_id: None,
            call_session_id: Some("s".into()),
            call_control_id: None,
            call_leg_id: leg.map(str::to_owned),
            connection_id: None,
            client_state: None,
            from_number: None,
            to_number: None,
            duration_millis: None,
            channels: None,
            recording_started_at: start_secs
                .and_then(|s| chrono::DateTime::from_timestamp(1_700_000_000 + s, 0)),
            recording_ended_at: None,
            state: crate::jobs::JobState::Running,
            attempts: 1,
            max_attempts: 12,
            last_error: None,
            errors: serde_json::json!([]),
            next_run_at: now,
            locked_by: Some("w".into()),
            locked_until: Some(now),
            created_at: now,
            updated_at: now,
            finished_at: None,
            resolved_at: None,
            intake_id: None,
            match_method: None,
            matched_at: None,
            object_path: None,
            tus_upload_url: None,
            content_type: None,
            object_sha256: None,
            object_size: None,
            stored_at: None,
            linked_at: None,
            telnyx_deleted_at: None,
            unmatched_reason: None,
            lease_id: None,
        }
    }

    #[test]
    fn a_sibling_recording_is_never_taken_for_this_one() {
        let first = recording("rec-1", "leg-a", 0);
        let second = recording("rec-2", "leg-a", 300);
        // The webhook for the second arrives while only the first is listed.
        let job = job_with(Some("leg-a"), Some(300));
        assert_eq!(pick_recording(vec![first.clone()], &job), Pick::NotYet);
        let Pick::Found(found) = pick_recording(vec![first.clone(), second.clone()], &job) else {
            panic!("the second fits");
        };
        assert_eq!(found.id, "rec-2");
        // Another leg at the same time is not it either.
        let other_leg = recording("rec-3", "leg-b", 300);
        assert_eq!(pick_recording(vec![other_leg], &job), Pick::NotYet);
        // Nothing in the event to tell two apart.
        assert_eq!(
            pick_recording(vec![first, second], &job_with(None, None)),
            Pick::Ambiguous(2)
        );
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
    fn an_unlisted_connection_is_an_unknown_tenant() {
        let org = Uuid::new_v4();
        let none = std::collections::HashMap::new();
        let some = std::collections::HashMap::from([("conn-a".to_owned(), org)]);
        assert_eq!(Scope::of(Some("conn-a"), &none), Scope::Unscoped);
        assert_eq!(Scope::of(None, &none), Scope::Unscoped);
        assert_eq!(Scope::of(Some("conn-a"), &some), Scope::Organization(org));
        assert_eq!(Scope::of(Some("conn-b"), &some), Scope::Unknown);
        assert_eq!(Scope::of(None, &some), Scope::Unknown);
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
