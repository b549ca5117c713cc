//! The test kit ([`recording_relay_test_kit`]) with the daemon's own
//! migration step.

pub(crate) use recording_relay_test_kit::*;

use recording_relay::db;
use sqlx::PgPool;

/// Turns a fresh `#[sqlx::test]` database into a migrated one with the
/// stand-in host tables, as production would look.
pub(crate) async fn prepare(pool: PgPool) -> PgPool {
    create_host_schema(&pool).await.expect("create host schema");
    db::migrate(&pool).await.expect("migrate");
    pool
}
