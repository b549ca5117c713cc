//! The retention policy's statements: finished jobs pruned in batches
//! along `recording_jobs_finished_idx`, and jobs that are the only pointer
//! to patient data (`HOLDS_PATIENT_DATA`) listed, alerted and deleted one
//! by one with their object (reading `public.intakes` to leave a linked
//! object alone).

use std::time::Duration;

use super::{Queue, QueueError, millis};

/// A finished job that is the only pointer to patient data, as a condition
/// on `recording_relay.recording_jobs j`: unmatched (its object under
/// `unmatched/` is known nowhere else); failed with a recording id, a call
/// session or an object (the recording may still be at Telnyx, or in the
/// bucket), unless it is a `call.recording.error` (no recording was made:
/// its session points at nothing); cancelled with an object no intake was
/// linked to. Ordinary retention never deletes these.
pub(crate) const HOLDS_PATIENT_DATA: &str = "j.state = 'unmatched'
     OR (j.state = 'failed' AND (j.recording_id IS NOT NULL OR j.object_path IS NOT NULL
                                 OR (j.call_session_id IS NOT NULL
                                     AND j.event_type <> 'call.recording.error')))
     OR (j.state = 'cancelled' AND j.object_path IS NOT NULL AND j.linked_at IS NULL)";

/// A succeeded job that is the only pointer to a copy it left behind: a
/// delete at Telnyx still owed (issue #21 item 6), or the `unmatched/`
/// original of a moved recording that could not be deleted (an orphan,
/// listed in `recording_cleanups_pending`). Retention keeps these; they are
/// not unresolved (the recording plays), so retention never deletes them
/// with their object either.
const LEFT_A_COPY_BEHIND: &str = "j.state = 'succeeded'
     AND (j.telnyx_delete_due_at IS NOT NULL
          OR (j.moved_from IS NOT NULL AND j.moved_from_deleted_at IS NULL))";

/// One retention batch: `$1` succeeded/duplicate/cancelled retention and
/// `$2` failed retention in milliseconds, `$3` the batch size. Oldest first
/// along `recording_jobs_finished_idx`, bounded by the shorter period, so a
/// table of millions of finished jobs is not read whole for each batch (it
/// was: a sequential scan of 6 GB, 3.8 s, per batch at 5 million rows).
/// `= ANY (ARRAY(…))` makes the batch's ids one array, so the DELETE finds
/// them by primary key whatever the planner thinks of the batch's size.
fn prune_finished_sql() -> String {
    format!(
        "DELETE FROM recording_relay.recording_jobs
         WHERE id = ANY (ARRAY(
             SELECT id FROM recording_relay.recording_jobs j
             WHERE j.state IN ('succeeded', 'duplicate', 'cancelled', 'failed')
               AND j.finished_at < now() - least($1, $2) * interval '1 millisecond'
               AND NOT ({HOLDS_PATIENT_DATA})
               AND NOT ({LEFT_A_COPY_BEHIND})
               AND ((j.state IN ('succeeded', 'duplicate', 'cancelled')
                     AND j.finished_at < now() - $1 * interval '1 millisecond')
                 OR (j.state = 'failed'
                     AND j.finished_at < now() - $2 * interval '1 millisecond'))
             ORDER BY j.finished_at
             LIMIT $3
             FOR UPDATE SKIP LOCKED))"
    )
}

impl Queue {
    /// Retention: deletes up to `batch` finished jobs older than their
    /// state's period, oldest first, in one short transaction; the caller
    /// repeats it (and paces it: `retention`). Jobs that point at patient
    /// data ([`HOLDS_PATIENT_DATA`]) are never deleted here: see
    /// [`Queue::unresolved_due`]. Returns how many rows were deleted.
    pub(crate) async fn prune_finished_batch(
        &self,
        succeeded_for: Duration,
        failed_for: Duration,
        batch: i64,
    ) -> Result<u64, QueueError> {
        let done = sqlx::query(sqlx::AssertSqlSafe(prune_finished_sql()))
            .bind(millis(succeeded_for))
            .bind(millis(failed_for))
            .bind(batch)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Jobs holding patient data that finished more than `older_than` ago,
    /// oldest first; with `alerted_before`, only those whose retention alert
    /// went out before then, else only those never alerted.
    pub(crate) async fn unresolved_due(
        &self,
        older_than: Duration,
        alerted_before: Option<Duration>,
        limit: i64,
    ) -> Result<Vec<(i64, Option<String>)>, QueueError> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, object_path FROM recording_relay.recording_jobs j
             WHERE ({HOLDS_PATIENT_DATA})
               AND finished_at < now() - $1 * interval '1 millisecond'
               AND CASE WHEN $2::bigint IS NULL THEN retention_alerted_at IS NULL
                        ELSE retention_alerted_at < now() - $2 * interval '1 millisecond' END
             ORDER BY finished_at, id
             LIMIT $3"
        )))
        .bind(millis(older_than))
        .bind(alerted_before.map(millis))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Records that the retention alert for `id` went out.
    pub(crate) async fn mark_retention_alerted(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET retention_alerted_at = now()
             WHERE id = $1 AND retention_alerted_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes job `id` after `delete_object` removed its object, in one
    /// transaction that holds the row, so an operator's requeue or attach
    /// in between waits and then finds no job (rather than a job whose
    /// object is gone). The row must still be due: finished more than
    /// `finished_before` ago, holding patient data, alerted at least
    /// `alerted_before` ago (any change of state since forgets that alert:
    /// `recording_jobs_alert_on_state`). An object that an intake links is
    /// left alone. `Ok(false)`: not due any more, nothing deleted.
    pub(crate) async fn delete_unresolved<F, Fut, E>(
        &self,
        id: i64,
        finished_before: Duration,
        alerted_before: Duration,
        delete_object: F,
    ) -> Result<Result<bool, E>, QueueError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let mut tx = self.pool.begin().await?;
        let due: Option<(Option<String>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT object_path,
                    EXISTS (SELECT 1 FROM public.intakes i
                            WHERE i.recording_object_path = j.object_path)
             FROM recording_relay.recording_jobs j
             WHERE id = $1 AND ({HOLDS_PATIENT_DATA})
               AND finished_at < now() - $2 * interval '1 millisecond'
               AND retention_alerted_at < now() - $3 * interval '1 millisecond'
             FOR UPDATE"
        )))
        .bind(id)
        .bind(millis(finished_before))
        .bind(millis(alerted_before))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((path, linked)) = due else {
            tx.rollback().await?;
            return Ok(Ok(false));
        };
        if let Some(path) = path.filter(|_| !linked)
            && let Err(e) = delete_object(path).await
        {
            tx.rollback().await?;
            return Ok(Err(e));
        }
        sqlx::query("DELETE FROM recording_relay.recording_jobs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(true))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// Retention's loop without its rests.
    async fn prune_all(
        q: &Queue,
        succeeded_for: Duration,
        failed_for: Duration,
        batch: i64,
    ) -> u64 {
        let mut total = 0;
        loop {
            let n = q
                .prune_finished_batch(succeeded_for, failed_for, batch)
                .await
                .unwrap();
            total += n;
            if n < u64::try_from(batch).unwrap() {
                return total;
            }
        }
    }

    /// Found by `bench history`: at 5 million finished jobs every retention
    /// batch read the whole table.
    #[sqlx::test(migrations = false)]
    async fn retention_batches_use_the_finished_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded',
                        now() - (g % 60) * interval '1 day'
                 FROM generate_series(1, 20000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let day: i64 = 86_400_000;
        let plan = testing::explain(
            &mut conn,
            &format!(
                "PREPARE prune(bigint, bigint, bigint) AS {}",
                prune_finished_sql()
            ),
            &format!("EXECUTE prune({}, {}, 500)", 30 * day, 90 * day),
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_finished_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        drop(conn);
        let due: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM recording_relay.recording_jobs
             WHERE finished_at < now() - interval '30 days'",
        )
        .fetch_one(q.pool())
        .await
        .unwrap();
        assert!(due > 9000, "{due}");
        let pruned = prune_all(
            &q,
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(90 * 86_400),
            500,
        )
        .await;
        assert_eq!(
            pruned,
            u64::try_from(due).unwrap(),
            "every due job, in batches"
        );
    }

    /// Issue #19: `retention_alerted_at` outlived the ending it was about,
    /// so a job an operator requeued (or attached) to keep it was deleted
    /// the next time it ended, with no fresh alert.
    #[sqlx::test(migrations = false)]
    async fn any_change_of_state_forgets_the_retention_alert(pool: PgPool) {
        let q = queue(pool).await;
        let alerted = |id: i64| {
            let q = q.clone();
            async move {
                q.mark_retention_alerted(id).await.unwrap();
                assert!(retention_alerted(&q, id).await);
            }
        };
        let id = failed_job(&q, "requeued").await;
        alerted(id).await;
        q.requeue(id).await.unwrap();
        assert!(!retention_alerted(&q, id).await, "requeue");
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET recording_id = 'rec-1' WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        alerted(id).await;
        let intake: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO public.intakes DEFAULT VALUES RETURNING id")
                .fetch_one(q.pool())
                .await
                .unwrap();
        q.attach(id, intake).await.unwrap();
        assert!(!retention_alerted(&q, id).await, "attach");
        let id = failed_job(&q, "cancelled").await;
        alerted(id).await;
        q.cancel(id).await.unwrap();
        assert!(
            !retention_alerted(&q, id).await,
            "cancel restarts the clock"
        );
    }

    async fn retention_alerted(q: &Queue, id: i64) -> bool {
        sqlx::query_scalar(
            "SELECT retention_alerted_at IS NOT NULL FROM recording_relay.recording_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(q.pool())
        .await
        .unwrap()
    }

    /// Retention lists due jobs, then deletes them one by one: a job that
    /// ended again in between (requeued, run, failed) is not due, whatever
    /// its alert says.
    #[sqlx::test(migrations = false)]
    async fn retention_deletes_no_job_that_finished_again_since_it_was_listed(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET recording_id = 'rec-1', retention_alerted_at = now() - interval '8 days'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let day = Duration::from_secs(86_400);
        let deleted = q
            .delete_unresolved(id, 90 * day, 7 * day, |_| async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        assert_eq!(deleted, Ok(false), "finished just now");
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET finished_at = now() - interval '91 days'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let deleted = q
            .delete_unresolved(id, 90 * day, 7 * day, |_| async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        assert_eq!(deleted, Ok(true));
    }

    /// Issue #10: retention deleted unmatched jobs (the only record of
    /// `unmatched/{id}.wav`) and failed jobs whose recording may still be at
    /// Telnyx after 90 days. They are kept now.
    #[sqlx::test(migrations = false)]
    async fn retention_deletes_only_what_it_should(pool: PgPool) {
        let q = queue(pool).await;
        // name, state, finished how many days ago, recording id, object path
        type Row<'a> = (&'a str, &'a str, i32, Option<&'a str>, Option<&'a str>);
        let rows: [Row<'_>; 9] = [
            (
                "succeeded-old",
                "succeeded",
                40,
                Some("r1"),
                Some("intakes/a/r1.wav"),
            ),
            (
                "succeeded-new",
                "succeeded",
                10,
                Some("r2"),
                Some("intakes/b/r2.wav"),
            ),
            ("duplicate-old", "duplicate", 40, Some("r1"), None),
            ("failed-nothing-40", "failed", 40, None, None),
            ("failed-nothing-100", "failed", 100, None, None),
            ("failed-at-telnyx-100", "failed", 100, Some("r3"), None),
            (
                "unmatched-100",
                "unmatched",
                100,
                Some("r4"),
                Some("unmatched/r4.wav"),
            ),
            (
                "cancelled-stored-40",
                "cancelled",
                40,
                Some("r5"),
                Some("unmatched/r5.wav"),
            ),
            ("cancelled-empty-40", "cancelled", 40, None, None),
        ];
        for (name, state, days, recording, object) in rows {
            sqlx::query(
                "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, last_error,
                      recording_id, object_path, call_session_id)
                 VALUES ($1, 'call.recording.saved', '{}', $2::recording_relay.recording_job_state,
                         now() - $3 * interval '1 day', 'x', $4, $5, NULL)",
            )
            .bind(name)
            .bind(state)
            .bind(f64::from(days))
            .bind(recording)
            .bind(object)
            .execute(q.pool())
            .await
            .unwrap();
        }
        q.enqueue(&new_job("pending")).await.unwrap();
        let day = Duration::from_secs(86_400);
        let deleted = prune_all(&q, 30 * day, 90 * day, 1).await;
        assert_eq!(deleted, 4, "batches of one until done");
        let mut left: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs")
                .fetch_all(q.pool())
                .await
                .unwrap();
        left.sort();
        assert_eq!(
            left,
            [
                "cancelled-stored-40",
                "failed-at-telnyx-100",
                "failed-nothing-40",
                "pending",
                "succeeded-new",
                "unmatched-100"
            ]
        );
    }
}
