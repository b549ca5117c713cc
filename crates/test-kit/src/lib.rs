//! The test kit: helpers shared by the daemon's unit and integration tests,
//! the demo, the bench and the chaos run. Not part of the daemon, and
//! independent of it: signatures are made here as Telnyx makes them, not
//! with the daemon's code, so a test of the verifier checks it against a
//! second implementation. Migrating a test database is the daemon's own
//! `db::migrate`, so each user adds that step (`prepare`) itself.

use ed25519_dalek::SigningKey;
use sqlx::{PgConnection, PgPool};

/// The header Telnyx puts its Ed25519 signature in (base64).
pub const SIGNATURE_HEADER: &str = "telnyx-signature-ed25519";
/// The header with the unix time the signature covers.
pub const TIMESTAMP_HEADER: &str = "telnyx-timestamp";

/// A minimal stand-in for ZScribe's `patients`/`intakes` tables, as the
/// daemon finds them on Supabase. One file for every test and tool.
pub const HOST_SCHEMA: &str = include_str!("../../../tests/fixtures/host_schema.sql");

/// Creates the [`HOST_SCHEMA`] tables.
pub async fn create_host_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(HOST_SCHEMA).execute(pool).await?;
    Ok(())
}

/// The same URL naming another database, its query string (sslmode, a
/// socket directory) kept.
pub fn with_database(server_url: &str, database: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server_url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{authority}/{database}?{q}"),
        None => format!("{authority}/{database}"),
    }
}

/// `DROP DATABASE IF EXISTS … WITH (FORCE)`: whoever holds it open is
/// disconnected.
pub async fn drop_database(admin: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut *admin)
    .await?;
    Ok(())
}

/// `name` dropped if it exists, then created empty.
pub async fn recreate_database(admin: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    drop_database(admin, name).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// `program` as a process with nothing of the test's environment but
/// `PATH`, no stdin, killed when dropped: what a test of a real binary
/// starts from.
pub fn bare_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Which plan [`explain`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// What the server picks for this execution.
    Chosen,
    /// The generic plan, as a long-lived prepared statement gets it.
    Generic,
}

/// The plan, as text, of `execute` (`EXECUTE name(…)`) after `prepare`
/// (`PREPARE name(…) AS …`), on one connection. `EXPLAIN` without ANALYZE:
/// nothing is run, an UPDATE or DELETE changes no row.
pub async fn explain(conn: &mut PgConnection, prepare: &str, execute: &str, plan: Plan) -> String {
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare.to_owned()))
        .execute(&mut *conn)
        .await
        .expect("PREPARE");
    if plan == Plan::Generic {
        sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .expect("SET plan_cache_mode");
    }
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {execute}")))
        .fetch_all(&mut *conn)
        .await
        .expect("EXPLAIN");
    lines.join("\n")
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
        (TIMESTAMP_HEADER, timestamp.to_string()),
        (SIGNATURE_HEADER, sign(key, timestamp, body)),
    ]
}

/// Telnyx's signature: Ed25519 over `{timestamp}|{raw body}`, in base64.
pub fn sign(key: &SigningKey, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let mut message = timestamp.to_string().into_bytes();
    message.push(b'|');
    message.extend_from_slice(body);
    base64::engine::general_purpose::STANDARD.encode(key.sign(&message).to_bytes())
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

/// A `call.initiated` event shaped like Telnyx's OpenAPI schema: the custom
/// headers of the SIP INVITE are a list of `{name, value}`. With `intake`,
/// the dialer named it in `X-Intake-Id` (as ZScribe's LiveKit dialer would,
/// README "The exact link from the SIP INVITE").
pub fn call_initiated_event(
    event_id: &str,
    call_session_id: &str,
    intake: Option<&str>,
) -> serde_json::Value {
    let headers = intake.map_or_else(Vec::new, |id| {
        vec![serde_json::json!({"name": INTAKE_HEADER, "value": id})]
    });
    serde_json::json!({
        "data": {
            "record_type": "event",
            "event_type": "call.initiated",
            "id": event_id,
            "occurred_at": chrono::Utc::now().to_rfc3339(),
            "payload": {
                "call_control_id": format!("v3:{call_session_id}"),
                "call_leg_id": uuid::Uuid::new_v4().to_string(),
                "call_session_id": call_session_id,
                "connection_id": "1684641123236054244",
                "direction": "outgoing",
                "from": "+15551230001",
                "to": "+15557650002",
                "state": "bridging",
                "start_time": chrono::Utc::now().to_rfc3339(),
                "custom_headers": headers
            }
        },
        "meta": {"attempt": 1, "delivered_to": "https://relay/webhooks/telnyx"}
    })
}

/// The SIP header in which ZScribe's dialer names the intake (issue #21):
/// LiveKit's `CreateSIPParticipantRequest.headers` sends it on the INVITE,
/// and Telnyx reports it in `call.initiated`'s `custom_headers`.
pub const INTAKE_HEADER: &str = "X-Intake-Id";

/// [`call_initiated_event`] for an outbound call ZScribe places through
/// LiveKit SIP over a Telnyx trunk: `from` is the organization's number,
/// `to` the patient's, and the intake is named in [`INTAKE_HEADER`]; no
/// `client_state` (only Call Control sets one).
pub fn dialled_call_initiated_event(
    event_id: &str,
    call_session_id: &str,
    intake_id: &str,
    from: &str,
    to: &str,
) -> serde_json::Value {
    let mut event = call_initiated_event(event_id, call_session_id, Some(intake_id));
    let payload = &mut event["data"]["payload"];
    payload["from"] = serde_json::Value::from(from);
    payload["to"] = serde_json::Value::from(to);
    event
}

/// A `call.recording.error` event (Telnyx's schema: no recording, a reason).
pub fn recording_error_event(
    event_id: &str,
    call_session_id: &str,
    reason: &str,
) -> serde_json::Value {
    serde_json::json!({
        "data": {
            "record_type": "event",
            "event_type": "call.recording.error",
            "id": event_id,
            "occurred_at": chrono::Utc::now().to_rfc3339(),
            "payload": {
                "call_control_id": format!("v3:{call_session_id}"),
                "call_leg_id": uuid::Uuid::new_v4().to_string(),
                "call_session_id": call_session_id,
                "connection_id": "1684641123236054244",
                "reason": reason
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

/// The TCP address of the server `DATABASE_URL` names (for a proxy in
/// front of it): never a fixed port, since `scripts/test` may run the
/// tests on a throwaway cluster.
pub fn database_server_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("DATABASE_URL parses");
    (options.get_host(), options.get_port())
        .to_socket_addrs()
        .expect("DATABASE_URL's host resolves")
        .next()
        .expect("DATABASE_URL's host has an address")
}

fn url_without_path(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    match url[scheme_end..].find('/') {
        Some(i) => url[..scheme_end + i].to_owned(),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Telnyx's shape: the header in an array of {name, value}, no
    /// client_state, the session and numbers in the payload.
    #[test]
    fn a_call_initiated_names_its_intake_in_an_array_of_custom_headers() {
        let event =
            dialled_call_initiated_event("ev-1", "s-1", "intake-1", "+19712656795", "+15550104477");
        let payload = &event["data"]["payload"];
        assert_eq!(event["data"]["event_type"], "call.initiated");
        assert_eq!(payload["call_session_id"], "s-1");
        assert_eq!(
            payload["custom_headers"],
            serde_json::json!([{"name": "X-Intake-Id", "value": "intake-1"}])
        );
        assert!(payload.get("client_state").is_none());
        assert_eq!(payload["direction"], "outgoing");
    }

    #[test]
    fn urls_name_another_database_and_keep_their_query() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "demo"),
            "postgres://u:p@h:5432/demo"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=require", "demo"),
            "postgres://u@h/demo?sslmode=require"
        );
        assert_eq!(with_database("postgres://h", "demo"), "postgres://h/demo");
        assert_eq!(
            with_database(
                "postgres://postgres@localhost:5432/postgres?host=%2Ftmp%2Fs",
                "d"
            ),
            "postgres://postgres@localhost:5432/d?host=%2Ftmp%2Fs"
        );
    }

    #[test]
    fn the_database_is_replaced_or_added() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "chaos_1"),
            "postgres://postgres@127.0.0.1:5432/chaos_1"
        );
        assert_eq!(with_database("postgres://u@h:1", "c"), "postgres://u@h:1/c");
        assert_eq!(
            with_database("postgres://u@h/d?sslmode=disable", "c"),
            "postgres://u@h/c?sslmode=disable"
        );
    }
}
