//! Client for the Telnyx Recordings API (`/v2/recordings`) and the presigned
//! download URLs it hands out.
//!
//! Errors are classified for the job queue: 5xx, 408, 429 and transport
//! failures retry; 404 and other 4xx are permanent; 401/403 are permanent
//! with a message that points at the API key.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::jobs::JobError;
use crate::telemetry::{encode_segment, redact_url};

#[derive(Debug, thiserror::Error)]
pub enum TelnyxError {
    #[error("Telnyx rejected the API key ({status}): check TELNYX_API_KEY")]
    Unauthorized { status: u16 },
    #[error("not found at Telnyx: {what}")]
    NotFound { what: String },
    #[error("Telnyx rate limit hit (429); retry in {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    #[error("Telnyx answered {status}: {detail}")]
    Server { status: u16, detail: String },
    #[error("Telnyx refused the request ({status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("recording download from {url} answered {status} (presigned URL expired or revoked)")]
    DownloadDenied { status: u16, url: String },
    #[error("Telnyx request failed: {0}")]
    Transport(String),
    #[error("unexpected Telnyx response: {0}")]
    Decode(String),
}

impl TelnyxError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, TelnyxError::NotFound { .. })
    }
}

impl TelnyxError {
    fn kind(&self) -> &'static str {
        match self {
            TelnyxError::Unauthorized { .. } => "unauthorized",
            TelnyxError::NotFound { .. } => "not_found",
            TelnyxError::RateLimited { .. } => "rate_limited",
            TelnyxError::Server { .. } => "server",
            TelnyxError::Rejected { .. } => "rejected",
            TelnyxError::DownloadDenied { .. } => "download_denied",
            TelnyxError::Transport(_) => "transport",
            TelnyxError::Decode(_) => "decode",
        }
    }
}

impl From<TelnyxError> for JobError {
    fn from(e: TelnyxError) -> Self {
        crate::metrics::metrics().provider_error("telnyx", e.kind());
        match e {
            TelnyxError::RateLimited { retry_after } => JobError::Retryable {
                message: e.to_string(),
                retry_after: Some(retry_after),
            },
            TelnyxError::Server { .. }
            | TelnyxError::Transport(_)
            | TelnyxError::DownloadDenied { .. }
            | TelnyxError::Decode(_) => JobError::retryable(e.to_string()),
            TelnyxError::Unauthorized { .. }
            | TelnyxError::NotFound { .. }
            | TelnyxError::Rejected { .. } => JobError::permanent(e.to_string()),
        }
    }
}

/// Transport errors carry the URL, which for downloads holds the presigned
/// signature: strip it before the message goes anywhere.
fn transport(e: reqwest::Error) -> TelnyxError {
    TelnyxError::Transport(e.without_url().to_string())
}

/// A recording as `GET /v2/recordings/{id}` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Recording {
    pub id: String,
    pub call_session_id: Option<String>,
    pub call_control_id: Option<String>,
    pub call_leg_id: Option<String>,
    pub channels: Option<String>,
    pub duration_millis: Option<i64>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub recording_started_at: Option<DateTime<Utc>>,
    pub recording_ended_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    pub status: Option<String>,
    #[serde(default)]
    pub download_urls: DownloadUrls,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DownloadUrls {
    pub mp3: Option<String>,
    pub wav: Option<String>,
}

#[derive(Debug, Deserialize)]
struct One {
    data: Recording,
}

#[derive(Debug, Deserialize)]
pub struct Page {
    pub data: Vec<Recording>,
    #[serde(default)]
    pub meta: PageMeta,
}

#[derive(Debug, Default, Deserialize)]
pub struct PageMeta {
    pub page_number: Option<u32>,
    pub total_pages: Option<u32>,
    pub total_results: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ErrorItem {
    title: Option<String>,
    detail: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TelnyxClient {
    http: reqwest::Client,
    base: String,
    api_key: SecretString,
    request_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole-request bound for API calls (metadata, list, delete).
    pub request: Duration,
    /// Longest silence while streaming a download; no bound on the total,
    /// since recordings can be large.
    pub read_idle: Duration,
}

impl TelnyxClient {
    pub fn new(base: &str, api_key: SecretString, timeouts: Timeouts) -> Result<Self, TelnyxError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read_idle)
            .user_agent(concat!("recording-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(transport)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
            request_timeout: timeouts.request,
        })
    }

    fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.api_key.expose_secret())
            .header("accept", "application/json")
            .timeout(self.request_timeout)
    }

    /// `GET /recordings/{id}`: metadata plus fresh presigned download URLs
    /// (the ones in the webhook expire after 10 minutes).
    pub async fn get_recording(&self, id: &str) -> Result<Recording, TelnyxError> {
        let path = format!("/recordings/{}", encode_segment(id));
        let res = self
            .api(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(transport)?;
        let res = check(res, || format!("recording {id}")).await?;
        let one: One = decode(res).await?;
        Ok(one.data)
    }

    /// `GET /recordings` with filters such as `filter[call_session_id]`.
    pub async fn list_recordings(
        &self,
        filters: &[(&str, String)],
        page_number: u32,
        page_size: u32,
    ) -> Result<Page, TelnyxError> {
        let mut query: Vec<(String, String)> = filters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        query.push(("page[number]".to_owned(), page_number.to_string()));
        query.push(("page[size]".to_owned(), page_size.min(250).to_string()));
        let res = self
            .api(reqwest::Method::GET, "/recordings")
            .query(&query)
            .send()
            .await
            .map_err(transport)?;
        let res = check(res, || "recordings list".to_owned()).await?;
        decode(res).await
    }

    /// Recordings of one call; the webhook has the session id even when it
    /// lacks the recording id.
    pub async fn recordings_of_call(
        &self,
        call_session_id: &str,
    ) -> Result<Vec<Recording>, TelnyxError> {
        let page = self
            .list_recordings(
                &[("filter[call_session_id]", call_session_id.to_owned())],
                1,
                250,
            )
            .await?;
        Ok(page.data)
    }

    /// `DELETE /recordings/{id}`. Already gone counts as deleted.
    pub async fn delete_recording(&self, id: &str) -> Result<(), TelnyxError> {
        let path = format!("/recordings/{}", encode_segment(id));
        let res = self
            .api(reqwest::Method::DELETE, &path)
            .send()
            .await
            .map_err(transport)?;
        match check(res, || format!("recording {id}")).await {
            Ok(_) | Err(TelnyxError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts streaming a presigned download. No API key is sent: the URL
    /// carries its own signature, and the key must not leak to the file host.
    pub async fn download(
        &self,
        url: &str,
        from_byte: u64,
    ) -> Result<reqwest::Response, TelnyxError> {
        let mut req = self.http.get(url);
        if from_byte > 0 {
            req = req.header("range", format!("bytes={from_byte}-"));
        }
        let res = req.send().await.map_err(transport)?;
        let status = res.status();
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            return Err(TelnyxError::DownloadDenied {
                status: status.as_u16(),
                url: redact_url(url).to_owned(),
            });
        }
        // Error answers first, like any other request's: a 429 keeps its
        // retry hint and a 404 (the recording is gone) is permanent.
        let res = check(res, || format!("recording file {}", redact_url(url))).await?;
        if from_byte > 0 && res.status() != StatusCode::PARTIAL_CONTENT {
            return Err(TelnyxError::Server {
                status: res.status().as_u16(),
                detail: "the download host ignored the Range request".to_owned(),
            });
        }
        Ok(res)
    }
}

impl TelnyxClient {
    /// The size of the file behind a download URL, asked with a one-byte
    /// Range request (no HEAD: presigned URLs are signed for GET).
    pub async fn source_length(&self, url: &str) -> Result<Option<u64>, TelnyxError> {
        let res = self
            .http
            .get(url)
            .header("range", "bytes=0-0")
            .send()
            .await
            .map_err(transport)?;
        if matches!(
            res.status(),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED
        ) {
            return Err(TelnyxError::DownloadDenied {
                status: res.status().as_u16(),
                url: redact_url(url).to_owned(),
            });
        }
        let res = check(res, || format!("recording file {}", redact_url(url))).await?;
        if res.status() == StatusCode::PARTIAL_CONTENT {
            let total = res
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, total)| total.parse().ok());
            return Ok(total);
        }
        Ok(res.content_length())
    }
}

/// Reads a JSON answer. serde's messages quote the offending value
/// ("invalid type: integer `15557650002`, expected a string"), and these
/// answers hold phone numbers, while the message ends up in `last_error`,
/// alerts and logs: keep what was expected and where, never the value.
async fn decode<T: serde::de::DeserializeOwned>(res: reqwest::Response) -> Result<T, TelnyxError> {
    let body = read_limited(res, MAX_API_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| TelnyxError::Decode(describe_json_error(&e)))
}

/// The largest API answer read (a full page of 250 recordings is ~250 KB):
/// a broken or hostile upstream must not fill our memory.
const MAX_API_BODY: usize = 16 * 1024 * 1024;

async fn read_limited(mut res: reqwest::Response, limit: usize) -> Result<Vec<u8>, TelnyxError> {
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(transport)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(TelnyxError::Decode(format!(
                "answer larger than {} MiB",
                limit / (1024 * 1024)
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn describe_json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Data => {
            let message = e.to_string();
            match message.split_once(", expected ") {
                Some((_, expected)) => {
                    let expected = expected.split(" at line ").next().unwrap_or(expected);
                    format!("a field has the wrong type or value (expected {expected})")
                }
                // "missing field `id`" and the like name no value.
                None => message
                    .split(" at line ")
                    .next()
                    .unwrap_or("unexpected data")
                    .to_owned(),
            }
        }
        serde_json::error::Category::Syntax => "not valid JSON".to_owned(),
        serde_json::error::Category::Eof => "truncated JSON".to_owned(),
        serde_json::error::Category::Io => "unreadable body".to_owned(),
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// Maps a non-2xx answer to its error class.
async fn check(
    res: reqwest::Response,
    what: impl FnOnce() -> String,
) -> Result<reqwest::Response, TelnyxError> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let retry_after = rate_limit_reset(&res);
    let detail = error_detail(res).await;
    Err(match status.as_u16() {
        401 | 403 => TelnyxError::Unauthorized {
            status: status.as_u16(),
        },
        404 | 410 => TelnyxError::NotFound { what: what() },
        429 => TelnyxError::RateLimited {
            retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
        },
        408 | 500..=599 => TelnyxError::Server {
            status: status.as_u16(),
            detail,
        },
        code => TelnyxError::Rejected {
            status: code,
            detail,
        },
    })
}

/// `x-ratelimit-reset` is documented as seconds until the window resets;
/// tolerate an absolute unix time too.
fn rate_limit_reset(res: &reqwest::Response) -> Option<Duration> {
    let value: u64 = res
        .headers()
        .get("x-ratelimit-reset")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
    let secs = if value > 1_000_000_000 {
        value.saturating_sub(now)
    } else {
        value
    };
    Some(Duration::from_secs(secs.max(1)))
}

async fn error_detail(res: reqwest::Response) -> String {
    // Only the start of an error body is ever shown.
    let bytes = read_limited(res, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) if !body.errors.is_empty() => body
            .errors
            .iter()
            .map(|e| {
                let title = e.title.as_deref().unwrap_or("error");
                match e.detail.as_deref() {
                    Some(d) => format!("{title}: {d}"),
                    None => title.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => text.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_map_to_job_errors() {
        let retry: JobError = TelnyxError::RateLimited {
            retry_after: Duration::from_secs(7),
        }
        .into();
        assert!(
            matches!(retry, JobError::Retryable { retry_after: Some(d), .. } if d.as_secs() == 7)
        );
        let gone: JobError = TelnyxError::NotFound {
            what: "recording x".into(),
        }
        .into();
        assert!(matches!(gone, JobError::Permanent { .. }));
        let key: JobError = TelnyxError::Unauthorized { status: 401 }.into();
        assert!(key.to_string().contains("TELNYX_API_KEY"));
    }

    /// Found by the chaos test: a resumed (ranged) download that got an
    /// error answer was reported as "ignored the Range request", as a
    /// retryable server error whatever the status: a 429 lost its
    /// `x-ratelimit-reset` hint, and a 404 (recording gone) was retried
    /// twelve times instead of failing at once.
    #[tokio::test]
    async fn a_ranged_download_classifies_error_answers_like_any_other() {
        use crate::sim::{Fault, SimRecording, TelnyxSim, TelnyxSimConfig};
        let sim = TelnyxSim::start(TelnyxSimConfig::default()).unwrap();
        sim.add_recording(SimRecording::sample("rec-ranged"));
        let client = TelnyxClient::new(
            &sim.base_url(),
            SecretString::from("unused for downloads"),
            Timeouts {
                connect: Duration::from_secs(2),
                request: Duration::from_secs(5),
                read_idle: Duration::from_secs(5),
            },
        )
        .unwrap();
        let url = sim.download_url("rec-ranged", "wav");

        sim.fail_next_downloads(1, Fault::Status(429));
        let err = client.download(&url, 1000).await.unwrap_err();
        assert!(matches!(err, TelnyxError::RateLimited { .. }), "{err}");

        sim.fail_next_downloads(1, Fault::Status(404));
        let err = client.download(&url, 1000).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(matches!(JobError::from(err), JobError::Permanent { .. }));

        sim.fail_next_downloads(1, Fault::Status(500));
        let err = client.download(&url, 1000).await.unwrap_err();
        assert!(
            matches!(err, TelnyxError::Server { status: 500, .. }),
            "{err}"
        );
        assert!(!err.to_string().contains("Range"), "{err}");

        let resumed = client.download(&url, 1000).await.unwrap();
        assert_eq!(resumed.status(), StatusCode::PARTIAL_CONTENT);
    }

    #[test]
    fn decode_errors_never_quote_the_value() {
        for body in [
            r#"{"data":{"id":"r","to":15557650002}}"#,
            r#"{"data":{"id":"r","from":["+15551230001"]}}"#,
            r#"{"data":{"id":"r","duration_millis":"+15557650002"}}"#,
            r#"{"data":{"id":"r","recording_started_at":"+15557650002"}}"#,
        ] {
            let e = serde_json::from_str::<One>(body).unwrap_err();
            let described = describe_json_error(&e);
            assert!(
                !described.contains("555"),
                "{body}: {described} (serde said: {e})"
            );
            assert!(described.contains("line 1 column"), "{described}");
        }
        let e = serde_json::from_str::<One>(r#"{"data":{}}"#).unwrap_err();
        assert!(describe_json_error(&e).contains("missing field `id`"));
    }
}
