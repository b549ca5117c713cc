//! The pools: the main one (webhooks, the worker), the small one of the
//! probes, and the one of `migrate`. Every pooled connection gets the
//! session settings after connecting (not as startup parameters, which a
//! pooler rejects or drops) and is pinged only after sitting idle.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool, SqlSafeStr};

use super::DbError;
use crate::config::Config;

/// The session settings every pooled connection gets after connecting. Not
/// startup `options`: a pooler rejects or silently drops those. No statement
/// of the daemon runs long; one stuck on a lock should fail (and be
/// retried) rather than hold a worker or a webhook. No transaction of the
/// daemon waits on anything but the database either: one left open by a
/// process that hung or lost its network is ended by the server, so the
/// row locks it holds (a call event's wake locks the session's jobs, see
/// `Queue::wake_session`) do not stall a worker's lease for longer.
pub(crate) const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("statement_timeout", "30s"),
    ("lock_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "1min"),
];

/// A pooled connection idle for less than this is handed out without a
/// ping first (see [`pool`]).
pub(crate) const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Builds the pool. Connections are opened on demand, so a listener starts
/// (and answers 503) while the database is down rather than refusing to run.
///
/// sqlx pings every connection before handing it out by default: a round
/// trip in front of every statement, a third of a webhook's. Here only a
/// connection that sat idle for `PING_IF_IDLE_FOR` is pinged (it may have
/// died unnoticed); a busier one answered a moment ago, and sqlx pings it
/// on release anyway, closing it if that fails.
pub fn pool(config: &Config) -> Result<PgPool, DbError> {
    pool_pinging_after(config, PING_IF_IDLE_FOR)
}

/// The playback API's own pool (half the webhooks' size, at least 2), so
/// that signed-in users, however many and however busy, never take a
/// connection a webhook needs (the review of issue #19).
pub(crate) fn playback_pool(config: &Config) -> Result<PgPool, DbError> {
    sized_pool(
        config,
        (config.database.max_connections / 2).max(2),
        config.database.acquire_timeout,
        PING_IF_IDLE_FOR,
    )
}

fn pool_pinging_after(config: &Config, ping_if_idle_for: Duration) -> Result<PgPool, DbError> {
    sized_pool(
        config,
        config.database.max_connections,
        config.database.acquire_timeout,
        ping_if_idle_for,
    )
}

/// A pool of `max_connections`, each waited for at most `acquire_timeout`
/// (the health pool is one: see `health.rs`).
pub(crate) fn sized_pool(
    config: &Config,
    max_connections: u32,
    acquire_timeout: Duration,
    ping_if_idle_for: Duration,
) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::raw_sql(session_settings_sql()).execute(conn).await?;
                Ok(())
            })
        })
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= ping_if_idle_for {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(connect_options(config)?))
}

pub(super) fn session_settings_sql() -> sqlx::SqlStr {
    let sql: String = SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect();
    AssertSqlSafe(sql).into_sql_str()
}

/// For `migrate`: no statement timeout, since building an index on a large
/// host table may take minutes (the migrations bound their own lock waits).
pub(crate) fn migration_pool(config: &Config) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(connect_options(config)?))
}

/// Only startup parameters that poolers track (PgBouncer rejects others,
/// e.g. sqlx's default `extra_float_digits`, unless told to ignore them).
pub fn connect_options(config: &Config) -> Result<PgConnectOptions, DbError> {
    let url = config.database_url().unwrap_or_default();
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    Ok(options
        .application_name("recording-relay")
        .extra_float_digits(None)
        // Statement logging would print phone numbers bound as parameters.
        .disable_statement_logging())
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
        one_connection_pool_pinging_after(admin, PING_IF_IDLE_FOR)
    }

    fn one_connection_pool_pinging_after(admin: &PgPool, ping_if_idle_for: Duration) -> PgPool {
        let mut config = Config::default();
        config.database.url = Some(crate::testing::database_url_of(admin, None).into());
        config.database.max_connections = 1;
        pool_pinging_after(&config, ping_if_idle_for).unwrap()
    }

    /// Until the server has really ended the backend (terminate only asks).
    async fn wait_until_gone(admin: &PgPool, pid: i32) {
        for _ in 0..200 {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(admin)
                    .await
                    .unwrap();
            if !alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("backend {pid} was not terminated");
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
        // A threshold no step of this test can reach, however slow the
        // machine: what is tested is that below it there is no ping.
        let pool = one_connection_pool_pinging_after(&admin, Duration::from_secs(3600));
        let first = backend_pid(&pool).await;
        // Reused at once: the same backend, no ping in between (a ping
        // would show up as a second round trip; what shows is that the
        // dead connection below is not caught before use).
        assert_eq!(backend_pid(&pool).await, first);
        terminate(&admin, first).await;
        wait_until_gone(&admin, first).await;
        // The trade-off: at most one statement fails (a webhook answers
        // 503, a claim or a result write is retried) and the connection is
        // closed, so the next statement gets a new one. (Whether that one
        // statement fails depends on whether sqlx has read the server's
        // goodbye yet: timing, so not asserted.)
        let _ = sqlx::query("SELECT 1").execute(&pool).await;
        assert_ne!(backend_pid(&pool).await, first);
    }
}
