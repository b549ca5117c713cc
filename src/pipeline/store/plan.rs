//! Where a recording goes and which file is fetched: the object's path
//! in the bucket, the format Telnyx offers, and the recording with fresh
//! download URLs.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::super::Run;
use super::super::errors::telnyx_failure;
use crate::config::AudioFormat;
use crate::jobs::JobError;
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
pub(crate) fn format_of(path: &str) -> Option<AudioFormat> {
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
    /// The recording with download URLs no older than [`FRESH_FOR`].
    pub(super) async fn fresh_recording(&mut self) -> Result<Recording, JobError> {
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
    pub(super) async fn format_to_fetch(&mut self) -> Result<AudioFormat, JobError> {
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

    pub(super) async fn download_url(&mut self, format: AudioFormat) -> Result<String, JobError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
