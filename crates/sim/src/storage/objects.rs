//! Objects: info, download (with `Range`), copy, delete.

use super::*;

pub(super) async fn delete_object(state: &State, bucket: &str, name: &str) -> Resp {
    let removed = state
        .lock()
        .objects
        .remove(&(bucket.to_owned(), name.to_owned()));
    match removed {
        None => no_such_key(),
        Some(obj) => {
            if let Data::File(p) = obj.data {
                let _ = tokio::fs::remove_file(p).await;
            }
            json_response(200, &json!({ "message": "Successfully deleted" }))
        }
    }
}

pub(super) fn etag(obj: &Obj) -> String {
    format!(
        "\"{}\"",
        obj.sha256_hex.get(..32).unwrap_or(&obj.sha256_hex)
    )
}

pub(super) fn info(state: &State, bucket: &str, name: &str) -> Resp {
    let g = state.lock();
    if !g.buckets.contains_key(bucket) {
        return no_such_bucket();
    }
    let Some(o) = g.objects.get(&(bucket.to_owned(), name.to_owned())) else {
        return no_such_key();
    };
    let mut resp = json_response(
        200,
        &json!({
            "id": o.id.to_string(),
            "name": name,
            "version": o.version.to_string(),
            "bucket_id": bucket,
            "size": o.size,
            "content_type": o.content_type,
            "cache_control": o.cache_control,
            "etag": etag(o),
            "metadata": null,
            "last_modified": ts(o.updated_at),
            "created_at": ts(o.created_at),
        }),
    );
    set_header(&mut resp, "etag", &etag(o));
    set_header(&mut resp, "last-modified", &http_date(o.updated_at));
    resp
}

pub(super) fn find_object(
    state: &State,
    bucket: &str,
    name: &str,
    public: bool,
) -> Result<Obj, StorageErr> {
    let g = state.lock();
    if public && !g.buckets.get(bucket).is_some_and(|b| b.public) {
        // A private bucket has no public URLs: the real answer is this.
        return Err(StorageErr::NoSuchBucket);
    }
    g.objects
        .get(&(bucket.to_owned(), name.to_owned()))
        .cloned()
        .ok_or(StorageErr::NoSuchKey)
}

pub(super) async fn download(
    state: &State,
    headers: &HeaderMap,
    bucket: &str,
    name: &str,
    public: bool,
) -> Resp {
    match find_object(state, bucket, name, public) {
        Ok(obj) => serve_object(obj, header_str(headers, "range")).await,
        Err(e) => e.json(),
    }
}

pub(super) async fn open_range(
    path: &PathBuf,
    start: u64,
    len: u64,
) -> io::Result<impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(start)).await?;
    Ok(ReaderStream::with_capacity(file.take(len), 64 * 1024))
}

/// Answers with an object's bytes, honouring a single `Range` the way an
/// `<audio>` element uses it to seek.
pub(super) async fn serve_object(obj: Obj, range: Option<&str>) -> Resp {
    let size = obj.size;
    let (code, start, end) = match parse_range(range, size) {
        ByteRange::Full => (200, 0, size),
        ByteRange::Partial { start, end } => (206, start, end + 1),
        ByteRange::Unsatisfiable => {
            let mut resp = json_response(
                416,
                &json!({ "statusCode": "416", "code": "InvalidRange", "error": "invalid_range", "message": "invalid range provided" }),
            );
            set_header(&mut resp, "content-range", &format!("bytes */{size}"));
            return resp;
        }
    };
    let body = match &obj.data {
        Data::Mem(b) => {
            let (s, e) = (
                usize::try_from(start).unwrap_or(b.len()).min(b.len()),
                usize::try_from(end).unwrap_or(b.len()).min(b.len()),
            );
            full_body(b.slice(s..e))
        }
        Data::File(p) => match open_range(p, start, end - start).await {
            Ok(s) => stream_body(s),
            Err(e) => {
                tracing::warn!(error = %e, "storage simulator could not read an object");
                return internal_error();
            }
        },
    };
    let mut resp = response(code, &obj.content_type, body);
    set_header(&mut resp, "content-length", &(end - start).to_string());
    set_header(&mut resp, "accept-ranges", "bytes");
    set_header(&mut resp, "etag", &etag(&obj));
    set_header(&mut resp, "last-modified", &http_date(obj.updated_at));
    set_header(&mut resp, "cache-control", &obj.cache_control);
    if code == 206 {
        set_header(
            &mut resp,
            "content-range",
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    resp
}

/// `POST /object/copy` `{bucketId, sourceKey, destinationKey,
/// destinationBucket?}`, as storage-api's `copyObject`: the source is looked
/// up first (404 `NoSuchKey`), then the destination is created, which
/// without `x-upsert: true` fails when it exists (409 `Duplicate`). The copy
/// keeps the source's content type and cache control and counts as a write
/// of the destination; the source stays.
pub(super) async fn copy_object(
    state: &State,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Resp, Abort> {
    let bytes = read_small_body(body, 64 * 1024).await?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(bucket), Some(source), Some(destination)) = (
        field("bucketId"),
        field("sourceKey"),
        field("destinationKey"),
    ) else {
        return Ok(validation(
            "body must have required properties 'sourceKey', 'bucketId', 'destinationKey'",
        ));
    };
    let dest_bucket = field("destinationBucket").unwrap_or_else(|| bucket.clone());
    let upsert = header_str(headers, "x-upsert") == Some("true");
    let found = {
        let g = state.lock();
        if !g.buckets.contains_key(&bucket) || !g.buckets.contains_key(&dest_bucket) {
            Err(StorageErr::NoSuchBucket)
        } else {
            g.objects
                .get(&(bucket.clone(), source.clone()))
                .cloned()
                .ok_or(StorageErr::NoSuchKey)
                .and_then(|o| {
                    if !upsert
                        && g.objects
                            .contains_key(&(dest_bucket.clone(), destination.clone()))
                    {
                        Err(StorageErr::Duplicate)
                    } else {
                        Ok(o)
                    }
                })
        }
    };
    let src = match found {
        Ok(o) => o,
        Err(e) => return Ok(e.json()),
    };
    // The destination gets bytes of its own, as S3's CopyObject gives it:
    // deleting the source must not take them away.
    let data = match &src.data {
        Data::Mem(b) => Data::Mem(b.clone()),
        Data::File(p) => {
            let Some(tmp) = state.tmp_path() else {
                return Ok(internal_error());
            };
            if let Err(e) = tokio::fs::copy(p, &tmp).await {
                tracing::warn!(error = %e, "storage simulator could not copy an object");
                let _ = tokio::fs::remove_file(&tmp).await;
                return Ok(internal_error());
            }
            Data::File(tmp)
        }
    };
    let rec = Received {
        size: src.size,
        sha256_hex: src.sha256_hex.clone(),
        data,
    };
    Ok(
        match commit(
            state,
            &dest_bucket,
            &destination,
            src.content_type.clone(),
            src.cache_control.clone(),
            upsert,
            rec,
        ) {
            Ok(id) => json_response(
                200,
                &json!({ "Id": id.to_string(), "Key": format!("{dest_bucket}/{destination}") }),
            ),
            Err(e) => e.json(),
        },
    )
}
