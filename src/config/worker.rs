//! `[worker]`, `[retry]` and `[pipeline]`: how jobs are claimed, retried,
//! matched and stored.

use std::time::Duration;

use serde::Deserialize;

use super::Config;
use super::providers::check_provider_url;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Jobs processed at once by one daemon.
    pub concurrency: usize,
    /// Fallback poll; LISTEN/NOTIFY normally wakes the worker at once.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a claim is valid without a heartbeat; a crashed worker's jobs
    /// become runnable again after this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// In-flight jobs get this long to finish on SIGTERM before they are
    /// released; keep it below the unit's TimeoutStopSec
    /// ([`UNIT_TIMEOUT_STOP`]), or systemd kills the daemon first.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// `TimeoutStopSec` of `systemd/recording-relay.service`: systemd kills the
/// daemon this long after SIGTERM.
pub(crate) const UNIT_TIMEOUT_STOP: Duration = Duration::from_secs(60);
/// What a stop needs besides the jobs' drain: releasing the jobs left, the
/// listener's last answers, closing the pools.
const STOP_MARGIN: Duration = Duration::from_secs(10);

impl WorkerConfig {
    /// A warning when a drain of `shutdown_timeout` would not end before
    /// systemd kills the unit: the jobs still running would not be released
    /// for another worker until their lease ran out.
    pub(crate) fn shutdown_warning(&self) -> Option<String> {
        (self.shutdown_timeout + STOP_MARGIN > UNIT_TIMEOUT_STOP).then(|| {
            format!(
                "worker.shutdown_timeout ({}) leaves less than {} before the unit's TimeoutStopSec \
                 ({}): systemd would kill the daemon before it releases in-flight jobs (they wait \
                 for their lease instead); lower it, or raise TimeoutStopSec with it",
                humantime::format_duration(self.shutdown_timeout),
                humantime::format_duration(STOP_MARGIN),
                humantime::format_duration(UNIT_TIMEOUT_STOP),
            )
        })
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_secs(5),
            lease: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    pub max_attempts: i32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(3600),
            max_attempts: 12,
        }
    }
}

/// A party of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Party {
    To,
    From,
}

/// Audio format fetched from Telnyx and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    Wav,
    Mp3,
}

impl AudioFormat {
    pub fn extension(self) -> &'static str {
        match self {
            AudioFormat::Wav => "wav",
            AudioFormat::Mp3 => "mp3",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Mp3 => "audio/mpeg",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub format: AudioFormat,
    /// An intake matches when its created_at is this close to the start of
    /// the recording.
    #[serde(with = "humantime_serde")]
    pub(crate) match_window: Duration,
    /// Attempts to find the intake (it may not be committed yet) before the
    /// recording is stored under `unmatched/` for an operator to attach.
    pub match_attempts: i32,
    /// At least this long between those attempts, so a late intake has time
    /// to appear (the job backoff alone can retry within a second).
    #[serde(with = "humantime_serde")]
    pub match_retry_delay: Duration,
    /// Which party of the call is the patient: "to" for calls ZScribe places
    /// (the original guide's flow: an agent calls the patient, whose number
    /// it read from `to_number`), "from" for calls patients place.
    pub(crate) patient_party: Party,
    /// Telnyx connection id → organization id. When the call's connection is
    /// listed, only that organization's intakes can match it.
    pub connection_organizations: std::collections::HashMap<String, uuid::Uuid>,
    /// Optional: the host table that names each organization's calling
    /// number. When set, the call's non-patient party (`from` for calls
    /// ZScribe places) must be exactly one organization's number, and a
    /// phone-and-time match looks only at that organization's intakes; an
    /// unknown number matches nothing by phone (issue #21).
    pub caller_id_organizations: Option<CallerIdOrganizations>,
    /// Delete the recording at Telnyx once it is stored, verified and linked.
    pub delete_from_telnyx: bool,
    /// Recordings larger than this use resumable (TUS) uploads.
    pub(crate) resumable_threshold_bytes: u64,
    /// Optional: receives a JSON summary of every job that ends failed or
    /// unmatched.
    pub alert_webhook_url: Option<String>,
    /// A call Telnyx announced (`call.initiated`) with no recording this
    /// long after is asked about by its session in the Recordings API
    /// (`ops::missing`), and again every few minutes.
    #[serde(with = "humantime_serde")]
    pub recording_overdue_after: Duration,
    /// Still no recording this long after the call was announced: the
    /// call is reported missing (metric and alert), once.
    #[serde(with = "humantime_serde")]
    pub recording_missing_after: Duration,
    /// The SIP INVITE header in which the dialer names the intake (an
    /// intake UUID), as Telnyx reports it in `call.initiated`'s
    /// `custom_headers`. Compared case-insensitively: SIP header names are.
    pub intake_header: String,
    /// How long a recording whose call session Telnyx has not reported yet
    /// (no `call.initiated`: webhooks arrive out of order) waits for it
    /// before phone and time may match it, counted from the recording's end
    /// (or the job's creation, if earlier). Only while call events arrive
    /// at all (one in the last day); zero never waits.
    #[serde(with = "humantime_serde")]
    pub link_wait: Duration,
}

/// Where the host keeps its organizations' calling numbers (ZScribe:
/// `public.organizations`, `id`, `phone`). These names go into SQL, so they
/// are checked as plain lower-case identifiers at load and quoted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerIdOrganizations {
    /// `schema.table`.
    pub table: String,
    pub id_column: String,
    pub phone_column: String,
}

impl CallerIdOrganizations {
    /// The problems with these names, one line each.
    fn problems(&self) -> Vec<String> {
        let plain = |s: &str| {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && s.len() <= 63
        };
        let mut problems = Vec::new();
        let table_ok = matches!(self.table.split_once('.'), Some((schema, table)) if plain(schema) && plain(table));
        if !table_ok {
            problems.push(format!(
                "pipeline.caller_id_organizations.table must be schema.table in lower-case \
                 letters, digits and _ (e.g. public.organizations), not {:?}",
                self.table
            ));
        }
        for (key, value) in [
            ("id_column", &self.id_column),
            ("phone_column", &self.phone_column),
        ] {
            if !plain(value) {
                problems.push(format!(
                    "pipeline.caller_id_organizations.{key} must be a column name in lower-case \
                     letters, digits and _, not {value:?}"
                ));
            }
        }
        problems
    }

    /// The SQL that finds the organizations whose number is `$1` (by the
    /// phone key, last ten digits). Only checked identifiers, quoted, go
    /// into it.
    pub(crate) fn lookup_sql(&self) -> String {
        let (schema, table) = self
            .table
            .split_once('.')
            .unwrap_or(("public", &self.table));
        format!(
            "SELECT \"{id}\"::uuid FROM \"{schema}\".\"{table}\"
             WHERE recording_relay.recording_relay_phone_key(\"{phone}\"::text)
                   = recording_relay.recording_relay_phone_key($1)
             LIMIT 2",
            id = self.id_column,
            phone = self.phone_column,
        )
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            format: AudioFormat::Wav,
            match_window: Duration::from_secs(600),
            match_attempts: 3,
            match_retry_delay: Duration::from_secs(30),
            patient_party: Party::To,
            connection_organizations: std::collections::HashMap::new(),
            caller_id_organizations: None,
            delete_from_telnyx: false,
            resumable_threshold_bytes: 6 * 1024 * 1024,
            alert_webhook_url: None,
            // Intake calls last minutes; Telnyx lists a recording moments
            // after the call ends.
            recording_overdue_after: Duration::from_secs(30 * 60),
            recording_missing_after: Duration::from_secs(2 * 3600),
            intake_header: "X-Intake-Id".to_owned(),
            // Telnyx delivers a call's events within seconds of each other;
            // its retries of a failed delivery come within minutes.
            link_wait: Duration::from_secs(180),
        }
    }
}

/// RFC 3261's `token`: what a header name may be.
fn is_sip_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

impl Config {
    pub(super) fn validate_worker(&self, problems: &mut Vec<String>) {
        let w = &self.worker;
        if w.concurrency == 0 {
            problems.push("worker.concurrency must be at least 1".to_owned());
        }
        if w.lease < Duration::from_secs(3) {
            problems
                .push("worker.lease must be at least 3s (heartbeats run every lease/3)".to_owned());
        }
        if w.poll_interval.is_zero() {
            problems.push("worker.poll_interval must be above 0s".to_owned());
        }
        if self.telnyx.api_key.is_none() {
            problems.push("telnyx.api_key is not set (or TELNYX_API_KEY)".to_owned());
        }
        self.validate_storage(problems);
        check_provider_url("telnyx.api_url", &self.telnyx.api_url, problems);
        let p = &self.pipeline;
        if p.match_attempts < 1 || p.match_attempts > self.retry.max_attempts {
            problems.push(
                "pipeline.match_attempts must be between 1 and retry.max_attempts".to_owned(),
            );
        }
        if let Some(caller_id) = &p.caller_id_organizations {
            problems.extend(caller_id.problems());
        }
        if p.resumable_threshold_bytes == 0 {
            problems.push("pipeline.resumable_threshold_bytes must be above 0".to_owned());
        }
        if !is_sip_token(&p.intake_header) {
            problems.push(format!(
                "pipeline.intake_header {:?} is not a SIP header name (letters, digits and -.!%*_+`'~, like X-Intake-Id)",
                p.intake_header
            ));
        }
        if p.link_wait > Duration::from_secs(3600) {
            problems.push(
                "pipeline.link_wait must be at most 1h: recordings wait that long before phone and time"
                    .to_owned(),
            );
        }
        if let Some(url) = p.alert_webhook_url.as_deref() {
            check_provider_url("pipeline.alert_webhook_url", url, problems);
        }
        if p.recording_overdue_after < Duration::from_secs(60)
            || p.recording_missing_after < p.recording_overdue_after
        {
            problems.push(
                "pipeline.recording_overdue_after must be at least 1m, and \
                 pipeline.recording_missing_after not below it"
                    .to_owned(),
            );
        }
        if let Some(period) = self.retention.unresolved_for {
            // Deleting the only pointer to a recording without telling anyone
            // first is not an option.
            if p.alert_webhook_url.is_none() {
                problems.push(
                    "retention.unresolved_for needs pipeline.alert_webhook_url: \
                     unresolved recordings are deleted only after an alert"
                        .to_owned(),
                );
            }
            if self.retention.unresolved_alert_before.is_zero()
                || self.retention.unresolved_alert_before >= period
            {
                problems.push(
                    "retention.unresolved_alert_before must be above 0s and below \
                     retention.unresolved_for"
                        .to_owned(),
                );
            }
        }
        let r = &self.retry;
        if r.max_attempts < 1 {
            problems.push("retry.max_attempts must be at least 1".to_owned());
        }
        if r.base.is_zero() || r.base > r.cap {
            problems.push("retry.base must be above 0s and not above retry.cap".to_owned());
        }
    }
}
