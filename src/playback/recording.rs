//! What the player may show for one intake: the recording's state, read
//! from the intake and its newest job, scoped to the caller's organization,
//! and the one object path that may be signed for it: the intake's column
//! only while it equals what the relay recorded for that intake, in that
//! intake's own folder (issue #19; `object_paths.rs`).

use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::jobs::Queue;
use crate::object_paths::is_intake_recording;

/// What the player shows: `available` (a signed URL comes with it),
/// `processing`, `failed` (the relay gave up on it) or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecordingStatus {
    /// Stored and linked: a signed URL can be minted.
    Available,
    /// On its way: matched but not stored yet, or its job is queued/running.
    Processing,
    /// Its newest job gave up (`last_error` says why; a DBA can requeue it).
    Failed,
    /// No recording is known for this intake.
    #[serde(rename = "none")]
    NoRecording,
}

impl RecordingStatus {
    /// `available` wins: a later job failing does not unplay a stored
    /// recording. A matched intake holds `recording_id` before its object is
    /// stored, which is what "processing" means without a live job.
    pub(crate) fn derive(object_path: bool, recording_id: bool, newest_job: Option<&str>) -> Self {
        match newest_job {
            _ if object_path => Self::Available,
            Some("failed") => Self::Failed,
            Some("pending" | "running") => Self::Processing,
            _ if recording_id => Self::Processing,
            _ => Self::NoRecording,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntakeRecording {
    pub status: RecordingStatus,
    /// The path to sign: set only when the intake's column equals the
    /// relay's record and has the own-folder form.
    pub object_path: Option<String>,
    pub duration_seconds: Option<i32>,
    /// The intake's column names an object the relay did not record for it
    /// (changed or set by hand, or an `unmatched/` object linked where it
    /// lay): answered as no recording, and worth a warning.
    pub(crate) refused_path: bool,
}

/// The intake's recording, or `None` when the intake does not exist or
/// belongs to another organization (the caller cannot tell which).
///
/// The organization is compared as text so the host may use uuid, text or
/// integer ids; the lookup itself goes by primary key.
pub async fn lookup(
    pool: &PgPool,
    intake: Uuid,
    organization: &str,
) -> Result<Option<IntakeRecording>, sqlx::Error> {
    let row = Queue::new(pool.clone())
        .intake_recording(intake, organization)
        .await?;
    Ok(row.map(|r| {
        let object_path = match (r.column_path.as_deref(), r.linked_path) {
            (Some(column), Some(linked))
                if column == linked && is_intake_recording(&linked, intake) =>
            {
                Some(linked)
            }
            _ => None,
        };
        let refused_path = r.column_path.is_some() && object_path.is_none();
        let status = if refused_path {
            RecordingStatus::NoRecording
        } else {
            RecordingStatus::derive(
                object_path.is_some(),
                r.has_recording_id,
                r.newest_job.as_deref(),
            )
        };
        IntakeRecording {
            status,
            object_path,
            duration_seconds: r.duration_seconds,
            refused_path,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn stored_beats_everything_and_failure_beats_a_dangling_claim() {
        use RecordingStatus::*;
        assert_eq!(
            RecordingStatus::derive(true, true, Some("failed")),
            Available
        );
        assert_eq!(RecordingStatus::derive(true, true, None), Available);
        assert_eq!(RecordingStatus::derive(false, true, Some("failed")), Failed);
        assert_eq!(
            RecordingStatus::derive(false, false, Some("failed")),
            Failed
        );
        assert_eq!(
            RecordingStatus::derive(false, false, Some("running")),
            Processing
        );
        assert_eq!(
            RecordingStatus::derive(false, false, Some("pending")),
            Processing
        );
        assert_eq!(RecordingStatus::derive(false, true, None), Processing);
        assert_eq!(
            RecordingStatus::derive(false, false, Some("cancelled")),
            NoRecording
        );
        assert_eq!(RecordingStatus::derive(false, false, None), NoRecording);
    }

    async fn intake(pool: &PgPool, org: Uuid) -> Uuid {
        sqlx::query_scalar("INSERT INTO public.intakes (organization_id) VALUES ($1) RETURNING id")
            .bind(org)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn job(pool: &PgPool, event: &str, intake: Uuid, state: &str, age_secs: i32) {
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, attempts,
                 last_error, finished_at, intake_id, matched_at, match_method, created_at)
             VALUES ($1, 'call.recording.saved', '{}', $3::recording_relay.recording_job_state,
                 CASE WHEN $3 = 'pending' THEN 0 ELSE 1 END,
                 CASE WHEN $3 = 'failed' THEN 'recording gone' END,
                 CASE WHEN $3 IN ('failed', 'succeeded') THEN now() END,
                 $2, now(), 'client_state', now() - make_interval(secs => $4))",
        )
        .bind(event)
        .bind(intake)
        .bind(state)
        .bind(f64::from(age_secs))
        .execute(pool)
        .await
        .unwrap();
    }

    #[sqlx::test(migrations = false)]
    async fn the_newest_job_decides_and_other_organizations_see_nothing(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
        let id = intake(&pool, org_a).await;
        let org = org_a.to_string();

        let got = lookup(&pool, id, &org).await.unwrap().unwrap();
        assert_eq!(got.status, RecordingStatus::NoRecording);
        assert_eq!(lookup(&pool, id, &org_b.to_string()).await.unwrap(), None);
        assert_eq!(lookup(&pool, Uuid::new_v4(), &org).await.unwrap(), None);

        job(&pool, "old", id, "failed", 60).await;
        job(&pool, "new", id, "pending", 1).await;
        let got = lookup(&pool, id, &org).await.unwrap().unwrap();
        assert_eq!(got.status, RecordingStatus::Processing);

        // Set by hand, in the own folder's form: not the relay's record.
        let path = format!("intakes/{id}/r.wav");
        sqlx::query(
            "UPDATE public.intakes SET recording_id = 'r', recording_object_path = $2,
                 recording_duration = 61 WHERE id = $1",
        )
        .bind(id)
        .bind(&path)
        .execute(&pool)
        .await
        .unwrap();
        let got = lookup(&pool, id, &org).await.unwrap().unwrap();
        assert_eq!(got.status, RecordingStatus::NoRecording);
        assert_eq!(got.object_path, None);
        assert!(got.refused_path);

        sqlx::query(
            "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path)
             VALUES ($1, 'r', $2)",
        )
        .bind(id)
        .bind(&path)
        .execute(&pool)
        .await
        .unwrap();
        let got = lookup(&pool, id, &org).await.unwrap().unwrap();
        assert_eq!(got.status, RecordingStatus::Available);
        assert_eq!(got.object_path.as_deref(), Some(path.as_str()));
        assert_eq!(got.duration_seconds, Some(61));
        assert!(!got.refused_path);
    }
}
