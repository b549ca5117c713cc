//! What a provider's failure means for the job: retry (with the provider's
//! own hint, when it gave one) or stop. Each mapping also counts the
//! failure in `provider_errors_total`, so a call site counts exactly the
//! failures it gives up on; the ones it handles (a 409 adopted, a 404 on
//! delete) are not errors of the provider and are not counted.

use crate::jobs::JobError;
use crate::metrics::metrics;
use crate::providers::storage_api::StorageError;
use crate::providers::telnyx_api::TelnyxError;

/// Counts and classifies a failed Telnyx call: 5xx, 408, 429, transport
/// and decode failures retry; 404, 401/403 and other 4xx are permanent.
pub(super) fn telnyx_failure(e: TelnyxError) -> JobError {
    metrics().provider_error("telnyx", e.kind());
    match e {
        TelnyxError::RateLimited { retry_after } => JobError::Retryable {
            message: e.to_string(),
            retry_after: Some(retry_after),
        },
        TelnyxError::Server { retry_after, .. } => JobError::Retryable {
            message: e.to_string(),
            retry_after,
        },
        TelnyxError::Transport(_) | TelnyxError::DownloadDenied { .. } | TelnyxError::Decode(_) => {
            JobError::retryable(e.to_string())
        }
        TelnyxError::NotConfigured(_)
        | TelnyxError::Unauthorized { .. }
        | TelnyxError::NotFound { .. }
        | TelnyxError::Rejected { .. }
        | TelnyxError::UnsafeId(_) => JobError::permanent(e.to_string()),
    }
}

/// Counts and classifies a failed storage call (see
/// [`StorageError::is_retryable`]).
pub(super) fn storage_failure(e: StorageError) -> JobError {
    metrics().provider_error("storage", e.kind());
    if e.is_retryable() {
        JobError::retryable(e.to_string())
    } else {
        JobError::permanent(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn telnyx_error_classes_map_to_job_errors() {
        let retry = telnyx_failure(TelnyxError::RateLimited {
            retry_after: Duration::from_secs(7),
        });
        assert!(
            matches!(retry, JobError::Retryable { retry_after: Some(d), .. } if d.as_secs() == 7)
        );
        let gone = telnyx_failure(TelnyxError::NotFound {
            what: "recording x".into(),
        });
        assert!(matches!(gone, JobError::Permanent { .. }));
        let key = telnyx_failure(TelnyxError::Unauthorized { status: 401 });
        assert!(key.to_string().contains("TELNYX_API_KEY"));
    }

    /// A 503 with Retry-After keeps its hint into the job's backoff.
    #[test]
    fn a_telnyx_retry_after_on_a_503_reaches_the_backoff() {
        let err = TelnyxError::Server {
            status: 503,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(5)),
        };
        assert!(matches!(
            telnyx_failure(err),
            JobError::Retryable { retry_after: Some(d), .. } if d.as_secs() == 5
        ));
    }

    #[test]
    fn storage_errors_retry_only_when_the_server_may_recover() {
        assert!(matches!(
            storage_failure(StorageError::Server {
                code: 503,
                message: String::new()
            }),
            JobError::Retryable { .. }
        ));
        assert!(matches!(
            storage_failure(StorageError::MimeNotAllowed("audio/wav".into())),
            JobError::Permanent { .. }
        ));
    }
}
