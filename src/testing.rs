//! Helpers shared by the unit tests, the integration tests and the demo.
//! Not part of the daemon's behaviour.

use ed25519_dalek::SigningKey;
use sqlx::PgPool;

use crate::db;
use crate::webhook::verify;

/// Turns a fresh `#[sqlx::test]` database into a migrated one with the
/// stand-in host tables, as production would look.
pub async fn prepare(pool: PgPool) -> PgPool {
    db::create_demo_host_schema(&pool)
        .await
        .expect("create host schema");
    db::migrate(&pool).await.expect("migrate");
    pool
}

/// A signing key from a random seed, standing in for Telnyx's private key.
pub fn signing_key() -> SigningKey {
    let mut seed = [0u8; 32];
    fastrand::fill(&mut seed);
    SigningKey::from_bytes(&seed)
}

pub fn public_key_base64(key: &SigningKey) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes())
}

/// The headers Telnyx would send with `body` at `timestamp`.
pub fn signature_headers(
    key: &SigningKey,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 2] {
    [
        (verify::TIMESTAMP_HEADER, timestamp.to_string()),
        (verify::SIGNATURE_HEADER, verify::sign(key, timestamp, body)),
    ]
}

pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}
