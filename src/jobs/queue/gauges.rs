//! What the queue looks like from outside: the `/metrics` gauges, read
//! at a cost that does not grow with the history, the depth view and the
//! count per state.

use super::{Queue, QueueError};
use crate::jobs::JobState;

/// Jobs of one state counted exactly by [`Queue::gauges`]; past this the
/// estimate stands in. 10,000 index entries are a few milliseconds.
pub(crate) const GAUGE_EXACT_UP_TO: i64 = 10_000;

/// `$1`: [`GAUGE_EXACT_UP_TO`]. Each state's count stops at `$1` entries
/// of the state index; the estimate comes from the statistics alone. The
/// ORDER BY is the index's: without it the planner may take the first `$1`
/// rows of a sequential scan, which for a state with few rows reads the
/// whole table to find them (its plan test caught this).
pub(crate) const GAUGES_SQL: &str = "SELECT s.state,
            (SELECT count(*) FROM (
                 SELECT 1 FROM recording_relay.recording_jobs j
                 WHERE j.state = s.state ORDER BY j.state LIMIT $1
             ) capped) AS counted,
            e.estimate
     FROM unnest(enum_range(NULL::recording_relay.recording_job_state)) AS s(state)
     LEFT JOIN (
         SELECT m.state, (m.freq * greatest(c.reltuples, 0))::int8 AS estimate
         FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_stats st
           ON st.schemaname = 'recording_relay' AND st.tablename = 'recording_jobs'
          AND st.attname = 'state',
              unnest(st.most_common_vals::text::text[], st.most_common_freqs) AS m(state, freq)
         WHERE c.oid = 'recording_relay.recording_jobs'::regclass
     ) e ON e.state = s.state::text";

/// How long the oldest runnable job has waited: the first entry of
/// `recording_jobs_claim_idx`.
pub(crate) const OLDEST_RUNNABLE_SQL: &str =
    "SELECT extract(epoch FROM now() - min(next_run_at))::float8
     FROM recording_relay.recording_jobs
     WHERE state = 'pending' AND next_run_at <= now()";

/// What [`Queue::gauges`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueGauges {
    pub jobs: Vec<(JobState, i64)>,
    pub(crate) oldest_runnable_age_seconds: f64,
}

impl Queue {
    /// Jobs per state, for readiness output and tests.
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, QueueError> {
        let rows = sqlx::query_as(
            "SELECT state, count(*) FROM recording_relay.recording_jobs GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The queue gauges of `/metrics`, at a cost that does not grow with
    /// the finished history (a scrape used to count the whole table): each
    /// state is counted along `recording_jobs_by_state_idx` up to
    /// `GAUGE_EXACT_UP_TO` entries, exactly, so the alerts on failed and
    /// unmatched jobs see every one; a state with more than that (the
    /// succeeded history) gets the planner's estimate instead, its share of
    /// the column in `pg_stats` times the table's `reltuples`, which
    /// autovacuum's ANALYZE keeps current. The lag is the first entry of
    /// the claim index.
    pub async fn gauges(&self) -> Result<QueueGauges, QueueError> {
        let rows: Vec<(JobState, i64, Option<i64>)> = sqlx::query_as(GAUGES_SQL)
            .bind(GAUGE_EXACT_UP_TO)
            .fetch_all(&self.pool)
            .await?;
        let jobs = rows
            .into_iter()
            .map(|(state, counted, estimate)| {
                let n = if counted < GAUGE_EXACT_UP_TO {
                    counted
                } else {
                    estimate.unwrap_or(0).max(counted)
                };
                (state, n)
            })
            .collect();
        let lag: Option<f64> = sqlx::query_scalar(OLDEST_RUNNABLE_SQL)
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueGauges {
            jobs,
            oldest_runnable_age_seconds: lag.unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// A history past the exact count: succeeded jobs beyond
    /// [`GAUGE_EXACT_UP_TO`], a few failed and pending ones, ANALYZEd.
    async fn history(q: &Queue, succeeded: i64) {
        fill_and_analyze(
            q,
            &format!(
                "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, finished_at, last_error, next_run_at)
                 SELECT 'ev-' || g, 'call.recording.saved', '{{}}',
                        CASE WHEN g <= 2 THEN 'failed' WHEN g <= 5 THEN 'pending' ELSE 'succeeded' END::recording_relay.recording_job_state,
                        CASE WHEN g > 5 OR g <= 2 THEN now() END,
                        CASE WHEN g <= 2 THEN 'gone' END,
                        now() - interval '1 minute'
                 FROM generate_series(1, {}) g",
                succeeded + 5
            ),
        )
        .await;
    }

    #[sqlx::test(migrations = false)]
    async fn gauges_count_small_states_exactly_and_estimate_the_history(pool: PgPool) {
        let q = queue(pool).await;
        history(&q, GAUGE_EXACT_UP_TO + 2_000).await;
        let gauges = q.gauges().await.unwrap();
        let n = |state| gauges.jobs.iter().find(|(s, _)| *s == state).unwrap().1;
        assert_eq!(n(JobState::Failed), 2);
        assert_eq!(n(JobState::Pending), 3);
        assert_eq!(n(JobState::Unmatched), 0);
        let succeeded = n(JobState::Succeeded);
        assert!(
            (GAUGE_EXACT_UP_TO..=GAUGE_EXACT_UP_TO + 4_000).contains(&succeeded),
            "{succeeded}"
        );
        assert_eq!(gauges.jobs.len(), JobState::ALL.len());
        assert!(
            (60.0..120.0).contains(&gauges.oldest_runnable_age_seconds),
            "{gauges:?}"
        );
    }

    /// A scrape used to count every row (`GROUP BY state`); now no gauge
    /// reads the table itself, only the state and claim indexes.
    #[sqlx::test(migrations = false)]
    async fn gauges_read_indexes_only_however_long_the_history(pool: PgPool) {
        let q = queue(pool).await;
        history(&q, 50_000).await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE gauges(bigint) AS {GAUGES_SQL}"),
            "EXECUTE gauges(10000)",
            Plan::Generic,
        )
        .await;
        assert!(!plan.contains("Seq Scan on recording_jobs"), "{plan}");
        assert!(plan.contains("recording_jobs_by_state_idx"), "{plan}");
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE lag AS {OLDEST_RUNNABLE_SQL}"),
            "EXECUTE lag",
            Plan::Generic,
        )
        .await;
        assert!(!plan.contains("Seq Scan"), "{plan}");
        assert!(plan.contains("recording_jobs_claim_idx"), "{plan}");
    }
}
