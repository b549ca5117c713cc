//! The bucket API: create, read, size and MIME limits.

use super::*;

/// `"50MB"`-style sizes as the bucket API accepts them (1024-based units).
pub(super) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult = match s[split..].trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1024,
        "MB" => MIB,
        "GB" => 1024 * MIB,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(super) async fn create_bucket(state: &State, body: Incoming) -> Result<Resp, Abort> {
    let bytes = read_small_body(body, 64 * 1024).await?;
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(validation("body must be object"));
    };
    let Some(name) = v.get("name").and_then(Value::as_str) else {
        return Ok(validation("body must have required property 'name'"));
    };
    let id = v.get("id").and_then(Value::as_str).unwrap_or(name);
    if id.is_empty() || id.contains('/') {
        return Ok(storage_error(
            400,
            "InvalidBucketName",
            "Invalid Input",
            "Bucket name invalid",
        ));
    }
    let public = v.get("public").and_then(Value::as_bool).unwrap_or(false);
    let file_size_limit = match v.get("file_size_limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Some(n),
            None => return Ok(validation("body/file_size_limit must be >= 0")),
        },
        Some(Value::String(s)) => match parse_size(s) {
            Some(n) => Some(n),
            None => {
                return Ok(storage_error(
                    400,
                    "InvalidRequest",
                    "InvalidRequest",
                    "Invalid file size format, hint: use 20GB / 20MB / 30KB / 3B",
                ));
            }
        },
        Some(_) => return Ok(validation("body/file_size_limit must be integer or string")),
    };
    let allowed_mime_types = match v.get("allowed_mime_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Some(_) => return Ok(validation("body/allowed_mime_types must be array")),
    };
    if !insert_bucket(state, id, name, public, file_size_limit, allowed_mime_types) {
        return Ok(duplicate());
    }
    Ok(json_response(200, &json!({ "name": name })))
}

pub(super) fn get_bucket(state: &State, id: &str) -> Resp {
    let g = state.lock();
    let Some(b) = g.buckets.get(id) else {
        return no_such_bucket();
    };
    json_response(
        200,
        &json!({
            "id": b.id,
            "name": b.name,
            "owner": "",
            "public": b.public,
            "type": "STANDARD",
            "file_size_limit": b.file_size_limit,
            "allowed_mime_types": b.allowed_mime_types,
            "created_at": ts(b.created_at),
            "updated_at": ts(b.updated_at),
        }),
    )
}

/// storage-api's `validateMimeType`: `type/*` or an exact `type/subtype`.
pub(super) fn mime_allowed(mime: &str, allowed: &[String]) -> bool {
    let Some((t, sub)) = mime.split_once('/') else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| a.split_once('/'))
        .any(|(at, asub)| at == t && (asub == "*" || asub == sub))
}

pub(super) fn check_mime(bucket: &BucketInfo, mime: &str) -> Result<(), StorageErr> {
    match bucket.allowed_mime_types.as_deref() {
        Some(allowed) if !allowed.is_empty() && !mime_allowed(mime, allowed) => {
            Err(StorageErr::InvalidMime(mime.to_owned()))
        }
        _ => Ok(()),
    }
}
