//! Connecting to PostgreSQL and applying the schema.
//!
//! Everything of the relay lives in the [`SCHEMA`] schema (closed to
//! Supabase's API roles), the migration history included. Connections work
//! directly, or through a session-mode pooler with its stock settings: no
//! startup parameter beyond the ones every pooler tracks, the session
//! timeouts set after connecting and checked at start-up. A transaction-mode
//! pooler is refused with a message that says which URL to use.
//!
//! - `pool.rs`: the pools and the session settings of their connections.
//! - `checks.rs`: start-up readiness, the session and pooler check, the
//!   NOTIFY self-test.
//! - `migrate.rs`: `migrate` and `ensure_migrated`, the history table;
//!   `rewrites.rs`: what the runner adds to landed migrations;
//!   `known_edits.rs`: landed migrations edited after they landed;
//!   `indexes.rs`: every expected index, built or rebuilt when unusable.

use sqlx::migrate::MigrateError;

mod checks;
mod indexes;
mod known_edits;
mod migrate;
mod pool;
mod rewrites;

pub(crate) use checks::is_connection_lost;
pub use checks::wait_until_ready;
pub(crate) use checks::{check_session, notify_self_test};
pub use migrate::{MIGRATOR, ensure_migrated, migrate};
pub(crate) use pool::sized_pool;
pub(crate) use pool::{PING_IF_IDLE_FOR, migration_pool, playback_pool};
pub use pool::{connect_options, pool};

/// The relay's own schema: tables, views, functions, migration history.
pub const SCHEMA: &str = "recording_relay";

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
    /// A migration the server refused, told once (sqlx's error repeats its
    /// cause at every layer and adds the line of PostgreSQL's own C source),
    /// with the file and the hint.
    #[error("migration {file} failed: {message}{}", hint.as_deref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    MigrationRefused {
        file: String,
        message: String,
        hint: Option<String>,
    },
}
