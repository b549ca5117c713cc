//! The look-up for recordings that never came (`ops::missing`): which of
//! the calls Telnyx announced (`recording_relay.calls`) are overdue, and
//! what the look-up learnt about each. Here, beside the job table, because
//! "overdue" means no job knows the call's session.
//!
//! A call is unsettled until a job for its session is seen
//! (`recording_found_at`) or it is reported missing
//! (`recording_missing_at`); only unsettled calls are read, through the
//! partial index `calls_unsettled_idx`, and each is asked about at most
//! once per recheck period by one worker at a time: the claim stamps
//! `recording_checked_at` as it takes the row (SKIP LOCKED), so concurrent
//! workers split the overdue calls instead of asking Telnyx twice.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Queue, QueueError, millis};

/// Settles the overdue calls a job already covers: any job of the session,
/// in any state, means the recording came (what became of it is the job's
/// story, told by its own alerts). Written once, so that retention pruning
/// the job later cannot make the call look recordless again.
pub(crate) const SETTLE_CALLS_SQL: &str = "UPDATE recording_relay.calls c
     SET recording_found_at = now(), updated_at = now()
     WHERE c.recording_found_at IS NULL AND c.recording_missing_at IS NULL
       AND c.received_at < now() - make_interval(secs => $1 / 1000.0)
       AND EXISTS (SELECT 1 FROM recording_relay.recording_jobs j
                   WHERE j.call_session_id = c.call_session_id)";

/// Takes up to `$4` overdue, unsettled calls not asked about within the
/// recheck period, oldest first, and stamps them asked. `$1` overdue after,
/// `$2` missing after, `$3` recheck period, all in milliseconds.
pub(crate) const CLAIM_OVERDUE_CALLS_SQL: &str = "UPDATE recording_relay.calls c
     SET recording_checked_at = now(), updated_at = now()
     FROM (SELECT call_session_id FROM recording_relay.calls
           WHERE recording_found_at IS NULL AND recording_missing_at IS NULL
             AND received_at < now() - make_interval(secs => $1 / 1000.0)
             AND (recording_checked_at IS NULL
                  OR recording_checked_at < now() - make_interval(secs => $3 / 1000.0))
           ORDER BY received_at
           LIMIT $4
           FOR UPDATE SKIP LOCKED) due
     WHERE c.call_session_id = due.call_session_id
     RETURNING c.call_session_id, c.intake_id, c.connection_id, c.received_at,
               c.received_at < now() - make_interval(secs => $2 / 1000.0) AS due_missing";

/// A call whose recording is overdue, as the look-up needs it: no phone
/// numbers (they are not needed to ask Telnyx, nor to alert).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OverdueCall {
    pub(crate) call_session_id: String,
    /// The intake the dialer named, if it named one (a UUID).
    pub(crate) intake_id: Option<Uuid>,
    pub(crate) connection_id: Option<String>,
    pub(crate) received_at: DateTime<Utc>,
    /// Past `pipeline.recording_missing_after`: if Telnyx has nothing now,
    /// the recording is missing.
    pub(crate) due_missing: bool,
}

impl Queue {
    /// Marks the overdue calls a job covers as settled; returns how many.
    pub(crate) async fn settle_covered_calls(
        &self,
        overdue_after: Duration,
    ) -> Result<u64, QueueError> {
        let done = sqlx::query(SETTLE_CALLS_SQL)
            .bind(millis(overdue_after))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Claims overdue calls to ask Telnyx about (see the module doc).
    pub(crate) async fn claim_overdue_calls(
        &self,
        overdue_after: Duration,
        missing_after: Duration,
        recheck: Duration,
        limit: i64,
    ) -> Result<Vec<OverdueCall>, QueueError> {
        let calls = sqlx::query_as(CLAIM_OVERDUE_CALLS_SQL)
            .bind(millis(overdue_after))
            .bind(millis(missing_after))
            .bind(millis(recheck))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(calls)
    }

    /// Telnyx had the call's recording(s) and a job covers them now.
    pub(crate) async fn call_recording_found(
        &self,
        call_session_id: &str,
    ) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE recording_relay.calls
             SET recording_found_at = now(), updated_at = now()
             WHERE call_session_id = $1 AND recording_found_at IS NULL",
        )
        .bind(call_session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that the call's recording is missing. `true` only for the
    /// one caller that changed the row, so the report goes out once
    /// however many workers (or `reconcile` runs) got this far.
    pub(crate) async fn call_recording_missing(
        &self,
        call_session_id: &str,
    ) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.calls
             SET recording_missing_at = now(), updated_at = now()
             WHERE call_session_id = $1
               AND recording_missing_at IS NULL AND recording_found_at IS NULL",
        )
        .bind(call_session_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    /// A `calls` row as the listener would write it from `call.initiated`,
    /// `minutes_ago` minutes old.
    async fn insert_call(q: &Queue, session: &str, minutes_ago: i32) {
        sqlx::query(
            "INSERT INTO recording_relay.calls
                 (call_session_id, first_event_id, first_event_type, received_at)
             VALUES ($1, 'ev-' || $1, 'call.initiated', now() - make_interval(mins => $2))",
        )
        .bind(session)
        .bind(minutes_ago)
        .execute(q.pool())
        .await
        .unwrap();
    }

    async fn claim(q: &Queue) -> Vec<String> {
        q.claim_overdue_calls(30 * MINUTE, 120 * MINUTE, 10 * MINUTE, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.call_session_id)
            .collect()
    }

    /// Only calls past their due time, with no job, not asked about
    /// recently, and not yet settled are asked about; a job settles its
    /// call for good, even once retention has pruned it.
    #[sqlx::test(migrations = false)]
    async fn only_overdue_jobless_unsettled_calls_are_claimed_once_per_recheck(pool: PgPool) {
        let q = queue(pool).await;
        insert_call(&q, "s-fresh", 5).await;
        insert_call(&q, "s-overdue", 45).await;
        insert_call(&q, "s-covered", 45).await;
        q.enqueue(&NewJob {
            call: CallFacts {
                call_session_id: Some("s-covered".into()),
                ..CallFacts::default()
            },
            ..new_job("ev-covered")
        })
        .await
        .unwrap();

        assert_eq!(q.settle_covered_calls(30 * MINUTE).await.unwrap(), 1);
        assert_eq!(claim(&q).await, ["s-overdue"]);
        // Asked about just now: not again before the recheck period.
        assert!(claim(&q).await.is_empty());
        sqlx::query(
            "UPDATE recording_relay.calls SET recording_checked_at = now() - interval '11 minutes'",
        )
        .execute(q.pool())
        .await
        .unwrap();
        assert_eq!(claim(&q).await, ["s-overdue"]);

        // The covering job pruned: the call stays settled.
        sqlx::query("DELETE FROM recording_relay.recording_jobs")
            .execute(q.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE recording_relay.calls SET recording_checked_at = NULL")
            .execute(q.pool())
            .await
            .unwrap();
        assert_eq!(claim(&q).await, ["s-overdue"]);

        assert!(q.call_recording_missing("s-overdue").await.unwrap());
        assert!(!q.call_recording_missing("s-overdue").await.unwrap());
        sqlx::query("UPDATE recording_relay.calls SET recording_checked_at = NULL")
            .execute(q.pool())
            .await
            .unwrap();
        assert!(claim(&q).await.is_empty());
    }

    /// Every worker runs the claim each minute: it must read the few
    /// unsettled calls through their partial index, not every call ever
    /// made.
    #[sqlx::test(migrations = false)]
    async fn the_overdue_claim_reads_only_unsettled_calls_through_their_index(pool: PgPool) {
        let q = queue(pool).await;
        sqlx::raw_sql(
            "INSERT INTO recording_relay.calls
                 (call_session_id, first_event_id, first_event_type, received_at,
                  recording_found_at)
             SELECT 's-' || g, 'ev-' || g, 'call.initiated',
                    now() - g * interval '1 minute', now()
             FROM generate_series(1, 20000) g;
             UPDATE recording_relay.calls SET recording_found_at = NULL
             WHERE call_session_id IN ('s-40', 's-50');
             ANALYZE recording_relay.calls",
        )
        .execute(q.pool())
        .await
        .unwrap();
        for (sql, args, kind) in [
            (
                CLAIM_OVERDUE_CALLS_SQL,
                "(1800000, 7200000, 600000, 50)",
                Plan::Chosen,
            ),
            (
                CLAIM_OVERDUE_CALLS_SQL,
                "(1800000, 7200000, 600000, 50)",
                Plan::Generic,
            ),
            (SETTLE_CALLS_SQL, "(1800000)", Plan::Chosen),
            (SETTLE_CALLS_SQL, "(1800000)", Plan::Generic),
        ] {
            // A fresh connection each: PREPARE names are per session.
            let mut conn = q.pool().acquire().await.unwrap().detach();
            let types = if args.contains(',') {
                "(float8, float8, float8, int8)"
            } else {
                "(float8)"
            };
            let plan = testing::explain(
                &mut conn,
                &format!("PREPARE stmt{types} AS {sql}"),
                &format!("EXECUTE stmt{args}"),
                kind,
            )
            .await;
            assert!(plan.contains("calls_unsettled_idx"), "{plan}");
            assert!(!plan.contains("Seq Scan on calls"), "{plan}");
        }
        assert_eq!(claim(&q).await, ["s-50", "s-40"]);
    }
}
