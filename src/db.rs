//! Connecting to PostgreSQL and applying the schema.
//!
//! Everything of the relay lives in the [`SCHEMA`] schema (closed to
//! Supabase's API roles), the migration history included. Connections work
//! directly, or through a session-mode pooler with its stock settings: no
//! startup parameter beyond the ones every pooler tracks, the session
//! timeouts set after connecting and checked at start-up. A transaction-mode
//! pooler is refused with a message that says which URL to use.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use sqlx::migrate::{MigrateError, Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool, SqlSafeStr};
use tracing::{info, warn};

use crate::config::Config;

mod indexes;

/// The relay's own schema: tables, views, functions, migration history.
pub const SCHEMA: &str = "recording_relay";

/// sqlx's history table, in the relay's schema rather than `public`, where
/// the API roles could read and write it and any other sqlx user of the
/// database would share it.
const HISTORY_TABLE: &str = "recording_relay._sqlx_migrations";

/// The session settings every pooled connection gets after connecting. Not
/// startup `options`: a pooler rejects or silently drops those. No statement
/// of the daemon runs long; one stuck on a lock should fail (and be
/// retried) rather than hold a worker or a webhook.
pub const SESSION_SETTINGS: [(&str, &str); 2] =
    [("statement_timeout", "30s"), ("lock_timeout", "10s")];

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

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Unreachable(sqlx::Error),
    #[error("migrations are not applied (missing: {0}); run `recording-relay migrate`")]
    NotMigrated(String),
    #[error(
        "applied migration(s) {0} differ from this binary's (checksum mismatch): a landed \
         migration was edited, or this binary belongs to another release; refusing to run"
    )]
    ChecksumMismatch(String),
    #[error(
        "applied migration(s) {0} ran a version of their file from before a known compatible \
         edit (migrations/known-edits.txt); run `recording-relay migrate`, which records \
         their current checksum"
    )]
    BeforeKnownEdit(String),
    #[error(
        "applied migration {0} ran its first version, which made a different schema than the \
         current file and that no later migration mends: {1}. This database was made by a \
         development build of 25 November 2026; copy out any rows worth keeping, drop the \
         schema recording_relay (and the relay's tables in public, if any), then run \
         `recording-relay migrate`"
    )]
    IncompatibleEdit(i64, &'static str),
    #[error(
        "expected index(es) not usable ({0}): an interrupted CREATE INDEX CONCURRENTLY leaves \
         one INVALID, a DROP INDEX removes one; run `recording-relay migrate`, which builds \
         each missing one and rebuilds each INVALID one"
    )]
    UnusableIndexes(String),
    #[error(
        "DATABASE_URL goes through a pooler in transaction mode (Supavisor on port 6543, or \
         PgBouncer with pool_mode = transaction), which the daemon cannot use: it needs one \
         session per connection for LISTEN/NOTIFY, prepared statements and its timeouts. Use \
         the direct connection (Supabase: db.<project-ref>.supabase.co:5432) or the \
         session-mode pooler (Supabase: the pooler host on port 5432) ({0})"
    )]
    TransactionPooler(String),
    #[error(
        "session setting {name} is {actual:?}, not {expected:?}: a pooler or the server overrides it"
    )]
    SessionSetting {
        name: &'static str,
        expected: &'static str,
        actual: String,
    },
    #[error(
        "public.recording_jobs exists beside recording_relay.recording_jobs: an older release \
         ran migrations after this one (a rollback). Its tables in public are open to the \
         Supabase API roles: move any rows worth keeping into recording_relay, drop the copies \
         in public, then run `recording-relay migrate` again"
    )]
    RelayObjectsInPublic,
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] MigrateError),
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
    pool_pinging_after(config, PING_IF_IDLE_FOR)
}

/// The small pool of `/readyz` and the queue gauges, apart from the one
/// webhooks and the worker use (see [`crate::health`]).
pub fn health_pool(config: &Config) -> Result<PgPool, DbError> {
    sized_pool(
        config,
        crate::health::HEALTH_CONNECTIONS,
        crate::health::HEALTH_ACQUIRE_TIMEOUT,
        PING_IF_IDLE_FOR,
    )
}

/// The playback API's own pool (half the webhooks' size, at least 2), so
/// that signed-in users, however many and however busy, never take a
/// connection a webhook needs (the review of issue #19).
pub fn playback_pool(config: &Config) -> Result<PgPool, DbError> {
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

fn sized_pool(
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

fn session_settings_sql() -> sqlx::SqlStr {
    let sql: String = SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect();
    AssertSqlSafe(sql).into_sql_str()
}

/// For `migrate`: no statement timeout, since building an index on a large
/// host table may take minutes (the migrations bound their own lock waits).
pub fn migration_pool(config: &Config) -> Result<PgPool, DbError> {
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

/// Start-up: waits (bounded by `patience`) until the database answers, the
/// session is one the daemon can use and the schema is this release's. A
/// database that goes away part-way (a restart, a failover) is waited for
/// again from the start, so a daemon started together with PostgreSQL does
/// not crash-loop; a wrong set-up (a transaction pooler, missing migrations)
/// fails at once. The first query is a simple one: through a
/// transaction-mode pooler a prepared one can fail with a misleading error
/// before [`check_session`] gets to say what is wrong.
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
    pub through_proxy: bool,
    pub server_port: i32,
    pub url_port: u16,
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
pub async fn check_session(config: &Config) -> Result<SessionReport, DbError> {
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
pub async fn notify_self_test(pool: &PgPool, patience: Duration) -> Result<Duration, DbError> {
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

/// Landed migrations edited after they landed (see
/// `migrations/known-edits.txt`, which `scripts/check-migration-history`
/// reads too): a database that ran the first version holds its checksum.
const KNOWN_EDITS: &str = include_str!("../migrations/known-edits.txt");

/// One line of [`KNOWN_EDITS`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct KnownEdit {
    version: i64,
    first: Vec<u8>,
    current: Vec<u8>,
    /// The edit leaves every fully migrated database with the same objects,
    /// so the history may record the current checksum over the first.
    compatible: bool,
}

fn known_edits() -> Vec<KnownEdit> {
    KNOWN_EDITS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some(KnownEdit {
                version: words.next()?.parse().ok()?,
                first: hex::decode(words.next()?).ok()?,
                current: hex::decode(words.next()?).ok()?,
                compatible: words.next()? == "carry",
            })
        })
        .collect()
}

/// Why the first version of a `refuse` edit cannot be carried forward.
fn incompatible_because(version: i64) -> &'static str {
    match version {
        20261125000001 => {
            "the job table has no 'duplicate' state, no unique index on recording_id and no \
             deduplicated quarantine"
        }
        _ => "its objects differ from the current file's",
    }
}

/// The known edit whose first version `checksum` is, if any.
fn ran_first_version(version: i64, checksum: &[u8]) -> Option<KnownEdit> {
    known_edits()
        .into_iter()
        .find(|e| e.version == version && e.first == checksum)
}

/// Before sqlx validates the history: a database that ran the first
/// version of a compatibly edited migration gets the current checksum
/// recorded (only over that exact first checksum, and logged); one that
/// ran an incompatible first version is refused with what to do. Any other
/// mismatch is left to sqlx, which refuses it.
async fn carry_known_edits(conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('recording_relay._sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Ok(());
    }
    for edit in known_edits() {
        if !edit.compatible {
            let ran_first: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM recording_relay._sqlx_migrations
                                WHERE version = $1 AND checksum = $2)",
            )
            .bind(edit.version)
            .bind(&edit.first)
            .fetch_one(&mut *conn)
            .await?;
            if ran_first {
                return Err(DbError::IncompatibleEdit(
                    edit.version,
                    incompatible_because(edit.version),
                ));
            }
            continue;
        }
        let carried = sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $3
             WHERE version = $1 AND checksum = $2",
        )
        .bind(edit.version)
        .bind(&edit.first)
        .bind(&edit.current)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if carried > 0 {
            info!(
                version = edit.version,
                first = %hex::encode(&edit.first),
                current = %hex::encode(&edit.current),
                "recorded the current checksum of a migration edited compatibly after this \
                 database ran it (migrations/known-edits.txt)"
            );
        }
    }
    Ok(())
}

/// How long `migrate` keeps retrying a migration that could not get its
/// locks within their short timeout.
pub const MIGRATE_LOCK_PATIENCE: Duration = Duration::from_secs(120);

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
pub const HOST_LOCK_TIMEOUT: &str = "500ms";

fn lock_host_tables_briefly(mut migration: Migration) -> Migration {
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

fn close_to_api_roles_at_once(mut migration: Migration) -> Migration {
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
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    carry_over_history(&mut conn).await?;
    refuse_relay_objects_in_public(&mut conn).await?;
    carry_known_edits(&mut conn).await?;
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
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    indexes::repair(&mut conn).await?;
    info!(
        migrations = MIGRATOR.iter().count(),
        "database schema is up to date"
    );
    Ok(())
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

    /// Every landed migration's checksum, as it first landed. Adding a
    /// migration adds its line; no line ever changes.
    const LANDED: &str = include_str!("../tests/landed_migrations.txt");

    fn landed() -> Vec<(i64, &'static str)> {
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

    #[test]
    fn the_known_edits_end_at_the_pinned_checksums() {
        let edits = known_edits();
        let versions: Vec<i64> = edits.iter().map(|e| e.version).collect();
        assert_eq!(versions, [20261125000001, 20261125000006, 20261202000002]);
        for edit in edits {
            let pinned = landed()
                .into_iter()
                .find(|(v, _)| *v == edit.version)
                .map(|(_, sum)| sum);
            assert_eq!(Some(hex::encode(&edit.current).as_str()), pinned);
            assert_ne!(edit.first, edit.current);
            assert_eq!(edit.first.len(), 48, "SHA-384");
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

    /// A database migrated before `2a4bfbe` holds the first checksum of
    /// 20261202000002 (an edit of comments): the daemon refuses with the
    /// fix, and `migrate` records the current checksum and nothing else.
    #[sqlx::test(migrations = false)]
    async fn a_database_that_ran_a_compatibly_edited_migration_is_carried_forward_by_migrate(
        pool: PgPool,
    ) {
        let pool = crate::testing::prepare(pool).await;
        let first = known_edits()
            .into_iter()
            .find(|e| e.version == 20261202000002)
            .unwrap()
            .first;
        sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $1 WHERE version = 20261202000002",
        )
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
        let err = ensure_migrated(&pool).await.unwrap_err();
        assert!(
            matches!(&err, DbError::BeforeKnownEdit(v) if v == "20261202000002"),
            "{err}"
        );
        assert!(
            err.to_string().contains("run `recording-relay migrate`"),
            "{err}"
        );

        migrate(&pool).await.unwrap();
        ensure_migrated(&pool).await.unwrap();
        let recorded: Vec<u8> = sqlx::query_scalar(
            "SELECT checksum FROM recording_relay._sqlx_migrations WHERE version = 20261202000002",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let current = MIGRATOR
            .iter()
            .find(|m| m.version == 20261202000002)
            .unwrap();
        assert_eq!(recorded, *current.checksum);
    }

    /// The first job table made a different schema: no checksum is
    /// rewritten over it, and both the daemon and `migrate` say what to do.
    #[sqlx::test(migrations = false)]
    async fn a_database_that_ran_the_first_job_table_is_refused_with_a_way_forward(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        let first = known_edits()
            .into_iter()
            .find(|e| e.version == 20261125000001)
            .unwrap()
            .first;
        sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $1 WHERE version = 20261125000001",
        )
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
        for err in [
            ensure_migrated(&pool).await.unwrap_err(),
            migrate(&pool).await.unwrap_err(),
        ] {
            assert!(
                matches!(err, DbError::IncompatibleEdit(20261125000001, _)),
                "{err}"
            );
            assert!(
                err.to_string().contains("drop the schema recording_relay"),
                "{err}"
            );
        }
        let still: Vec<u8> = sqlx::query_scalar(
            "SELECT checksum FROM recording_relay._sqlx_migrations WHERE version = 20261125000001",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(still, first);
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
