//! A `call.recording.error` job: Telnyx could not record (or store) the
//! call. Nothing is downloaded or stored. The intake is found exactly (the
//! call's `client_state` or its session's SIP header; never by phone and
//! time: no recording proves which patient's call it was) and the job ends
//! `failed` with Telnyx's reason and that intake, so the playback API shows
//! the intake's recording `failed` (its newest job failed) instead of
//! "processing" or "none", and the alert sweep sends the alert the failed
//! job owes.

use tracing::warn;

use super::Run;
use super::intakes;
use super::rules::{Exact, Scope, exact_link, intake_id_from_client_state};
use crate::jobs::{JobError, QueueError};

/// Telnyx's reason is its text, not ours: kept to this many characters.
const REASON_CHARS: usize = 300;

impl Run<'_> {
    pub(super) async fn recording_error(&mut self) -> Result<crate::jobs::Outcome, JobError> {
        let reason: String = self.job.event["data"]["payload"]["reason"]
            .as_str()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .unwrap_or("no reason given")
            .chars()
            .take(REASON_CHARS)
            .collect();
        let mut message = format!("Telnyx could not record the call: {reason}");
        if self.job.intake_id.is_none() {
            match self.error_intake().await? {
                Ok(intake) => {
                    let mut tx = self.queue.pool().begin().await.map_err(QueueError::from)?;
                    self.queue
                        .save_match(&mut tx, &self.lease, intake, method_of(&self.job))
                        .await?;
                    tx.commit().await.map_err(QueueError::from)?;
                    self.job.intake_id = Some(intake);
                }
                Err(why) => {
                    warn!(reason = %why, "a call Telnyx could not record names no intake");
                    message.push_str(&format!("; no intake: {why}"));
                }
            }
        }
        crate::metrics::metrics().recording_errors.inc();
        Err(JobError::permanent(message))
    }

    /// The intake the call was for, exactly, within the call's tenant; or
    /// why none.
    async fn error_intake(&self) -> Result<Result<uuid::Uuid, String>, JobError> {
        let j = &self.job;
        let organization = match Scope::of(
            j.call.connection_id.as_deref(),
            &self.p.opts.connection_organizations,
        ) {
            Scope::Unscoped => None,
            Scope::Organization(org) => Some(org),
            Scope::Unknown => {
                return Ok(Err(format!(
                    "connection {} is not in pipeline.connection_organizations",
                    j.call.connection_id.as_deref().unwrap_or("(none)")
                )));
            }
        };
        let named = j
            .client_state
            .as_deref()
            .and_then(intake_id_from_client_state);
        // The session's call.initiated may still be on its way.
        self.wait_for_link(named.is_some()).await?;
        let pool = self.queue.pool();
        let session = intakes::session_link(pool, j.call.call_session_id.as_deref())
            .await
            .map_err(QueueError::from)?;
        let intake = match exact_link(named, &session) {
            Exact::Named(id, _) => id,
            Exact::Disagree(why) => return Ok(Err(why)),
            Exact::None => {
                return Ok(Err(
                    "neither client_state nor the call session's SIP header names one".to_owned(),
                ));
            }
        };
        let exists = intakes::intake_in(pool, intake, organization)
            .await
            .map_err(QueueError::from)?;
        Ok(if exists {
            Ok(intake)
        } else {
            Err(format!(
                "the named intake {intake} does not exist{}",
                if organization.is_some() {
                    " in this connection's organization"
                } else {
                    ""
                }
            ))
        })
    }
}

/// How the intake was named, for `match_method`.
fn method_of(job: &crate::jobs::Job) -> &'static str {
    let by_client_state = job
        .client_state
        .as_deref()
        .and_then(intake_id_from_client_state)
        .is_some();
    if by_client_state {
        super::rules::MatchMethod::ClientState.as_str()
    } else {
        super::rules::MatchMethod::SipHeader.as_str()
    }
}
