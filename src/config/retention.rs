//! `[retention]` and `[metrics]`: what the background passes keep, and where
//! the metrics are served.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` here instead of on the webhook port (so the metrics
    /// are not exposed wherever webhooks are).
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Succeeded (and duplicate, cancelled) jobs are deleted this long after
    /// they finished.
    #[serde(with = "humantime_serde")]
    pub succeeded_for: Duration,
    /// Failed jobs that point at no recording (no recording id, call
    /// session or object) are deleted this long after they finished.
    #[serde(with = "humantime_serde")]
    pub failed_for: Duration,
    /// Jobs that are the only pointer to patient data (unmatched jobs,
    /// failed jobs whose recording may still be at Telnyx or in the bucket,
    /// cancelled jobs with an unlinked object) are kept until someone
    /// resolves them, unless this is set: then they are deleted together
    /// with their bucket object this long after they finished, and an alert
    /// goes to `pipeline.alert_webhook_url` `unresolved_alert_before` first.
    #[serde(with = "humantime_serde")]
    pub unresolved_for: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub unresolved_alert_before: Duration,
    /// How often a worker prunes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Playback access records (who listened to what) are kept this long.
    /// Six years by default: HIPAA's retention for such documentation.
    #[serde(with = "humantime_serde")]
    pub playback_audit_for: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            succeeded_for: Duration::from_secs(30 * 86_400),
            failed_for: Duration::from_secs(90 * 86_400),
            unresolved_for: None,
            unresolved_alert_before: Duration::from_secs(7 * 86_400),
            interval: Duration::from_secs(3600),
            playback_audit_for: Duration::from_secs(6 * 366 * 86_400),
        }
    }
}
