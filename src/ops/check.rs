//! `recording-relay check`: validates the configuration and tries each
//! dependency, one line per check, so an operator sees every problem at once.

use serde::Serialize;

use crate::config::{Config, Role};
use crate::db;
use crate::providers::storage_api::StorageClient;
use crate::providers::telnyx_api::{TelnyxClient, TelnyxError};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: false,
        detail: detail.into(),
    }
}

pub async fn run(config: &Config) -> Vec<Check> {
    let mut checks = vec![match config.validate(Role::Serve) {
        Ok(()) => pass("config", "valid for serve"),
        Err(e) => fail("config", e.to_string().replace('\n', " ")),
    }];
    checks.extend(database(config).await);
    checks.push(telnyx(config).await);
    checks.push(storage(config).await);
    checks
}

async fn database(config: &Config) -> Vec<Check> {
    if config.database_url().is_none() {
        return vec![fail(
            "database",
            "database.url is not set (or DATABASE_URL)",
        )];
    }
    let pool = match db::pool(config) {
        Ok(pool) => pool,
        Err(e) => return vec![fail("database", e.to_string())],
    };
    // The session check comes first: through a transaction-mode pooler any
    // prepared statement may fail with an error that hides the cause.
    let session = match db::check_session(config).await {
        Ok(report) => pass("connection", report.describe()),
        Err(e @ db::DbError::Unreachable(_)) => {
            return vec![fail("database", e.to_string())];
        }
        Err(e) => return vec![fail("connection", e.to_string())],
    };
    let version: Result<String, _> = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await;
    let reachable = match version {
        Ok(v) => pass("database", format!("reachable (PostgreSQL {v})")),
        Err(e) => return vec![fail("database", format!("cannot reach PostgreSQL: {e}"))],
    };
    let notify = match db::notify_self_test(&pool, std::time::Duration::from_secs(2)).await {
        Ok(took) => pass(
            "notify",
            format!("a NOTIFY to itself arrived in {} ms", took.as_millis()),
        ),
        Err(e) => pass(
            "notify",
            format!(
                "WARNING: {e}; workers will pick jobs up by polling only (worker.poll_interval)"
            ),
        ),
    };
    let migrations = match db::ensure_migrated(&pool).await {
        Ok(()) => pass("migrations", all_applied(db::MIGRATOR.iter().count())),
        Err(e) => fail("migrations", e.to_string()),
    };
    pool.close().await;
    vec![reachable, session, notify, migrations]
}

fn all_applied(count: usize) -> String {
    format!("all {count} applied, checksums match")
}

async fn telnyx(config: &Config) -> Check {
    let client = match TelnyxClient::from_config(config) {
        Ok(c) => c,
        Err(e) => return fail("telnyx", e.to_string()),
    };
    match client.list_recordings(&[], 1, 1).await {
        Ok(_) => pass(
            "telnyx",
            format!("API key accepted by {}", config.telnyx.api_url),
        ),
        Err(e @ TelnyxError::Unauthorized { .. }) => fail("telnyx", e.to_string()),
        Err(e) => fail(
            "telnyx",
            format!("{} did not answer properly: {e}", config.telnyx.api_url),
        ),
    }
}

async fn storage(config: &Config) -> Check {
    let client = match StorageClient::from_config(config) {
        Ok(c) => c,
        Err(e) => return fail("storage", e.to_string()),
    };
    let bucket = client.bucket().to_owned();
    match client.get_bucket(&bucket).await {
        Ok(Some(b)) if b.public => fail(
            "storage",
            format!("bucket {bucket} is PUBLIC: make it private before storing recordings"),
        ),
        Ok(Some(_)) => pass("storage", format!("bucket {bucket} exists and is private")),
        Ok(None) => fail(
            "storage",
            format!("bucket {bucket} not found: run `recording-relay setup-bucket`"),
        ),
        Err(e) => fail("storage", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's sample output of `check` shows the real number of
    /// migrations: a new migration updates it.
    #[test]
    fn the_readme_shows_as_many_migrations_as_check_counts() {
        let readme = include_str!("../../README.md");
        let line = format!(
            "ok    migrations  {}",
            all_applied(db::MIGRATOR.iter().count())
        );
        assert!(
            readme.contains(&line),
            "README.md's `check` sample should show {line:?}"
        );
    }
}
