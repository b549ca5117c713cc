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

/// The `call.initiated` of `rec`'s call as ZScribe's dialer causes it
/// (LiveKit SIP over a Telnyx trunk): dialled 5 s before the recording
/// started, with the recording's call ids and numbers, the intake (if any)
/// named in `X-Intake-Id`, no `client_state`.
pub fn dialled_event_for(
    rec: &recording_relay_sim::SimRecording,
    event_id: &str,
    intake: Option<&str>,
) -> serde_json::Value {
    let mut event = call_initiated_event(event_id, &rec.call_session_id, intake);
    let at = (rec.recording_started_at - chrono::Duration::seconds(5)).to_rfc3339();
    event["data"]["occurred_at"] = at.clone().into();
    let p = &mut event["data"]["payload"];
    p["from"] = rec.from.clone().into();
    p["to"] = rec.to.clone().into();
    p["start_time"] = at.into();
    p["call_control_id"] = rec.call_control_id.clone().into();
    p["call_leg_id"] = rec.call_leg_id.clone().into();
    p["connection_id"] = rec.connection_id.clone().into();
    event
}

/// `rec`'s `call.recording.saved` in Telnyx's official shape (no recording
/// id, no numbers: those come from the Recordings API).
pub fn saved_event_for(
    rec: &recording_relay_sim::SimRecording,
    event_id: &str,
) -> serde_json::Value {
    let mut event = recording_saved_event(event_id, &rec.call_session_id);
    event["data"]["occurred_at"] = rec.recording_ended_at.to_rfc3339().into();
    let p = &mut event["data"]["payload"];
    p["call_control_id"] = rec.call_control_id.clone().into();
    p["call_leg_id"] = rec.call_leg_id.clone().into();
    p["connection_id"] = rec.connection_id.clone().into();
    p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
    p["recording_ended_at"] = rec.recording_ended_at.to_rfc3339().into();
    event
}
