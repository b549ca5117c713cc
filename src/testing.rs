//! The test kit for this crate's unit tests: [`recording_relay_test_kit`]
//! (no dependency on this crate, so no second copy of it is linked) with
//! this crate's migration step.

pub(crate) use recording_relay_test_kit::*;

use sqlx::PgPool;

/// Turns a fresh `#[sqlx::test]` database into a migrated one with the
/// stand-in host tables, as production would look.
pub(crate) async fn prepare(pool: PgPool) -> PgPool {
    create_host_schema(&pool).await.expect("create host schema");
    crate::db::migrate(&pool).await.expect("migrate");
    pool
}
