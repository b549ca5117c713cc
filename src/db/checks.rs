//! The checks that the database is one the daemon can use: start-up waits
//! out a server that is away but not a wrong set-up, each connection must
//! be a session of its own (a transaction-mode pooler is refused with the
//! URL to use instead), the session settings must have taken, and a NOTIFY
//! must come back.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool};
use tracing::warn;

use super::pool::{SESSION_SETTINGS, connect_options, session_settings_sql};
use super::{DbError, ensure_migrated};
use crate::config::Config;

/// Start-up: waits (bounded by `patience`) until the database answers, the
/// session is one the daemon can use and the schema is this release's. A
/// database that goes away part-way (a restart, a failover) is waited for
/// again from the start, so a daemon started together with PostgreSQL does
/// not crash-loop; a wrong set-up (a transaction pooler, missing migrations)
/// fails at once. The first query is a simple one: through a
/// transaction-mode pooler a prepared one can fail with a misleading error
/// before `check_session` gets to say what is wrong.
pub async fn wait_until_ready(
    config: &Config,
    pool: &PgPool,
    patience: Duration,
) -> Result<SessionReport, DbError> {
    let ready = || async {
        sqlx::raw_sql("SELECT 1").execute(pool).await.map_err(|e| {
            if is_transaction_pooling_symptom(&e) {
                DbError::TransactionPooler(e.to_string())
            } else {
                DbError::Unreachable(e)
            }
        })?;
        let session = check_session(config).await?;
        ensure_migrated(pool).await?;
        Ok(session)
    };
    ready
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(patience))
                .without_max_times(),
        )
        .when(DbError::is_transient)
        .notify(|e, next| warn!(error = %e, retry_in = ?next, "database not ready yet"))
        .await
}

impl DbError {
    /// Whether waiting can mend it: the server is away, starting or
    /// stopping, not that it is set up wrongly.
    fn is_transient(&self) -> bool {
        match self {
            DbError::Unreachable(e) => !is_refused_login(e),
            DbError::Query(e) => is_connection_lost(e),
            _ => false,
        }
    }
}

/// The server answered and refused us: class 28 (wrong password, no such
/// role, pg_hba), 3D000 (no such database). Waiting mends neither, so the
/// daemon says so at once instead of after its whole patience.
fn is_refused_login(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("28") || &*c == "3D000"))
}

/// A connection of its own (the session checks), bounded: a host that drops
/// packets would otherwise hold start-up for the kernel's TCP timeout.
async fn connect_bounded(options: &PgConnectOptions) -> Result<PgConnection, DbError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(result) => result.map_err(DbError::Unreachable),
        Err(_) => Err(DbError::Unreachable(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {CONNECT_TIMEOUT:?}"),
        )))),
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection broke or could not be had, rather than the query being
/// refused: class 08 (connection exception), 57P01–57P03 (the server
/// shutting down, crashed, or not yet accepting connections).
pub(crate) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// What a transaction-mode pooler does to sqlx's named prepared statements.
fn is_transaction_pooling_symptom(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("42P05" | "26000"))
            && db.message().contains("sqlx_s_"))
}

/// How the daemon's connections reach PostgreSQL, as far as it can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// Whether the server's own port is the one in the URL; when it is not,
    /// a pooler or proxy sits in between (in session mode: it passed).
    pub(crate) through_proxy: bool,
    pub(crate) server_port: i32,
    pub(crate) url_port: u16,
}

impl SessionReport {
    pub fn describe(&self) -> String {
        if self.through_proxy {
            format!(
                "session mode through a pooler or proxy (URL port {}, server port {})",
                self.url_port, self.server_port
            )
        } else {
            format!(
                "one session per connection (direct, or a session-mode pooler on the server's port {})",
                self.server_port
            )
        }
    }
}

/// Proves that each connection is a session of its own, and that the
/// session timeouts took effect; refuses a transaction-mode pooler.
///
/// Two connections are held open at once. Each marks its session; in
/// session mode neither sees the other's mark and each keeps its own. A
/// transaction-mode pooler hands an idle client's server connection to the
/// next client (PgBouncer reuses the most recent one), so the second client
/// finds the first one's mark, or the first loses its own.
pub(crate) async fn check_session(config: &Config) -> Result<SessionReport, DbError> {
    let options = connect_options(config)?;
    let url_port = options.get_port();
    let mut first = connect_bounded(&options).await?;
    let mut second = connect_bounded(&options).await?;
    let mark = format!("{:016x}", fastrand::u64(..));
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SELECT set_config('recording_relay.session_probe', '{mark}', false)"
    )))
    .execute(&mut first)
    .await?;
    let seen_by_second = session_probe(&mut second).await?;
    let kept_by_first = session_probe(&mut first).await?;
    if seen_by_second.as_deref() == Some(mark.as_str())
        || kept_by_first.as_deref() != Some(mark.as_str())
    {
        return Err(DbError::TransactionPooler(
            "a second connection shared the first one's session".into(),
        ));
    }
    sqlx::raw_sql(session_settings_sql())
        .execute(&mut first)
        .await?;
    for (name, expected) in SESSION_SETTINGS {
        let actual = show(&mut first, name).await?;
        if actual != expected {
            return Err(DbError::SessionSetting {
                name,
                expected,
                actual,
            });
        }
    }
    let server_port: i32 = show(&mut first, "port").await?.parse().unwrap_or_default();
    Ok(SessionReport {
        through_proxy: i64::from(server_port) != i64::from(url_port),
        server_port,
        url_port,
    })
}

/// `current_setting(…, true)` of the probe, read with a simple query (no
/// prepared statement, which a transaction pooler would break first).
async fn session_probe(conn: &mut sqlx::PgConnection) -> Result<Option<String>, DbError> {
    use futures_util::TryStreamExt as _;
    use sqlx::Row as _;
    let rows: Vec<sqlx::postgres::PgRow> = sqlx::raw_sql(
        "SELECT coalesce(current_setting('recording_relay.session_probe', true), '')",
    )
    .fetch(conn)
    .try_collect()
    .await?;
    let value: String = rows
        .first()
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or_default();
    Ok(Some(value).filter(|v| !v.is_empty()))
}

async fn show(conn: &mut sqlx::PgConnection, name: &str) -> Result<String, DbError> {
    use futures_util::TryStreamExt as _;
    use sqlx::Row as _;
    let rows: Vec<sqlx::postgres::PgRow> = sqlx::raw_sql(AssertSqlSafe(format!("SHOW {name}")))
        .fetch(conn)
        .try_collect()
        .await?;
    Ok(rows
        .first()
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or_default())
}

/// Sends a NOTIFY to itself through the pool and waits for it on a
/// listening connection: workers rely on notifications for prompt pick-up
/// and fall back to polling when they do not arrive (a pooler that drops
/// them, a replica).
pub(crate) async fn notify_self_test(
    pool: &PgPool,
    patience: Duration,
) -> Result<Duration, DbError> {
    let channel = format!("recording_relay_selftest_{:016x}", fastrand::u64(..));
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(&channel).await?;
    let started = Instant::now();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(&channel)
        .execute(pool)
        .await?;
    let arrived = tokio::time::timeout(patience, listener.recv()).await;
    listener.unlisten(&channel).await.ok();
    match arrived {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DbError::Query(sqlx::Error::Protocol(format!(
            "no notification arrived within {patience:?}"
        )))),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_waits_out_an_absent_server_but_not_a_wrong_set_up() {
        let io = || sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(DbError::Unreachable(io()).is_transient());
        assert!(DbError::Query(io()).is_transient());
        assert!(DbError::Query(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!DbError::Query(sqlx::Error::RowNotFound).is_transient());
        assert!(!DbError::TransactionPooler("x".into()).is_transient());
        assert!(!DbError::NotMigrated("1".into()).is_transient());
        assert!(!DbError::ChecksumMismatch("1".into()).is_transient());
        assert!(!DbError::RelayObjectsInPublic.is_transient());
    }

    /// A real refusal from the server (3D000), not a made-up error.
    #[tokio::test]
    async fn a_missing_database_is_not_waited_for() {
        let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
        let mut options: PgConnectOptions = base.parse().unwrap();
        options = options.database("recording_relay_no_such_database");
        let err = connect_bounded(&options).await.unwrap_err();
        assert!(
            matches!(&err, DbError::Unreachable(e) if is_refused_login(e)),
            "{err}"
        );
        assert!(!err.is_transient());
    }
}
