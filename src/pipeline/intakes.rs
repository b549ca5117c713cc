//! SQL against ZScribe's tables: find the intake a recording belongs to,
//! and link the stored recording to it. The rules that pick the intake are
//! `rules.rs`; the other recordings they weigh come from
//! `jobs/queue/competitors.rs`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

pub use super::rules::MatchMethod;
use super::rules::{
    Exact, Found, IntakeRow, Listed, MatchInput, SessionLink, decide, exact_link,
    intake_id_from_client_state,
};
use crate::jobs::queue::competitors;
use crate::jobs::{Lease, Queue, QueueError};
use crate::providers::telnyx_api::TelnyxError;

/// What Telnyx listed for the number around the recording.
#[derive(Debug)]
pub(crate) enum Listing {
    Recordings(Vec<Listed>),
    /// More than the look-up reads (`n` at least): too many to weigh.
    TooMany(usize),
}

/// Why no decision could be made: a retry may get one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FindError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The phone-and-time match does not go ahead without Telnyx's list.
    #[error("listing the number's recordings at Telnyx: {0}")]
    Telnyx(#[from] TelnyxError),
}

/// The intakes of the number's patients in a span of time, free or not;
/// the `EXPLAIN` test checks its plan. `$1` number, `$2`..`$3` the span,
/// `$4` organization or NULL.
pub(crate) const INTAKES_BY_PHONE_SQL: &str = "SELECT i.id, i.patient_id, i.created_at, i.recording_id,
            i.recording_object_path
     FROM public.intakes i
     JOIN public.patients p ON p.id = i.patient_id
     WHERE recording_relay.recording_relay_phone_key(p.phone) = recording_relay.recording_relay_phone_key($1)
       AND i.created_at BETWEEN $2 AND $3
       AND ($4::uuid IS NULL OR i.organization_id = $4)
     ORDER BY i.created_at, i.id
     LIMIT 101";

/// What `recording_relay.calls` says about the recording's session. By
/// primary key.
pub(crate) async fn session_link(
    pool: &PgPool,
    session: Option<&str>,
) -> Result<SessionLink, sqlx::Error> {
    let Some(session) = session else {
        return Ok(SessionLink::Unknown);
    };
    let row: Option<(Option<Uuid>, Option<String>)> = sqlx::query_as(
        "SELECT intake_id, intake_conflict FROM recording_relay.calls WHERE call_session_id = $1",
    )
    .bind(session)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        None => SessionLink::Unknown,
        Some((_, Some(values))) => SessionLink::Conflicting(values),
        Some((Some(intake), None)) => SessionLink::Intake(intake),
        Some((None, None)) => SessionLink::NoIntake,
    })
}

/// Whether call events arrive at all (one in the last day): only then is
/// a recording's missing `call.initiated` worth waiting for. By
/// `calls_received_idx`.
pub(crate) async fn session_links_in_use(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM recording_relay.calls
                        WHERE received_at > now() - interval '1 day')",
    )
    .fetch_one(pool)
    .await
}

/// Whether the intake exists, in `organization` when one is given.
pub(crate) async fn intake_in(
    pool: &PgPool,
    intake: Uuid,
    organization: Option<Uuid>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM public.intakes
                        WHERE id = $1 AND ($2::uuid IS NULL OR organization_id = $2))",
    )
    .bind(intake)
    .bind(organization)
    .fetch_one(pool)
    .await
}

/// Finds the intake. An intake named exactly (by `client_state`, or by the
/// SIP header its call session reported) always wins, and nothing else is
/// tried when one is named, or when they disagree. Otherwise a
/// phone-and-time match is made only when it is unambiguous (the rules are
/// on `decide`), and only after `list` has asked Telnyx for the number's
/// other recordings in the span (it is called only then, so an exact match
/// needs no list).
pub(crate) async fn find_intake<L, F>(
    pool: &PgPool,
    m: &MatchInput<'_>,
    list: L,
) -> Result<Found, FindError>
where
    L: FnOnce((DateTime<Utc>, DateTime<Utc>)) -> F,
    F: std::future::Future<Output = Result<Listing, TelnyxError>>,
{
    let session = session_link(pool, m.call_session_id).await?;
    let client_state = m.client_state.and_then(intake_id_from_client_state);
    match exact_link(client_state, &session) {
        Exact::None => {}
        Exact::Disagree(why) => return Ok(Found::Ambiguous(why)),
        Exact::Named(id, method) => {
            let exists = intake_in(pool, id, m.organization).await?;
            // The caller named the intake: another one found by phone would
            // be a guess against what they said. Another organization's
            // intake is as good as none (the header, like client_state, is
            // the dialer's word, not proof).
            let by = match method {
                MatchMethod::SipHeader => "the SIP header",
                _ => "client_state",
            };
            return Ok(if exists {
                Found::Intake(id, method)
            } else {
                Found::Nothing(format!(
                    "{by} names intake {id}, which does not exist{}",
                    if m.organization.is_some() {
                        " in this connection's organization"
                    } else {
                        ""
                    }
                ))
            });
        }
    }
    // Final: the caller ID will not change on a later attempt.
    if let Some(why) = m.no_phone_match.as_deref() {
        return Ok(Found::Ambiguous(format!(
            "no match by phone and time: {why}"
        )));
    }
    let Some(number) = m.number else {
        return Ok(Found::Nothing(
            "the patient's number is unknown (set client_state to the intake id when dialing)"
                .to_owned(),
        ));
    };
    let w = chrono::Duration::from_std(m.window).unwrap_or(chrono::Duration::days(1));
    // Wide enough to see every recording and intake that could be paired
    // with ours through a chain of overlapping windows, or to know that the
    // chain runs on beyond it.
    let (from, to) = (m.around - w * 3, m.around + w * 3);
    let intakes: Vec<IntakeRow> = sqlx::query_as(INTAKES_BY_PHONE_SQL)
        .bind(number)
        .bind(from)
        .bind(to)
        .bind(m.organization)
        .fetch_all(pool)
        .await?;
    let others = competitors::around(
        pool,
        m.party,
        number,
        m.job_id,
        m.recording_id,
        (from, to),
        m.call_session_id,
    )
    .await?;
    let listed = match list((from, to)).await? {
        Listing::Recordings(listed) => listed,
        Listing::TooMany(n) => {
            return Ok(Found::Ambiguous(format!(
                "Telnyx lists {n} or more recordings of this number around the recording: \
                 too many to weigh"
            )));
        }
    };
    Ok(decide(m, w, (from, to), intakes, others, listed))
}

/// The organizations whose number (`caller_id`'s table and column) is
/// `number`, compared by the phone key; at most two (two is already too
/// many).
pub(crate) async fn organizations_by_number(
    pool: &PgPool,
    caller_id: &crate::config::CallerIdOrganizations,
    number: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(caller_id.lookup_sql()))
        .bind(number)
        .fetch_all(pool)
        .await
}

/// Whether `public.intakes` holds intakes of more than one organization:
/// the first organization found, then any other. Stops at the first row of
/// a second organization; with one organization it reads the table, so it
/// runs once at start-up, under a statement timeout.
pub(crate) async fn intakes_of_several_organizations(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    let several: bool = sqlx::query_scalar(
        "WITH one AS (SELECT organization_id FROM public.intakes
                      WHERE organization_id IS NOT NULL LIMIT 1)
         SELECT EXISTS (SELECT 1 FROM public.intakes i, one
                        WHERE i.organization_id <> one.organization_id)",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(several)
}

/// At a worker's start-up (issue #19's review): with neither
/// `pipeline.connection_organizations` nor `pipeline.caller_id_organizations`
/// set, matching by phone looks at every organization's patients. Where the
/// intakes are one organization's that is fine; where they are several's,
/// one organization's call can land in another's chart when their patients
/// share a number, and the operator must hear of it.
pub async fn warn_if_matching_is_unscoped(opts: &crate::config::PipelineConfig, pool: &PgPool) {
    if !opts.connection_organizations.is_empty() || opts.caller_id_organizations.is_some() {
        return;
    }
    const SET: &str = "set pipeline.caller_id_organizations (ZScribe: { table = \"public.organizations\", \
         id_column = \"id\", phone_column = \"phone\" }) or pipeline.connection_organizations";
    match intakes_of_several_organizations(pool).await {
        Ok(false) => {}
        Ok(true) => tracing::warn!(
            "MATCHING IS NOT SCOPED BY ORGANIZATION, and public.intakes holds intakes of more \
             than one organization: a recording can be matched by phone to another \
             organization's patient with the same number; {SET}"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "matching is not scoped by organization, and whether public.intakes holds more than \
             one organization could not be checked; if it does, {SET}"
        ),
    }
}

/// What a claim or a link found: both write the intake in one transaction
/// fenced on the lease, and meet the same obstacles.
#[derive(Debug, PartialEq, Eq)]
pub enum IntakeWrite {
    /// The intake holds this recording now (claimed, or linked).
    Written,
    /// The intake was deleted (for a link: after the match).
    Gone,
    /// The intake holds another recording (set by hand, or by an operator's
    /// attach after this job's reservation was released), or another
    /// object: the recording id, else the object's path (the host cleared
    /// only the id).
    TakenBy(String),
}

/// Saves `recording_id` and `recording_duration` on the intake (the UI's
/// "processing" state) and records the match on the job, in one transaction
/// fenced on the lease: a worker that lost its lease claims nothing.
pub async fn claim_intake(
    queue: &Queue,
    lease: &Lease,
    intake: Uuid,
    method: MatchMethod,
    recording_id: &str,
    duration_secs: Option<i32>,
) -> Result<IntakeWrite, QueueError> {
    let mut tx = queue.pool().begin().await?;
    // A lost lease is an error; the transaction rolls back as it drops.
    queue.lock_lease(&mut tx, lease).await?;
    // Concurrent claims serialise on the row lock; the loser re-checks the
    // WHERE against the winner's value and updates nothing. An intake that
    // points at an object other than this job's (the host cleared only its
    // recording id) is not free: the path is that object's only pointer.
    let updated = sqlx::query(
        "UPDATE public.intakes
         SET recording_id = $2, recording_duration = coalesce($3, recording_duration)
         WHERE id = $1 AND (recording_id IS NULL OR recording_id = $2)
           AND (recording_object_path IS NULL
                OR recording_object_path = (SELECT object_path FROM recording_relay.recording_jobs
                                            WHERE id = $4))",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(duration_secs)
    .bind(lease.job_id)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 1 {
        queue
            .save_match(&mut tx, lease, intake, method.as_str())
            .await?;
        tx.commit().await?;
        return Ok(IntakeWrite::Written);
    }
    let other: Option<Option<String>> = sqlx::query_scalar(
        "SELECT coalesce(recording_id, recording_object_path) FROM public.intakes WHERE id = $1",
    )
    .bind(intake)
    .fetch_optional(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(match other {
        None => IntakeWrite::Gone,
        Some(other) => IntakeWrite::TakenBy(other.unwrap_or_default()),
    })
}

/// Points the intake at the stored object and marks the job linked, in one
/// transaction fenced on the lease. Only `Written` changed anything.
pub async fn link(
    queue: &Queue,
    lease: &Lease,
    intake: Uuid,
    recording_id: &str,
    duration_secs: Option<i32>,
    object_path: &str,
    recording_url: &str,
) -> Result<IntakeWrite, QueueError> {
    let mut tx = queue.pool().begin().await?;
    // A lost lease is an error; the transaction rolls back as it drops.
    queue.lock_lease(&mut tx, lease).await?;
    let updated = sqlx::query(
        "UPDATE public.intakes
         SET recording_id = $2, recording_object_path = $3, recording_url = $4,
             recording_duration = coalesce($5, recording_duration),
             recording_migrated_at = now()
         WHERE id = $1 AND (recording_id IS NULL OR recording_id = $2)
           AND (recording_object_path IS NULL OR recording_object_path = $3)",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(object_path)
    .bind(recording_url)
    .bind(duration_secs)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() != 1 {
        let other: Option<Option<String>> = sqlx::query_scalar(
            "SELECT coalesce(recording_id, recording_object_path) FROM public.intakes WHERE id = $1",
        )
        .bind(intake)
        .fetch_optional(&mut *tx)
        .await?;
        tx.rollback().await?;
        return Ok(match other {
            None => IntakeWrite::Gone,
            Some(other) => IntakeWrite::TakenBy(other.unwrap_or_default()),
        });
    }
    // The relay's own record (issue #19): the playback API signs the
    // intake's column only while it equals this, and the table's CHECK
    // takes only the intake's own folder. The pipeline moves an
    // `unmatched/` recording into that folder before it links it
    // (`relocate`) and refuses to link any other path (`link`); jobs linked
    // where they lay before that are not recorded and do not play.
    if crate::object_paths::is_intake_recording(object_path, intake) {
        sqlx::query(
            "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path, job_id)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (intake_id) DO UPDATE
             SET recording_id = EXCLUDED.recording_id, object_path = EXCLUDED.object_path,
                 job_id = EXCLUDED.job_id, linked_at = now()",
        )
        .bind(intake)
        .bind(recording_id)
        .bind(object_path)
        .bind(lease.job_id)
        .execute(&mut *tx)
        .await?;
    }
    // A lost lease is an error; the transaction rolls back as it drops.
    queue.mark_linked(&mut tx, lease).await?;
    tx.commit().await?;
    Ok(IntakeWrite::Written)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;

    use super::*;
    use crate::config::Party;
    use crate::testing::{self, Plan};

    async fn patient(pool: &PgPool, phone: &str) -> Uuid {
        sqlx::query_scalar("INSERT INTO public.patients (phone) VALUES ($1) RETURNING id")
            .bind(phone)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn intake(pool: &PgPool, patient: Uuid, minutes_from_now: i64) -> Uuid {
        intake_at(
            pool,
            patient,
            Utc::now() + chrono::Duration::minutes(minutes_from_now),
        )
        .await
    }

    async fn intake_at(pool: &PgPool, patient: Uuid, at: DateTime<Utc>) -> Uuid {
        sqlx::query_scalar(
            "INSERT INTO public.intakes (patient_id, created_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(patient)
        .bind(at)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Telnyx lists nothing beyond our own table's jobs.
    async fn unlisted(_: (DateTime<Utc>, DateTime<Utc>)) -> Result<Listing, TelnyxError> {
        Ok(Listing::Recordings(Vec::new()))
    }

    fn input<'a>(number: &'a str, rec: &'a str) -> MatchInput<'a> {
        MatchInput {
            job_id: 0,
            recording_id: rec,
            call_session_id: None,
            client_state: None,
            number: Some(number),
            party: Party::To,
            organization: None,
            no_phone_match: None,
            around: Utc::now(),
            window: Duration::from_secs(600),
        }
    }

    /// Another call's job, as the matcher sees it: `number` is the patient
    /// party's (None: not resolved yet). Returns its id.
    async fn other_job(
        pool: &PgPool,
        recording: Option<&str>,
        number: Option<&str>,
        started: DateTime<Utc>,
        state: &str,
    ) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO recording_relay.recording_jobs
                 (event_id, event_type, event, recording_id, to_number, recording_started_at,
                  call_session_id, state, finished_at, last_error)
             VALUES (gen_random_uuid()::text, 'call.recording.saved', '{}', $1, $2, $3,
                     gen_random_uuid()::text, $4::recording_relay.recording_job_state,
                     CASE WHEN $4 IN ('pending', 'running') THEN NULL ELSE now() END, 'x')
             RETURNING id",
        )
        .bind(recording)
        .bind(number)
        .bind(started)
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    fn min(m: f64) -> chrono::Duration {
        chrono::Duration::milliseconds((m * 60_000.0) as i64)
    }

    /// A job claimed by a worker, to fence intake claims on.
    async fn claimed(queue: &Queue, event: &str) -> Lease {
        queue
            .enqueue(&crate::jobs::NewJob {
                event_id: event.into(),
                event_type: "call.recording.saved".into(),
                event: serde_json::json!({}),
                max_attempts: 3,
                ..Default::default()
            })
            .await
            .unwrap();
        let job = queue
            .claim("w", 1, Duration::from_secs(30))
            .await
            .unwrap()
            .remove(0);
        job.lease().unwrap()
    }

    #[sqlx::test(migrations = false)]
    async fn matches_free_format_numbers_within_the_window(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "(971) 265-6795").await;
        let near = intake(&pool, p, -2).await;
        let _outside = intake(&pool, p, -30).await;
        let found = find_intake(&pool, &input("+1 971 265 6795", "rec-1"), unlisted)
            .await
            .unwrap();
        assert_eq!(found, Found::Intake(near, MatchMethod::PhoneAndTime));
        assert!(matches!(
            find_intake(&pool, &input("+1 503 000 0000", "rec-1"), unlisted)
                .await
                .unwrap(),
            Found::Nothing(_)
        ));
    }

    #[sqlx::test(migrations = false)]
    async fn a_nearer_intake_holding_another_recording_blocks_the_match(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let queue = Queue::new(pool.clone());
        let p = patient(&pool, "9712656795").await;
        let older = intake(&pool, p, -5).await;
        let newer = intake(&pool, p, -1).await;
        let a = claimed(&queue, "a").await;
        let claim = claim_intake(
            &queue,
            &a,
            newer,
            MatchMethod::PhoneAndTime,
            "rec-A",
            Some(60),
        )
        .await;
        assert_eq!(claim.unwrap(), IntakeWrite::Written);
        // rec-B may be the second recording of the call that rec-A is from.
        let found = find_intake(&pool, &input("+19712656795", "rec-B"), unlisted)
            .await
            .unwrap();
        let Found::Undecided(why) = found else {
            panic!("{found:?}")
        };
        assert!(
            why.contains(&older.to_string()) && why.contains("holds recording rec-A"),
            "{why}"
        );
        let b = claimed(&queue, "b").await;
        let claim = claim_intake(&queue, &b, newer, MatchMethod::PhoneAndTime, "rec-B", None).await;
        assert_eq!(claim.unwrap(), IntakeWrite::TakenBy("rec-A".into()));
        let again = claim_intake(&queue, &a, newer, MatchMethod::PhoneAndTime, "rec-A", None).await;
        assert_eq!(again.unwrap(), IntakeWrite::Written, "idempotent");
        // The recording that holds it finds it again (a retry after the claim).
        assert_eq!(
            find_intake(&pool, &input("+19712656795", "rec-A"), unlisted)
                .await
                .unwrap(),
            Found::Intake(newer, MatchMethod::PhoneAndTime)
        );
    }

    /// Issue #19: a host that clears only `recording_id` leaves
    /// `recording_object_path` the only pointer to an older recording's
    /// object. The phone match, the claim and the link all took such an
    /// intake for free and overwrote that pointer.
    #[sqlx::test(migrations = false)]
    async fn an_intake_holding_another_object_is_not_taken(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let queue = Queue::new(pool.clone());
        let p = patient(&pool, "9712656795").await;
        let held = intake(&pool, p, -1).await;
        let old = "intakes/held/rec-old.wav";
        sqlx::query("UPDATE public.intakes SET recording_object_path = $2 WHERE id = $1")
            .bind(held)
            .bind(old)
            .execute(&pool)
            .await
            .unwrap();
        let found = find_intake(&pool, &input("+19712656795", "rec-new"), unlisted)
            .await
            .unwrap();
        assert!(
            matches!(&found, Found::Nothing(why) if why.contains(old)),
            "{found:?}"
        );
        // Named by client_state: the claim itself refuses.
        let a = claimed(&queue, "a").await;
        let claim = claim_intake(&queue, &a, held, MatchMethod::ClientState, "rec-new", None).await;
        assert_eq!(claim.unwrap(), IntakeWrite::TakenBy(old.into()));
        let linked = link(
            &queue,
            &a,
            held,
            "rec-new",
            None,
            "intakes/held/rec-new.wav",
            "https://x/rec-new.wav",
        )
        .await;
        assert_eq!(linked.unwrap(), IntakeWrite::TakenBy(old.into()));
        let kept: (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT recording_id, recording_object_path FROM public.intakes WHERE id = $1",
        )
        .bind(held)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(kept, (None, Some(old.to_owned())));

        // Its own object (the host cleared only the recording id after this
        // job linked it, and an operator requeued the job): taken again.
        let b = claimed(&queue, "b").await;
        queue.plan_object(&b, old, "audio/wav", None).await.unwrap();
        let claim = claim_intake(&queue, &b, held, MatchMethod::ClientState, "rec-old", None).await;
        assert_eq!(claim.unwrap(), IntakeWrite::Written);
        queue
            .save_stored(&b, &"0".repeat(64), 1, None)
            .await
            .unwrap();
        let linked = link(
            &queue,
            &b,
            held,
            "rec-old",
            None,
            old,
            "https://x/rec-old.wav",
        )
        .await;
        assert_eq!(linked.unwrap(), IntakeWrite::Written);
    }

    /// Issue #10: a patient's call 1 at 10:00 has its intake, call 2 at 10:06
    /// has none yet. Call 2's recording took call 1's intake (nearest in
    /// either direction, skipping intakes already taken) while call 1's job
    /// was still waiting.
    #[sqlx::test(migrations = false)]
    async fn a_later_call_does_not_take_an_earlier_calls_intake(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let call2 = Utc::now();
        let call1 = call2 - min(6.0);
        let intake1 = intake_at(&pool, p, call1 - min(0.5)).await;
        // Call 1's job knows its number but has not matched (it is waiting
        // for a retry, or failed with its recording still at Telnyx).
        let job1 = other_job(&pool, Some("rec-1"), Some("+19712656795"), call1, "failed").await;

        let mut m = input("+19712656795", "rec-2");
        m.around = call2;
        let found = find_intake(&pool, &m, unlisted).await.unwrap();
        let Found::Undecided(why) = found else {
            panic!("{found:?}")
        };
        assert!(
            why.contains("rec-1") && why.contains(&intake1.to_string()),
            "the reason names the candidates: {why}"
        );
        // Call 1's recording is the first after intake 1 was created: it
        // takes it, though call 2's recording competes (issue #21; issue
        // #10 refused both until call 2's intake was saved).
        let mut m = input("+19712656795", "rec-1");
        m.job_id = job1;
        m.around = call1;
        let call2_job =
            other_job(&pool, Some("rec-2"), Some("+19712656795"), call2, "pending").await;
        assert_eq!(
            find_intake(&pool, &m, unlisted).await.unwrap(),
            Found::Intake(intake1, MatchMethod::PhoneAndTime)
        );
        // Once call 2's intake is saved, call 2 takes it.
        let intake2 = intake_at(&pool, p, call2 - min(0.5)).await;
        let mut m2 = input("+19712656795", "rec-2");
        m2.job_id = call2_job;
        m2.around = call2;
        assert_eq!(
            find_intake(&pool, &m2, unlisted).await.unwrap(),
            Found::Intake(intake2, MatchMethod::PhoneAndTime)
        );
    }

    #[sqlx::test(migrations = false)]
    async fn an_intake_named_by_another_calls_client_state_is_not_free(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let t = Utc::now();
        let named = intake_at(&pool, p, t - min(3.0)).await;
        let job = other_job(
            &pool,
            Some("rec-1"),
            Some("9712656795"),
            t - min(3.0),
            "pending",
        )
        .await;
        sqlx::query("UPDATE recording_relay.recording_jobs SET client_state = $2 WHERE id = $1")
            .bind(job)
            .bind(base64::engine::general_purpose::STANDARD.encode(named.to_string()))
            .execute(&pool)
            .await
            .unwrap();
        assert!(matches!(
            find_intake(&pool, &input("9712656795", "rec-2"), unlisted)
                .await
                .unwrap(),
            Found::Nothing(_)
        ));
        let free = intake_at(&pool, p, t - min(0.5)).await;
        assert_eq!(
            find_intake(&pool, &input("9712656795", "rec-2"), unlisted)
                .await
                .unwrap(),
            Found::Intake(free, MatchMethod::PhoneAndTime)
        );
    }

    #[sqlx::test(migrations = false)]
    async fn intakes_of_a_second_organization_are_noticed(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        assert!(
            !intakes_of_several_organizations(&pool).await.unwrap(),
            "empty"
        );
        let p = patient(&pool, "9712656795").await;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        for org in [Some(a), None, Some(a)] {
            let i = intake(&pool, p, -1).await;
            sqlx::query("UPDATE public.intakes SET organization_id = $2 WHERE id = $1")
                .bind(i)
                .bind(org)
                .execute(&pool)
                .await
                .unwrap();
        }
        assert!(
            !intakes_of_several_organizations(&pool).await.unwrap(),
            "one"
        );
        let i = intake(&pool, p, -1).await;
        sqlx::query("UPDATE public.intakes SET organization_id = $2 WHERE id = $1")
            .bind(i)
            .bind(b)
            .execute(&pool)
            .await
            .unwrap();
        assert!(
            intakes_of_several_organizations(&pool).await.unwrap(),
            "two"
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_worker_without_its_lease_claims_nothing(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let queue = Queue::new(pool.clone());
        let intake = intake(&pool, patient(&pool, "9712656795").await, 0).await;
        let mut stale = claimed(&queue, "a").await;
        stale.worker = "someone-else".into();
        let claim = claim_intake(
            &queue,
            &stale,
            intake,
            MatchMethod::PhoneAndTime,
            "rec-A",
            None,
        )
        .await;
        assert!(matches!(claim, Err(QueueError::LeaseLost)), "{claim:?}");
        let held: Option<String> =
            sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
                .bind(intake)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(held, None, "rolled back");
    }

    #[sqlx::test(migrations = false)]
    async fn two_patients_sharing_a_number_are_not_guessed_between(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let parent = patient(&pool, "971-265-6795").await;
        let child = patient(&pool, "(971) 265 6795").await;
        intake(&pool, parent, -2).await;
        intake(&pool, child, -3).await;
        let found = find_intake(&pool, &input("+19712656795", "rec-1"), unlisted)
            .await
            .unwrap();
        assert!(matches!(found, Found::Ambiguous(_)), "{found:?}");
    }

    #[sqlx::test(migrations = false)]
    async fn the_organization_scopes_the_match(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let theirs = intake(&pool, p, -1).await;
        let org = Uuid::new_v4();
        sqlx::query("UPDATE public.intakes SET organization_id = $1 WHERE id = $2")
            .bind(Uuid::new_v4())
            .bind(theirs)
            .execute(&pool)
            .await
            .unwrap();
        let mut m = input("+19712656795", "rec-1");
        m.organization = Some(org);
        assert!(matches!(
            find_intake(&pool, &m, unlisted).await.unwrap(),
            Found::Nothing(_)
        ));
    }

    #[sqlx::test(migrations = false)]
    async fn client_state_wins_over_phone(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let by_phone = intake(&pool, p, 0).await;
        let other = intake(&pool, patient(&pool, "111").await, -400).await;
        let state = base64::engine::general_purpose::STANDARD.encode(other.to_string());
        let mut m = input("9712656795", "rec-1");
        m.client_state = Some(&state);
        assert_eq!(
            find_intake(&pool, &m, unlisted).await.unwrap(),
            Found::Intake(other, MatchMethod::ClientState)
        );
        // Naming an intake that does not exist is not an invitation to guess
        // by phone.
        let missing = base64::engine::general_purpose::STANDARD.encode(Uuid::new_v4().to_string());
        m.client_state = Some(&missing);
        let found = find_intake(&pool, &m, unlisted).await.unwrap();
        assert!(
            matches!(&found, Found::Nothing(why) if why.contains("client_state names intake")),
            "{found:?}"
        );
        let _ = by_phone;
    }

    #[sqlx::test(migrations = false)]
    async fn the_patient_lookup_uses_the_phone_key_index(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        sqlx::query("INSERT INTO public.patients (phone) SELECT '555' || lpad(g::text, 7, '0') FROM generate_series(1, 20000) g")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("ANALYZE public.patients")
            .execute(&pool)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!(
                "PREPARE match_by_phone(text, timestamptz, timestamptz, uuid) AS {INTAKES_BY_PHONE_SQL}"
            ),
            "EXECUTE match_by_phone('+1 555 000 1234', now() - interval '30 minutes', now(), NULL)",
            Plan::Chosen,
        )
        .await;
        assert!(
            plan.contains("idx_patients_recording_relay_phone_key"),
            "{plan}"
        );
    }
}
