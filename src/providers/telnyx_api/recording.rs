//! A recording as the Telnyx Recordings API describes it, and its list
//! pages, read leniently: the spec requires no field and types timestamps
//! as plain strings, so one odd value drops that field, never the record or
//! the page.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::call::CallFacts;

/// A recording as `GET /v2/recordings/{id}` describes it.
///
/// The spec requires none of its fields and types its timestamps as plain
/// strings "in ISO 8601", so every field is read on its own and leniently:
/// a value of another type or shape becomes `None` instead of failing the
/// recording, let alone the page it is on. Only the id is needed; a listed
/// record without one is skipped (see [`Page::skipped`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Recording {
    pub id: String,
    /// Telnyx names the numbers `from` and `to`.
    pub call: CallFacts,
    pub created_at: Option<DateTime<Utc>>,
    pub status: Option<String>,
    /// Only the format the recording was made in, as a rule.
    pub download_urls: DownloadUrls,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DownloadUrls {
    pub mp3: Option<String>,
    pub wav: Option<String>,
}

impl Recording {
    /// Reads one recording object; `None` when it has no usable id.
    pub(crate) fn from_json(v: &Value) -> Option<Recording> {
        let urls = v.get("download_urls");
        Some(Recording {
            id: text(v, "id")?,
            call: CallFacts {
                call_session_id: text(v, "call_session_id"),
                call_control_id: text(v, "call_control_id"),
                call_leg_id: text(v, "call_leg_id"),
                connection_id: text(v, "connection_id"),
                from_number: text(v, "from"),
                to_number: text(v, "to"),
                duration_millis: count(v, "duration_millis"),
                channels: text(v, "channels"),
                recording_started_at: when(v, "recording_started_at"),
                recording_ended_at: when(v, "recording_ended_at"),
            },
            created_at: when(v, "created_at"),
            status: text(v, "status"),
            download_urls: DownloadUrls {
                mp3: urls.and_then(|u| url_text(u, "mp3")),
                wav: urls.and_then(|u| url_text(u, "wav")),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Recording {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Recording::from_json(&v).ok_or_else(|| serde::de::Error::missing_field("id"))
    }
}

/// A string field; numbers are taken as their digits (ids and phone
/// numbers have come as JSON numbers).
pub(super) fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A URL must be a string: a number here is no URL.
fn url_text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A non-negative integer, also when sent as a string or a float.
fn count(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 9e15)
                .map(|f| f.round() as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n >= 0)
}

fn when(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    parse_timestamp(v.get(key)?.as_str()?)
}

/// Reads the ISO 8601 shapes a "plain string" timestamp may take: RFC 3339,
/// a space for the `T`, an offset without colon or minutes (`+0000`,
/// `+00`), a comma before the fraction, the basic format
/// (`20190123T181002.574Z`), and no offset at all (taken as UTC, as
/// Telnyx's clocks are). Anything else is `None`, never an error: a wrong
/// time only widens what the matcher has to go on.
pub(crate) fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let s = text.trim().replace(',', ".").to_ascii_uppercase();
    if s.is_empty() {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
        return Some(t.with_timezone(&Utc));
    }
    let (local, offset) = split_offset(&s)?;
    let local = local.replacen(' ', "T", 1);
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y%m%dT%H%M%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(&local, f).ok())?;
    let t = naive.and_utc();
    t.checked_sub_signed(chrono::Duration::seconds(i64::from(offset)))
}

/// Splits a trailing `Z`, `±hh`, `±hhmm` or `±hh:mm` off; no offset is 0.
fn split_offset(s: &str) -> Option<(&str, i32)> {
    if let Some(local) = s.strip_suffix('Z') {
        return Some((local, 0));
    }
    // The date's own dashes come before the `T`; an offset sign after it.
    let t = s.find('T').or_else(|| s.find(' '))?;
    let Some(sign_at) = s[t..].rfind(['+', '-']).map(|i| t + i) else {
        return Some((s, 0));
    };
    let digits: String = s[sign_at + 1..].chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (digits[..2].parse().ok()?, digits[2..].parse::<i32>().ok()?),
        _ => return None,
    };
    if h > 23 || m > 59 {
        return None;
    }
    let secs = h * 3600 + m * 60;
    let sign = if s.as_bytes()[sign_at] == b'-' { -1 } else { 1 };
    Some((&s[..sign_at], sign * secs))
}

#[derive(Debug)]
pub(super) struct One {
    pub(super) data: Recording,
}

impl<'de> Deserialize<'de> for One {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let data = v
            .get("data")
            .ok_or_else(|| serde::de::Error::missing_field("data"))?;
        Ok(One {
            data: Recording::from_json(data)
                .ok_or_else(|| serde::de::Error::missing_field("id"))?,
        })
    }
}

/// One page of `GET /recordings`.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub data: Vec<Recording>,
    /// Listed records that could not be used (not an object, no id).
    pub skipped: usize,
    pub meta: PageMeta,
}

impl<'de> Deserialize<'de> for Page {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let listed = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| serde::de::Error::missing_field("data"))?;
        let data: Vec<Recording> = listed.iter().filter_map(Recording::from_json).collect();
        let meta = v.get("meta").cloned().unwrap_or(Value::Null);
        let number = |key: &str| count(&meta, key).and_then(|n| u32::try_from(n).ok());
        Ok(Page {
            skipped: listed.len() - data.len(),
            data,
            meta: PageMeta {
                total_pages: number("total_pages"),
            },
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct PageMeta {
    pub total_pages: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec requires no field of a recording. One record with odd
    /// values must not fail the page it is on (reconcile reads pages).
    #[test]
    fn one_odd_record_or_field_does_not_sink_a_page() {
        let body = serde_json::json!({
            "data": [
                {"id": "a1", "duration_millis": "60000", "from": 15551230001_u64,
                 "recording_started_at": "2019-01-23T18:10:02.574Z",
                 "download_urls": {"wav": 12, "mp3": "https://x.invalid/a1.mp3"}},
                {"id": {"nested": true}, "call_session_id": "s2"},
                {"id": "a3", "recording_started_at": 42, "channels": ["dual"],
                 "created_at": "yesterday", "connection_id": 175237942907135762_u64},
                "not even an object",
                {"id": "a5"}
            ],
            "meta": {"page_number": "1", "total_pages": 1}
        })
        .to_string();
        let page: Page = serde_json::from_str(&body).expect("the page is read");
        let ids: Vec<&str> = page.data.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a3", "a5"]);
        assert_eq!(page.skipped, 2);
        let a1 = &page.data[0];
        assert_eq!(a1.call.duration_millis, Some(60_000));
        assert_eq!(a1.call.from_number.as_deref(), Some("15551230001"));
        assert_eq!(a1.download_urls.wav, None);
        assert_eq!(
            a1.download_urls.mp3.as_deref(),
            Some("https://x.invalid/a1.mp3")
        );
        let a3 = &page.data[1];
        assert_eq!(a3.call.channels, None);
        assert_eq!(a3.created_at, None);
        assert_eq!(a3.call.connection_id.as_deref(), Some("175237942907135762"));
        assert_eq!(page.meta.total_pages, Some(1));
    }

    #[test]
    fn timestamps_are_read_in_iso_8601_shapes_beyond_rfc_3339() {
        let want = "2019-01-23T18:10:02.574Z".parse::<DateTime<Utc>>().unwrap();
        for text in [
            "2019-01-23T18:10:02.574Z",
            "2019-01-23T18:10:02.574+00:00",
            "2019-01-23T20:10:02.574+02:00",
            "2019-01-23T18:10:02.574",
            "2019-01-23 18:10:02.574",
            "2019-01-23 18:10:02.574+0000",
            "2019-01-23T13:10:02.574-0500",
            "2019-01-23T18:10:02.574+00",
            "20190123T181002.574Z",
            "20190123T181002.574",
            " 2019-01-23t18:10:02.574z ",
            "2019-01-23T18:10:02,574Z",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, Some(want), "{text}");
        }
        let whole = "2019-01-23T18:10:02Z".parse::<DateTime<Utc>>().unwrap();
        for text in [
            "2019-01-23T18:10:02",
            "20190123T181002Z",
            "2019-01-23 18:10:02Z",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, Some(whole), "{text}");
        }
        for text in [
            "",
            "yesterday",
            "2019-13-40T00:00:00Z",
            "2019-01-23T25:00:00",
        ] {
            let rec: Recording = serde_json::from_value(serde_json::json!({
                "id": "r", "recording_started_at": text
            }))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rec.call.recording_started_at, None, "{text}");
        }
    }
}
