//! storage-api's error answers: JSON with the real code inside an HTTP 400,
//! and tus-node-server's plain-text ones.

use super::*;

pub(super) fn storage_error(status_code: u16, code: &str, error: &str, message: &str) -> Resp {
    // storage-api's error handler: everything but a 500 is sent as HTTP 400.
    let http = if status_code == 500 { 500 } else { 400 };
    json_response(
        http,
        &json!({ "statusCode": status_code.to_string(), "code": code, "error": error, "message": message }),
    )
}

pub(super) fn access_denied(message: &str) -> Resp {
    storage_error(403, "AccessDenied", "Unauthorized", message)
}

pub(super) fn no_such_bucket() -> Resp {
    storage_error(404, "NoSuchBucket", "Bucket not found", "Bucket not found")
}

pub(super) fn no_such_key() -> Resp {
    storage_error(404, "NoSuchKey", "not_found", "Object not found")
}

pub(super) fn duplicate() -> Resp {
    storage_error(
        409,
        "ResourceAlreadyExists",
        "Duplicate",
        "The resource already exists",
    )
}

pub(super) fn too_large() -> Resp {
    storage_error(
        413,
        "EntityTooLarge",
        "Payload too large",
        "The object exceeded the maximum allowed size",
    )
}

pub(super) fn invalid_mime(mime: &str) -> Resp {
    storage_error(
        415,
        "InvalidMimeType",
        "invalid_mime_type",
        &format!("mime type {mime} is not supported"),
    )
}

pub(super) fn internal_error() -> Resp {
    storage_error(500, "InternalError", "internal", "Internal server error")
}

/// A storage-api error, kept small and rendered late: as JSON on the REST
/// routes, as tus text (real status, message body) on the TUS routes, the
/// way storage-api's `onResponseError` hook maps them.
pub(super) enum StorageErr {
    AccessDenied(&'static str),
    NoSuchBucket,
    NoSuchKey,
    Duplicate,
    InvalidMime(String),
    Internal,
}

impl StorageErr {
    pub(super) fn json(self) -> Resp {
        match self {
            StorageErr::AccessDenied(m) => access_denied(m),
            StorageErr::NoSuchBucket => no_such_bucket(),
            StorageErr::NoSuchKey => no_such_key(),
            StorageErr::Duplicate => duplicate(),
            StorageErr::InvalidMime(m) => invalid_mime(&m),
            StorageErr::Internal => internal_error(),
        }
    }

    pub(super) fn tus(self) -> Resp {
        match self {
            StorageErr::AccessDenied(m) => tus_text(403, m),
            StorageErr::NoSuchBucket => tus_text(404, "Bucket not found"),
            StorageErr::NoSuchKey => tus_text(404, "Object not found"),
            StorageErr::Duplicate => tus_text(409, "The resource already exists"),
            StorageErr::InvalidMime(m) => tus_text(415, &format!("mime type {m} is not supported")),
            StorageErr::Internal => tus_text(500, "Internal server error"),
        }
    }
}

/// Fastify's schema-validation error, which bypasses the storage shape.
pub(super) fn validation(message: &str) -> Resp {
    json_response(
        400,
        &json!({ "statusCode": "400", "code": "FST_ERR_VALIDATION", "error": "Bad Request", "message": message }),
    )
}

pub(super) fn tus_text(status: u16, message: &str) -> Resp {
    let mut resp = bytes_response(status, "text/plain; charset=utf-8", message.to_owned());
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

pub(super) fn fault_response(status: u16, tus: bool) -> Resp {
    if tus {
        return tus_text(status, "Something went wrong with that request\n");
    }
    match status {
        // The gateway's and the database pool's answers keep their status.
        429 => json_response(
            429,
            &json!({ "statusCode": "429", "code": "SlowDown", "error": "too_many_connections", "message": "Too many connections issued to the database" }),
        ),
        s if s >= 500 => json_response(
            s,
            &json!({ "statusCode": s.to_string(), "code": "InternalError", "error": "internal", "message": "Internal server error" }),
        ),
        s => storage_error(s, "InvalidRequest", "InvalidRequest", "Simulated failure"),
    }
}
