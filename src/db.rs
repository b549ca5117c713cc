//! Connecting to PostgreSQL and applying the schema.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tracing::{info, warn};

use crate::config::Config;

/// The daemon's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Creates the stand-in `patients`/`intakes` tables (tests and the demo only).
pub const DEMO_HOST_SCHEMA: &str = include_str!("host_schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Unreachable(sqlx::Error),
    #[error("migrations are not applied (missing: {0}); run `recording-relay migrate`")]
    NotMigrated(String),
    #[error(
        "index(es) {0} are INVALID (an interrupted CREATE INDEX CONCURRENTLY): \
         DROP INDEX CONCURRENTLY each, then run `recording-relay migrate` again"
    )]
    InvalidIndexes(String),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A pooled connection idle for less than this is handed out without a
/// ping first (see [`pool`]).
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Builds the pool. Connections are opened on demand, so a listener starts
/// (and answers 503) while the database is down rather than refusing to run.
///
/// sqlx pings every connection before handing it out by default: a round
/// trip in front of every statement, a third of a webhook's. Here only a
/// connection that sat idle for [`PING_IF_IDLE_FOR`] is pinged (it may have
/// died unnoticed); a busier one answered a moment ago, and sqlx pings it
/// on release anyway, closing it if that fails.
pub fn pool(config: &Config) -> Result<PgPool, DbError> {
    // No statement of the daemon runs long; one stuck on a lock should fail
    // (and be retried) rather than hold a worker or a webhook.
    let options =
        connect_options(config)?.options([("statement_timeout", "30s"), ("lock_timeout", "10s")]);
    Ok(PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(config.database.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// For `migrate`: no statement timeout, since building an index on a large
/// host table may take minutes (the migrations bound their own lock waits).
pub fn migration_pool(config: &Config) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(connect_options(config)?))
}

fn connect_options(config: &Config) -> Result<PgConnectOptions, DbError> {
    let url = config.database_url().unwrap_or_default();
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    Ok(options
        .application_name("recording-relay")
        // Statement logging would print phone numbers bound as parameters.
        .disable_statement_logging())
}

/// Waits (bounded) for the database at start-up, so a daemon started
/// together with PostgreSQL does not crash-loop.
pub async fn wait_until_reachable(pool: &PgPool, patience: Duration) -> Result<(), DbError> {
    let ping = || async { sqlx::query("SELECT 1").execute(pool).await.map(|_| ()) };
    ping.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_total_delay(Some(patience))
            .without_max_times(),
    )
    .notify(|e, next| warn!(error = %e, retry_in = ?next, "database not reachable yet"))
    .await
    .map_err(DbError::Unreachable)
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    info!(
        migrations = MIGRATOR.iter().count(),
        "database schema is up to date"
    );
    Ok(())
}

/// Refuses to run against a schema older than this binary.
pub async fn ensure_migrated(pool: &PgPool) -> Result<(), DbError> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| m.version.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(DbError::NotMigrated(missing.join(", ")));
    }
    ensure_indexes_valid(pool).await
}

/// An interrupted `CREATE INDEX CONCURRENTLY` leaves an INVALID index that a
/// later `IF NOT EXISTS` skips; the unique ones would then enforce nothing.
async fn ensure_indexes_valid(pool: &PgPool) -> Result<(), DbError> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE NOT i.indisvalid
           AND c.relname IN ('idx_intakes_recording_id', 'idx_intakes_recording_object_path',
                             'idx_patients_recording_relay_phone_key')",
    )
    .fetch_all(pool)
    .await?;
    if invalid.is_empty() {
        Ok(())
    } else {
        Err(DbError::InvalidIndexes(invalid.join(", ")))
    }
}

pub async fn create_demo_host_schema(pool: &PgPool) -> Result<(), DbError> {
    sqlx::raw_sql(DEMO_HOST_SCHEMA).execute(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn backend_pid(pool: &PgPool) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    async fn terminate(admin: &PgPool, pid: i32) {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(admin)
            .await
            .unwrap();
    }

    fn one_connection_pool(admin: &PgPool) -> PgPool {
        let mut config = Config::default();
        config.database.url = Some(crate::testing::database_url_of(admin, None).into());
        config.database.max_connections = 1;
        pool(&config).unwrap()
    }

    #[sqlx::test(migrations = false)]
    async fn a_connection_that_died_while_idle_is_replaced_before_use(admin: PgPool) {
        let pool = one_connection_pool(&admin);
        let first = backend_pid(&pool).await;
        terminate(&admin, first).await;
        tokio::time::sleep(PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
        // Pinged, found dead, replaced: the statement itself succeeds.
        let second = backend_pid(&pool).await;
        assert_ne!(first, second);
    }

    #[sqlx::test(migrations = false)]
    async fn a_busy_connection_is_not_pinged_and_a_dead_one_fails_only_once(admin: PgPool) {
        let pool = one_connection_pool(&admin);
        let first = backend_pid(&pool).await;
        // Reused at once: the same backend, no ping in between (a ping
        // would show up as a second round trip; what shows is that the
        // dead connection below is not caught before use).
        assert_eq!(backend_pid(&pool).await, first);
        terminate(&admin, first).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The trade-off: one statement fails (a webhook answers 503, a
        // claim or a result write is retried) and the connection is
        // closed, so the next statement gets a new one.
        assert!(sqlx::query("SELECT 1").execute(&pool).await.is_err());
        assert_ne!(backend_pid(&pool).await, first);
    }
}
