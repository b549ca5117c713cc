//! Step 2: the intake the recording belongs to, by `client_state` or the
//! SIP header of its call session (exact), or by phone number and call
//! time, within the call's tenant.

use tracing::{info, warn};

use super::intakes::{self, IntakeWrite};
use super::rules::{Found, MatchInput, Scope, intake_id_from_client_state, link_wait_until};
use super::{Run, duration_secs};
use crate::config::Party;
use crate::jobs::{JobError, QueueError};
use crate::telemetry::mask_phone;

impl Run<'_> {
    /// Step 2. `Ok(None)`: matched. `Ok(Some(reason))`: store as unmatched
    /// (no intake after the configured attempts, or an ambiguous one).
    /// Retryable error before that.
    pub(super) async fn match_intake(&mut self) -> Result<Option<String>, JobError> {
        let recording_id = self.recording_id()?.to_owned();
        let opts = &self.p.opts;
        let j = &self.job;
        let around = j
            .call
            .recording_started_at
            .or(j.occurred_at)
            .unwrap_or(j.created_at);
        let number = match opts.patient_party {
            Party::To => j.call.to_number.as_deref(),
            Party::From => j.call.from_number.as_deref(),
        };
        let named = j
            .client_state
            .as_deref()
            .and_then(intake_id_from_client_state);
        let organization = match Scope::of(
            j.call.connection_id.as_deref(),
            &opts.connection_organizations,
        ) {
            Scope::Unscoped => None,
            Scope::Organization(org) => Some(org),
            // Fail closed: a connection that maps to no tenant could be any
            // tenant's. A phone number alone would cross tenants, and so
            // would client_state, which whoever started the call sets and
            // which may name any tenant's intake. No later attempt knows
            // more, so this is final at once.
            Scope::Unknown => {
                let why = format!(
                    "connection {} is not in pipeline.connection_organizations, so the call \
                     could be any tenant's and matches no intake, by phone, client_state or SIP header{}; \
                     add the connection to the map, or attach the recording by hand",
                    j.call.connection_id.as_deref().unwrap_or("(none)"),
                    named.map_or(String::new(), |id| format!(
                        " (its client_state names intake {id})"
                    )),
                );
                warn!(reason = %why, "storing the recording as unmatched");
                return Ok(Some(why));
            }
        };
        self.wait_for_link(named.is_some()).await?;
        let input = MatchInput {
            job_id: j.id,
            recording_id: &recording_id,
            call_session_id: j.call.call_session_id.as_deref(),
            client_state: j.client_state.as_deref(),
            number,
            party: opts.patient_party,
            organization,
            around,
            window: opts.match_window,
        };
        let found = intakes::find_intake(self.queue.pool(), &input)
            .await
            .map_err(QueueError::from)?;
        let (intake, method) = match found {
            Found::Intake(intake, method) => (intake, method),
            Found::Ambiguous(why) => return Ok(Some(why)),
            Found::Nothing(detail) => {
                let client_state = match (&j.client_state, named) {
                    (None, _) => "the call has no client_state".to_owned(),
                    (Some(_), None) => "its client_state names no intake id".to_owned(),
                    (Some(_), Some(id)) => {
                        format!("its client_state names intake {id}, which does not exist")
                    }
                };
                let why = match number {
                    None if j.call.from_number.is_none() && j.call.to_number.is_none() => {
                        format!(
                            "Telnyx gave no from/to numbers for this recording (older Recordings \
                         API schema), so only client_state can match, and {client_state}; set \
                         client_state to the intake id when dialing"
                        )
                    }
                    None => format!(
                        "the recording has no number for the patient's party \
                         (pipeline.patient_party), so only client_state can match, and \
                         {client_state}"
                    ),
                    Some(number) => format!(
                        "no intake matches (patient number {}, created within {} of {around}): {detail}",
                        mask_phone(number),
                        humantime::format_duration(opts.match_window)
                    ),
                };
                // An intake a client_state names may not be committed yet;
                // with nothing else to go on, no later attempt can match.
                if number.is_none() && named.is_none() {
                    warn!(reason = %why, "storing the recording as unmatched");
                    return Ok(Some(why));
                }
                return self.unmatched_or_retry(why);
            }
            Found::Undecided(why) => {
                return self.unmatched_or_retry(format!(
                    "no unambiguous intake (patient number {}): {why}",
                    number
                        .map(mask_phone)
                        .unwrap_or_else(|| "unknown".to_owned()),
                ));
            }
        };
        let duration = duration_secs(j);
        match intakes::claim_intake(
            &self.queue,
            &self.lease,
            intake,
            method,
            &recording_id,
            duration,
        )
        .await?
        {
            IntakeWrite::Written => {}
            IntakeWrite::TakenBy(other) => {
                return self.unmatched_or_retry(format!(
                    "intake {intake} already holds recording {other}"
                ));
            }
            IntakeWrite::Gone => {
                return self.unmatched_or_retry(format!("intake {intake} was deleted"));
            }
        }
        self.job.intake_id = Some(intake);
        info!(intake.id = %intake, method = method.as_str(), "intake matched");
        Ok(None)
    }

    /// Webhooks come out of order: a recording whose session Telnyx has not
    /// reported yet may get its exact link (the SIP header) in a moment.
    /// Until `pipeline.link_wait` after the recording ended (or the job was
    /// created, if earlier), it waits instead of letting phone and time
    /// guess. One retry at the end of the wait, with the job backoff as
    /// usual: the listener makes the job runnable at once when the
    /// session's `call.initiated` arrives (`Queue::wake_session`), so the
    /// wait costs one attempt, and never the last.
    pub(super) async fn wait_for_link(&self, has_client_state: bool) -> Result<(), JobError> {
        let j = &self.job;
        let wait = self.p.opts.link_wait;
        let session = j.call.call_session_id.as_deref();
        if wait.is_zero() || has_client_state || session.is_none() {
            return Ok(());
        }
        let pool = self.queue.pool();
        let link = intakes::session_link(pool, session)
            .await
            .map_err(QueueError::from)?;
        let in_use = link == super::rules::SessionLink::Unknown
            && intakes::session_links_in_use(pool)
                .await
                .map_err(QueueError::from)?;
        let from = j
            .call
            .recording_ended_at
            .map_or(j.created_at, |ended| ended.min(j.created_at));
        let deadline = from + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero());
        let now = chrono::Utc::now();
        let Some(until) = link_wait_until(
            &link,
            has_client_state,
            session.is_some(),
            in_use,
            deadline,
            now,
            j.max_attempts - j.attempts,
        ) else {
            return Ok(());
        };
        Err(JobError::Retryable {
            message: format!(
                "waiting until {} for the call session's call.initiated (its SIP header is the \
                 exact link) before matching by phone and time (pipeline.link_wait)",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            retry_after: (until - now).to_std().ok(),
        })
    }

    /// Retries matching a few times (the intake may not be saved yet), then
    /// gives up so the recording is stored as unmatched.
    fn unmatched_or_retry(&self, why: String) -> Result<Option<String>, JobError> {
        if self.job.attempts < self.p.opts.match_attempts {
            return Err(JobError::Retryable {
                message: format!("{why}; trying again"),
                retry_after: Some(self.p.opts.match_retry_delay),
            });
        }
        warn!(reason = %why, "storing the recording as unmatched");
        Ok(Some(why))
    }
}
