//! SQL against ZScribe's tables: find the intake a recording belongs to,
//! and link the stored recording to it.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::Party;
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
    /// This recording's job: never its own competitor.
    pub job_id: i64,
    pub recording_id: &'a str,
    /// Other jobs of the same call are the same call's recordings, not
    /// competitors from another call.
    pub call_session_id: Option<&'a str>,
    pub client_state: Option<&'a str>,
    /// The patient's number: the remote party of the call.
    pub number: Option<&'a str>,
    /// Which number of other jobs is their patient's (the same setting).
    pub party: Party,
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
    /// No intake to take: none in the window, or every one holds another
    /// recording. The intake may not be saved yet, so matching is retried.
    Nothing(String),
    /// More than one reading fits (several free intakes, recordings
    /// competing, a nearer intake already taken, a competitor whose number
    /// is not known yet). A later attempt may see it settled (an intake
    /// saved, a competitor matched); until then nothing is guessed.
    Undecided(String),
    /// Several patients share the number within the window: guessing could
    /// put one patient's call in another's chart. Waiting does not help.
    Ambiguous(String),
}

/// The intakes of the number's patients in a span of time, free or not;
/// the `EXPLAIN` test checks its plan. `$1` number, `$2`..`$3` the span,
/// `$4` organization or NULL.
pub const INTAKES_BY_PHONE_SQL: &str = "SELECT i.id, i.patient_id, i.created_at, i.recording_id,
            i.recording_object_path
     FROM public.intakes i
     JOIN public.patients p ON p.id = i.patient_id
     WHERE recording_relay.recording_relay_phone_key(p.phone) = recording_relay.recording_relay_phone_key($1)
       AND i.created_at BETWEEN $2 AND $3
       AND ($4::uuid IS NULL OR i.organization_id = $4)
     ORDER BY i.created_at, i.id
     LIMIT 101";

/// Other recordings of the same number in the span, whatever their job's
/// state (a failed or unmatched one may still be requeued or attached), one
/// statement per party so that each uses its phone-key index. Recordings of
/// the same call are not rivals: they belong to the same intake, and the
/// first to claim it has it. `$1` number, `$2` this job, `$3` this
/// recording, `$4`..`$5` the span, `$6` this call session or NULL.
macro_rules! recordings_by_phone_sql {
    ($column:literal) => {
        concat!(
            "SELECT j.id, j.recording_id, j.client_state, j.intake_id,
                    coalesce(j.recording_started_at, j.occurred_at, j.created_at) AS at
             FROM recording_relay.recording_jobs j
             WHERE recording_relay.recording_relay_phone_key(j.",
            $column,
            ") = recording_relay.recording_relay_phone_key($1)
               AND j.state <> 'duplicate' AND j.id <> $2
               AND j.recording_id IS DISTINCT FROM $3
               AND coalesce(j.recording_started_at, j.occurred_at, j.created_at) BETWEEN $4 AND $5
               AND ($6::text IS NULL OR j.call_session_id IS DISTINCT FROM $6)
             ORDER BY at, j.id
             LIMIT 101"
        )
    };
}
pub const RECORDINGS_BY_TO_SQL: &str = recordings_by_phone_sql!("to_number");
pub const RECORDINGS_BY_FROM_SQL: &str = recordings_by_phone_sql!("from_number");

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

#[derive(Debug, Clone, sqlx::FromRow)]
struct IntakeRow {
    id: Uuid,
    patient_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    recording_id: Option<String>,
    recording_object_path: Option<String>,
}

impl IntakeRow {
    /// What the intake holds already, if anything: a recording, or the
    /// object of one whose id the host cleared (then the path is the only
    /// pointer to that object, and taking the intake would lose it).
    fn holding(&self) -> Option<String> {
        match (&self.recording_id, &self.recording_object_path) {
            (Some(r), _) => Some(format!("recording {r}")),
            (None, Some(path)) => Some(format!("object {path}")),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct OtherRecording {
    id: i64,
    recording_id: Option<String>,
    client_state: Option<String>,
    intake_id: Option<Uuid>,
    at: DateTime<Utc>,
}

impl OtherRecording {
    fn name(&self) -> String {
        match &self.recording_id {
            Some(r) => format!("recording {r} (job {}, {})", self.id, stamp(self.at)),
            None => format!("job {} ({})", self.id, stamp(self.at)),
        }
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn intake_name(i: &IntakeRow) -> String {
    format!("intake {} ({})", i.id, stamp(i.created_at))
}

fn list(names: impl IntoIterator<Item = String>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// Finds the intake. An intake named by `client_state` always wins, and
/// nothing else is tried when it names one. Otherwise a phone-and-time match
/// is made only when it is unambiguous (the rules are on `decide`, below).
pub async fn find_intake(pool: &PgPool, m: &MatchInput<'_>) -> Result<Found, sqlx::Error> {
    if let Some(id) = m.client_state.and_then(intake_id_from_client_state) {
        let exists: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM public.intakes WHERE id = $1 AND ($2::uuid IS NULL OR organization_id = $2)",
        )
        .bind(id)
        .bind(m.organization)
        .fetch_optional(pool)
        .await?;
        // The caller named the intake: another one found by phone would be a
        // guess against what they said.
        return Ok(match exists {
            Some(id) => Found::Intake(id, MatchMethod::ClientState),
            None => Found::Nothing(format!(
                "client_state names intake {id}, which does not exist{}",
                if m.organization.is_some() {
                    " in this connection's organization"
                } else {
                    ""
                }
            )),
        });
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
    let by_phone = match m.party {
        Party::To => RECORDINGS_BY_TO_SQL,
        Party::From => RECORDINGS_BY_FROM_SQL,
    };
    let others: Vec<OtherRecording> = sqlx::query_as(by_phone)
        .bind(number)
        .bind(m.job_id)
        .bind(m.recording_id)
        .bind(from)
        .bind(to)
        .bind(m.call_session_id)
        .fetch_all(pool)
        .await?;
    Ok(decide(m, w, (from, to), intakes, others))
}

/// The rules, apart from the SQL so each case is plain to read:
///
/// 1. An intake already holding this recording is this recording's.
/// 2. Recordings and free intakes of the number are linked when they are
///    within the window of each other; ours belongs to the group so linked
///    to it. Recordings that hold an intake already are settled and take
///    part in nothing; an intake named by another recording's
///    `client_state` is that recording's.
/// 3. The group's free intakes must be one patient's.
/// 4. Alone in its group, the recording takes the group's only free intake.
///    With other recordings, recordings and intakes are paired in time
///    order, only when there are as many of each and every pair is within
///    the window.
/// 5. An intake nearer to the recording that holds another recording means
///    the calls may have been mixed up already: nothing is taken.
///
/// Only recordings whose numbers are known take part. The official webhook
/// carries none: a job learns them from the Recordings API in its first
/// step, so a job that has not got that far yet is invisible here. Waiting
/// for every such job would leave a burst of webhooks (or one stuck job)
/// blocking every match around it; rule 5 and the pairing catch the usual
/// order of events (the earlier call matched first).
fn decide(
    m: &MatchInput<'_>,
    w: chrono::Duration,
    span: (DateTime<Utc>, DateTime<Utc>),
    intakes: Vec<IntakeRow>,
    others: Vec<OtherRecording>,
) -> Found {
    if intakes.len() > 100 || others.len() > 100 {
        return Found::Undecided(
            "more than 100 intakes or recordings of this number around the recording".to_owned(),
        );
    }
    // 1.
    if let Some(ours) = intakes
        .iter()
        .find(|i| i.recording_id.as_deref() == Some(m.recording_id))
    {
        return Found::Intake(ours.id, MatchMethod::PhoneAndTime);
    }
    let near = |a: DateTime<Utc>, b: DateTime<Utc>| (a - b).abs() <= w;
    // 2. Intakes reserved by another recording's client_state are not free.
    let named: std::collections::HashSet<Uuid> = others
        .iter()
        .filter_map(|o| {
            o.client_state
                .as_deref()
                .and_then(intake_id_from_client_state)
        })
        .collect();
    let held: std::collections::HashSet<&str> = intakes
        .iter()
        .filter_map(|i| i.recording_id.as_deref())
        .collect();
    let free: Vec<&IntakeRow> = intakes
        .iter()
        .filter(|i| i.holding().is_none() && !named.contains(&i.id))
        .collect();
    let free_ids: std::collections::HashSet<Uuid> = free.iter().map(|i| i.id).collect();
    // Competing: not named elsewhere, and holding no intake (an intake
    // released after a failure is free again, so its job competes again).
    let competes = |o: &OtherRecording| {
        let names_intake = o
            .client_state
            .as_deref()
            .and_then(intake_id_from_client_state)
            .is_some();
        let holds = o.recording_id.as_deref().is_some_and(|r| held.contains(r))
            || o.intake_id.is_some_and(|i| !free_ids.contains(&i));
        !names_intake && !holds
    };
    let competitors: Vec<&OtherRecording> = others.iter().filter(|o| competes(o)).collect();

    // The group: grow from our recording through overlapping windows.
    let mut group_recs: Vec<(DateTime<Utc>, Option<&OtherRecording>)> = vec![(m.around, None)];
    let mut group_intakes: Vec<&IntakeRow> = Vec::new();
    let mut grown = true;
    while grown {
        grown = false;
        for i in &free {
            if !group_intakes.iter().any(|g| g.id == i.id)
                && group_recs.iter().any(|(t, _)| near(*t, i.created_at))
            {
                group_intakes.push(i);
                grown = true;
            }
        }
        for o in &competitors {
            if !group_recs
                .iter()
                .any(|(_, g)| g.is_some_and(|g| g.id == o.id))
                && group_intakes.iter().any(|i| near(o.at, i.created_at))
            {
                group_recs.push((o.at, Some(o)));
                grown = true;
            }
        }
    }
    let beyond = |t: DateTime<Utc>| t - w < span.0 || t + w > span.1;
    if group_intakes.iter().any(|i| beyond(i.created_at))
        || group_recs.iter().any(|(t, _)| beyond(*t))
    {
        return Found::Undecided(
            "the number's recordings and intakes run on in a chain too long to pair".to_owned(),
        );
    }
    group_intakes.sort_by_key(|i| (i.created_at, i.id));
    group_recs.sort_by_key(|(t, o)| (*t, o.map(|o| o.id)));
    let taken_in_window = || {
        list(
            intakes
                .iter()
                .filter(|i| near(i.created_at, m.around))
                .filter_map(|i| Some(format!("{} holds {}", intake_name(i), i.holding()?))),
        )
    };
    if group_intakes.is_empty() {
        let taken = taken_in_window();
        return Found::Nothing(if taken.is_empty() {
            "no intake of a patient with this number in the window".to_owned()
        } else {
            format!("no free intake in the window: {taken}")
        });
    }
    // 3.
    let patients: std::collections::HashSet<Option<Uuid>> =
        group_intakes.iter().map(|i| i.patient_id).collect();
    if patients.len() > 1 {
        return Found::Ambiguous(format!(
            "{} patients with this number have intakes in the window: {}",
            patients.len(),
            list(group_intakes.iter().map(|i| intake_name(i)))
        ));
    }
    // 4.
    let candidates = || list(group_intakes.iter().map(|i| intake_name(i)));
    let chosen = if group_recs.len() == 1 {
        if group_intakes.len() != 1 {
            return Found::Undecided(format!(
                "{} free intakes of the patient in the window: {}",
                group_intakes.len(),
                candidates()
            ));
        }
        group_intakes[0]
    } else {
        let rivals = || list(group_recs.iter().filter_map(|(_, o)| o.map(|o| o.name())));
        if group_recs.len() != group_intakes.len()
            || group_recs
                .iter()
                .zip(&group_intakes)
                .any(|((t, _), i)| !near(*t, i.created_at))
        {
            return Found::Undecided(format!(
                "{} recordings of this number compete for {} free intake(s): {}; intakes: {}",
                group_recs.len(),
                group_intakes.len(),
                rivals(),
                candidates()
            ));
        }
        let ours = group_recs
            .iter()
            .position(|(_, o)| o.is_none())
            .unwrap_or_default();
        group_intakes[ours]
    };
    // 5.
    let distance = |t: DateTime<Utc>| (t - m.around).abs();
    let nearer: Vec<String> = intakes
        .iter()
        .filter(|i| {
            distance(i.created_at) < distance(chosen.created_at) && near(i.created_at, m.around)
        })
        .filter_map(|i| Some(format!("{} already holds {}", intake_name(i), i.holding()?)))
        .collect();
    if !nearer.is_empty() {
        return Found::Undecided(format!(
            "{} is free, but nearer to the recording {}",
            intake_name(chosen),
            list(nearer)
        ));
    }
    Found::Intake(chosen.id, MatchMethod::PhoneAndTime)
}

/// Whether an intake took this recording.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    Gone,
    /// The recording id the intake holds (or, when the host cleared only
    /// that, the path of the object it points at).
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
    let other: Option<Option<String>> = sqlx::query_scalar(
        "SELECT coalesce(recording_id, recording_object_path) FROM public.intakes WHERE id = $1",
    )
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
    /// operator's attach after this job's reservation was released), or
    /// another object: the recording id, else the object's path.
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
            None => Linked::Gone,
            Some(other) => Linked::TakenBy(other.unwrap_or_default()),
        });
    }
    // The relay's own record (issue #19): the playback API signs the
    // intake's column only while it equals this, and the table's CHECK
    // takes only the intake's own folder. The pipeline moves an
    // `unmatched/` recording into that folder before it links it
    // (`relocate`); jobs linked where they lay before that are not recorded
    // and do not play.
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
    use crate::testing::{self, Plan};

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

    fn input<'a>(number: &'a str, rec: &'a str) -> MatchInput<'a> {
        MatchInput {
            job_id: 0,
            recording_id: rec,
            call_session_id: None,
            client_state: None,
            number: Some(number),
            party: Party::To,
            organization: None,
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
        let found = find_intake(&pool, &input("+1 971 265 6795", "rec-1"))
            .await
            .unwrap();
        assert_eq!(found, Found::Intake(near, MatchMethod::PhoneAndTime));
        assert!(matches!(
            find_intake(&pool, &input("+1 503 000 0000", "rec-1"))
                .await
                .unwrap(),
            Found::Nothing(_)
        ));
    }

    /// "Nearest" was a guess: two free intakes of the patient in the window
    /// and nothing to tell which call this is.
    #[sqlx::test(migrations = false)]
    async fn two_free_intakes_in_the_window_are_not_guessed_between(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "(971) 265-6795").await;
        let far = intake(&pool, p, -9).await;
        let near = intake(&pool, p, -2).await;
        let found = find_intake(&pool, &input("+1 971 265 6795", "rec-1"))
            .await
            .unwrap();
        let Found::Undecided(why) = found else {
            panic!("{found:?}")
        };
        assert!(
            why.contains(&far.to_string()) && why.contains(&near.to_string()),
            "{why}"
        );
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
        assert_eq!(claim.unwrap(), Claim::Claimed);
        // rec-B may be the second recording of the call that rec-A is from.
        let found = find_intake(&pool, &input("+19712656795", "rec-B"))
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
        assert_eq!(claim.unwrap(), Claim::TakenBy("rec-A".into()));
        let again = claim_intake(&queue, &a, newer, MatchMethod::PhoneAndTime, "rec-A", None).await;
        assert_eq!(again.unwrap(), Claim::Claimed, "idempotent");
        // The recording that holds it finds it again (a retry after the claim).
        assert_eq!(
            find_intake(&pool, &input("+19712656795", "rec-A"))
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
        let found = find_intake(&pool, &input("+19712656795", "rec-new"))
            .await
            .unwrap();
        assert!(
            matches!(&found, Found::Nothing(why) if why.contains(old)),
            "{found:?}"
        );
        // Named by client_state: the claim itself refuses.
        let a = claimed(&queue, "a").await;
        let claim = claim_intake(&queue, &a, held, MatchMethod::ClientState, "rec-new", None).await;
        assert_eq!(claim.unwrap(), Claim::TakenBy(old.into()));
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
        assert_eq!(linked.unwrap(), Linked::TakenBy(old.into()));
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
        assert!(queue.plan_object(&b, old, "audio/wav", None).await.unwrap());
        let claim = claim_intake(&queue, &b, held, MatchMethod::ClientState, "rec-old", None).await;
        assert_eq!(claim.unwrap(), Claim::Claimed);
        assert!(
            queue
                .save_stored(&b, &"0".repeat(64), 1, None)
                .await
                .unwrap()
        );
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
        assert_eq!(linked.unwrap(), Linked::Linked);
    }

    #[sqlx::test(migrations = false)]
    async fn a_farther_intake_already_taken_does_not_block(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let taken = intake(&pool, p, -8).await;
        let free = intake(&pool, p, -1).await;
        sqlx::query("UPDATE public.intakes SET recording_id = 'rec-A' WHERE id = $1")
            .bind(taken)
            .execute(&pool)
            .await
            .unwrap();
        let t = Utc::now() - min(8.0);
        other_job(&pool, Some("rec-A"), Some("+19712656795"), t, "succeeded").await;
        assert_eq!(
            find_intake(&pool, &input("+19712656795", "rec-B"))
                .await
                .unwrap(),
            Found::Intake(free, MatchMethod::PhoneAndTime)
        );
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
        let found = find_intake(&pool, &m).await.unwrap();
        let Found::Undecided(why) = found else {
            panic!("{found:?}")
        };
        assert!(
            why.contains("rec-1") && why.contains(&intake1.to_string()),
            "the reason names the candidates: {why}"
        );
        // And call 1's recording does not take it either while call 2's
        // competes: 2 recordings, 1 intake.
        let mut m = input("+19712656795", "rec-1");
        m.job_id = job1;
        m.around = call1;
        let call2_job =
            other_job(&pool, Some("rec-2"), Some("+19712656795"), call2, "pending").await;
        let found = find_intake(&pool, &m).await.unwrap();
        assert!(matches!(found, Found::Undecided(_)), "{found:?}");
        // Once call 2's intake is saved, both sets are complete: paired in
        // time order.
        let intake2 = intake_at(&pool, p, call2 - min(0.5)).await;
        assert_eq!(
            find_intake(&pool, &m).await.unwrap(),
            Found::Intake(intake1, MatchMethod::PhoneAndTime)
        );
        let mut m2 = input("+19712656795", "rec-2");
        m2.job_id = call2_job;
        m2.around = call2;
        assert_eq!(
            find_intake(&pool, &m2).await.unwrap(),
            Found::Intake(intake2, MatchMethod::PhoneAndTime)
        );
    }

    #[sqlx::test(migrations = false)]
    async fn pairing_needs_as_many_intakes_as_recordings(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let t = Utc::now();
        // Three recordings within minutes, two intakes: which call has none?
        for (rec, at) in [("rec-1", t - min(4.0)), ("rec-2", t - min(2.0))] {
            other_job(&pool, Some(rec), Some("9712656795"), at, "pending").await;
        }
        intake_at(&pool, p, t - min(4.5)).await;
        intake_at(&pool, p, t - min(0.5)).await;
        let found = find_intake(&pool, &input("9712656795", "rec-3"))
            .await
            .unwrap();
        let Found::Undecided(why) = found else {
            panic!("{found:?}")
        };
        assert!(
            why.contains("3 recordings") && why.contains("rec-1"),
            "{why}"
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_recording_that_holds_its_intake_does_not_compete(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let p = patient(&pool, "9712656795").await;
        let t = Utc::now();
        let intake1 = intake_at(&pool, p, t - min(6.5)).await;
        let intake2 = intake_at(&pool, p, t - min(0.5)).await;
        sqlx::query("UPDATE public.intakes SET recording_id = 'rec-1' WHERE id = $1")
            .bind(intake1)
            .execute(&pool)
            .await
            .unwrap();
        other_job(
            &pool,
            Some("rec-1"),
            Some("9712656795"),
            t - min(6.0),
            "succeeded",
        )
        .await;
        assert_eq!(
            find_intake(&pool, &input("9712656795", "rec-2"))
                .await
                .unwrap(),
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
            find_intake(&pool, &input("9712656795", "rec-2"))
                .await
                .unwrap(),
            Found::Nothing(_)
        ));
        let free = intake_at(&pool, p, t - min(0.5)).await;
        assert_eq!(
            find_intake(&pool, &input("9712656795", "rec-2"))
                .await
                .unwrap(),
            Found::Intake(free, MatchMethod::PhoneAndTime)
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
        assert!(matches!(
            find_intake(&pool, &m).await.unwrap(),
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
            find_intake(&pool, &m).await.unwrap(),
            Found::Intake(other, MatchMethod::ClientState)
        );
        // Naming an intake that does not exist is not an invitation to guess
        // by phone.
        let missing = base64::engine::general_purpose::STANDARD.encode(Uuid::new_v4().to_string());
        m.client_state = Some(&missing);
        let found = find_intake(&pool, &m).await.unwrap();
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

    #[sqlx::test(migrations = false)]
    async fn the_rival_lookup_uses_the_jobs_phone_key_indexes(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs
                 (event_id, event_type, event, state, finished_at, to_number, from_number)
             SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded', now(),
                    '+1555' || lpad(g::text, 7, '0'), '+1666' || lpad(g::text, 7, '0')
             FROM generate_series(1, 5000) g",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE recording_relay.recording_jobs")
            .execute(&pool)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        for (name, sql, index) in [
            (
                "rivals_to",
                RECORDINGS_BY_TO_SQL,
                "recording_jobs_to_number_key_idx",
            ),
            (
                "rivals_from",
                RECORDINGS_BY_FROM_SQL,
                "recording_jobs_from_number_key_idx",
            ),
        ] {
            let plan = testing::explain(
                &mut conn,
                &format!(
                    "PREPARE {name}(text, bigint, text, timestamptz, timestamptz, text) AS {sql}"
                ),
                &format!(
                    "EXECUTE {name}('+1 555 000 1234', 1, 'rec', now() - interval '30 minutes', now(), NULL)"
                ),
                Plan::Chosen,
            )
            .await;
            assert!(plan.contains(index), "{plan}");
            assert!(!plan.contains("Seq Scan"), "{plan}");
        }
    }
}
