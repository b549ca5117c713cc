//! Telnyx's answers classified for the job queue: 5xx, 408, 429 and
//! transport failures retry; 404 and other 4xx are permanent; 401/403 are
//! permanent with a message that points at the API key. Retry hints
//! (`Retry-After`, `x-ratelimit-reset`) are read here, and JSON errors are
//! described without quoting the value (answers hold phone numbers).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::read_limited;
use crate::providers::urls::UnsafePath;

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
pub(super) fn transport(e: reqwest::Error) -> TelnyxError {
    TelnyxError::Transport(e.without_url().to_string())
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

pub(super) fn describe_json_error(e: &serde_json::Error) -> String {
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
pub(super) async fn check(
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
    use reqwest::StatusCode;
    use secrecy::SecretString;

    use super::super::recording::One;
    use super::super::{TelnyxClient, Timeouts};
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
