//! The matcher's one look at `recording_jobs`: other recordings of the
//! patient's number around a recording, which may compete with it for an
//! intake. The rules that weigh them are `pipeline/rules.rs`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::Party;

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
const RECORDINGS_BY_TO_SQL: &str = recordings_by_phone_sql!("to_number");
const RECORDINGS_BY_FROM_SQL: &str = recordings_by_phone_sql!("from_number");

/// Another recording of the number, as the matcher sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Competitor {
    pub(crate) id: i64,
    pub(crate) recording_id: Option<String>,
    pub(crate) client_state: Option<String>,
    pub(crate) intake_id: Option<Uuid>,
    pub(crate) at: DateTime<Utc>,
    /// Listed by Telnyx with no job here (its webhook has not come): `id`
    /// is no job's, only distinct among the competitors.
    #[sqlx(default)]
    pub(crate) listed_only: bool,
}

/// The other recordings of `number` (the `party` side of their call) in
/// `span`, at most 101 of them: the caller treats more than 100 as too many
/// to weigh.
pub(crate) async fn around(
    pool: &PgPool,
    party: Party,
    number: &str,
    job_id: i64,
    recording_id: &str,
    span: (DateTime<Utc>, DateTime<Utc>),
    call_session_id: Option<&str>,
) -> Result<Vec<Competitor>, sqlx::Error> {
    let by_phone = match party {
        Party::To => RECORDINGS_BY_TO_SQL,
        Party::From => RECORDINGS_BY_FROM_SQL,
    };
    sqlx::query_as(by_phone)
        .bind(number)
        .bind(job_id)
        .bind(recording_id)
        .bind(span.0)
        .bind(span.1)
        .bind(call_session_id)
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Plan};

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
