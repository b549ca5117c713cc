//! The test kit ([`recording_relay_test_kit`]) with the daemon's own
//! migration step, for the demo, the bench and the chaos run.

pub use recording_relay_test_kit::*;

use recording_relay::db;
use sqlx::PgPool;

/// Turns a fresh database into a migrated one with the stand-in host
/// tables, as production would look.
pub async fn prepare(pool: PgPool) -> PgPool {
    create_host_schema(&pool).await.expect("create host schema");
    db::migrate(&pool).await.expect("migrate");
    pool
}
