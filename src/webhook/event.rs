//! Reading a verified Telnyx event envelope.
//!
//! Only `data.id` and `data.event_type` are required. Every payload field is
//! optional and read leniently: the official schema lacks `recording_id`, the
//! numbers and `duration_millis` (some deliveries carry them, under either
//! `from`/`to` or `from_number`/`to_number`), and a field of an unexpected
//! type must not cost us the event. The whole event is kept as jsonb anyway.
//!
//! Duplicate keys are the one thing not read leniently. JSON parsers disagree
//! on them (serde_json's `Value` and PostgreSQL's jsonb keep the last, others
//! the first), so a body with two `data.id`s could be deduplicated under one
//! id here and read under the other by anything downstream. A duplicate at
//! the levels we read (the envelope, `data`, `data.payload`) makes the body
//! unreadable: it is quarantined, byte for byte, like any other.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::call::CallFacts;
use crate::jobs::NewJob;

pub const RECORDING_SAVED: &str = "call.recording.saved";
/// Telnyx could not make (or store) the recording; its `reason` says why.
pub const RECORDING_ERROR: &str = "call.recording.error";
/// The events that say what a call session is (numbers, connection, the
/// custom headers of the SIP INVITE): kept in `recording_relay.calls`.
pub const CALL_INITIATED: &str = "call.initiated";
pub const CALL_ANSWERED: &str = "call.answered";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("not a Telnyx event envelope: {0}")]
    NotAnEnvelope(&'static str),
    #[error("ambiguous envelope: {0}")]
    DuplicateKey(String),
}

/// A parsed envelope: the two fields every event has, plus the whole value.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub event_type: String,
    pub value: Value,
}

impl Envelope {
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        // A second pass over valid JSON; cheap next to the signature check.
        let mut check = serde_json::Deserializer::from_slice(body);
        UniqueKeys { path: READ_PATH }
            .deserialize(&mut check)
            .map_err(|e| EventError::DuplicateKey(e.to_string()))?;
        let data = value
            .get("data")
            .filter(|d| d.is_object())
            .ok_or(EventError::NotAnEnvelope("no data object"))?;
        let id = non_empty_str(data, "id").ok_or(EventError::NotAnEnvelope("no data.id"))?;
        let event_type = non_empty_str(data, "event_type")
            .ok_or(EventError::NotAnEnvelope("no data.event_type"))?;
        if [
            RECORDING_SAVED,
            RECORDING_ERROR,
            CALL_INITIATED,
            CALL_ANSWERED,
        ]
        .contains(&event_type.as_str())
            && !data.get("payload").is_some_and(Value::is_object)
        {
            return Err(EventError::NotAnEnvelope(
                "a call or recording event without a payload object",
            ));
        }
        Ok(Self {
            id,
            event_type,
            value,
        })
    }

    pub(crate) fn is_recording_saved(&self) -> bool {
        self.event_type == RECORDING_SAVED
    }

    /// A job of its own, like a recording: `call.recording.saved`, and
    /// `call.recording.error`, which ends its intake's playback `failed`.
    pub fn is_job(&self) -> bool {
        self.is_recording_saved() || self.event_type == RECORDING_ERROR
    }

    /// `call.initiated` or `call.answered`: kept in `recording_relay.calls`.
    pub fn is_call_event(&self) -> bool {
        self.event_type == CALL_INITIATED || self.event_type == CALL_ANSWERED
    }

    /// The job row for a `call.recording.saved` (or `.error`) event.
    pub fn into_job(self, max_attempts: i32) -> NewJob {
        let data = &self.value["data"];
        let p = &data["payload"];
        NewJob {
            occurred_at: timestamp(data, "occurred_at"),
            recording_id: non_empty_str(p, "recording_id"),
            call: CallFacts {
                call_session_id: non_empty_str(p, "call_session_id"),
                call_control_id: non_empty_str(p, "call_control_id"),
                call_leg_id: non_empty_str(p, "call_leg_id"),
                connection_id: non_empty_str(p, "connection_id"),
                from_number: non_empty_str(p, "from").or_else(|| non_empty_str(p, "from_number")),
                to_number: non_empty_str(p, "to").or_else(|| non_empty_str(p, "to_number")),
                duration_millis: integer(p, "duration_millis"),
                channels: non_empty_str(p, "channels"),
                recording_started_at: timestamp(p, "recording_started_at"),
                recording_ended_at: timestamp(p, "recording_ended_at"),
            },
            client_state: non_empty_str(p, "client_state"),
            max_attempts,
            event_id: self.id,
            event_type: self.event_type,
            event: self.value,
        }
    }
}

/// The objects whose keys the relay reads: the envelope, `data` and
/// `data.payload`, and the entries of `data.payload.custom_headers` (each a
/// `{name, value}`: a second `value` could name another intake). Other
/// deeper objects (`recording_urls`, `meta`) are kept as jsonb but never
/// read, so their duplicates are harmless.
const READ_PATH: &[&str] = &["data", "payload"];

/// Walks a JSON value without building it, failing on a repeated key in
/// the object at each level of `path` (the first entry names the child to
/// descend into). Everything else is skipped.
struct UniqueKeys {
    path: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            match self.path.split_first() {
                Some((child, rest)) if key == *child => {
                    map.next_value_seed(UniqueKeys { path: rest })?;
                }
                None if key == "custom_headers" => {
                    map.next_value_seed(HeaderEntries)?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if seen.contains(&key) {
                let shown: String = key.chars().take(40).collect();
                return Err(de::Error::custom(format!(
                    "key {shown:?} appears twice in {}",
                    self.level()
                )));
            }
            seen.insert(key);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// `custom_headers`: a list of `{name, value}` objects (or, leniently, one
/// object), each checked for repeated keys.
struct HeaderEntries;

impl<'de> DeserializeSeed<'de> for HeaderEntries {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for HeaderEntries {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueKeys { path: &[] })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        UniqueKeys { path: &[] }.visit_map(map)
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

impl UniqueKeys {
    /// Where this level sits, for the quarantine reason.
    fn level(&self) -> &'static str {
        match READ_PATH.len().saturating_sub(self.path.len()) {
            0 => "the envelope",
            1 => "data",
            _ => "data.payload",
        }
    }
}

pub(super) fn non_empty_str(obj: &Value, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn integer(obj: &Value, key: &str) -> Option<i64> {
    match obj.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|v| *v >= 0)
}

/// Telnyx's timestamps are plain strings "in ISO 8601", not always RFC 3339.
pub(super) fn timestamp(obj: &Value, key: &str) -> Option<DateTime<Utc>> {
    crate::providers::telnyx_api::parse_timestamp(obj.get(key)?.as_str()?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The shape in Telnyx's OpenAPI spec: no recording_id, numbers or duration.
    fn official() -> Value {
        json!({
            "data": {
                "record_type": "event",
                "event_type": "call.recording.saved",
                "id": "0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",
                "occurred_at": "2025-11-19T10:34:00.000Z",
                "payload": {
                    "call_control_id": "v3:abc",
                    "call_leg_id": "428c31b6-7af4-4bcb-b7f5-5013ef9657c1",
                    "call_session_id": "84a97d76-e40f-11ed-9074-02420a0daa69",
                    "connection_id": "conn-1",
                    "client_state": "aW50YWtl",
                    "channels": "single",
                    "recording_started_at": "2025-11-19T10:30:00.000Z",
                    "recording_ended_at": "2025-11-19T10:33:00.000Z",
                    "recording_urls": {"mp3": "https://x/a.mp3", "wav": "https://x/a.wav"},
                    "public_recording_urls": {}
                }
            },
            "meta": {"attempt": 1, "delivered_to": "https://relay/webhooks/telnyx"}
        })
    }

    fn parse(v: &Value) -> Result<Envelope, EventError> {
        Envelope::parse(v.to_string().as_bytes())
    }

    /// Telnyx's timestamps are plain strings "in ISO 8601": not always
    /// RFC 3339, and the event's start time tells a call's recordings apart.
    #[test]
    fn timestamps_in_other_iso_8601_shapes_are_read() {
        let mut event = official();
        event["data"]["payload"]["recording_started_at"] = "2025-11-19 10:30:00.000+0000".into();
        event["data"]["occurred_at"] = "2025-11-19T10:34:00.000".into();
        let job = Envelope::parse(event.to_string().as_bytes())
            .unwrap()
            .into_job(12);
        assert_eq!(
            job.call.recording_started_at,
            "2025-11-19T10:30:00Z".parse::<DateTime<Utc>>().ok()
        );
        assert_eq!(
            job.occurred_at,
            "2025-11-19T10:34:00Z".parse::<DateTime<Utc>>().ok()
        );
    }

    #[test]
    fn official_payload_parses_with_optional_fields_absent() {
        let job = parse(&official()).unwrap().into_job(12);
        assert_eq!(job.event_id, "0ccc7b54-4df3-4bca-a65a-3da1ecc777f0");
        assert_eq!(
            job.call.call_session_id.as_deref(),
            Some("84a97d76-e40f-11ed-9074-02420a0daa69")
        );
        assert_eq!(job.recording_id, None);
        assert_eq!(job.call.to_number, None);
        assert_eq!(job.call.duration_millis, None);
        assert_eq!(
            job.call.recording_started_at.unwrap().to_rfc3339(),
            "2025-11-19T10:30:00+00:00"
        );
        assert_eq!(job.max_attempts, 12);
    }

    #[test]
    fn ids_and_numbers_some_deliveries_carry_are_picked_up() {
        let mut v = official();
        let p = &mut v["data"]["payload"];
        p["recording_id"] = json!("rec-1");
        p["from_number"] = json!("+19712656795");
        p["to"] = json!("+1234567890");
        p["duration_millis"] = json!(180000);
        let job = parse(&v).unwrap().into_job(12);
        assert_eq!(job.recording_id.as_deref(), Some("rec-1"));
        assert_eq!(job.call.from_number.as_deref(), Some("+19712656795"));
        assert_eq!(job.call.to_number.as_deref(), Some("+1234567890"));
        assert_eq!(job.call.duration_millis, Some(180_000));
    }

    #[test]
    fn odd_field_types_do_not_reject_the_event() {
        let mut v = official();
        let p = &mut v["data"]["payload"];
        p["duration_millis"] = json!("oops");
        p["recording_started_at"] = json!(12);
        p["call_leg_id"] = json!({"nested": true});
        let job = parse(&v).unwrap().into_job(12);
        assert_eq!(job.call.duration_millis, None);
        assert_eq!(job.call.recording_started_at, None);
        assert_eq!(job.call.call_leg_id, None);
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        assert!(matches!(
            Envelope::parse(b"not json"),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            Envelope::parse(b"[]"),
            Err(EventError::NotAnEnvelope(_))
        ));
        let mut v = official();
        v["data"]["id"] = json!("");
        assert!(matches!(parse(&v), Err(EventError::NotAnEnvelope(_))));
        let mut v = official();
        v["data"]["payload"] = json!(null);
        assert!(matches!(parse(&v), Err(EventError::NotAnEnvelope(_))));
    }

    #[test]
    fn other_event_types_parse_but_are_not_recordings() {
        let mut v = official();
        v["data"]["event_type"] = json!("call.hangup");
        let env = parse(&v).unwrap();
        assert!(!env.is_recording_saved());
    }

    #[test]
    fn duplicate_keys_where_we_read_make_the_body_ambiguous() {
        for body in [
            // Two data.id: we would dedupe on one, another parser read the other.
            r#"{"data":{"id":"a","event_type":"call.recording.saved","id":"b","payload":{}}}"#,
            // The same key spelt with an escape is still the same key.
            r#"{"data":{"id":"a","\u0069d":"b","event_type":"call.hangup"}}"#,
            r#"{"data":{"id":"a","event_type":"call.hangup"},"data":{"id":"b","event_type":"x"}}"#,
            r#"{"data":{"id":"a","event_type":"call.recording.saved","payload":{"to":"1","to":"2"}}}"#,
        ] {
            let got = Envelope::parse(body.as_bytes());
            assert!(
                matches!(got, Err(EventError::DuplicateKey(_))),
                "{body}: {got:?}"
            );
        }
    }

    /// A header entry with two values could be read as either intake.
    #[test]
    fn a_custom_header_entry_with_two_values_makes_the_body_ambiguous() {
        let body = r#"{"data":{"id":"a","event_type":"call.initiated","payload":{"custom_headers":[{"name":"X-Intake-Id","value":"1","value":"2"}]}}}"#;
        let got = Envelope::parse(body.as_bytes());
        assert!(matches!(got, Err(EventError::DuplicateKey(_))), "{got:?}");
    }

    #[test]
    fn duplicate_keys_we_never_read_are_tolerated() {
        let body = r#"{"data":{"id":"a","event_type":"call.recording.saved","payload":{"recording_urls":{"mp3":"x","mp3":"y"}}},"meta":{"attempt":1,"attempt":2}}"#;
        let env = Envelope::parse(body.as_bytes()).unwrap();
        assert_eq!(env.id, "a");
    }
}
