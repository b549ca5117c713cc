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

/// Checks what `role` needs (`check --role`, `serve` by default): a
/// listen-only host needs neither the Telnyx API key nor storage (unless
/// it serves playback, which signs URLs).
pub async fn run(config: &Config, role: Role) -> Vec<Check> {
    let name = match role {
        Role::Listen => "listen",
        Role::Work => "work",
        _ => "serve",
    };
    let mut checks = vec![match config.validate(role) {
        Ok(()) => {
            let warnings = config.warnings(role);
            if warnings.is_empty() {
                pass("config", format!("valid for {name}"))
            } else {
                pass(
                    "config",
                    format!(
                        "valid for {name}; WARNING: {}",
                        warnings.join("; WARNING: ")
                    ),
                )
            }
        }
        Err(e) => {
            let mut detail = format!("not valid for {name}: {}", e.to_string().replace('\n', " "));
            if role == Role::Serve {
                for (other, hint) in [(Role::Listen, "listen"), (Role::Work, "work")] {
                    if config.validate(other).is_ok() {
                        detail.push_str(&format!(
                            " (valid for {hint}: on a {hint}-only host run `check --role {hint}`)"
                        ));
                    }
                }
            }
            fail("config", detail)
        }
    }];
    checks.extend(database(config).await);
    if role.works() {
        checks.push(telnyx(config).await);
    }
    if role.works() || config.playback.addr.is_some() {
        checks.push(storage(config).await);
    }
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
    use crate::testing;
    use sqlx::PgPool;

    const PUBLIC_KEY: &str = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";

    fn line<'a>(checks: &'a [Check], name: &str) -> Option<&'a Check> {
        checks.iter().find(|c| c.name == name)
    }

    /// A listen-only host holds the database URL and Telnyx's public key,
    /// nothing of the worker's.
    #[sqlx::test(migrations = false)]
    async fn a_listen_only_host_is_judged_by_what_listening_needs(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let mut config = Config::from_toml("").unwrap();
        config.database.url = Some(testing::database_url_of(&pool, None).into());
        config.telnyx.public_key = Some(PUBLIC_KEY.to_owned());

        let checks = run(&config, Role::Listen).await;
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert_eq!(line(&checks, "config").unwrap().detail, "valid for listen");
        assert!(line(&checks, "migrations").is_some(), "{checks:#?}");
        assert!(line(&checks, "telnyx").is_none(), "{checks:#?}");
        assert!(line(&checks, "storage").is_none(), "{checks:#?}");

        // By serve's needs it fails, and says what to run instead.
        let checks = run(&config, Role::Serve).await;
        let config_line = line(&checks, "config").unwrap();
        assert!(
            !config_line.ok
                && config_line.detail.starts_with("not valid for serve: ")
                && config_line.detail.contains("telnyx.api_key is not set")
                && config_line.detail.contains("run `check --role listen`"),
            "{checks:#?}"
        );

        // Playback on a listener signs URLs: storage is checked then.
        config.playback.addr = Some("127.0.0.1:0".parse().unwrap());
        let checks = run(&config, Role::Listen).await;
        assert!(!line(&checks, "config").unwrap().ok, "{checks:#?}");
        assert!(line(&checks, "storage").is_some(), "{checks:#?}");
    }

    /// Valid, so `ok`, but with the warning on the config line. Every
    /// dependency is a closed loopback port: only the config line matters.
    #[tokio::test]
    async fn a_shutdown_timeout_beyond_the_units_stop_timeout_shows_on_the_config_line() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = Config::from_toml("").unwrap();
        config.database.url = Some(format!("postgres://postgres@{closed}/postgres").into());
        config.telnyx.public_key = Some(PUBLIC_KEY.to_owned());
        config.telnyx.api_key = Some("KEY_x".to_owned().into());
        config.telnyx.api_url = format!("http://{closed}/v2");
        config.supabase.url = Some(format!("http://{closed}"));
        config.supabase.service_role_key = Some("service".to_owned().into());
        config.worker.shutdown_timeout = std::time::Duration::from_secs(90);
        let checks = run(&config, Role::Work).await;
        let config_line = line(&checks, "config").unwrap();
        assert!(
            config_line.ok
                && config_line
                    .detail
                    .starts_with("valid for work; WARNING: worker.shutdown_timeout (1m 30s)"),
            "{checks:#?}"
        );
    }

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
