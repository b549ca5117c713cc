//! The test kit: helpers shared by the daemon's unit and integration tests,
//! the demo, the bench and the chaos run. Not part of the daemon.

use ed25519_dalek::SigningKey;
use sqlx::PgPool;

use recording_relay::db;
use recording_relay::webhook::verify;

/// Turns a fresh `#[sqlx::test]` database into a migrated one with the
/// stand-in host tables, as production would look.
pub async fn prepare(pool: PgPool) -> PgPool {
    create_host_schema(&pool).await.expect("create host schema");
    db::migrate(&pool).await.expect("migrate");
    pool
}

/// A minimal stand-in for ZScribe's `patients`/`intakes` tables, as the
/// daemon finds them on Supabase. One file for every test and tool.
pub const HOST_SCHEMA: &str = include_str!("../../../tests/fixtures/host_schema.sql");

/// Creates the [`HOST_SCHEMA`] tables.
pub async fn create_host_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(HOST_SCHEMA).execute(pool).await?;
    Ok(())
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

/// A `call.recording.saved` event shaped like Telnyx's OpenAPI example (no
/// recording_id, numbers or duration: those come from the Recordings API;
/// no `meta`, which other events have). Leg ids are UUIDs, as at Telnyx.
pub fn recording_saved_event(event_id: &str, call_session_id: &str) -> serde_json::Value {
    serde_json::json!({
        "data": {
            "record_type": "event",
            "event_type": "call.recording.saved",
            "id": event_id,
            "occurred_at": "2025-11-19T10:34:00.000Z",
            "payload": {
                "call_control_id": format!("v3:{call_session_id}"),
                "call_leg_id": uuid::Uuid::new_v4().to_string(),
                "call_session_id": call_session_id,
                "connection_id": "1494404757140276705",
                "channels": "single",
                "recording_started_at": "2025-11-19T10:30:00.000Z",
                "recording_ended_at": "2025-11-19T10:33:00.000Z",
                "recording_urls": {
                    "mp3": "https://example.invalid/expired.mp3",
                    "wav": "https://example.invalid/expired.wav"
                },
                "public_recording_urls": {}
            }
        }
    })
}

/// The URL of the database behind `pool` (a `#[sqlx::test]` database), on
/// the server `DATABASE_URL` names, optionally through another port.
pub fn database_url_of(pool: &PgPool, port: Option<u16>) -> String {
    let opts = pool.connect_options();
    let base = std::env::var("DATABASE_URL").unwrap_or_default();
    let mut url = url_without_path(&base);
    if let Some(port) = port {
        url = format!("postgres://{}@127.0.0.1:{port}", opts.get_username());
    }
    format!("{url}/{}", opts.get_database().unwrap_or("postgres"))
}

fn url_without_path(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    match url[scheme_end..].find('/') {
        Some(i) => url[..scheme_end + i].to_owned(),
        None => url.to_owned(),
    }
}
