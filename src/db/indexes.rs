//! The indexes the migrations create, by name and definition, in one place:
//! start-up refuses to run while one is missing or INVALID, and `migrate`
//! builds the missing ones and rebuilds the INVALID ones, so the advice it
//! gives ("run `recording-relay migrate`") is true.
//!
//! An interrupted `CREATE INDEX CONCURRENTLY` leaves an INVALID index that
//! the migration's `IF NOT EXISTS` then skips; a dropped one is simply gone,
//! and a migration already recorded as applied never runs again. Either way
//! a unique one would enforce nothing and the others make a hot query a
//! scan. Constraint-backed indexes (primary keys, `UNIQUE` columns) are not
//! listed: they exist as long as their constraint does.

use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tracing::{info, warn};

use super::DbError;

/// Each index as `pg_get_indexdef` prints it on a migrated database (a
/// test compares this list with one, so it cannot drift). `migrate` builds
/// one from its definition with `CONCURRENTLY`, as the migrations did, so
/// neither the listener's inserts nor ZScribe's writes to `intakes` wait.
pub(crate) const EXPECTED: [(&str, &str); 20] = [
    (
        "calls_received_idx",
        "CREATE INDEX calls_received_idx ON recording_relay.calls USING btree (received_at)",
    ),
    (
        "calls_unsettled_idx",
        "CREATE INDEX calls_unsettled_idx ON recording_relay.calls USING btree (received_at) WHERE ((recording_found_at IS NULL) AND (recording_missing_at IS NULL))",
    ),
    (
        "idx_intakes_recording_id",
        "CREATE INDEX idx_intakes_recording_id ON public.intakes USING btree (recording_id)",
    ),
    (
        "idx_intakes_recording_object_path",
        "CREATE UNIQUE INDEX idx_intakes_recording_object_path ON public.intakes USING btree (recording_object_path) WHERE (recording_object_path IS NOT NULL)",
    ),
    (
        "idx_patients_recording_relay_phone_key",
        "CREATE INDEX idx_patients_recording_relay_phone_key ON public.patients USING btree (recording_relay.recording_relay_phone_key(phone))",
    ),
    (
        "playback_audit_at_idx",
        "CREATE INDEX playback_audit_at_idx ON recording_relay.playback_audit USING btree (at)",
    ),
    (
        "playback_audit_intake_idx",
        "CREATE INDEX playback_audit_intake_idx ON recording_relay.playback_audit USING btree (intake_id, at DESC)",
    ),
    (
        "playback_audit_user_idx",
        "CREATE INDEX playback_audit_user_idx ON recording_relay.playback_audit USING btree (user_id, at DESC)",
    ),
    (
        "recording_jobs_alert_due_idx",
        "CREATE INDEX recording_jobs_alert_due_idx ON recording_relay.recording_jobs USING btree (alert_due_at) WHERE (alert_due_at IS NOT NULL)",
    ),
    (
        "recording_jobs_by_state_idx",
        "CREATE INDEX recording_jobs_by_state_idx ON recording_relay.recording_jobs USING btree (state)",
    ),
    (
        "recording_jobs_call_session_idx",
        "CREATE INDEX recording_jobs_call_session_idx ON recording_relay.recording_jobs USING btree (call_session_id) WHERE (call_session_id IS NOT NULL)",
    ),
    (
        "recording_jobs_claim_idx",
        "CREATE INDEX recording_jobs_claim_idx ON recording_relay.recording_jobs USING btree (next_run_at, id) WHERE (state = 'pending'::recording_relay.recording_job_state)",
    ),
    (
        "recording_jobs_finished_idx",
        "CREATE INDEX recording_jobs_finished_idx ON recording_relay.recording_jobs USING btree (finished_at) WHERE (state = ANY (ARRAY['succeeded'::recording_relay.recording_job_state, 'duplicate'::recording_relay.recording_job_state, 'cancelled'::recording_relay.recording_job_state, 'failed'::recording_relay.recording_job_state]))",
    ),
    (
        "recording_jobs_from_number_key_idx",
        "CREATE INDEX recording_jobs_from_number_key_idx ON recording_relay.recording_jobs USING btree (recording_relay.recording_relay_phone_key(from_number)) WHERE (state <> 'duplicate'::recording_relay.recording_job_state)",
    ),
    (
        "recording_jobs_intake_idx",
        "CREATE INDEX recording_jobs_intake_idx ON recording_relay.recording_jobs USING btree (intake_id) WHERE (intake_id IS NOT NULL)",
    ),
    (
        "recording_jobs_lease_idx",
        "CREATE INDEX recording_jobs_lease_idx ON recording_relay.recording_jobs USING btree (locked_until) WHERE (state = 'running'::recording_relay.recording_job_state)",
    ),
    (
        "recording_jobs_object_path_key",
        "CREATE UNIQUE INDEX recording_jobs_object_path_key ON recording_relay.recording_jobs USING btree (object_path) WHERE (object_path IS NOT NULL)",
    ),
    (
        "recording_jobs_recording_id_key",
        "CREATE UNIQUE INDEX recording_jobs_recording_id_key ON recording_relay.recording_jobs USING btree (recording_id) WHERE ((recording_id IS NOT NULL) AND (state <> 'duplicate'::recording_relay.recording_job_state))",
    ),
    (
        "recording_jobs_telnyx_delete_due_idx",
        "CREATE INDEX recording_jobs_telnyx_delete_due_idx ON recording_relay.recording_jobs USING btree (telnyx_delete_due_at) WHERE (telnyx_delete_due_at IS NOT NULL)",
    ),
    (
        "recording_jobs_to_number_key_idx",
        "CREATE INDEX recording_jobs_to_number_key_idx ON recording_relay.recording_jobs USING btree (recording_relay.recording_relay_phone_key(to_number)) WHERE (state <> 'duplicate'::recording_relay.recording_job_state)",
    ),
];

/// Expected indexes that are not usable, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Unusable {
    pub(crate) missing: Vec<&'static str>,
    pub(crate) invalid: Vec<&'static str>,
}

impl Unusable {
    pub(crate) fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.invalid.is_empty()
    }

    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing: {}", self.missing.join(", ")));
        }
        if !self.invalid.is_empty() {
            parts.push(format!("INVALID: {}", self.invalid.join(", ")));
        }
        parts.join("; ")
    }
}

/// Which expected indexes are missing or INVALID. Looked up by schema and
/// name, so an index of the same name elsewhere does not count.
pub(crate) async fn unusable(conn: &mut PgConnection) -> Result<Unusable, DbError> {
    let found: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid
         FROM pg_catalog.pg_index i
         JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace IN ('public'::regnamespace, 'recording_relay'::regnamespace)
           AND c.relname = ANY($1)",
    )
    .bind(EXPECTED.map(|(name, _)| name).as_slice())
    .fetch_all(&mut *conn)
    .await?;
    let mut unusable = Unusable::default();
    for (name, _) in EXPECTED {
        match found.iter().find(|(n, _)| n == name) {
            None => unusable.missing.push(name),
            Some((_, false)) => unusable.invalid.push(name),
            Some((_, true)) => {}
        }
    }
    Ok(unusable)
}

/// Start-up: refuses while an expected index is missing or INVALID.
pub(crate) async fn ensure_usable(pool: &PgPool) -> Result<(), DbError> {
    let unusable = unusable(&mut *pool.acquire().await?).await?;
    if unusable.is_empty() {
        Ok(())
    } else {
        Err(DbError::UnusableIndexes(unusable.describe()))
    }
}

/// `migrate`, after the migrations: drops each INVALID expected index and
/// builds each missing one from its definition, concurrently (outside a
/// transaction, on `conn`). A unique index that cannot be built (duplicate
/// rows) fails `migrate` with PostgreSQL's error, which names the key.
pub(crate) async fn repair(conn: &mut PgConnection) -> Result<(), DbError> {
    let unusable = unusable(&mut *conn).await?;
    if unusable.is_empty() {
        return Ok(());
    }
    warn!(indexes = %unusable.describe(), "rebuilding expected indexes");
    for name in &unusable.invalid {
        let schema = schema_of(name);
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {schema}.{name}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    for name in unusable.invalid.iter().chain(&unusable.missing) {
        sqlx::raw_sql(AssertSqlSafe(concurrently(definition(name))))
            .execute(&mut *conn)
            .await?;
        info!(index = name, "index built");
    }
    Ok(())
}

fn definition(name: &str) -> &'static str {
    EXPECTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .unwrap_or_default()
}

/// The schema an expected index lives in, from its definition.
fn schema_of(name: &str) -> &'static str {
    if definition(name).contains(" ON public.") {
        "public"
    } else {
        "recording_relay"
    }
}

/// `CREATE [UNIQUE] INDEX name …` as `CREATE [UNIQUE] INDEX CONCURRENTLY
/// IF NOT EXISTS name …`.
fn concurrently(definition: &str) -> String {
    definition.replacen(" INDEX ", " INDEX CONCURRENTLY IF NOT EXISTS ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_is_built_concurrently_and_only_once() {
        assert_eq!(
            concurrently("CREATE UNIQUE INDEX a ON public.t USING btree (x)"),
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS a ON public.t USING btree (x)"
        );
        assert_eq!(schema_of("idx_intakes_recording_id"), "public");
        assert_eq!(schema_of("recording_jobs_claim_idx"), "recording_relay");
    }

    async fn indexdefs(pool: &PgPool) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT x.indexname::text, x.indexdef
             FROM pg_catalog.pg_indexes x
             JOIN pg_catalog.pg_class c
               ON c.relname = x.indexname AND c.relnamespace = x.schemaname::regnamespace
             WHERE x.schemaname IN ('public', 'recording_relay')
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conindid = c.oid)
             ORDER BY x.indexname::text COLLATE \"C\"",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    }

    /// The list is what the migrations make: every index of a freshly
    /// migrated database that no constraint owns, with its definition.
    #[sqlx::test(migrations = false)]
    async fn the_expected_indexes_are_the_ones_the_migrations_create(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        let expected: Vec<(String, String)> = EXPECTED
            .iter()
            .map(|(n, d)| ((*n).to_owned(), (*d).to_owned()))
            .collect();
        assert_eq!(indexdefs(&pool).await, expected);
    }

    /// The start-up advice, followed: a dropped index and one left INVALID
    /// (as an interrupted concurrent build leaves it) stop the daemon, and
    /// `migrate` makes both valid again, with their own definitions.
    #[sqlx::test(migrations = false)]
    async fn a_missing_or_invalid_index_stops_the_daemon_until_migrate_rebuilds_it(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        let before = indexdefs(&pool).await;
        sqlx::raw_sql(
            "DROP INDEX public.idx_intakes_recording_object_path;
             UPDATE pg_catalog.pg_index SET indisvalid = false
             WHERE indexrelid = 'recording_relay.recording_jobs_recording_id_key'::regclass;",
        )
        .execute(&pool)
        .await
        .unwrap();
        let err = crate::db::ensure_migrated(&pool).await.unwrap_err();
        assert!(
            matches!(&err, DbError::UnusableIndexes(d)
                if d == "missing: idx_intakes_recording_object_path; \
                         INVALID: recording_jobs_recording_id_key"),
            "{err}"
        );
        assert!(
            err.to_string().contains("run `recording-relay migrate`"),
            "{err}"
        );

        crate::db::migrate(&pool).await.unwrap();
        crate::db::ensure_migrated(&pool).await.unwrap();
        assert_eq!(indexdefs(&pool).await, before);
    }
}
