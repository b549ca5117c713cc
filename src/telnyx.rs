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
use serde_json::Value;

use crate::call::CallFacts;
use crate::config::Config;
use crate::urls::{UnsafePath, encode_segment, redact_url};

#[derive(Debug, thiserror::Error)]
pub enum TelnyxError {
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    #[error("Telnyx rejected the API key ({status}): check TELNYX_API_KEY")]
    Unauthorized { status: u16 },
    #[error("not found at Telnyx: {what}")]
    NotFound { what: String },
    #[error("Telnyx rate limit hit (429); retry in {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    #[error("Telnyx answered {status}: {detail}")]
    Server {
        status: u16,
        detail: String,
        /// `Retry-After` on a 503, when the server gave one.
        retry_after: Option<Duration>,
    },
    #[error("Telnyx refused the request ({status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("recording download from {url} answered {status} (presigned URL expired or revoked)")]
    DownloadDenied { status: u16, url: String },
    #[error("Telnyx request failed: {0}")]
    Transport(String),
    #[error("unexpected Telnyx response: {0}")]
    Decode(String),
    /// A recording id (a provider answer) that would not stay in its URL
    /// segment (`..`, `%2e%2e`): refused before any request.
    #[error("refused a recording id as a URL path segment: {0}")]
    UnsafeId(#[from] UnsafePath),
}

impl TelnyxError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TelnyxError::NotConfigured(_) => "not_configured",
            TelnyxError::Unauthorized { .. } => "unauthorized",
            TelnyxError::NotFound { .. } => "not_found",
            TelnyxError::RateLimited { .. } => "rate_limited",
            TelnyxError::Server { .. } => "server",
            TelnyxError::Rejected { .. } => "rejected",
            TelnyxError::DownloadDenied { .. } => "download_denied",
            TelnyxError::Transport(_) => "transport",
            TelnyxError::Decode(_) => "decode",
            TelnyxError::UnsafeId(_) => "unsafe_id",
        }
    }
}

/// Transport errors carry the URL, which for downloads holds the presigned
/// signature: strip it before the message goes anywhere.
fn transport(e: reqwest::Error) -> TelnyxError {
    TelnyxError::Transport(e.without_url().to_string())
}

/// A recording as `GET /v2/recordings/{id}` describes it.
///
/// The spec requires none of its fields and types its timestamps as plain
/// strings "in ISO 8601", so every field is read on its own and leniently:
/// a value of another type or shape becomes `None` instead of failing the
/// recording, let alone the page it is on. Only the id is needed; a listed
/// record without one is skipped (see [`Page::skipped`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub id: String,
    /// Telnyx names the numbers `from` and `to`.
    pub call: CallFacts,
    pub created_at: Option<DateTime<Utc>>,
    pub status: Option<String>,
    /// Only the format the recording was made in, as a rule.
    pub download_urls: DownloadUrls,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownloadUrls {
    pub mp3: Option<String>,
    pub wav: Option<String>,
}

impl Recording {
    /// Reads one recording object; `None` when it has no usable id.
    pub fn from_json(v: &Value) -> Option<Recording> {
        let urls = v.get("download_urls");
        Some(Recording {
            id: text(v, "id")?,
            call: CallFacts {
                call_session_id: text(v, "call_session_id"),
                call_control_id: text(v, "call_control_id"),
                call_leg_id: text(v, "call_leg_id"),
                connection_id: text(v, "connection_id"),
                from_number: text(v, "from"),
                to_number: text(v, "to"),
                duration_millis: count(v, "duration_millis"),
                channels: text(v, "channels"),
                recording_started_at: when(v, "recording_started_at"),
                recording_ended_at: when(v, "recording_ended_at"),
            },
            created_at: when(v, "created_at"),
            status: text(v, "status"),
            download_urls: DownloadUrls {
                mp3: urls.and_then(|u| url_text(u, "mp3")),
                wav: urls.and_then(|u| url_text(u, "wav")),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Recording {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Recording::from_json(&v).ok_or_else(|| serde::de::Error::missing_field("id"))
    }
}

/// A string field; numbers are taken as their digits (ids and phone
/// numbers have come as JSON numbers).
fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A URL must be a string: a number here is no URL.
fn url_text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A non-negative integer, also when sent as a string or a float.
fn count(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 9e15)
                .map(|f| f.round() as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n >= 0)
}

fn when(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    parse_timestamp(v.get(key)?.as_str()?)
}

/// Reads the ISO 8601 shapes a "plain string" timestamp may take: RFC 3339,
/// a space for the `T`, an offset without colon or minutes (`+0000`,
/// `+00`), a comma before the fraction, the basic format
/// (`20190123T181002.574Z`), and no offset at all (taken as UTC, as
/// Telnyx's clocks are). Anything else is `None`, never an error: a wrong
/// time only widens what the matcher has to go on.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let s = text.trim().replace(',', ".").to_ascii_uppercase();
    if s.is_empty() {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
        return Some(t.with_timezone(&Utc));
    }
    let (local, offset) = split_offset(&s)?;
    let local = local.replacen(' ', "T", 1);
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y%m%dT%H%M%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(&local, f).ok())?;
    let t = naive.and_utc();
    t.checked_sub_signed(chrono::Duration::seconds(i64::from(offset)))
}

/// Splits a trailing `Z`, `±hh`, `±hhmm` or `±hh:mm` off; no offset is 0.
fn split_offset(s: &str) -> Option<(&str, i32)> {
    if let Some(local) = s.strip_suffix('Z') {
        return Some((local, 0));
    }
    // The date's own dashes come before the `T`; an offset sign after it.
    let t = s.find('T').or_else(|| s.find(' '))?;
    let Some(sign_at) = s[t..].rfind(['+', '-']).map(|i| t + i) else {
        return Some((s, 0));
    };
    let digits: String = s[sign_at + 1..].chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (digits[..2].parse().ok()?, digits[2..].parse::<i32>().ok()?),
        _ => return None,
    };
    if h > 23 || m > 59 {
        return None;
    }
    let secs = h * 3600 + m * 60;
    let sign = if s.as_bytes()[sign_at] == b'-' { -1 } else { 1 };
    Some((&s[..sign_at], sign * secs))
}

#[derive(Debug)]
struct One {
    data: Recording,
}

impl<'de> Deserialize<'de> for One {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let data = v
            .get("data")
            .ok_or_else(|| serde::de::Error::missing_field("data"))?;
        Ok(One {
            data: Recording::from_json(data)
                .ok_or_else(|| serde::de::Error::missing_field("id"))?,
        })
    }
}

/// One page of `GET /recordings`.
#[derive(Debug, Default)]
pub struct Page {
    pub data: Vec<Recording>,
    /// Listed records that could not be used (not an object, no id).
    pub skipped: usize,
    pub meta: PageMeta,
}

impl<'de> Deserialize<'de> for Page {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let listed = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| serde::de::Error::missing_field("data"))?;
        let data: Vec<Recording> = listed.iter().filter_map(Recording::from_json).collect();
        let meta = v.get("meta").cloned().unwrap_or(Value::Null);
        let number = |key: &str| count(&meta, key).and_then(|n| u32::try_from(n).ok());
        Ok(Page {
            skipped: listed.len() - data.len(),
            data,
            meta: PageMeta {
                page_number: number("page_number"),
                total_pages: number("total_pages"),
                total_results: count(&meta, "total_results").and_then(|n| u64::try_from(n).ok()),
            },
        })
    }
}

#[derive(Debug, Default)]
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
    /// The client `config` describes; the API key is required.
    pub fn from_config(config: &Config) -> Result<Self, TelnyxError> {
        let key = config
            .telnyx
            .api_key
            .clone()
            .ok_or(TelnyxError::NotConfigured("telnyx.api_key"))?;
        let http = &config.http;
        Self::new(
            &config.telnyx.api_url,
            key,
            Timeouts {
                connect: http.connect_timeout,
                request: http.request_timeout,
                read_idle: http.read_idle_timeout,
            },
        )
    }

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
        let path = format!("/recordings/{}", encode_segment(id)?);
        let res = self
            .api(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(transport)?;
        let res = check(res, || format!("recording {id}")).await?;
        let mut v: Value = decode(res).await?;
        // No field is required, not even the id we asked for.
        if let Some(data) = v.get_mut("data").and_then(Value::as_object_mut)
            && text(&Value::Object(data.clone()), "id").is_none()
        {
            data.insert("id".to_owned(), Value::String(id.to_owned()));
        }
        let one: One =
            serde_json::from_value(v).map_err(|e| TelnyxError::Decode(describe_json_error(&e)))?;
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
        let path = format!("/recordings/{}", encode_segment(id)?);
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
                retry_after: None,
            });
        }
        Ok(res)
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
    // Errors raised while reading a parsed value carry no position.
    if e.line() == 0 {
        return what;
    }
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
    let retry_after = retry_hint(res.headers(), Utc::now());
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
            retry_after,
        },
        code => TelnyxError::Rejected {
            status: code,
            detail,
        },
    })
}

/// How long the server asked us to wait: `Retry-After` (seconds or an HTTP
/// date, as the official SDKs read it) and `x-ratelimit-reset` (documented
/// as seconds until the window resets; an absolute unix time is tolerated).
/// With both, the later, so neither limit is hit again at once.
fn retry_hint(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let header = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let retry_after = header("retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(secs) => Some(secs),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(v).ok()?;
            Some(u64::try_from((at.with_timezone(&Utc) - now).num_seconds()).unwrap_or(0))
        }
    });
    let reset = header("x-ratelimit-reset")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|value| {
            let now = u64::try_from(now.timestamp()).unwrap_or(0);
            if value > 1_000_000_000 {
                value.saturating_sub(now)
            } else {
                value
            }
        });
    let secs = retry_after.into_iter().chain(reset).max()?;
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

    /// Found by the chaos test: a resumed (ranged) download that got an
    /// error answer was reported as "ignored the Range request", as a
    /// retryable server error whatever the status: a 429 lost its
    /// `x-ratelimit-reset` hint, and a 404 (recording gone) was retried
    /// twelve times instead of failing at once.
    #[tokio::test]
    async fn a_ranged_download_classifies_error_answers_like_any_other() {
        use recording_relay_sim::{Fault, SimRecording, TelnyxSim, TelnyxSimConfig};
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
        assert!(matches!(err, TelnyxError::NotFound { .. }), "{err}");

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

    fn sim_client(sim: &recording_relay_sim::TelnyxSim) -> TelnyxClient {
        TelnyxClient::new(
            &sim.base_url(),
            SecretString::from("KEY_sim_telnyx"),
            Timeouts {
                connect: Duration::from_secs(2),
                request: Duration::from_secs(5),
                read_idle: Duration::from_secs(5),
            },
        )
        .unwrap()
    }

    /// The official SDKs honour `Retry-After` (seconds or an HTTP date);
    /// we only read `x-ratelimit-reset` and otherwise retried after 1 s.
    #[tokio::test]
    async fn retry_after_is_honoured_in_seconds_and_as_an_http_date() {
        use recording_relay_sim::{
            Fault, SimRecording, TelnyxSim, TelnyxSimBehaviour, TelnyxSimConfig,
        };
        let sim = TelnyxSim::start(TelnyxSimConfig::default()).unwrap();
        sim.add_recording(SimRecording::sample("0d7f3e2a-1b4c-4d5e-8f6a-7b8c9d0e1f2a"));
        let client = sim_client(&sim);
        let rate_limited = |retry_after: Option<String>, reset: Option<&str>| {
            sim.set_behaviour(TelnyxSimBehaviour {
                retry_after,
                ratelimit_reset: reset.map(str::to_owned),
                ..TelnyxSimBehaviour::default()
            });
            sim.fail_next(1, Fault::Status(429));
            let client = client.clone();
            async move {
                match client
                    .get_recording("0d7f3e2a-1b4c-4d5e-8f6a-7b8c9d0e1f2a")
                    .await
                {
                    Err(TelnyxError::RateLimited { retry_after }) => retry_after,
                    other => panic!("{other:?}"),
                }
            }
        };
        assert_eq!(
            rate_limited(Some("7".into()), None).await,
            Duration::from_secs(7)
        );
        let in_30s = (Utc::now() + chrono::Duration::seconds(30))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let hinted = rate_limited(Some(in_30s), None).await;
        assert!(
            (Duration::from_secs(28)..=Duration::from_secs(31)).contains(&hinted),
            "{hinted:?}"
        );
        // Both: the later of the two, so neither limit is hit again.
        assert_eq!(
            rate_limited(Some("3".into()), Some("9")).await,
            Duration::from_secs(9)
        );
        assert_eq!(
            rate_limited(Some("12".into()), Some("2")).await,
            Duration::from_secs(12)
        );
        // Garbage is ignored; the reset still counts.
        assert_eq!(
            rate_limited(Some("soon".into()), Some("4")).await,
            Duration::from_secs(4)
        );
    }

    /// The spec requires no field of a recording. One record with odd
    /// values must not fail the page it is on (reconcile reads pages).
    #[test]
    fn one_odd_record_or_field_does_not_sink_a_page() {
        let body = serde_json::json!({
            "data": [
                {"id": "a1", "duration_millis": "60000", "from": 15551230001_u64,
                 "recording_started_at": "2019-01-23T18:10:02.574Z",
                 "download_urls": {"wav": 12, "mp3": "https://x.invalid/a1.mp3"}},
                {"id": {"nested": true}, "call_session_id": "s2"},
                {"id": "a3", "recording_started_at": 42, "channels": ["dual"],
                 "created_at": "yesterday", "connection_id": 175237942907135762_u64},
                "not even an object",
                {"id": "a5"}
            ],
            "meta": {"page_number": "1", "total_pages": 1}
        })
        .to_string();
        let page: Page = serde_json::from_str(&body).expect("the page is read");
        let ids: Vec<&str> = page.data.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a3", "a5"]);
        assert_eq!(page.skipped, 2);
        let a1 = &page.data[0];
        assert_eq!(a1.call.duration_millis, Some(60_000));
        assert_eq!(a1.call.from_number.as_deref(), Some("15551230001"));
        assert_eq!(a1.download_urls.wav, None);
        assert_eq!(
            a1.download_urls.mp3.as_deref(),
            Some("https://x.invalid/a1.mp3")
        );
        let a3 = &page.data[1];
        assert_eq!(a3.call.channels, None);
        assert_eq!(a3.created_at, None);
        assert_eq!(a3.call.connection_id.as_deref(), Some("175237942907135762"));
        assert_eq!(page.meta.total_pages, Some(1));
    }

    #[test]
    fn timestamps_are_read_in_iso_8601_shapes_beyond_rfc_3339() {
        let want = "2019-01-23T18:10:02.574Z".parse::<DateTime<Utc>>().unwrap();
        for text in [
            "2019-01-23T18:10:02.574Z",
            "2019-01-23T18:10:02.574+00:00",
            "2019-01-23T20:10:02.574+02:00",
            "2019-01-23T18:10:02.574",
            "2019-01-23 18:10:02.574",
            "2019-01-23 18:10:02.574+0000",
            "2019-01-23T13:10:02.574-0500",
            "2019-01-23T18:10:02.574+00",
            "20190123T181002.574Z",
            "20190123T181002.574",
            " 2019-01-23t18:10:02.574z ",
            "2019-01-23T18:10:02,574Z",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, Some(want), "{text}");
        }
        let whole = "2019-01-23T18:10:02Z".parse::<DateTime<Utc>>().unwrap();
        for text in [
            "2019-01-23T18:10:02",
            "20190123T181002Z",
            "2019-01-23 18:10:02Z",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, Some(whole), "{text}");
        }
        for text in [
            "",
            "yesterday",
            "2019-13-40T00:00:00Z",
            "2019-01-23T25:00:00",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, None, "{text}");
        }
    }

    #[test]
    fn decode_errors_never_quote_the_value() {
        // Odd types are no longer errors at all: the field is dropped.
        let one: One = serde_json::from_str(
            r#"{"data":{"id":"r","from":["+15551230001"],"duration_millis":"+15557650002x",
                "recording_started_at":"+15557650002"}}"#,
        )
        .unwrap();
        assert_eq!(one.data.call.from_number, None);
        assert_eq!(one.data.call.duration_millis, None);
        assert_eq!(one.data.call.recording_started_at, None);
        // What still fails (not JSON, no data, no id) names no value.
        for body in [
            r#"{"data":{"id":"r","to":"+15557650002""#,
            r#"{"data":{"id":"r","to":+15557650002}}"#,
            r#"{"rows":[{"to":"+15557650002"}]}"#,
            r#"{"data":{"to":"+15557650002"}}"#,
        ] {
            let e = serde_json::from_str::<One>(body).unwrap_err();
            let described = describe_json_error(&e);
            assert!(
                !described.contains("555"),
                "{body}: {described} (serde said: {e})"
            );
            assert!(!described.is_empty(), "{body}");
        }
        let e = serde_json::from_str::<One>(r#"{"data":{}}"#).unwrap_err();
        assert!(describe_json_error(&e).contains("missing field `id`"));
    }
}
