//! Resumable uploads (TUS 1.0.0): create, HEAD, PATCH in 6 MiB chunks,
//! completion.

use super::*;

/// Parses `Upload-Metadata` (`key base64value` pairs, comma separated).
pub(super) fn parse_metadata(value: &str) -> Option<HashMap<String, String>> {
    let mut map = HashMap::new();
    for pair in value.split(',') {
        let pair = pair.trim();
        let (k, v) = pair.split_once(' ').unwrap_or((pair, ""));
        if k.is_empty() {
            return None;
        }
        let v = v.trim();
        let decoded = STANDARD
            .decode(v)
            .or_else(|_| STANDARD_NO_PAD.decode(v))
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        if map.insert(k.to_owned(), decoded).is_some() {
            return None;
        }
    }
    Some(map)
}

pub(super) const INVALID_METADATA: &str = "Upload-Metadata is invalid. It MUST consist of one or more comma-separated key-value pairs. The key and value MUST be separated by a space. The key MUST NOT contain spaces and commas and MUST NOT be empty. The key SHOULD be ASCII encoded and the value MUST be Base64 encoded. All keys MUST be unique";

pub(super) async fn tus_create(state: &State, headers: &HeaderMap, mut body: Incoming) -> Resp {
    drain(&mut body).await;
    if header_str(headers, "tus-resumable") != Some(TUS_VERSION) {
        return tus_text(412, "Unsupported version\n");
    }
    if headers.contains_key("upload-defer-length") {
        return tus_text(
            501,
            "creation-defer-length extension is not (yet) supported.\n",
        );
    }
    let Some(length) = header_str(headers, "upload-length").and_then(|v| v.parse::<u64>().ok())
    else {
        return tus_text(
            400,
            "Upload-Length or Upload-Defer-Length header required\n",
        );
    };
    let Some(meta_header) = header_str(headers, "upload-metadata") else {
        return tus_text(400, "Metadata header is required");
    };
    let Some(meta) = parse_metadata(meta_header) else {
        return tus_text(400, INVALID_METADATA);
    };
    let bucket = meta.get("bucketName").cloned().unwrap_or_default();
    let object = meta.get("objectName").cloned().unwrap_or_default();
    if bucket.is_empty() || bucket.contains('/') {
        return tus_text(400, "Bucket name invalid");
    }
    if object.is_empty() {
        return tus_text(400, &format!("Invalid key: {object}"));
    }
    let content_type = meta
        .get("contentType")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    // storage-api's onCreate: a number means max-age, anything else no-cache.
    let cache_control = match meta.get("cacheControl") {
        Some(v)
            if !v.is_empty()
                && v.trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit()) =>
        {
            format!("max-age={v}")
        }
        _ => "no-cache".to_owned(),
    };
    let upsert = header_str(headers, "x-upsert") == Some("true");
    let version = Uuid::new_v4();
    let id = URL_SAFE_NO_PAD.encode(format!("{bucket}/{object}/{version}"));
    {
        let mut g = state.lock();
        let Some(b) = g.buckets.get(&bucket) else {
            return tus_text(404, "Bucket not found");
        };
        // tus-node-server's order: size limit, then the storage hooks
        // (duplicate check, then mime type).
        if length > state.limit_for(b) {
            return tus_text(413, "Maximum size exceeded\n");
        }
        if !upsert && g.objects.contains_key(&(bucket.clone(), object.clone())) {
            return tus_text(409, "The resource already exists");
        }
        if let Err(e) = check_mime(b, &content_type) {
            return e.tus();
        }
        let part = match state.tmp_path() {
            Some(p) => Part::File(p),
            None => Part::Mem(Vec::new()),
        };
        let ttl = chrono::Duration::from_std(state.tus_ttl).unwrap_or(chrono::Duration::MAX);
        g.uploads.insert(
            id.clone(),
            Tus {
                bucket,
                object,
                content_type,
                cache_control,
                length,
                offset: 0,
                hasher: Sha256::new(),
                part,
                busy: false,
                release: CancellationToken::new(),
                completed: false,
                expired: false,
                expires_at: Utc::now()
                    .checked_add_signed(ttl)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
            },
        );
    }
    let mut resp = empty_response(201);
    set_header(
        &mut resp,
        "location",
        &format!("{}/storage/v1/upload/resumable/{id}", state.origin),
    );
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

pub(super) fn is_gone(u: &Tus) -> bool {
    u.expired || (!u.completed && Utc::now() >= u.expires_at)
}

pub(super) fn tus_head(state: &State, id: &str) -> Resp {
    let g = state.lock();
    // HEAD answers carry no body, so only the status tells what went wrong.
    let mut resp = match g.uploads.get(id) {
        None => empty_response(404),
        Some(u) if is_gone(u) => empty_response(410),
        Some(u) => {
            let mut resp = empty_response(200);
            set_header(&mut resp, "upload-offset", &u.offset.to_string());
            set_header(&mut resp, "upload-length", &u.length.to_string());
            resp
        }
    };
    set_header(&mut resp, "cache-control", "no-store");
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

pub(super) fn tus_delete(state: &State, id: &str) -> Resp {
    let part = {
        let mut g = state.lock();
        match g.uploads.get(id) {
            None => return tus_text(404, "The file for this url was not found\n"),
            Some(u) if u.completed => {
                return tus_text(400, "Cannot terminate an already completed upload");
            }
            Some(_) => g.uploads.remove(id).map(|u| u.part),
        }
    };
    if let Some(Part::File(p)) = part {
        let _ = std::fs::remove_file(p);
    }
    let mut resp = empty_response(204);
    set_header(&mut resp, "tus-resumable", TUS_VERSION);
    resp
}

/// Clears an upload's `busy` flag however the PATCH ends, including when
/// hyper drops the request future because the client went away.
pub(super) struct BusyGuard<'a> {
    pub(super) state: &'a State,
    pub(super) id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.state.lock().uploads.get_mut(&self.id) {
            u.busy = false;
        }
    }
}

pub(super) struct PatchStart {
    pub(super) bucket: String,
    pub(super) object: String,
    pub(super) content_type: String,
    pub(super) cache_control: String,
    pub(super) length: u64,
    pub(super) offset: u64,
    pub(super) hasher: Sha256,
    pub(super) file: Option<PathBuf>,
    pub(super) completed: bool,
    /// Cancelled when another request asks for the upload's lock.
    pub(super) release: CancellationToken,
    pub(super) rate: Option<u64>,
}

pub(super) enum ChunkError {
    TooLarge,
    WrongSize,
    Aborted,
    Io(io::Error),
}

pub(super) async fn tus_patch(
    state: &State,
    headers: &HeaderMap,
    mut body: Incoming,
    id: &str,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    let client_offset = header_str(headers, "upload-offset").and_then(|v| v.parse::<u64>().ok());
    let early = if header_str(headers, "tus-resumable") != Some(TUS_VERSION) {
        Some(tus_text(412, "Unsupported version\n"))
    } else if header_str(headers, "content-type") != Some("application/offset+octet-stream") {
        Some(tus_text(403, "Content-Type header required\n"))
    } else if client_offset.is_none() {
        Some(tus_text(403, "Upload-Offset header required\n"))
    } else {
        None
    };
    if let Some(resp) = early {
        drain(&mut body).await;
        return Ok(resp);
    }
    let client_offset = client_offset.unwrap_or_default();
    let upsert = header_str(headers, "x-upsert") == Some("true");

    // Take the upload's lock, waiting a little for a PATCH whose client has
    // gone but whose request the server has not finished tearing down.
    let deadline = Instant::now() + Duration::from_secs(3);
    let start = loop {
        let step = {
            let mut g = state.lock();
            let exists = |g: &Inner, u: &Tus| {
                g.objects
                    .contains_key(&(u.bucket.clone(), u.object.clone()))
            };
            match g.uploads.get(id) {
                None => Err(tus_text(404, "The file for this url was not found\n")),
                Some(u) if is_gone(u) => {
                    Err(tus_text(410, "The file for this url no longer exists\n"))
                }
                // storage-api re-checks upload permission on every PATCH.
                Some(u) if !upsert && !u.completed && exists(&g, u) => {
                    Err(tus_text(409, "The resource already exists"))
                }
                Some(u) if u.busy => {
                    u.release.cancel();
                    Ok(None)
                }
                Some(_) => match g.uploads.get_mut(id) {
                    Some(u) => {
                        u.busy = true;
                        u.release = CancellationToken::new();
                        Ok(Some(PatchStart {
                            bucket: u.bucket.clone(),
                            object: u.object.clone(),
                            content_type: u.content_type.clone(),
                            cache_control: u.cache_control.clone(),
                            length: u.length,
                            offset: u.offset,
                            hasher: u.hasher.clone(),
                            file: match &u.part {
                                Part::File(p) => Some(p.clone()),
                                Part::Mem(_) => None,
                            },
                            completed: u.completed,
                            release: u.release.clone(),
                            rate: g.tus_patch_rate,
                        }))
                    }
                    None => Err(tus_text(404, "The file for this url was not found\n")),
                },
            }
        };
        match step {
            Ok(Some(start)) => break start,
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(None) => {
                drain(&mut body).await;
                return Ok(tus_text(500, "failed to acquire lock before timeout"));
            }
            Err(resp) => {
                drain(&mut body).await;
                return Ok(resp);
            }
        }
    };
    let _busy = BusyGuard {
        state,
        id: id.to_owned(),
    };

    let ok = |offset: u64, complete: bool| {
        let mut resp = empty_response(204);
        set_header(&mut resp, "upload-offset", &offset.to_string());
        set_header(&mut resp, "tus-resumable", TUS_VERSION);
        if complete {
            set_header(&mut resp, "tus-complete", "1");
        }
        resp
    };
    if start.completed {
        drain(&mut body).await;
        return Ok(if client_offset == start.length {
            ok(start.length, true)
        } else {
            tus_text(409, "Upload-Offset conflict\n")
        });
    }
    if client_offset != start.offset {
        drain(&mut body).await;
        return Ok(tus_text(409, "Upload-Offset conflict\n"));
    }
    let remaining = start.length - start.offset;
    let chunk_rule = |n: u64| chunk_size_ok(state, remaining, n);
    let wrong_size = || {
        tus_text(
            400,
            &format!(
                "chunk size must be exactly {} bytes, except for a shorter last chunk\n",
                state.tus_chunk
            ),
        )
    };
    if let Some(n) = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        let early = if n > remaining {
            Some(tus_text(413, "upload's size exceeded\n"))
        } else if !chunk_rule(n) && cut.is_none() {
            Some(wrong_size())
        } else {
            None
        };
        if let Some(resp) = early {
            drain(&mut body).await;
            return Ok(resp);
        }
    }

    let mut hasher = start.hasher.clone();
    let received = receive_chunk(state, &mut body, &start, &mut hasher, remaining, cut).await;
    let (n, mem_chunk) = match received {
        Ok(r) => r,
        Err(ChunkError::Aborted) => return Err(Abort),
        Err(ChunkError::TooLarge) => {
            drain(&mut body).await;
            return Ok(tus_text(413, "upload's size exceeded\n"));
        }
        Err(ChunkError::WrongSize) => {
            drain(&mut body).await;
            return Ok(wrong_size());
        }
        Err(ChunkError::Io(e)) => {
            tracing::warn!(error = %e, "storage simulator could not store a chunk");
            drain(&mut body).await;
            return Ok(tus_text(500, "Something went wrong receiving the file\n"));
        }
    };
    let new_offset = start.offset + n;
    let finished = new_offset == start.length;
    let part = {
        let mut g = state.lock();
        let Some(u) = g.uploads.get_mut(id) else {
            return Ok(tus_text(404, "The file for this url was not found\n"));
        };
        u.offset = new_offset;
        u.hasher = hasher.clone();
        if let (Part::Mem(v), Some(chunk)) = (&mut u.part, mem_chunk) {
            v.extend_from_slice(&chunk);
        }
        finished.then(|| std::mem::replace(&mut u.part, Part::Mem(Vec::new())))
    };
    let Some(part) = part else {
        return Ok(ok(new_offset, false));
    };
    let rec = Received {
        size: start.length,
        sha256_hex: hex::encode(hasher.finalize()),
        data: match part {
            Part::Mem(v) => Data::Mem(Bytes::from(v)),
            Part::File(p) => Data::File(p),
        },
    };
    let committed = commit(
        state,
        &start.bucket,
        &start.object,
        start.content_type,
        start.cache_control,
        upsert,
        rec,
    );
    let mut g = state.lock();
    match committed {
        Ok(_) => {
            if let Some(u) = g.uploads.get_mut(id) {
                u.completed = true;
            }
            Ok(ok(new_offset, true))
        }
        Err(e) => {
            // The data is gone with the failed commit, so the upload is too:
            // the client starts over (HEAD then answers 404).
            g.uploads.remove(id);
            Ok(e.tus())
        }
    }
}

/// Supabase's rule: every chunk is exactly the chunk size, except a shorter
/// last one.
pub(super) fn chunk_size_ok(state: &State, remaining: u64, n: u64) -> bool {
    !state.strict_chunks
        || n == state.tus_chunk.min(remaining)
        || (n == remaining && n < state.tus_chunk)
}

/// Receives one PATCH body. Memory mode returns the bytes to append; file
/// mode writes at the upload's offset (truncating anything a broken-off
/// PATCH left behind) and returns only the count.
pub(super) async fn receive_chunk(
    state: &State,
    body: &mut Incoming,
    start: &PatchStart,
    hasher: &mut Sha256,
    remaining: u64,
    cut: Option<u64>,
) -> Result<(u64, Option<Vec<u8>>), ChunkError> {
    let max_chunk = if state.strict_chunks {
        state.tus_chunk.min(remaining)
    } else {
        remaining
    };
    let mut file = match &start.file {
        None => None,
        Some(p) => {
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .await
                .map_err(ChunkError::Io)?;
            f.set_len(start.offset).await.map_err(ChunkError::Io)?;
            f.seek(SeekFrom::Start(start.offset))
                .await
                .map_err(ChunkError::Io)?;
            Some(BufWriter::with_capacity(MIB as usize, f))
        }
    };
    let mut mem = file.is_none().then(Vec::new);
    let mut n = 0u64;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = start.release.cancelled() => return Err(ChunkError::Aborted),
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|_| ChunkError::Aborted)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        n += data.len() as u64;
        if let Some(rate) = start.rate {
            let pace = Duration::from_secs_f64(data.len() as f64 / rate as f64);
            tokio::select! {
                () = tokio::time::sleep(pace) => {}
                () = start.release.cancelled() => return Err(ChunkError::Aborted),
            }
        }
        if cut.is_some_and(|c| n >= c) {
            return Err(ChunkError::Aborted);
        }
        if n > remaining {
            return Err(ChunkError::TooLarge);
        }
        if n > max_chunk {
            return Err(ChunkError::WrongSize);
        }
        hasher.update(&data);
        match (&mut file, &mut mem) {
            (Some(f), _) => f.write_all(&data).await.map_err(ChunkError::Io)?,
            (None, Some(v)) => v.extend_from_slice(&data),
            (None, None) => {}
        }
    }
    if cut.is_some() {
        return Err(ChunkError::Aborted);
    }
    if !chunk_size_ok(state, remaining, n) {
        return Err(ChunkError::WrongSize);
    }
    if let Some(mut f) = file {
        f.flush().await.map_err(ChunkError::Io)?;
    }
    Ok((n, mem))
}
