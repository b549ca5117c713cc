//! Supabase Storage's answers classified: the server reports most errors
//! as HTTP 400 with the real code in the JSON body
//! (`{"statusCode":"409","error":"Duplicate",...}`), so errors are
//! classified by that code, not by the HTTP status.

use serde::Deserialize;
use serde_json::Value;

use crate::providers::urls::UnsafePath;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    #[error("object already exists in storage")]
    Duplicate,
    #[error("not found in storage: {0}")]
    NotFound(String),
    #[error("storage rejected the service key ({0}): check SUPABASE_SERVICE_ROLE_KEY")]
    Unauthorized(String),
    #[error("object too large for the bucket or the project's limit: {0}")]
    TooLarge(String),
    #[error("the bucket does not accept this content type: {0}")]
    MimeNotAllowed(String),
    #[error("resumable upload offset conflict: {0}")]
    OffsetConflict(String),
    #[error("storage answered {code}: {message}")]
    Server { code: u16, message: String },
    #[error("storage refused the request ({code}): {message}")]
    Rejected { code: u16, message: String },
    #[error("storage request failed: {0}")]
    Transport(String),
    #[error("unexpected storage response: {0}")]
    Decode(String),
    /// Refused before any request: the path would name another object.
    #[error("refused to address storage by this path: {0}")]
    UnsafePath(#[from] UnsafePath),
}

impl StorageError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::Server { .. }
                | StorageError::Transport(_)
                | StorageError::Decode(_)
                | StorageError::OffsetConflict(_)
        )
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::NotConfigured(_) => "not_configured",
            StorageError::Duplicate => "duplicate",
            StorageError::NotFound(_) => "not_found",
            StorageError::Unauthorized(_) => "unauthorized",
            StorageError::TooLarge(_) => "too_large",
            StorageError::MimeNotAllowed(_) => "mime_not_allowed",
            StorageError::OffsetConflict(_) => "offset_conflict",
            StorageError::Server { .. } => "server",
            StorageError::Rejected { .. } => "rejected",
            StorageError::Transport(_) => "transport",
            StorageError::Decode(_) => "decode",
            StorageError::UnsafePath(_) => "unsafe_path",
        }
    }
}

pub(super) fn transport(e: reqwest::Error) -> StorageError {
    StorageError::Transport(error_chain(&e.without_url()))
}

/// The error and every cause under it, `: `-separated: reqwest's own text is
/// only "error sending request", which tells an operator nothing (was the
/// connection refused, reset, timed out?). URLs are already stripped.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "statusCode")]
    status_code: Option<Value>,
    error: Option<String>,
    message: Option<String>,
}

/// Classifies a non-2xx answer by the code in its body.
pub(super) async fn check(res: reqwest::Response) -> Result<reqwest::Response, StorageError> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    // storage-api answers every refusal but a 500 as HTTP 400 with the real
    // code in the body: an answer that broke off before its body was read
    // says nothing (a missing object's 404 looks like a refusal), so it is
    // a transport failure to retry, not a permanent one.
    let text = res.text().await.map_err(transport)?;
    let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
    let code = body
        .as_ref()
        .and_then(|b| b.status_code.as_ref())
        .and_then(|c| match c {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .unwrap_or(status.as_u16());
    let message = body
        .map(|b| {
            let error = b.error.unwrap_or_default();
            let message = b.message.unwrap_or_default();
            if error.is_empty() || message.contains(&error) {
                message
            } else {
                format!("{error}: {message}")
            }
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| text.chars().take(200).collect());
    Err(match code {
        409 => StorageError::Duplicate,
        404 => StorageError::NotFound(message),
        401 | 403 => StorageError::Unauthorized(message),
        413 => StorageError::TooLarge(message),
        415 => StorageError::MimeNotAllowed(message),
        408 | 429 | 500..=599 => StorageError::Server { code, message },
        _ => StorageError::Rejected { code, message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::storage_api::StorageClient;
    use recording_relay_sim::{Fault, StorageSim, StorageSimConfig};
    use std::time::Duration;

    /// Found by the chaos run with faults on every request (issue #22): the
    /// answer to a missing object's info (HTTP 400, `"statusCode": "404"`
    /// in the body) cut off mid-body was read as a permanent refusal, and
    /// the job failed at once. It is a transport failure, retried.
    #[tokio::test]
    async fn an_error_answer_cut_off_mid_body_is_retried_not_a_refusal() {
        let sim = StorageSim::start(StorageSimConfig {
            service_key: "k".to_owned(),
            ..StorageSimConfig::default()
        })
        .unwrap();
        sim.create_bucket("b", false, None, None);
        let t = Duration::from_secs(5);
        let client =
            StorageClient::new(&sim.base_url(), "k".to_owned().into(), "b", t, t, t).unwrap();
        assert!(client.object_info("a/missing.wav").await.unwrap().is_none());
        sim.fail_next_other(1, Fault::ResetMidBody { after_bytes: 16 });
        let cut = client.object_info("a/missing.wav").await.unwrap_err();
        assert!(
            cut.is_retryable() && matches!(cut, StorageError::Transport(_)),
            "{cut:?}"
        );
        sim.fail_next_other(1, Fault::ResetMidBody { after_bytes: 16 });
        let cut = client.delete_object("a/missing.wav").await.unwrap_err();
        assert!(cut.is_retryable(), "{cut:?}");
    }

    /// What reqwest says alone ("error sending request") hides why; the
    /// causes under it are what `last_error` needs.
    #[test]
    fn transport_errors_keep_their_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
        assert_eq!(
            error_chain(&e),
            "error sending request: connection reset by peer"
        );
    }
}
