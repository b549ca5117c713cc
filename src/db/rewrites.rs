//! What the runner adds to landed migrations before running them (their
//! files cannot change: they are checksummed): the locks on busy host
//! tables taken first with a short timeout, and what a migration created in
//! `public` closed to the API roles in the same transaction.

use sqlx::migrate::Migration;
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// Landed migrations that lock tables other applications use all the time,
/// with those tables. Their own SQL cannot change (it is checksummed) and
/// waits up to 5 s for its locks, while every other query on the table
/// queues behind the waiting lock. So the runner takes the locks first,
/// with a short timeout, in the migration's own transaction; `migrate`
/// retries with backoff when they are busy. The history keeps the file's
/// checksum. Later migrations take their own short `lock_timeout`.
const LOCK_FIRST: [(i64, &[&str]); 3] = [
    (20261125000001, &["public.intakes"]),
    (20261125000007, &["storage.objects"]),
    // The job table itself: webhooks must not queue past Telnyx's 2 s.
    (20261201000001, &["public.recording_jobs"]),
];

/// A lock wait on a busy host table stays below this; queries queued behind
/// a migration's lock request wait no longer.
pub(crate) const HOST_LOCK_TIMEOUT: &str = "500ms";

pub(super) fn lock_host_tables_briefly(mut migration: Migration) -> Migration {
    let Some((_, tables)) = LOCK_FIRST.iter().find(|(v, _)| *v == migration.version) else {
        return migration;
    };
    let locks: String = tables
        .iter()
        .map(|t| {
            format!(
                "IF to_regclass('{t}') IS NOT NULL THEN \
                 BEGIN LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; \
                 EXCEPTION WHEN insufficient_privilege THEN NULL; END; END IF;"
            )
        })
        .collect();
    let prelude = format!(
        "SET LOCAL lock_timeout = '{HOST_LOCK_TIMEOUT}';\nDO $lock_first$ BEGIN {locks} END $lock_first$;\n"
    );
    migration.sql = AssertSqlSafe(format!("{prelude}{}", migration.sql.as_str())).into_sql_str();
    migration
}

/// The last migration that created relay objects in `public`; the next
/// one moves them into the relay schema and closes them.
const LAST_MIGRATION_IN_PUBLIC: i64 = 20261125000008;

/// Closes, in the same transaction, what a landed migration created in
/// `public` to Supabase's API roles (and functions to PUBLIC): a `migrate`
/// that stops between it and the move into the relay schema (an INVALID
/// index, a lock that stayed busy) must not leave jobs readable with the
/// anon key until someone notices. The phone key and the bucket name stay
/// executable: ZScribe's users run them (see the relay-schema migration).
const CLOSE_PUBLIC_OBJECTS: &str = r#"
DO $close_to_api_roles$
DECLARE
    api_role TEXT;
    object RECORD;
BEGIN
    FOR object IN
        SELECT c.oid::regclass::text AS name, c.relkind = 'S' AS is_sequence
        FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'v', 'S')
          AND (c.relname LIKE 'recording\_jobs%' OR c.relname LIKE 'webhook\_quarantine%')
    LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM PUBLIC',
                       CASE WHEN object.is_sequence THEN 'SEQUENCE' ELSE 'TABLE' END, object.name);
        FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
            CONTINUE WHEN to_regrole(api_role) IS NULL;
            EXECUTE format('REVOKE ALL ON %s %s FROM %I',
                           CASE WHEN object.is_sequence THEN 'SEQUENCE' ELSE 'TABLE' END,
                           object.name, api_role);
        END LOOP;
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure::text AS name
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'recording\_jobs\_%'
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', object.name);
        FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
            CONTINUE WHEN to_regrole(api_role) IS NULL;
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', object.name, api_role);
        END LOOP;
    END LOOP;
END
$close_to_api_roles$;
"#;

pub(super) fn close_to_api_roles_at_once(mut migration: Migration) -> Migration {
    if migration.no_tx || migration.version > LAST_MIGRATION_IN_PUBLIC {
        return migration;
    }
    migration.sql = AssertSqlSafe(format!(
        "{}\n{CLOSE_PUBLIC_OBJECTS}",
        migration.sql.as_str()
    ))
    .into_sql_str();
    migration
}
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::PgPool;

    use crate::db::{ensure_migrated, migrate};

    /// A transaction of ZScribe's holds `intakes` for 8 s while `migrate`
    /// runs: every other query on `intakes` still answers within 1 s (the
    /// migration's lock request waits at most 500 ms before it steps back),
    /// and `migrate` succeeds once the transaction ends.
    #[sqlx::test(migrations = false)]
    async fn migrate_never_makes_intakes_wait_behind_it(pool: PgPool) {
        crate::testing::create_host_schema(&pool).await.unwrap();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT count(*) FROM public.intakes")
            .execute(&mut *holder)
            .await
            .unwrap();
        let migrating = tokio::spawn({
            let pool = pool.clone();
            async move { migrate(&pool).await }
        });
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut probes = 0;
        while started.elapsed() < Duration::from_secs(8) {
            let asked = Instant::now();
            sqlx::query("SELECT count(*) FROM public.intakes")
                .execute(&pool)
                .await
                .unwrap();
            slowest = slowest.max(asked.elapsed());
            probes += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !migrating.is_finished(),
            "migrate cannot finish while intakes is held"
        );
        holder.commit().await.unwrap();
        migrating.await.unwrap().unwrap();
        assert!(probes > 20, "only {probes} probes ran");
        assert!(
            slowest < Duration::from_secs(1),
            "a query on intakes waited {slowest:?} behind the migration"
        );
        ensure_migrated(&pool).await.unwrap();
    }
}
