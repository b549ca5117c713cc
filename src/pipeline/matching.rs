//! Step 2: the intake the recording belongs to, by `client_state` or the
//! SIP header of its call session (exact), or by phone number and call
//! time, within the call's tenant.

use tracing::{info, warn};

use chrono::{DateTime, Utc};

use super::errors::telnyx_failure;
use super::intakes::{self, FindError, IntakeWrite, Listing};
use super::rules::{
    CallerId, Found, Listed, MatchInput, Scope, intake_id_from_client_state, link_wait_until,
    phone_scope,
};
use super::{Run, duration_secs};
use crate::config::Party;
use crate::jobs::{JobError, QueueError};
use crate::providers::telnyx_api::{TelnyxClient, TelnyxError};
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
        let caller = self.caller_id().await?;
        let (organization, no_phone_match) = match phone_scope(organization, &caller) {
            Ok(scope) => (scope, None),
            // The exact links keep the connection's scope.
            Err(why) => (organization, Some(why)),
        };
        let input = MatchInput {
            job_id: j.id,
            recording_id: &recording_id,
            call_session_id: j.call.call_session_id.as_deref(),
            client_state: j.client_state.as_deref(),
            number,
            party: opts.patient_party,
            organization,
            no_phone_match,
            around,
            window: opts.match_window,
        };
        let telnyx = &self.p.telnyx;
        let party = opts.patient_party;
        let listed_number = number.unwrap_or_default();
        let found = intakes::find_intake(self.queue.pool(), &input, |span| {
            listed_around(telnyx, party, listed_number, around, span)
        })
        .await
        .map_err(|e| match e {
            FindError::Db(e) => JobError::from(QueueError::from(e)),
            // Never a phone match without the list: whatever Telnyx's
            // answer was, this attempt decides nothing, and a later one
            // asks again (its hint, when it gave one, kept).
            FindError::Telnyx(e) => match telnyx_failure(e) {
                JobError::Permanent { message } => JobError::retryable(message),
                retry => retry,
            },
        })?;
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
        // The database's clock, as `created_at` is: a host whose clock is off
        // must neither cut the wait short nor stretch it (issue #22).
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(pool)
            .await
            .map_err(QueueError::from)?;
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

    /// The organization whose number the call's non-patient party is,
    /// through `pipeline.caller_id_organizations`.
    async fn caller_id(&self) -> Result<CallerId, JobError> {
        let Some(table) = &self.p.opts.caller_id_organizations else {
            return Ok(CallerId::Off);
        };
        let (party, number) = match self.p.opts.patient_party {
            Party::To => ("from", self.job.call.from_number.as_deref()),
            Party::From => ("to", self.job.call.to_number.as_deref()),
        };
        let Some(number) = number else {
            return Ok(CallerId::Unknown(format!(
                "the call has no {party} number, so pipeline.caller_id_organizations cannot \
                 name its organization"
            )));
        };
        let found = intakes::organizations_by_number(self.queue.pool(), table, number)
            .await
            .map_err(QueueError::from)?;
        Ok(match found.as_slice() {
            [org] => CallerId::Organization(*org),
            [] => CallerId::Unknown(format!(
                "the call's {party} number {} is no organization's number in {}.{} \
                 (pipeline.caller_id_organizations)",
                mask_phone(number),
                table.table,
                table.phone_column
            )),
            _ => CallerId::Unknown(format!(
                "the call's {party} number {} is the number of more than one organization in \
                 {}.{} (pipeline.caller_id_organizations)",
                mask_phone(number),
                table.table,
                table.phone_column
            )),
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

/// Pages of 250 read from Telnyx's list before the number counts as having
/// too many recordings around this one to weigh (the rules weigh at most
/// 100 anyway).
const MAX_LIST_PAGES: u32 = 4;

/// Telnyx's `max_length` of a recording (4 hours): a recording started in
/// the span was created (saved) by its end plus this.
const LONGEST_RECORDING: chrono::Duration = chrono::Duration::hours(4);

/// The recordings Telnyx has of the patient's number (as Telnyx writes it
/// on this recording: its filters are exact) that started in `span`,
/// whether or not their webhooks have come (issue #21). Telnyx filters by
/// creation, which is when a recording is saved, after it started: the
/// list asks from the span's start to its end plus the longest recording,
/// and keeps those that started in the span. One with no time it can read
/// is placed at the recording's own start, where it conflicts most.
async fn listed_around(
    telnyx: &TelnyxClient,
    party: Party,
    number: &str,
    around: DateTime<Utc>,
    span: (DateTime<Utc>, DateTime<Utc>),
) -> Result<Listing, TelnyxError> {
    let filter = match party {
        Party::To => "filter[to]",
        Party::From => "filter[from]",
    };
    let created = (span.0, span.1 + LONGEST_RECORDING);
    let Some(recordings) = telnyx
        .recordings_of_number(filter, number, created, MAX_LIST_PAGES)
        .await?
    else {
        return Ok(Listing::TooMany(MAX_LIST_PAGES as usize * 250));
    };
    Ok(Listing::Recordings(
        recordings
            .into_iter()
            .filter_map(|r| {
                let at = r
                    .call
                    .recording_started_at
                    .or(r.created_at)
                    .unwrap_or(around);
                (span.0..=span.1).contains(&at).then_some(Listed {
                    recording_id: r.id,
                    call_session_id: r.call.call_session_id,
                    at,
                })
            })
            .collect(),
    ))
}
