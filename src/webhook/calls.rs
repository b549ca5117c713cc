//! `call.initiated` and `call.answered`: what a call session says about
//! itself, kept in `recording_relay.calls` before the listener's 200
//! (issue #21).
//!
//! ZScribe dials through LiveKit SIP over a Telnyx trunk, so `client_state`
//! never reaches a recording; the dialer names the intake in a custom
//! header of the SIP INVITE instead (`pipeline.intake_header`, default
//! `X-Intake-Id`), which Telnyx reports in `call.initiated`'s
//! `custom_headers`: a list of `{name, value}`. Matching reads the row as
//! an exact link, ahead of phone and time (`pipeline::intakes`).
//!
//! One row per session. A redelivery or a later event of the session fills
//! in what is missing and never overwrites; two values for the named
//! intake (two events, or two headers in one) leave the session with none
//! for good (`intake_conflict`): a wrong chart is worse than no chart.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::event::{Envelope, non_empty_str, timestamp};

/// A raw header value kept for the operator is cut to this many characters:
/// it is the dialer's text, not ours, and never matched on.
const RAW_HEADER_CHARS: usize = 200;

/// What the event's custom headers say about the intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IntakeHeader {
    Absent,
    /// The header's one value, a UUID.
    Intake(Uuid),
    /// The header's one value, which is not a UUID: kept, never matched.
    Raw(String),
    /// The header appears more than once with different values.
    Conflicting(String),
}

/// One `call.initiated` or `call.answered`, as stored.
#[derive(Debug, Clone)]
pub(crate) struct CallEvent {
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    pub(crate) call_session_id: String,
    pub(crate) intake: IntakeHeader,
    pub(crate) call_leg_id: Option<String>,
    pub(crate) connection_id: Option<String>,
    pub(crate) direction: Option<String>,
    pub(crate) from_number: Option<String>,
    pub(crate) to_number: Option<String>,
    pub(crate) occurred_at: Option<DateTime<Utc>>,
}

/// What the upsert left in the session's row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct StoredCall {
    /// This event created the row.
    pub(crate) inserted: bool,
    pub(crate) intake_id: Option<Uuid>,
    pub(crate) intake_conflict: Option<String>,
}

impl CallEvent {
    /// `None` when the event names no call session: nothing could link to it.
    pub(crate) fn from_envelope(envelope: &Envelope, header: &str) -> Option<Self> {
        let data = &envelope.value["data"];
        let p = &data["payload"];
        Some(Self {
            event_id: envelope.id.clone(),
            event_type: envelope.event_type.clone(),
            call_session_id: non_empty_str(p, "call_session_id")?,
            intake: intake_header(p.get("custom_headers"), header),
            call_leg_id: non_empty_str(p, "call_leg_id"),
            connection_id: non_empty_str(p, "connection_id"),
            direction: non_empty_str(p, "direction"),
            from_number: non_empty_str(p, "from"),
            to_number: non_empty_str(p, "to"),
            occurred_at: timestamp(data, "occurred_at"),
        })
    }
}

/// The values of header `name` among `custom_headers`: Telnyx's list of
/// `{name, value}` objects, or leniently one object of name → value. Header
/// names are compared case-insensitively (RFC 3261 §7.3.1), values trimmed.
pub(crate) fn intake_header(custom_headers: Option<&Value>, name: &str) -> IntakeHeader {
    let text = |v: &Value| v.as_str().map(|s| s.trim().to_owned());
    let values: Vec<String> = match custom_headers {
        Some(Value::Array(entries)) => entries
            .iter()
            .filter(|e| {
                e.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
            })
            .filter_map(|e| e.get("value").and_then(text))
            .collect(),
        Some(Value::Object(map)) => map
            .iter()
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| text(v))
            .collect(),
        _ => Vec::new(),
    };
    let mut distinct: Vec<String> = Vec::new();
    for v in values.into_iter().filter(|v| !v.is_empty()) {
        // The same UUID in two spellings is one value.
        let v = Uuid::parse_str(&v).map_or(v, |id| id.to_string());
        if !distinct.contains(&v) {
            distinct.push(v);
        }
    }
    match distinct.as_slice() {
        [] => IntakeHeader::Absent,
        [one] => Uuid::parse_str(one).map_or_else(
            |_| IntakeHeader::Raw(one.chars().take(RAW_HEADER_CHARS).collect()),
            IntakeHeader::Intake,
        ),
        many => IntakeHeader::Conflicting(
            many.iter()
                .map(|v| v.chars().take(RAW_HEADER_CHARS).collect::<String>())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

/// The session's value as compared across events: the UUID's text, else
/// the raw header.
macro_rules! named {
    ($row:literal) => {
        concat!(
            "coalesce(",
            $row,
            ".intake_id::text, ",
            $row,
            ".intake_header)"
        )
    };
}

/// Inserts the session's row, or fills in what an earlier event left
/// missing. The named intake is set once: another value later (or two in
/// one event) clears it and records the conflict, which sticks. `$1`
/// session, `$2` intake, `$3` raw header, `$4` conflict, `$5`..`$10` leg,
/// connection, direction, from, to, occurred_at, `$11` event id, `$12` type.
pub(crate) const UPSERT_CALL_SQL: &str = concat!(
    "INSERT INTO recording_relay.calls AS c (
         call_session_id, intake_id, intake_header, intake_conflict, call_leg_id,
         connection_id, direction, from_number, to_number, started_at,
         first_event_id, first_event_type)
     VALUES ($1, CASE WHEN $4::text IS NULL THEN $2::uuid END, $3, $4, $5, $6, $7, $8, $9, $10,
             $11, $12)
     ON CONFLICT (call_session_id) DO UPDATE SET
         intake_conflict = CASE
             WHEN c.intake_conflict IS NOT NULL THEN c.intake_conflict
             WHEN EXCLUDED.intake_conflict IS NOT NULL
                 THEN concat_ws(', ', ",
    named!("c"),
    ", EXCLUDED.intake_conflict)
             WHEN ",
    named!("c"),
    " <> ",
    named!("EXCLUDED"),
    " THEN ",
    named!("c"),
    " || ', ' || ",
    named!("EXCLUDED"),
    "
         END,
         intake_id = CASE
             WHEN c.intake_conflict IS NOT NULL OR EXCLUDED.intake_conflict IS NOT NULL
                  OR ",
    named!("c"),
    " <> ",
    named!("EXCLUDED"),
    " THEN NULL
             ELSE coalesce(c.intake_id, EXCLUDED.intake_id)
         END,
         intake_header = coalesce(c.intake_header, EXCLUDED.intake_header),
         call_leg_id = coalesce(c.call_leg_id, EXCLUDED.call_leg_id),
         connection_id = coalesce(c.connection_id, EXCLUDED.connection_id),
         direction = coalesce(c.direction, EXCLUDED.direction),
         from_number = coalesce(c.from_number, EXCLUDED.from_number),
         to_number = coalesce(c.to_number, EXCLUDED.to_number),
         started_at = least(c.started_at, EXCLUDED.started_at),
         updated_at = now()
     RETURNING (xmax = 0) AS inserted, intake_id, intake_conflict"
);

/// Stores the event in `executor` (the listener's transaction).
pub(crate) async fn upsert<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    call: &CallEvent,
) -> Result<StoredCall, sqlx::Error> {
    let (intake, raw, conflict) = match &call.intake {
        IntakeHeader::Absent => (None, None, None),
        IntakeHeader::Intake(id) => (Some(*id), None, None),
        IntakeHeader::Raw(raw) => (None, Some(raw.as_str()), None),
        IntakeHeader::Conflicting(values) => (None, None, Some(values.as_str())),
    };
    sqlx::query_as(UPSERT_CALL_SQL)
        .bind(&call.call_session_id)
        .bind(intake)
        .bind(raw)
        .bind(conflict)
        .bind(&call.call_leg_id)
        .bind(&call.connection_id)
        .bind(&call.direction)
        .bind(&call.from_number)
        .bind(&call.to_number)
        .bind(call.occurred_at)
        .bind(&call.event_id)
        .bind(&call.event_type)
        .fetch_one(executor)
        .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sqlx::PgPool;

    use super::*;
    use crate::testing;

    const A: &str = "0b5d2c4e-8f1a-4e6b-b7c3-9d2e1f0a3b42";
    const B: &str = "6f9d7f8e-1c1e-4a55-9b0e-3c2f6c1b9a10";

    #[test]
    fn the_header_is_found_whatever_its_case_and_checked_to_be_one_uuid() {
        let h = |v: Value| intake_header(Some(&v), "X-Intake-Id");
        let a = Uuid::parse_str(A).unwrap();
        assert_eq!(
            h(json!([{"name": "x-intake-id", "value": A.to_uppercase()}])),
            IntakeHeader::Intake(a)
        );
        assert_eq!(
            h(json!([{"name": "X-Other", "value": A}])),
            IntakeHeader::Absent
        );
        assert_eq!(
            h(json!([{"name": "X-Intake-Id", "value": "intake-42"}])),
            IntakeHeader::Raw("intake-42".into())
        );
        // Twice the same intake is one; two intakes are none.
        assert_eq!(
            h(json!([{"name": "X-Intake-Id", "value": A}, {"name": "X-INTAKE-ID", "value": A}])),
            IntakeHeader::Intake(a)
        );
        assert_eq!(
            h(json!([{"name": "X-Intake-Id", "value": A}, {"name": "x-intake-id", "value": B}])),
            IntakeHeader::Conflicting(format!("{A}, {B}"))
        );
        // Leniently, a map.
        assert_eq!(h(json!({"X-Intake-Id": A})), IntakeHeader::Intake(a));
        assert_eq!(h(json!("X-Intake-Id")), IntakeHeader::Absent);
        assert_eq!(intake_header(None, "X-Intake-Id"), IntakeHeader::Absent);
    }

    fn event(id: &str, event_type: &str, header: Option<&str>) -> CallEvent {
        let mut payload = json!({
            "call_session_id": "sess-1",
            "call_leg_id": "leg-1",
            "connection_id": "conn-1",
            "from": "+15550000001",
            "to": "+15557650002",
        });
        if let Some(v) = header {
            payload["custom_headers"] = json!([{"name": "X-Intake-Id", "value": v}]);
        }
        let body = json!({"data": {"id": id, "event_type": event_type,
                                   "occurred_at": "2025-11-19T10:30:00Z", "payload": payload}});
        let envelope = Envelope::parse(body.to_string().as_bytes()).unwrap();
        CallEvent::from_envelope(&envelope, "X-Intake-Id").unwrap()
    }

    async fn stored(pool: &PgPool, e: &CallEvent) -> StoredCall {
        upsert(pool, e).await.unwrap()
    }

    #[sqlx::test(migrations = false)]
    async fn a_redelivery_or_a_later_event_fills_in_and_never_overwrites(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        let a = Uuid::parse_str(A).unwrap();
        let first = stored(&pool, &event("ev-1", "call.initiated", None)).await;
        assert!(first.inserted && first.intake_id.is_none());
        let later = stored(&pool, &event("ev-2", "call.answered", Some(A))).await;
        assert_eq!((later.inserted, later.intake_id), (false, Some(a)));
        let again = stored(&pool, &event("ev-2", "call.answered", Some(A))).await;
        assert_eq!(again.intake_id, Some(a));
        let without = stored(&pool, &event("ev-3", "call.answered", None)).await;
        assert_eq!(without.intake_id, Some(a), "no header is no change");
        let (rows, first_event): (i64, String) =
            sqlx::query_as("SELECT count(*), min(first_event_id) FROM recording_relay.calls")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((rows, first_event.as_str()), (1, "ev-1"));
    }

    #[sqlx::test(migrations = false)]
    async fn two_intakes_named_for_one_session_leave_it_none_for_good(pool: PgPool) {
        let pool = testing::prepare(pool).await;
        stored(&pool, &event("ev-1", "call.initiated", Some(A))).await;
        let clash = stored(&pool, &event("ev-2", "call.answered", Some(B))).await;
        assert_eq!(clash.intake_id, None);
        assert_eq!(clash.intake_conflict, Some(format!("{A}, {B}")));
        let back = stored(&pool, &event("ev-3", "call.answered", Some(A))).await;
        assert_eq!(back.intake_id, None, "the conflict sticks");
        // Two values in one event: none from the start.
        let mut e = event("ev-4", "call.initiated", None);
        e.call_session_id = "sess-2".into();
        e.intake = IntakeHeader::Conflicting(format!("{A}, {B}"));
        let both = stored(&pool, &e).await;
        assert_eq!((both.intake_id, both.inserted), (None, true));
        assert!(both.intake_conflict.is_some());
    }
}
