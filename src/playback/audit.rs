//! The playback access audit: every signed URL handed out is recorded
//! (who, which intake and object, from where) before the caller sees it.
//! The table is append-only (triggers refuse UPDATE and TRUNCATE; DELETE
//! only through the retention function).

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// One signed URL about to be handed out.
#[derive(Debug, Clone)]
pub struct Access<'a> {
    pub user_id: &'a str,
    pub organization: &'a str,
    pub intake_id: Uuid,
    pub object_path: &'a str,
    pub client_addr: IpAddr,
    pub user_agent: Option<&'a str>,
    pub expires_at: DateTime<Utc>,
}

/// One row of the audit, as `audit` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub user_id: String,
    pub organization: String,
    pub intake_id: Uuid,
    pub object_path: String,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// Whose accesses to list.
#[derive(Debug, Clone)]
pub enum Filter {
    Intake(Uuid),
    User(String),
}

/// User agents are the client's to choose: bounded, so one request cannot
/// write an arbitrarily large row.
const MAX_USER_AGENT: usize = 512;

pub async fn record(pool: &PgPool, access: &Access<'_>) -> Result<(), sqlx::Error> {
    let user_agent = access.user_agent.map(|ua| truncate(ua, MAX_USER_AGENT));
    sqlx::query(
        "INSERT INTO recording_relay.playback_audit
             (user_id, organization, intake_id, object_path, client_addr, user_agent, expires_at)
         VALUES ($1, $2, $3, $4, $5::inet, $6, $7)",
    )
    .bind(access.user_id)
    .bind(access.organization)
    .bind(access.intake_id)
    .bind(access.object_path)
    .bind(access.client_addr.to_string())
    .bind(user_agent)
    .bind(access.expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Newest first.
pub async fn list(pool: &PgPool, filter: &Filter, limit: i64) -> Result<Vec<Entry>, sqlx::Error> {
    let (intake, user) = match filter {
        Filter::Intake(id) => (Some(*id), None),
        Filter::User(sub) => (None, Some(sub.as_str())),
    };
    sqlx::query_as(
        "SELECT at, user_id, organization, intake_id, object_path,
                host(client_addr) AS client_addr, user_agent, expires_at
         FROM recording_relay.playback_audit
         WHERE ($1::uuid IS NULL OR intake_id = $1) AND ($2::text IS NULL OR user_id = $2)
         ORDER BY at DESC, id DESC
         LIMIT $3",
    )
    .bind(intake)
    .bind(user)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Deletes up to `batch` records older than `keep_for`; returns how many.
pub(crate) async fn prune(
    pool: &PgPool,
    keep_for: Duration,
    batch: i32,
) -> Result<u64, sqlx::Error> {
    let keep_for = sqlx::postgres::types::PgInterval::try_from(keep_for)
        .map_err(|e| sqlx::Error::Encode(e.to_string().into()))?;
    let deleted: i32 = sqlx::query_scalar("SELECT recording_relay.playback_audit_prune($1, $2)")
        .bind(keep_for)
        .bind(batch)
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(deleted).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn access(user: &str, intake: Uuid) -> Access<'_> {
        Access {
            user_id: user,
            organization: "org-a",
            intake_id: intake,
            object_path: "intakes/x/rec.wav",
            client_addr: "192.0.2.7".parse().unwrap(),
            user_agent: Some("Mozilla/5.0"),
            expires_at: Utc::now() + chrono::Duration::minutes(5),
        }
    }

    #[sqlx::test(migrations = false)]
    async fn accesses_are_listed_by_intake_and_by_user_newest_first(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
        record(&pool, &access("alice", one)).await.unwrap();
        record(&pool, &access("bob", one)).await.unwrap();
        record(&pool, &access("alice", two)).await.unwrap();

        let by_intake = list(&pool, &Filter::Intake(one), 50).await.unwrap();
        let users: Vec<&str> = by_intake.iter().map(|e| e.user_id.as_str()).collect();
        assert_eq!(users, ["bob", "alice"]);
        assert_eq!(by_intake[0].client_addr.as_deref(), Some("192.0.2.7"));
        assert_eq!(by_intake[0].user_agent.as_deref(), Some("Mozilla/5.0"));

        let by_user = list(&pool, &Filter::User("alice".into()), 50)
            .await
            .unwrap();
        let intakes: Vec<Uuid> = by_user.iter().map(|e| e.intake_id).collect();
        assert_eq!(intakes, [two, one]);
        assert_eq!(
            list(&pool, &Filter::User("alice".into()), 1)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[sqlx::test(migrations = false)]
    async fn the_audit_cannot_be_edited_and_only_retention_removes_rows(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let intake = Uuid::new_v4();
        record(&pool, &access("alice", intake)).await.unwrap();
        for sql in [
            "UPDATE recording_relay.playback_audit SET user_id = 'mallory'",
            "DELETE FROM recording_relay.playback_audit",
            "TRUNCATE recording_relay.playback_audit",
        ] {
            let err = sqlx::raw_sql(sql).execute(&pool).await.unwrap_err();
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        // Retention keeps what is younger than its period…
        assert_eq!(
            prune(&pool, Duration::from_secs(3600), 500).await.unwrap(),
            0
        );
        // …and removes what is older, in batches.
        sqlx::raw_sql(
            "ALTER TABLE recording_relay.playback_audit DISABLE TRIGGER playback_audit_no_update;
             UPDATE recording_relay.playback_audit SET at = now() - interval '2 hours';
             ALTER TABLE recording_relay.playback_audit ENABLE TRIGGER playback_audit_no_update;",
        )
        .execute(&pool)
        .await
        .unwrap();
        record(&pool, &access("bob", intake)).await.unwrap();
        assert_eq!(
            prune(&pool, Duration::from_secs(3600), 500).await.unwrap(),
            1
        );
        let left = list(&pool, &Filter::Intake(intake), 50).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].user_id, "bob");
        // The setting that lets retention delete does not outlive its call.
        let err = sqlx::raw_sql("DELETE FROM recording_relay.playback_audit")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }

    #[test]
    fn long_user_agents_are_cut_on_a_character_boundary() {
        let ua = "é".repeat(400);
        let cut = truncate(&ua, MAX_USER_AGENT);
        assert!(cut.len() <= MAX_USER_AGENT);
        assert!(ua.starts_with(cut));
    }
}
