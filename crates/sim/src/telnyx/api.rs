//! The recordings API (`/v2/recordings`): authentication, faults, the
//! recording's JSON, the list with its filters and pages, and Telnyx's error
//! shapes.

use super::download::{download, parse_download_path, s3_fault};
use super::*;

pub(super) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Abort> {
    let path = req.uri().path().to_owned();
    let is_download = path.starts_with("/downloads/");
    let (fault, behaviour) = {
        let mut g = state.lock();
        g.requests.push(path.clone());
        if is_download {
            if let Some((id, _)) = parse_download_path(&path) {
                *g.downloads.entry(id).or_insert(0) += 1;
            }
            (g.download_faults.next(), g.behaviour.clone())
        } else {
            (g.api_faults.next(), g.behaviour.clone())
        }
    };
    let cut = match start_fault(fault, &state.cancel).await {
        FaultAction::None => None,
        FaultAction::Reset => return Err(Abort),
        FaultAction::CutAfter(n) => Some(n),
        FaultAction::Status(s) => {
            let mut resp = if is_download {
                s3_fault(s)
            } else {
                api_fault(s)
            };
            if s == 429 {
                rate_limit_headers(&mut resp, &behaviour);
            }
            return Ok(resp);
        }
    };
    let resp = if is_download {
        download(&state, &req)
    } else {
        api(&state, &req)
    };
    Ok(match cut {
        Some(n) => cut_response(resp, n),
        None => resp,
    })
}

fn telnyx_error(
    status: u16,
    code: &str,
    title: &str,
    detail: &str,
    parameter: Option<&str>,
) -> Resp {
    let mut err = json!({
        "code": code,
        "title": title,
        "detail": detail,
        "meta": { "url": format!("https://developers.telnyx.com/docs/overview/errors/{code}") },
    });
    if let Some(p) = parameter {
        err["source"] = json!({ "parameter": p });
    }
    json_response(status, &json!({ "errors": [err] }))
}

fn not_found() -> Resp {
    telnyx_error(
        404,
        "10005",
        "Resource not found",
        "The requested resource or URL could not be found.",
        None,
    )
}

fn bad_request(detail: &str, parameter: &str) -> Resp {
    telnyx_error(400, "10015", "Bad Request", detail, Some(parameter))
}

fn api_fault(status: u16) -> Resp {
    let (code, title, detail) = match status {
        400 => (
            "10015",
            "Bad Request",
            "The request failed because it was not well-formed.",
        ),
        401 => (
            "10009",
            "Authentication failed",
            "The required authentication headers were either invalid or not included in the request.",
        ),
        403 => (
            "10010",
            "Authorization failed",
            "You do not have permission to perform the requested action on the specified resource or resources.",
        ),
        404 => (
            "10005",
            "Resource not found",
            "The requested resource or URL could not be found.",
        ),
        408 => ("10008", "Request timeout", "The request timed out."),
        429 => (
            "10011",
            "Too many requests",
            "You have exceeded the maximum number of allowed requests.",
        ),
        _ => ("10007", "Unexpected error", "An unexpected error occured."),
    };
    telnyx_error(status, code, title, detail, None)
}

fn rate_limit_headers(resp: &mut Resp, b: &TelnyxSimBehaviour) {
    set_header(resp, "x-ratelimit-limit", "100");
    set_header(resp, "x-ratelimit-remaining", "0");
    if let Some(reset) = &b.ratelimit_reset {
        set_header(resp, "x-ratelimit-reset", reset);
    }
    if let Some(after) = &b.retry_after {
        set_header(resp, "retry-after", after);
    }
}

fn api(state: &State, req: &Request<Incoming>) -> Resp {
    if bearer(req.headers()) != Some(state.api_key.as_str()) {
        return api_fault(401);
    }
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v2/recordings") else {
        return not_found();
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return match *req.method() {
            Method::GET => list(state, req.uri().query()),
            _ => not_found(),
        };
    }
    let Some(id) = rest.strip_prefix('/').map(|s| percent_decode(s, false)) else {
        return not_found();
    };
    if id.contains('/') {
        return not_found();
    }
    let now = Utc::now();
    let mut g = state.lock();
    let behaviour = g.behaviour.clone();
    let Some(entry) = g.recordings.get_mut(&id).filter(|e| !e.deleted) else {
        return not_found();
    };
    match *req.method() {
        Method::GET => {
            let data = recording_json(state, &behaviour, entry, now);
            json_response(200, &json!({ "data": data }))
        }
        Method::DELETE if behaviour.delete_status.is_some() => {
            let status = behaviour.delete_status.unwrap_or(500);
            json_response(
                status,
                &json!({ "errors": [{ "detail": "delete refused" }] }),
            )
        }
        Method::DELETE => {
            entry.deleted = true;
            entry.updated_at = now;
            let data = recording_json(state, &behaviour, entry, now);
            g.deleted.push(id);
            json_response(200, &json!({ "data": data }))
        }
        _ => not_found(),
    }
}

fn recording_json(state: &State, b: &TelnyxSimBehaviour, e: &Entry, now: DateTime<Utc>) -> Value {
    let r = &e.rec;
    let ts = |t: DateTime<Utc>| b.timestamps.format(t);
    let recorded = r.format.extension();
    let mut urls = serde_json::Map::new();
    for format in ["mp3", "wav"] {
        if format == recorded || !b.only_recorded_format {
            urls.insert(
                format.to_owned(),
                mint_url(state, &r.id, format, now).into(),
            );
        }
    }
    let mut data = json!({
        "record_type": "recording",
        "id": r.id,
        "call_session_id": r.call_session_id,
        "call_control_id": r.call_control_id,
        "call_leg_id": r.call_leg_id,
        "connection_id": r.connection_id,
        "conference_id": null,
        "channels": r.channels,
        "duration_millis": r.duration_millis,
        "from": r.from,
        "to": r.to,
        "recording_started_at": ts(r.recording_started_at),
        "recording_ended_at": ts(r.recording_ended_at),
        "created_at": ts(r.created_at),
        "updated_at": ts(e.updated_at),
        "status": "completed",
        "source": "call",
        "download_urls": urls,
    });
    if !b.numbers
        && let Some(obj) = data.as_object_mut()
    {
        obj.remove("from");
        obj.remove("to");
    }
    data
}

/// The list parameters the simulator implements. The spec also has
/// `conference_id`, `conference_region`, `sip_call_id`, `start_time` and
/// `end_time` filters; they are refused here rather than ignored, so a test
/// can never pass on a filter that filtered nothing.
const LIST_PARAMS: &[&str] = &[
    "page[number]",
    "page[size]",
    "filter[call_session_id]",
    "filter[call_leg_id]",
    "filter[call_control_id]",
    "filter[connection_id]",
    "filter[from]",
    "filter[to]",
    "filter[created_at][gte]",
    "filter[created_at][lte]",
];

/// Filters the spec types as `format: uuid`.
const UUID_FILTERS: &[&str] = &["filter[call_session_id]", "filter[call_leg_id]"];

fn unprocessable(detail: &str, parameter: &str) -> Resp {
    telnyx_error(422, "10015", "Invalid parameter", detail, Some(parameter))
}

fn list(state: &State, query: Option<&str>) -> Resp {
    let q = parse_query(query);
    let behaviour = state.lock().behaviour.clone();
    if behaviour.refuse_unknown_filters
        && let Some((key, _)) = q.iter().find(|(k, _)| !LIST_PARAMS.contains(&k.as_str()))
    {
        return bad_request("unknown or unsupported query parameter", key);
    }
    if behaviour.uuid_filters {
        for key in UUID_FILTERS {
            if let Some(v) = query_value(&q, key)
                && uuid::Uuid::try_parse(v).is_err()
            {
                return unprocessable("must be a valid UUID", key);
            }
        }
    }
    let page_number = match query_value(&q, "page[number]").map(str::parse::<u64>) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            return bad_request(
                "page[number] must be an integer greater than or equal to 1",
                "page[number]",
            );
        }
    };
    let page_size = match query_value(&q, "page[size]").map(str::parse::<u64>) {
        None => 20,
        Some(Ok(n)) if (1..=250).contains(&n) => n,
        Some(_) => {
            return bad_request(
                "page[size] must be an integer between 1 and 250",
                "page[size]",
            );
        }
    };
    let mut bounds = [None, None];
    for (slot, key) in bounds
        .iter_mut()
        .zip(["filter[created_at][gte]", "filter[created_at][lte]"])
    {
        if let Some(v) = query_value(&q, key) {
            match DateTime::parse_from_rfc3339(v) {
                Ok(t) => *slot = Some(t.with_timezone(&Utc)),
                Err(_) => return bad_request("must be an ISO 8601 datetime", key),
            }
        }
    }
    let [gte, lte] = bounds;
    let exact = |key: &str| query_value(&q, key).map(str::to_owned);
    let (session, leg, control, connection, from, to) = (
        exact("filter[call_session_id]"),
        exact("filter[call_leg_id]"),
        exact("filter[call_control_id]"),
        exact("filter[connection_id]"),
        exact("filter[from]"),
        exact("filter[to]"),
    );
    let now = Utc::now();
    let g = state.lock();
    let mut hits: Vec<&Entry> = g
        .recordings
        .values()
        .filter(|e| !e.deleted)
        .filter(|e| {
            let r = &e.rec;
            session.as_ref().is_none_or(|v| *v == r.call_session_id)
                && leg.as_ref().is_none_or(|v| *v == r.call_leg_id)
                && control.as_ref().is_none_or(|v| *v == r.call_control_id)
                && connection.as_ref().is_none_or(|v| *v == r.connection_id)
                && from.as_ref().is_none_or(|v| *v == r.from)
                && to.as_ref().is_none_or(|v| *v == r.to)
                && gte.is_none_or(|t| r.created_at >= t)
                && lte.is_none_or(|t| r.created_at <= t)
        })
        .collect();
    hits.sort_by(|a, b| (a.rec.created_at, &a.rec.id).cmp(&(b.rec.created_at, &b.rec.id)));
    let total = hits.len() as u64;
    let skip = usize::try_from((page_number - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
    let data: Vec<Value> = hits
        .iter()
        .skip(skip)
        .take(usize::try_from(page_size).unwrap_or(250))
        .map(|e| recording_json(state, &behaviour, e, now))
        .collect();
    json_response(
        200,
        &json!({
            "data": data,
            "meta": {
                "page_number": page_number,
                "page_size": page_size,
                "total_pages": total.div_ceil(page_size),
                "total_results": total,
            },
        }),
    )
}
