//! SQL against ZScribe's tables: find the intake a recording belongs to,
//! and link the stored recording to it.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::jobs::{Lease, Queue, QueueError};

/// How an intake was found; stored in `recording_jobs.match_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchMethod {
    ClientState,
    PhoneAndTime,
}

impl MatchMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchMethod::ClientState => "client_state",
            MatchMethod::PhoneAndTime => "phone_and_time",
        }
    }
}

/// What the matcher knows about a recording.
pub struct MatchInput<'a> {
    pub recording_id: &'a str,
    pub client_state: Option<&'a str>,
    /// The patient's number: the remote party of the call.
    pub number: Option<&'a str>,
    /// When set, only intakes of this organization match (the Telnyx
    /// connection the call came through identifies the tenant).
    pub organization: Option<Uuid>,
    pub around: DateTime<Utc>,
    pub window: std::time::Duration,
}

/// What the matcher found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Intake(Uuid, MatchMethod),
    Nothing,
    /// Several patients share the number within the window: guessing could
    /// put one patient's call in another's chart.
    Ambiguous(String),
}

/// The phone-and-time lookup; the `EXPLAIN` test checks its plan.
pub const MATCH_BY_PHONE_SQL: &str = "SELECT i.id, i.patient_id
     FROM public.intakes i
     JOIN public.patients p ON p.id = i.patient_id
     WHERE recording_relay.recording_relay_phone_key(p.phone) = recording_relay.recording_relay_phone_key($1)
       AND i.created_at BETWEEN $2 - $3 * interval '1 millisecond'
                            AND $2 + $3 * interval '1 millisecond'
       AND (i.recording_id IS NULL OR i.recording_id = $4)
       AND ($5::uuid IS NULL OR i.organization_id = $5)
     ORDER BY abs(extract(epoch FROM i.created_at - $2)), i.created_at DESC, i.id
     LIMIT 20";

/// `client_state` is set by whoever started the call: base64 of an intake
/// id, of `{"intake_id": "..."}`, or (leniently) the bare id.
pub fn intake_id_from_client_state(client_state: &str) -> Option<Uuid> {
    let raw = client_state.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    [decoded.as_deref(), Some(raw)]
        .into_iter()
        .flatten()
        .find_map(|text| {
            let text = text.trim();
            Uuid::parse_str(text).ok().or_else(|| {
                serde_json::from_str::<serde_json::Value>(text)
                    .ok()?
                    .get("intake_id")?
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
            })
        })
}

/// Finds the intake: an explicit id in `client_state` wins; otherwise the
/// patient with this number and their intake created nearest to the
/// recording's start, within the window, that has no other recording yet.
pub async fn find_intake(pool: &PgPool, m: &MatchInput<'_>) -> Result<Found, sqlx::Error> {
    if let Some(id) = m.client_state.and_then(intake_id_from_client_state) {
        let exists: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM public.intakes WHERE id = $1 AND ($2::uuid IS NULL OR organization_id = $2)",
        )
        .bind(id)
        .bind(m.organization)
        .fetch_optional(pool)
        .await?;
        if let Some(id) = exists {
            return Ok(Found::Intake(id, MatchMethod::ClientState));
        }
    }
    let Some(number) = m.number else {
        return Ok(Found::Nothing);
    };
    let window_ms = i64::try_from(m.window.as_millis()).unwrap_or(i64::MAX);
    let candidates: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(MATCH_BY_PHONE_SQL)
        .bind(number)
        .bind(m.around)
        .bind(window_ms)
        .bind(m.recording_id)
        .bind(m.organization)
        .fetch_all(pool)
        .await?;
    let Some(&(nearest, _)) = candidates.first() else {
        return Ok(Found::Nothing);
    };
    let patients = candidates
        .iter()
        .map(|(_, p)| *p)
        .collect::<std::collections::HashSet<_>>();
    if patients.len() > 1 {
        return Ok(Found::Ambiguous(format!(
            "{} patients with this number have intakes in the window",
            patients.len()
        )));
    }
    Ok(Found::Intake(nearest, MatchMethod::PhoneAndTime))
}

/// Whether an intake took this recording.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    Gone,
    TakenBy(String),
    LeaseLost,
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
) -> Result<Claim, QueueError> {
    let mut tx = queue.pool().begin().await?;
    if !queue.lock_lease(&mut tx, lease).await? {
        tx.rollback().await?;
        return Ok(Claim::LeaseLost);
    }
    // Concurrent claims serialise on the row lock; the loser re-checks the
    // WHERE against the winner's value and updates nothing.
    let updated = sqlx::query(
        "UPDATE public.intakes
         SET recording_id = $2, recording_duration = coalesce($3, recording_duration)
         WHERE id = $1 AND (recording_id IS NULL OR recording_id = $2)",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(duration_secs)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 1 {
        if !queue
            .save_match(&mut tx, lease, intake, method.as_str())
            .await?
        {
            tx.rollback().await?;
            return Ok(Claim::LeaseLost);
        }
        tx.commit().await?;
        return Ok(Claim::Claimed);
    }
    let other: Option<Option<String>> =
        sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
            .bind(intake)
            .fetch_optional(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(match other {
        None => Claim::Gone,
        Some(other) => Claim::TakenBy(other.unwrap_or_default()),
    })
}

/// What a link found.
#[derive(Debug, PartialEq, Eq)]
pub enum Linked {
    Linked,
    LeaseLost,
    /// The intake was deleted after the match.
    Gone,
    /// The intake holds another recording now (set by hand, or by an
    /// operator's attach after this job's reservation was released).
    TakenBy(String),
}

/// Points the intake at the stored object and marks the job linked, in one
/// transaction fenced on the lease. Only `Linked` changed anything.
pub async fn link(
    queue: &Queue,
    lease: &Lease,
    intake: Uuid,
    recording_id: &str,
    duration_secs: Option<i32>,
    object_path: &str,
    recording_url: &str,
) -> Result<Linked, QueueError> {
    let mut tx = queue.pool().begin().await?;
    if !queue.lock_lease(&mut tx, lease).await? {
        tx.rollback().await?;
        return Ok(Linked::LeaseLost);
    }
    let updated = sqlx::query(
        "UPDATE public.intakes
         SET recording_id = $2, recording_object_path = $3, recording_url = $4,
             recording_duration = coalesce($5, recording_duration),
             recording_migrated_at = now()
         WHERE id = $1 AND (recording_id IS NULL OR recording_id = $2)",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(object_path)
    .bind(recording_url)
    .bind(duration_secs)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() != 1 {
        let other: Option<Option<String>> =
            sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
                .bind(intake)
                .fetch_optional(&mut *tx)
                .await?;
        tx.rollback().await?;
        return Ok(match other {
            None => Linked::Gone,
            Some(other) => Linked::TakenBy(other.unwrap_or_default()),
        });
    }
    if !queue.mark_linked(&mut tx, lease).await? {
        tx.rollback().await?;
        return Ok(Linked::LeaseLost);
    }
    tx.commit().await?;
    Ok(Linked::Linked)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing;

    #[test]
    fn client_state_forms() {
        let id = Uuid::parse_str("7f1c2a4e-1d2b-4c3d-9e8f-001122334455").unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(intake_id_from_client_state(&b64(&id.to_string())), Some(id));
        assert_eq!(
            intake_id_from_client_state(&b64(&format!(r#"{{"intake_id":"{id}"}}"#))),
            Some(id)
        );
        assert_eq!(intake_id_from_client_state(&id.to_string()), Some(id));
        assert_eq!(intake_id_from_client_state(&b64("hello")), None);
    }

    async fn patient(pool: &PgPool, phone: &str) -> Uuid {
        sqlx::query_scalar("INSERT INTO public.patients (phone) VALUES ($1) RETURNING id")
            .bind(phone)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn intake(pool: &PgPool, patient: Uuid, minutes_from_now: i64) -> Uuid {
        sqlx::query_scalar(
            "INSERT INTO public.intakes (patient_id, created_at) VALUES ($1, now() + $2 * interval '1 minute') RETURNING id",
        )
        .bind(patient)
        .bind(minutes_from_now)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    fn input<'a>(number: &'a str, rec: &'a str) -> MatchInput<'a> {
        MatchInput {
            recording_id: rec,
            client_state: None,
            number: Some(number),
            organization: None,
            around: Utc::now(),
            window: Duration::from_secs(600),
        }
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
    async fn matches_free_format_numbers_nearest_in_time(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "(971) 265-6795").await;
        let _far = intake(&pool, p, -9).await;
        let near = intake(&pool, p, -2).await;
        let _outside = intake(&pool, p, -30).await;
        let found = find_intake(&pool, &input("+1 971 265 6795", "rec-1"))
            .await
            .unwrap();
        assert_eq!(found, Found::Intake(near, MatchMethod::PhoneAndTime));
        assert_eq!(
            find_intake(&pool, &input("+1 503 000 0000", "rec-1"))
                .await
                .unwrap(),
            Found::Nothing
        );
    }

    #[sqlx::test(migrations = false)]
    async fn intakes_with_another_recording_are_skipped(pool: PgPool) {
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
        assert_eq!(claim.unwrap(), Claim::Claimed);
        let found = find_intake(&pool, &input("+19712656795", "rec-B"))
            .await
            .unwrap();
        assert_eq!(found, Found::Intake(older, MatchMethod::PhoneAndTime));
        let b = claimed(&queue, "b").await;
        let claim = claim_intake(&queue, &b, newer, MatchMethod::PhoneAndTime, "rec-B", None).await;
        assert_eq!(claim.unwrap(), Claim::TakenBy("rec-A".into()));
        let again = claim_intake(&queue, &a, newer, MatchMethod::PhoneAndTime, "rec-A", None).await;
        assert_eq!(again.unwrap(), Claim::Claimed, "idempotent");
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
        assert_eq!(claim.unwrap(), Claim::LeaseLost);
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
        let found = find_intake(&pool, &input("+19712656795", "rec-1"))
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
        assert_eq!(find_intake(&pool, &m).await.unwrap(), Found::Nothing);
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
            find_intake(&pool, &m).await.unwrap(),
            Found::Intake(other, MatchMethod::ClientState)
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
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE match_by_phone(text, timestamptz, bigint, text, uuid) AS {MATCH_BY_PHONE_SQL}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(
            "EXPLAIN EXECUTE match_by_phone('+1 555 000 1234', now(), 600000, 'rec', NULL)",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert!(
            plan.join("\n")
                .contains("idx_patients_recording_relay_phone_key"),
            "{plan:?}"
        );
    }
}
