//! Questions other modules ask of the job table: reconcile's "is this
//! recording known", and playback's "what is the newest job of this
//! intake" (read with the intake and its link, in one statement).

use uuid::Uuid;

use super::{Queue, QueueError};

/// Reconcile's "is this recording known" lookup, once per listed
/// recording. `state <> 'duplicate'` lets the partial unique index
/// `recording_jobs_recording_id_key` answer the first half (a bare
/// `recording_id = $1` cannot use it and scans the table); a duplicate job
/// always has an owner with the same recording id, which that index finds.
/// The second half uses the call-session index. Its plan is tested.
pub(crate) const HAS_JOB_FOR_RECORDING_SQL: &str = "SELECT EXISTS (
         SELECT 1 FROM recording_relay.recording_jobs
         WHERE recording_id = $1 AND state <> 'duplicate')
     OR EXISTS (
         SELECT 1 FROM recording_relay.recording_jobs
         WHERE call_session_id = $2 AND recording_id IS NULL
           AND state IN ('pending', 'running'))";

/// One intake as playback reads it (`playback::recording` derives what the
/// player may show from it).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct IntakeRecordingRow {
    /// The intake's own `recording_object_path` (the host's to write).
    pub(crate) column_path: Option<String>,
    /// What the relay recorded for the intake in `recording_links`.
    pub(crate) linked_path: Option<String>,
    pub(crate) has_recording_id: bool,
    pub(crate) duration_seconds: Option<i32>,
    /// The state of the intake's newest job, if it has one.
    pub(crate) newest_job: Option<String>,
}

impl Queue {
    /// Whether a job covers this recording (reconcile's question for each
    /// listed recording): by id, or a live unresolved job of the same call,
    /// which will find this recording when it resolves. An unresolved job
    /// that ended (failed, cancelled, or refused the session as ambiguous)
    /// finds nothing more, so it covers nothing: otherwise the session's
    /// recordings could never be enqueued by id, which is what the
    /// ambiguous-session error tells the operator to do.
    pub(crate) async fn has_job_for_recording(
        &self,
        recording_id: &str,
        call_session_id: Option<&str>,
    ) -> Result<bool, QueueError> {
        let known = sqlx::query_scalar(HAS_JOB_FOR_RECORDING_SQL)
            .bind(recording_id)
            .bind(call_session_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(known)
    }

    /// The intake with its link and the state of its newest job, or `None`
    /// when the intake does not exist or belongs to another organization
    /// (compared as text). A plain read whose error playback reports as
    /// the database's, so it is sqlx's.
    pub(crate) async fn intake_recording(
        &self,
        intake: Uuid,
        organization: &str,
    ) -> Result<Option<IntakeRecordingRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT i.recording_object_path AS column_path,
                l.object_path AS linked_path,
                i.recording_id IS NOT NULL AS has_recording_id,
                i.recording_duration AS duration_seconds,
                j.state::text AS newest_job
         FROM public.intakes i
         LEFT JOIN recording_relay.recording_links l ON l.intake_id = i.id
         LEFT JOIN LATERAL (
             SELECT state FROM recording_relay.recording_jobs
             WHERE intake_id = i.id
             ORDER BY created_at DESC, id DESC
             LIMIT 1
         ) j ON true
         WHERE i.id = $1 AND i.organization_id::text = $2",
        )
        .bind(intake)
        .bind(organization)
        .fetch_optional(&self.pool)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// Issue #13: reconcile asks this once per listed recording; with
    /// `recording_id = $1` alone the partial unique index does not apply and
    /// every call scans the table.
    #[sqlx::test(migrations = false)]
    async fn reconciles_lookup_uses_the_recording_id_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, recording_id, call_session_id)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded', now(),
                        'rec-' || g, 'sess-' || g
                 FROM generate_series(1, 5000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE known(text, text) AS {HAS_JOB_FOR_RECORDING_SQL}"),
            "EXECUTE known('rec-42', 'sess-42')",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_recording_id_key"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        drop(conn);
        assert!(q.has_job_for_recording("rec-42", None).await.unwrap());
        assert!(!q.has_job_for_recording("rec-none", None).await.unwrap());
    }

    /// Issue #10: an unresolved job that ended (failed, cancelled, an
    /// ambiguous session) hid every recording of its session from
    /// reconcile, so "enqueue the right one by recording id" never worked.
    #[sqlx::test(migrations = false)]
    async fn an_ended_unresolved_job_does_not_hide_its_sessions_recordings(pool: PgPool) {
        let q = queue(pool).await;
        let mut job = new_job("ev-session");
        job.call.call_session_id = Some("sess-1".into());
        q.enqueue(&job).await.unwrap();
        assert!(
            q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap(),
            "a pending unresolved job will resolve its session's recording"
        );
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        assert!(
            q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap()
        );
        q.finish_unsuccessfully(
            &lease,
            JobState::Failed,
            "permanent",
            "2 recordings of call session sess-1 fit this event",
        )
        .await
        .unwrap();
        assert!(
            !q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap(),
            "a failed unresolved job covers nothing"
        );
        q.requeue(lease.job_id).await.unwrap();
        q.cancel(lease.job_id).await.unwrap();
        assert!(
            !q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap()
        );
        // A job that knows its recording covers it whatever its state.
        let mut known = new_job("ev-known");
        known.recording_id = Some("rec-b".into());
        known.call.call_session_id = Some("sess-1".into());
        q.enqueue(&known).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "boom")
            .await
            .unwrap();
        assert!(
            q.has_job_for_recording("rec-b", Some("sess-1"))
                .await
                .unwrap()
        );
    }
}
