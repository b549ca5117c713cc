//! What is known about one recorded call: which call, leg and connection,
//! the numbers, how long, and when. The webhook says some of it, the
//! Recordings API more; a job row holds what both said.
//!
//! One struct for all three ([`crate::jobs::NewJob`], [`crate::jobs::Job`],
//! `Recording`), so a new fact is added here plus its SQL
//! (the columns, `Queue::enqueue`, and `Queue::save_resolution` if the
//! Recordings API can tell it) and the reader of each source. A leaf: jobs
//! and telnyx both use it without depending on each other.

use chrono::{DateTime, Utc};

/// Every field is optional: neither the webhook nor the Recordings API
/// promises any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct CallFacts {
    pub call_session_id: Option<String>,
    pub call_control_id: Option<String>,
    pub call_leg_id: Option<String>,
    /// The Telnyx application or SIP connection: the tenant, through
    /// `pipeline.connection_organizations`.
    pub connection_id: Option<String>,
    /// Absent from the Recordings API's older schema and from Telnyx's own
    /// examples.
    pub from_number: Option<String>,
    pub to_number: Option<String>,
    pub duration_millis: Option<i64>,
    pub channels: Option<String>,
    pub recording_started_at: Option<DateTime<Utc>>,
    pub recording_ended_at: Option<DateTime<Utc>>,
}

impl CallFacts {
    /// Adds what the Recordings API said (`api`) to what the webhook said,
    /// exactly as `Queue::save_resolution` does in SQL, so the job in
    /// memory stays the row: the API's numbers, duration, channels and
    /// times win where it has them; the webhook's own connection wins (it
    /// is the one the tenant was configured by); which call and leg it was
    /// stays the webhook's.
    pub(crate) fn resolve_with(&mut self, api: &CallFacts) {
        fn newer<T: Clone>(mine: &mut Option<T>, theirs: &Option<T>) {
            if theirs.is_some() {
                mine.clone_from(theirs);
            }
        }
        newer(&mut self.from_number, &api.from_number);
        newer(&mut self.to_number, &api.to_number);
        newer(&mut self.duration_millis, &api.duration_millis);
        newer(&mut self.channels, &api.channels);
        newer(&mut self.recording_started_at, &api.recording_started_at);
        newer(&mut self.recording_ended_at, &api.recording_ended_at);
        if self.connection_id.is_none() {
            self.connection_id.clone_from(&api.connection_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_fills_in_and_corrects_but_keeps_the_webhooks_call_and_connection() {
        let mut job = CallFacts {
            call_session_id: Some("s".into()),
            call_leg_id: Some("leg-webhook".into()),
            connection_id: Some("conn-webhook".into()),
            to_number: Some("+15550000001".into()),
            duration_millis: Some(1000),
            ..CallFacts::default()
        };
        job.resolve_with(&CallFacts {
            call_session_id: Some("other".into()),
            call_leg_id: Some("leg-api".into()),
            connection_id: Some("conn-api".into()),
            from_number: Some("+15550000002".into()),
            duration_millis: Some(2000),
            ..CallFacts::default()
        });
        assert_eq!(job.call_session_id.as_deref(), Some("s"));
        assert_eq!(job.call_leg_id.as_deref(), Some("leg-webhook"));
        assert_eq!(job.connection_id.as_deref(), Some("conn-webhook"));
        assert_eq!(job.to_number.as_deref(), Some("+15550000001"));
        assert_eq!(job.from_number.as_deref(), Some("+15550000002"));
        assert_eq!(job.duration_millis, Some(2000));

        let mut bare = CallFacts::default();
        bare.resolve_with(&CallFacts {
            connection_id: Some("conn-api".into()),
            ..CallFacts::default()
        });
        assert_eq!(bare.connection_id.as_deref(), Some("conn-api"));
    }
}
