//! Applying the migrations (`recording-relay migrate`) and refusing to run
//! against a schema that is not this binary's: the history in the relay's
//! schema (carried over once from `public`), landed migrations pinned, relay
//! tables back in `public` refused, indexes repaired and checked.

use std::sync::LazyLock;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};
use tracing::{info, warn};

use super::known_edits::{carry_known_edits, incompatible_because, ran_first_version};
use super::rewrites::{close_to_api_roles_at_once, lock_host_tables_briefly};
use super::{DbError, SCHEMA, indexes};

/// sqlx's history table, in the relay's schema rather than `public`, where
/// the API roles could read and write it and any other sqlx user of the
/// database would share it.
const HISTORY_TABLE: &str = "recording_relay._sqlx_migrations";

/// The daemon's migrations, embedded in the binary, with their history in
/// the relay's schema.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(HISTORY_TABLE);
    migrator.create_schema(SCHEMA);
    migrator.migrations = migrator
        .migrations
        .iter()
        .cloned()
        .map(lock_host_tables_briefly)
        .map(close_to_api_roles_at_once)
        .collect::<Vec<_>>()
        .into();
    migrator
});

/// How long `migrate` keeps retrying a migration that could not get its
/// locks within their short timeout.
pub(crate) const MIGRATE_LOCK_PATIENCE: Duration = Duration::from_secs(120);

fn is_lock_timeout(e: &MigrateError) -> bool {
    let sql_error = match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => e,
        _ => return false,
    };
    matches!(sql_error, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Applies the migrations on one connection of `pool`.
///
/// One connection throughout: sqlx holds a session-level advisory lock for
/// a run and does not release it when a migration fails, so a retry on
/// another connection of the pool would wait for that lock forever. After a
/// failed attempt the lock is released explicitly.
///
/// Returns the migrations it applied (`{version}_{name}`, as their files
/// are named), none when the schema was up to date.
pub async fn migrate(pool: &PgPool) -> Result<Vec<String>, DbError> {
    let mut conn = pool.acquire().await?;
    carry_over_history(&mut conn).await?;
    refuse_relay_objects_in_public(&mut conn).await?;
    carry_known_edits(&mut conn).await?;
    let before = applied_versions(&mut conn).await?;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(4))
        .with_jitter()
        .with_total_delay(Some(MIGRATE_LOCK_PATIENCE))
        .without_max_times()
        .build();
    loop {
        let outcome = MIGRATOR.run_direct(None, &mut *conn, false).await;
        if outcome.is_err() {
            sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(&mut *conn)
                .await?;
        }
        match outcome {
            Ok(()) => break,
            Err(e) if is_lock_timeout(&e) => match delays.next() {
                Some(delay) => {
                    warn!(error = %e, retry_in = ?delay, "a table is busy; migration retries");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(explain(e)),
            },
            Err(e) => return Err(explain(e)),
        }
    }
    indexes::repair(&mut conn).await?;
    info!(
        migrations = MIGRATOR.iter().count(),
        "database schema is up to date"
    );
    Ok(MIGRATOR
        .iter()
        .filter(|m| !before.contains(&m.version))
        .map(file_stem)
        .collect())
}

async fn applied_versions(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, DbError> {
    match sqlx::query_scalar(
        "SELECT version FROM recording_relay._sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await
    {
        Ok(versions) => Ok(versions),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// `20261125000001_recording_jobs`: the file's name without `.sql` (sqlx
/// keeps the name with spaces for underscores).
fn file_stem(m: &sqlx::migrate::Migration) -> String {
    format!("{}_{}", m.version, m.description.replace(' ', "_"))
}

/// A refusal from the server while a migration ran, as one message: the
/// migration's file, the server's message and its hint (or ours, for the
/// owner of `intakes`). Other failures keep sqlx's error.
fn explain(e: MigrateError) -> DbError {
    let MigrateError::ExecuteMigration(sqlx::Error::Database(db), version) = &e else {
        return e.into();
    };
    let file = MIGRATOR.iter().find(|m| m.version == *version).map_or_else(
        || version.to_string(),
        |m| format!("migrations/{}.sql", file_stem(m)),
    );
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
    let mut hint = pg.and_then(|pg| pg.hint()).map(str::to_owned);
    if db.code().as_deref() == Some("42501") && db.message().contains("must be owner") {
        hint = Some(
            "migrate adds columns and indexes to ZScribe's intakes (and patients): connect as the \
             role that owns them (on Supabase, postgres), see the README's \"The database role\""
                .to_owned(),
        );
    }
    DbError::MigrationRefused {
        file,
        message: db.message().to_owned(),
        hint,
    }
}

/// The relay's tables in `public` next to the relay schema mean an older
/// release ran after this one (a rollback re-creates them there, open to the
/// API roles again). Refused rather than guessed at: which copy holds the
/// truth is a DBA's decision (README, "Deploying on Supabase").
async fn refuse_relay_objects_in_public(conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    let (moved, in_public): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('recording_relay.recording_jobs') IS NOT NULL,
                to_regclass('public.recording_jobs') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if moved && in_public {
        return Err(DbError::RelayObjectsInPublic);
    }
    Ok(())
}

/// Moves this project's rows of sqlx's history from `public._sqlx_migrations`
/// (where releases before the relay schema kept it) to [`HISTORY_TABLE`],
/// once. Another sqlx user's rows stay where they are; the old table is
/// dropped only when nothing is left in it.
async fn carry_over_history(conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('recording_relay history carry-over'))")
        .execute(&mut *tx)
        .await?;
    let (old, new): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('public._sqlx_migrations') IS NOT NULL,
                to_regclass('recording_relay._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !old || new {
        return Ok(());
    }
    let ours: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS recording_relay;
         CREATE TABLE recording_relay._sqlx_migrations (LIKE public._sqlx_migrations INCLUDING ALL);",
    )
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(
        "WITH moved AS (DELETE FROM public._sqlx_migrations WHERE version = ANY($1) RETURNING *)
         INSERT INTO recording_relay._sqlx_migrations SELECT * FROM moved",
    )
    .bind(&ours)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations")
        .fetch_one(&mut *tx)
        .await?;
    if left == 0 {
        sqlx::raw_sql("DROP TABLE public._sqlx_migrations")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    info!(
        moved,
        left_for_others = left,
        "migration history moved into the recording_relay schema"
    );
    Ok(())
}

/// Refuses to run against a schema older than this binary, or one whose
/// applied migrations are not this binary's (an edited landed migration).
pub async fn ensure_migrated(pool: &PgPool) -> Result<(), DbError> {
    let applied: Vec<(i64, Vec<u8>)> = match sqlx::query_as(
        "SELECT version, checksum FROM recording_relay._sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut missing = Vec::new();
    let mut differing = Vec::new();
    let mut before_edit = Vec::new();
    for migration in MIGRATOR.iter() {
        match applied.iter().find(|(v, _)| *v == migration.version) {
            None => missing.push(migration.version.to_string()),
            Some((_, checksum)) if *checksum != *migration.checksum => {
                match ran_first_version(migration.version, checksum) {
                    Some(edit) if edit.compatible => before_edit.push(edit.version.to_string()),
                    Some(edit) => {
                        return Err(DbError::IncompatibleEdit(
                            edit.version,
                            incompatible_because(edit.version),
                        ));
                    }
                    None => differing.push(migration.version.to_string()),
                }
            }
            Some(_) => {}
        }
    }
    if !differing.is_empty() {
        return Err(DbError::ChecksumMismatch(differing.join(", ")));
    }
    if !before_edit.is_empty() {
        return Err(DbError::BeforeKnownEdit(before_edit.join(", ")));
    }
    if !missing.is_empty() {
        return Err(DbError::NotMigrated(missing.join(", ")));
    }
    refuse_relay_objects_in_public(&mut *pool.acquire().await?).await?;
    indexes::ensure_usable(pool).await
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Every landed migration's checksum, as it first landed. Adding a
    /// migration adds its line; no line ever changes.
    const LANDED: &str = include_str!("../../tests/landed_migrations.txt");

    pub(in crate::db) fn landed() -> Vec<(i64, &'static str)> {
        LANDED
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (version, sum) = l.split_once(' ').expect("`VERSION SHA384` per line");
                (version.parse().expect("a version number"), sum.trim())
            })
            .collect()
    }

    #[test]
    fn landed_migrations_are_never_edited_and_new_ones_are_pinned() {
        let pinned = landed();
        for (version, sum) in &pinned {
            let migration = MIGRATOR
                .iter()
                .find(|m| m.version == *version)
                .unwrap_or_else(|| panic!("landed migration {version} was removed"));
            assert_eq!(
                hex::encode(&migration.checksum),
                *sum,
                "migration {version} was edited after it landed: put the change in a new migration"
            );
        }
        for migration in MIGRATOR.iter() {
            assert!(
                pinned.iter().any(|(v, _)| *v == migration.version),
                "new migration {} is not pinned: add `{} {}` to tests/landed_migrations.txt",
                migration.version,
                migration.version,
                hex::encode(&migration.checksum)
            );
        }
    }

    /// Runs scripts/check-migration-history of a clone of this repository.
    fn history_check(clone: &std::path::Path) -> std::process::Output {
        std::process::Command::new(clone.join("scripts/check-migration-history"))
            .output()
            .expect("run scripts/check-migration-history")
    }

    fn git(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What `2a4bfbe` did: a landed migration edited and its pin rewritten
    /// in one commit. The pin test passes on that tree; the history does not.
    #[test]
    fn an_edit_committed_with_its_new_pin_fails_the_history_check() {
        let temp = tempfile::tempdir().unwrap();
        let clone = temp.path().join("clone");
        let here = env!("CARGO_MANIFEST_DIR");
        git(
            temp.path(),
            &["clone", "--quiet", "--no-local", here, "clone"],
        );
        let out = history_check(&clone);
        assert!(
            out.status.success(),
            "the committed tree passes: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let file = clone.join("migrations/20261201000302_retention_alerted.sql");
        let mut sql = std::fs::read(&file).unwrap();
        sql.extend_from_slice(b"-- a comment is an edit too\n");
        std::fs::write(&file, &sql).unwrap();
        let pins = clone.join("tests/landed_migrations.txt");
        use sha2::Digest as _;
        let new_sum = hex::encode(sha2::Sha384::digest(&sql));
        let repinned: String = std::fs::read_to_string(&pins)
            .unwrap()
            .lines()
            .map(|l| match l.split_once(' ') {
                Some(("20261201000302", _)) => format!("20261201000302 {new_sum}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&pins, repinned).unwrap();
        git(
            &clone,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qam",
                "edit",
            ],
        );
        let out = history_check(&clone);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "an edit with its pin passed");
        assert!(
            stderr.contains("migrations/20261201000302_retention_alerted.sql differs"),
            "{stderr}"
        );

        // A shallow clone cannot show the first versions: it fails, loudly.
        let shallow = temp.path().join("shallow");
        git(
            temp.path(),
            &[
                "clone",
                "--quiet",
                "--depth",
                "1",
                &format!("file://{here}"),
                "shallow",
            ],
        );
        let out = history_check(&shallow);
        assert!(!out.status.success(), "a shallow clone passed");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("shallow clone"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[sqlx::test(migrations = false)]
    async fn an_edited_applied_migration_stops_the_daemon(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        ensure_migrated(&pool).await.unwrap();
        sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = '\\x00'::bytea
             WHERE version = 20261125000006",
        )
        .execute(&pool)
        .await
        .unwrap();
        let err = ensure_migrated(&pool).await.unwrap_err();
        assert!(
            matches!(&err, DbError::ChecksumMismatch(v) if v == "20261125000006"),
            "{err}"
        );
    }

    /// An older release migrating after this one (a rollback) re-creates
    /// the job table in public, open to the API roles: refused, loudly.
    #[sqlx::test(migrations = false)]
    async fn relay_tables_back_in_public_are_refused(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        sqlx::raw_sql("CREATE TABLE public.recording_jobs (id BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        for err in [
            ensure_migrated(&pool).await.unwrap_err(),
            migrate(&pool).await.unwrap_err(),
        ] {
            assert!(matches!(err, DbError::RelayObjectsInPublic), "{err}");
        }
    }

    /// Told once, with the migration's file and hint, never the line of
    /// PostgreSQL's C source sqlx appends.
    fn assert_told_once(err: &DbError, message: &str, hint: &str) {
        let text = err.to_string();
        assert!(
            text.starts_with("migration migrations/20261125000001_recording_jobs.sql failed: ")
                && text.contains(message)
                && text.contains(hint),
            "{text}"
        );
        assert_eq!(text.matches(message).count(), 1, "{text}");
        assert!(!text.contains(" at line "), "{text}");
        assert!(std::error::Error::source(err).is_none(), "{err:?}");
        assert!(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations/20261125000001_recording_jobs.sql")
                .exists()
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_database_without_intakes_gets_one_error_naming_the_file_with_its_hint(pool: PgPool) {
        let err = migrate(&pool).await.unwrap_err();
        assert_told_once(
            &err,
            "table \"intakes\" not found",
            "hint: recording-relay extends ZScribe's intakes table",
        );
    }

    #[sqlx::test(migrations = false)]
    async fn a_role_that_does_not_own_intakes_is_told_to_migrate_as_its_owner(pool: PgPool) {
        crate::testing::create_host_schema(&pool).await.unwrap();
        let role = format!("rr_not_owner_{}", uuid::Uuid::new_v4().simple());
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE \"{database}\" TO {role};
             GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let as_role = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone().username(&role))
            .await
            .unwrap();
        let outcome = migrate(&as_role).await;
        as_role.close().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP OWNED BY {role}; DROP ROLE {role};"
        )))
        .execute(&pool)
        .await
        .unwrap();
        assert_told_once(
            &outcome.unwrap_err(),
            "must be owner of table intakes",
            "connect as the role that owns them",
        );
    }

    #[sqlx::test(migrations = false)]
    async fn migrate_says_which_migrations_it_applied(pool: PgPool) {
        crate::testing::create_host_schema(&pool).await.unwrap();
        let applied = migrate(&pool).await.unwrap();
        assert_eq!(applied.len(), MIGRATOR.iter().count());
        assert_eq!(applied[0], "20261125000001_recording_jobs");
        for name in &applied {
            let file = format!("{}/migrations/{name}.sql", env!("CARGO_MANIFEST_DIR"));
            assert!(std::path::Path::new(&file).exists(), "{file}");
        }
        assert_eq!(migrate(&pool).await.unwrap(), Vec::<String>::new());
    }

    #[sqlx::test(migrations = false)]
    async fn the_history_moves_out_of_public_once_and_leaves_others_rows(pool: PgPool) {
        crate::testing::create_host_schema(&pool).await.unwrap();
        // A database migrated by a release that kept the history in public,
        // shared with another sqlx user.
        let mut old = sqlx::migrate!("./migrations");
        old.migrations = old
            .migrations
            .iter()
            .filter(|m| m.version <= 20261125000008)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        old.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO public._sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (1, 'someone else', true, '\\x01', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();

        migrate(&pool).await.unwrap();
        migrate(&pool).await.unwrap();
        let ours: i64 = sqlx::query_scalar("SELECT count(*) FROM recording_relay._sqlx_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(ours, MIGRATOR.iter().count() as i64);
        let theirs: Vec<i64> = sqlx::query_scalar("SELECT version FROM public._sqlx_migrations")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(theirs, vec![1]);
        ensure_migrated(&pool).await.unwrap();
        let moved: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('recording_relay.recording_jobs')::text")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(moved.as_deref(), Some("recording_relay.recording_jobs"));
    }
}
