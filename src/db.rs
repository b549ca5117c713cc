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
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Builds the pool. Connections are opened on demand, so a listener starts
/// (and answers 503) while the database is down rather than refusing to run.
pub fn pool(config: &Config) -> Result<PgPool, DbError> {
    let url = config.database_url().unwrap_or_default();
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    let options = options
        .application_name("recording-relay")
        // Statement logging would print phone numbers bound as parameters.
        .disable_statement_logging();
    Ok(PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(config.database.acquire_timeout)
        .connect_lazy_with(options))
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
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DbError::NotMigrated(missing.join(", ")))
    }
}

pub async fn create_demo_host_schema(pool: &PgPool) -> Result<(), DbError> {
    sqlx::raw_sql(DEMO_HOST_SCHEMA).execute(pool).await?;
    Ok(())
}
