//! Standard uploads (POST/PUT to `object/{bucket}/{name}`), streamed to a
//! temporary file and checked against the bucket's limits.

use super::*;

/// A temp file that deletes itself unless kept, so every early return and
/// dropped connection cleans up after a partial upload.
pub(super) struct TempFile(Option<PathBuf>);

impl TempFile {
    pub(super) fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(super) enum Sink {
    Mem(Vec<u8>),
    File(BufWriter<tokio::fs::File>, TempFile),
}

impl Sink {
    pub(super) async fn open(state: &State) -> io::Result<Sink> {
        match state.tmp_path() {
            None => Ok(Sink::Mem(Vec::new())),
            Some(p) => {
                let guard = TempFile(Some(p.clone()));
                let file = tokio::fs::File::create(&p).await?;
                Ok(Sink::File(
                    BufWriter::with_capacity(MIB as usize, file),
                    guard,
                ))
            }
        }
    }

    pub(super) async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Mem(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
            Sink::File(f, _) => f.write_all(data).await,
        }
    }

    pub(super) async fn finish(self) -> io::Result<Data> {
        match self {
            Sink::Mem(v) => Ok(Data::Mem(Bytes::from(v))),
            Sink::File(mut f, guard) => {
                f.flush().await?;
                drop(f);
                guard
                    .keep()
                    .map(Data::File)
                    .ok_or_else(|| io::Error::other("temp file vanished"))
            }
        }
    }
}

pub(super) struct Received {
    pub(super) size: u64,
    pub(super) sha256_hex: String,
    pub(super) data: Data,
}

pub(super) enum RecvError {
    TooLarge,
    /// The client went away, or a `ResetMidBody` fault fired.
    Aborted,
    Io(io::Error),
}

/// Streams a request body into memory or a temp file, hashing on the way
/// and stopping at `limit` bytes, so nothing is buffered whole.
pub(super) async fn receive(
    state: &State,
    body: &mut Incoming,
    limit: u64,
    cut: Option<u64>,
) -> Result<Received, RecvError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut sink = Sink::open(state).await.map_err(RecvError::Io)?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| RecvError::Aborted)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if cut.is_some_and(|c| size >= c) {
            return Err(RecvError::Aborted);
        }
        if size > limit {
            return Err(RecvError::TooLarge);
        }
        hasher.update(&data);
        sink.write(&data).await.map_err(RecvError::Io)?;
    }
    if cut.is_some() {
        // The body was shorter than the cut point: drop the connection anyway.
        return Err(RecvError::Aborted);
    }
    let data = sink.finish().await.map_err(RecvError::Io)?;
    Ok(Received {
        size,
        sha256_hex: hex::encode(hasher.finalize()),
        data,
    })
}

pub(super) fn remove_data(data: Data) {
    if let Data::File(p) = data {
        let _ = std::fs::remove_file(p);
    }
}

/// Publishes a fully received object. Visibility changes only here, so a
/// broken-off upload never shows.
pub(super) fn commit(
    state: &State,
    bucket: &str,
    name: &str,
    content_type: String,
    cache_control: String,
    upsert: bool,
    rec: Received,
) -> Result<Uuid, StorageErr> {
    let version = Uuid::new_v4();
    // Rename before locking; it is a cheap metadata operation.
    let data = match rec.data {
        Data::File(tmp) => match state.object_path(version) {
            Some(dst) => match std::fs::rename(&tmp, &dst) {
                Ok(()) => Data::File(dst),
                Err(e) => {
                    tracing::warn!(error = %e, "storage simulator could not store an object");
                    let _ = std::fs::remove_file(tmp);
                    return Err(StorageErr::Internal);
                }
            },
            None => Data::File(tmp),
        },
        mem => mem,
    };
    let key = (bucket.to_owned(), name.to_owned());
    let now = Utc::now();
    let outcome = {
        let mut g = state.lock();
        if !g.buckets.contains_key(bucket) {
            Err(StorageErr::NoSuchBucket)
        } else if !upsert && g.objects.contains_key(&key) {
            // Re-checked here: two concurrent uploads without upsert must
            // not both win.
            Err(StorageErr::Duplicate)
        } else {
            let (id, created_at) = g
                .objects
                .get(&key)
                .map_or((Uuid::new_v4(), now), |o| (o.id, o.created_at));
            let obj = Obj {
                id,
                version,
                size: rec.size,
                sha256_hex: rec.sha256_hex,
                content_type,
                cache_control,
                created_at,
                updated_at: now,
                data: data.clone(),
            };
            let old = g.objects.insert(key.clone(), obj).map(|o| o.data);
            *g.write_counts.entry(key).or_insert(0) += 1;
            Ok((id, old))
        }
    };
    match outcome {
        Ok((id, old)) => {
            if let Some(old) = old {
                remove_data(old);
            }
            Ok(id)
        }
        Err(e) => {
            remove_data(data);
            Err(e)
        }
    }
}

/// storage-api refuses an upload (key, bucket, mime type, declared size,
/// duplicate, RLS) before it reads the body, and answers on a connection it
/// keeps alive with the body unread. The body is held here, unread, so
/// hyper neither drains it nor reads the connection's next request; once
/// it is dropped, hyper closes the connection (it cannot drain cheaply), as
/// the real server resets it.
pub(super) fn refuse_unread(state: &State, body: Incoming, resp: Resp) -> Resp {
    let (hold, cancel) = (state.unread_body_hold, state.cancel.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = cancel.cancelled() => {}
        }
        drop(body);
    });
    resp
}

pub(super) async fn upload(
    state: &State,
    headers: &HeaderMap,
    mut body: Incoming,
    bucket: &str,
    name: &str,
    put: bool,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    // PUT is storage-api's update route, which always upserts.
    let upsert = put || header_str(headers, "x-upsert") == Some("true");
    let content_type = header_str(headers, "content-type")
        .filter(|s| !s.is_empty())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let cache_control = header_str(headers, "cache-control")
        .unwrap_or("no-cache")
        .to_owned();
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let checked = {
        let g = state.lock();
        match g.buckets.get(bucket) {
            None => Err(StorageErr::NoSuchBucket),
            Some(b) => check_mime(b, &content_type).and_then(|()| {
                if !upsert
                    && g.objects
                        .contains_key(&(bucket.to_owned(), name.to_owned()))
                {
                    Err(StorageErr::Duplicate)
                } else {
                    Ok(state.limit_for(b))
                }
            }),
        }
    };
    let limit = match checked {
        Ok(limit) => limit,
        Err(e) => return Ok(refuse_unread(state, body, e.json())),
    };
    if declared.is_some_and(|n| n > limit) && cut.is_none() {
        return Ok(refuse_unread(state, body, too_large()));
    }
    let rec = match receive(state, &mut body, limit, cut).await {
        Ok(rec) => rec,
        Err(RecvError::Aborted) => return Err(Abort),
        Err(RecvError::TooLarge) => {
            drain(&mut body).await;
            return Ok(too_large());
        }
        Err(RecvError::Io(e)) => {
            tracing::warn!(error = %e, "storage simulator could not buffer an upload");
            drain(&mut body).await;
            return Ok(internal_error());
        }
    };
    Ok(
        match commit(
            state,
            bucket,
            name,
            content_type,
            cache_control,
            upsert,
            rec,
        ) {
            Ok(id) => json_response(
                200,
                &json!({ "Key": format!("{bucket}/{name}"), "Id": id.to_string() }),
            ),
            Err(e) => e.json(),
        },
    )
}
