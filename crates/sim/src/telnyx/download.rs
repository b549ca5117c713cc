//! The presigned S3 URLs of `download_urls`: minted with an expiry, checked
//! and served with `Range`, with S3's XML errors.

use super::*;

fn amz_date(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

fn url_signature(key: &[u8], file: &str, date: &str, expires: u64) -> String {
    hex::encode(hmac_sha256(
        key,
        format!("GET\n/downloads/{file}\n{date}\n{expires}").as_bytes(),
    ))
}

pub(super) fn mint_url(state: &State, id: &str, format: &str, now: DateTime<Utc>) -> String {
    // X-Amz-Date has whole seconds; rounding it up keeps X-Amz-Expires
    // equal to the TTL (600, as Telnyx's URLs say) while the URL still lives
    // at least the full TTL.
    let floor = now.trunc_subsecs(0);
    let date_t = if floor == now {
        floor
    } else {
        floor + chrono::Duration::seconds(1)
    };
    let expires = state.ttl.as_secs_f64().ceil().max(1.0) as u64;
    let date = amz_date(date_t);
    let file = format!("{id}.{format}");
    let sig = url_signature(&state.signing_key, &file, &date, expires);
    format!(
        "{}/downloads/{}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=SIMKEY%2F{}%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}",
        state.origin,
        percent_encode(&file, false),
        date.get(..8).unwrap_or(&date),
    )
}

/// `/downloads/{id}.{wav|mp3}` → (id, format).
pub(super) fn parse_download_path(path: &str) -> Option<(String, String)> {
    let file = percent_decode(path.strip_prefix("/downloads/")?, false);
    let (id, format) = file.rsplit_once('.')?;
    (!id.is_empty() && (format == "wav" || format == "mp3"))
        .then(|| (id.to_owned(), format.to_owned()))
}

pub(super) fn download(state: &State, req: &Request<Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return s3_error(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
    }
    let Some((id, format)) = parse_download_path(req.uri().path()) else {
        return s3_error(404, "NoSuchKey", "The specified key does not exist.");
    };
    let q = parse_query(req.uri().query());
    let (Some(date), Some(expires), Some(sig)) = (
        query_value(&q, "X-Amz-Date"),
        query_value(&q, "X-Amz-Expires").and_then(|v| v.parse::<u64>().ok()),
        query_value(&q, "X-Amz-Signature"),
    ) else {
        return s3_error(
            403,
            "AccessDenied",
            "Query-string authentication requires the X-Amz-Date, X-Amz-Expires and X-Amz-Signature parameters",
        );
    };
    let expected = url_signature(&state.signing_key, &format!("{id}.{format}"), date, expires);
    if expected != sig {
        return s3_error(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        );
    }
    let Ok(minted) = NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ").map(|t| t.and_utc())
    else {
        return s3_error(
            403,
            "AuthorizationQueryParametersError",
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"",
        );
    };
    // Checked arithmetic: an absurd X-Amz-Expires must not panic the server.
    let deadline = i64::try_from(expires)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .and_then(|d| minted.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if Utc::now() >= deadline {
        state.lock().expired_downloads += 1;
        return s3_error(403, "AccessDenied", "Request has expired");
    }
    let (content, behaviour) = {
        let g = state.lock();
        // Only the recorded format's file exists, unless told otherwise.
        match g.recordings.get(&id).filter(|e| {
            !e.deleted && (!g.behaviour.only_recorded_format || e.rec.format.extension() == format)
        }) {
            Some(e) => (e.rec.content.clone(), g.behaviour.clone()),
            None => return s3_error(404, "NoSuchKey", "The specified key does not exist."),
        }
    };
    let content_type = if format == "mp3" {
        "audio/mpeg"
    } else {
        "audio/wav"
    };
    let size = content.len();
    let range = parse_range(crate::http::header_str(req.headers(), "range"), size);
    let (code, start, end) = match range {
        ByteRange::Full => (200, 0, size),
        ByteRange::Partial { start, end } => (206, start, end + 1),
        ByteRange::Unsatisfiable => {
            let mut resp = s3_error(
                416,
                "InvalidRange",
                "The requested range is not satisfiable",
            );
            set_header(&mut resp, "content-range", &format!("bytes */{size}"));
            return resp;
        }
    };
    let sent_end = end.saturating_sub(behaviour.download_short_by).max(start);
    let mut resp = response(
        code,
        content_type,
        stream_body(content.stream_range(start, sent_end)),
    );
    if behaviour.download_length {
        set_header(&mut resp, "content-length", &(end - start).to_string());
    }
    set_header(&mut resp, "accept-ranges", "bytes");
    if code == 206 {
        set_header(
            &mut resp,
            "content-range",
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    resp
}

pub(super) fn s3_error(status: u16, code: &str, message: &str) -> Resp {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{}</RequestId></Error>",
        uuid::Uuid::new_v4().simple()
    );
    bytes_response(status, "application/xml", body)
}

pub(super) fn s3_fault(status: u16) -> Resp {
    match status {
        403 => s3_error(403, "AccessDenied", "Access Denied"),
        404 => s3_error(404, "NoSuchKey", "The specified key does not exist."),
        500 => s3_error(
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        503 | 429 => s3_error(status, "SlowDown", "Please reduce your request rate."),
        _ => s3_error(
            status,
            "ServiceUnavailable",
            "The service is unavailable. Please try again.",
        ),
    }
}
