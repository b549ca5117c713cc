//! Plumbing shared by the two simulators: a hyper accept loop that stops on a
//! cancellation token, response builders, fault injection, `Range` parsing,
//! query-string decoding and a small HMAC for the simulators' signed URLs.

use std::{
    collections::VecDeque, convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Response body of both simulators. Unsync because streamed bodies are built
/// from `unfold` futures that are `Send` but not `Sync`.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;
/// A simulator response.
pub(crate) type Resp = Response<Body>;

/// A failure a simulator injects instead of, or into, its normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and the service's own error body (Telnyx JSON,
    /// S3 XML for Telnyx downloads, storage-api JSON or tus text for storage).
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Wait this long, then answer normally (for client timeouts).
    Hang(Duration),
    /// On a response (downloads, API answers): send the headers and this many
    /// body bytes, then drop the connection. On an upload to the storage
    /// simulator: read this many request body bytes, then drop the connection
    /// without answering (nothing is stored).
    ResetMidBody { after_bytes: u64 },
}

/// Returned by a request handler to make hyper drop the connection without
/// writing a response: that is how `Fault::Reset` reaches the client.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the simulator")]
pub(crate) struct Abort;

/// Queue of one-shot faults plus an optional random background rate.
#[derive(Debug)]
pub(crate) struct FaultPlan {
    queue: VecDeque<(usize, Fault)>,
    random_probability: f64,
    random_kinds: Vec<Fault>,
    rng: fastrand::Rng,
}

impl FaultPlan {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            random_probability: 0.0,
            random_kinds: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Queues `fault` for the next `n` requests, after any already queued.
    pub(crate) fn push(&mut self, n: usize, fault: Fault) {
        if n > 0 {
            self.queue.push_back((n, fault));
        }
    }

    pub(crate) fn set_random(&mut self, probability: f64, kinds: Vec<Fault>) {
        self.random_probability = if probability.is_finite() {
            probability.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.random_kinds = kinds;
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.random_probability = 0.0;
        self.random_kinds.clear();
    }

    /// The fault for the request being handled now, if any. Queued faults
    /// win over random ones so a test's explicit plan is exact.
    pub(crate) fn next(&mut self) -> Option<Fault> {
        if let Some((left, fault)) = self.queue.front_mut() {
            let fault = fault.clone();
            *left -= 1;
            if *left == 0 {
                self.queue.pop_front();
            }
            return Some(fault);
        }
        if self.random_kinds.is_empty() || self.random_probability <= 0.0 {
            return None;
        }
        if self.rng.f64() < self.random_probability {
            let i = self.rng.usize(..self.random_kinds.len());
            return self.random_kinds.get(i).cloned();
        }
        None
    }
}

/// What the handler must do about the fault drawn for a request.
pub(crate) enum FaultAction {
    None,
    Status(u16),
    Reset,
    CutAfter(u64),
}

/// Applies the timing part of a fault (`Hang`) and tells the caller what is
/// left to do. A hang cut short by shutdown becomes a reset.
pub(crate) async fn start_fault(fault: Option<Fault>, cancel: &CancellationToken) -> FaultAction {
    match fault {
        None => FaultAction::None,
        Some(Fault::Status(s)) => FaultAction::Status(s),
        Some(Fault::Reset) => FaultAction::Reset,
        Some(Fault::ResetMidBody { after_bytes }) => FaultAction::CutAfter(after_bytes),
        Some(Fault::Hang(d)) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => FaultAction::None,
                _ = cancel.cancelled() => FaultAction::Reset,
            }
        }
    }
}

/// Binds a listener; split from [`spawn_server`] so a simulator knows its
/// own address (for absolute URLs) before it serves anything.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `handler` on `listener` until `cancel` fires.
///
/// Synchronous so `start` can stay synchronous, but it must be called from
/// inside a Tokio runtime (it spawns the accept loop there).
pub(crate) fn spawn_server<H, F>(
    listener: std::net::TcpListener,
    cancel: CancellationToken,
    handler: H,
) -> io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Resp, Abort>> + Send + 'static,
{
    let rt = tokio::runtime::Handle::try_current().map_err(|e| {
        io::Error::other(format!("simulator must start inside a Tokio runtime: {e}"))
    })?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    rt.spawn(accept_loop(listener, cancel, Arc::new(handler)));
    Ok(())
}

async fn accept_loop<H, F>(
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
    handler: Arc<H>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Resp, Abort>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE under a benchmark; back off instead of spinning.
                    tracing::debug!(error = %e, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| (*handler)(req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            // Dropping the connection future on shutdown aborts in-flight
            // requests, which is what a test tearing a simulator down wants.
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

pub(crate) fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

pub(crate) fn stream_body<S>(stream: S) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Sets a header, skipping values that are not valid header text (they come
/// from request data, and a bad value must not turn into a panic).
pub(crate) fn set_header(resp: &mut Resp, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

pub(crate) fn response(code: u16, content_type: &str, body: Body) -> Resp {
    let mut resp = Response::new(body);
    *resp.status_mut() = status(code);
    if !content_type.is_empty() {
        set_header(&mut resp, "content-type", content_type);
    }
    resp
}

pub(crate) fn bytes_response(code: u16, content_type: &str, bytes: impl Into<Bytes>) -> Resp {
    let bytes = bytes.into();
    let len = bytes.len();
    let mut resp = response(code, content_type, full_body(bytes));
    set_header(&mut resp, "content-length", &len.to_string());
    resp
}

pub(crate) fn json_response(code: u16, value: &serde_json::Value) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_response(code, "application/json; charset=utf-8", body)
}

pub(crate) fn empty_response(code: u16) -> Resp {
    response(code, "", full_body(Bytes::new()))
}

/// Wraps a response so its body breaks off after `after` bytes: the client
/// has the headers (and `content-length`) but the connection dies mid-body.
pub(crate) fn cut_response(resp: Resp, after: u64) -> Resp {
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, cut_body(body, after))
}

fn cut_body(body: Body, after: u64) -> Body {
    enum St {
        Passing(Body, u64),
        // Pause before failing so the bytes already handed to hyper are
        // flushed to the socket rather than lost with the connection.
        Failing,
        Done,
    }
    let s = futures_util::stream::unfold(St::Passing(body, 0), move |st| async move {
        match st {
            St::Done => None,
            St::Failing => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let err =
                    io::Error::new(io::ErrorKind::ConnectionReset, "simulated reset mid-body");
                Some((Err(err), St::Done))
            }
            St::Passing(mut body, sent) => {
                if sent >= after {
                    return Some((Ok(Bytes::new()), St::Failing));
                }
                match body.frame().await {
                    None => Some((Ok(Bytes::new()), St::Failing)),
                    Some(Err(e)) => Some((Err(e), St::Done)),
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else {
                            return Some((Ok(Bytes::new()), St::Passing(body, sent)));
                        };
                        let room = after - sent;
                        if data.len() as u64 >= room {
                            // `room` < data.len() here, so it fits in usize.
                            let part = data.slice(..room as usize);
                            Some((Ok(part), St::Failing))
                        } else {
                            let n = data.len() as u64;
                            Some((Ok(data), St::Passing(body, sent + n)))
                        }
                    }
                }
            }
        }
    });
    stream_body(s)
}

/// Reads a small request body (JSON), refusing more than `limit` bytes.
pub(crate) async fn read_small_body(body: Incoming, limit: usize) -> Result<Bytes, Abort> {
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Abort)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Abort);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

/// Reads and discards the rest of a request body, so an early error answer
/// reaches a client that is still sending instead of a broken pipe.
pub(crate) async fn drain(body: &mut Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// The token of `Authorization: Bearer <token>`, scheme case-insensitive.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A parsed single-range `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    Full,
    /// Inclusive bounds, already clamped to the resource.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Parses `Range: bytes=a-b | a- | -n` against a resource of `size` bytes.
/// Syntax it does not understand, and multi-range requests, are ignored
/// (answered with the whole resource), which RFC 9110 allows.
pub(crate) fn parse_range(value: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return ByteRange::Full;
        };
        if n == 0 || size == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Partial {
            start: size.saturating_sub(n),
            end: size - 1,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return ByteRange::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(end) if end >= start => end,
            _ => return ByteRange::Full,
        }
    };
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Partial {
        start,
        end: end.min(size - 1),
    }
}

/// Decodes `%XX` escapes (and `+` as space in query strings). Bad escapes
/// are kept literally; invalid UTF-8 is replaced, never a panic.
pub(crate) fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/`
/// when `keep_slash`, for object paths).
pub(crate) fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits and decodes a query string into (key, value) pairs, in order.
pub(crate) fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

pub(crate) fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// HMAC-SHA256 (RFC 2104), enough to sign the simulators' URLs and tokens
/// without another dependency.
pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().into()
}

/// A random per-simulator key; only has to differ between runs, not be
/// cryptographically strong.
pub(crate) fn random_key() -> [u8; 32] {
    std::array::from_fn(|_| fastrand::u8(..))
}

/// `Last-Modified` style date (IMF-fixdate).
pub(crate) fn http_date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), ByteRange::Full);
        assert_eq!(
            parse_range(Some("bytes=0-3"), 10),
            ByteRange::Partial { start: 0, end: 3 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-"), 10),
            ByteRange::Partial { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-100"), 10),
            ByteRange::Partial { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            ByteRange::Partial { start: 7, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            ByteRange::Partial { start: 0, end: 9 }
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=4-2"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), ByteRange::Full);
    }

    #[test]
    fn query_and_escapes() {
        let q = parse_query(Some(
            "filter%5Bto%5D=%2B1555&page[size]=2&x=a+b&bad=%zz&tail=%4",
        ));
        assert_eq!(query_value(&q, "filter[to]"), Some("+1555"));
        assert_eq!(query_value(&q, "page[size]"), Some("2"));
        assert_eq!(query_value(&q, "x"), Some("a b"));
        assert_eq!(query_value(&q, "bad"), Some("%zz"));
        assert_eq!(query_value(&q, "tail"), Some("%4"));
        assert_eq!(percent_encode("a b/c+é", true), "a%20b/c%2B%C3%A9");
        assert_eq!(
            percent_decode(&percent_encode("a b/c+é", false), false),
            "a b/c+é"
        );
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn fault_plan_order() {
        let mut plan = FaultPlan::new(1);
        plan.push(2, Fault::Reset);
        plan.push(1, Fault::Status(500));
        assert_eq!(plan.next(), Some(Fault::Reset));
        assert_eq!(plan.next(), Some(Fault::Reset));
        assert_eq!(plan.next(), Some(Fault::Status(500)));
        assert_eq!(plan.next(), None);
        plan.set_random(1.0, vec![Fault::Status(503)]);
        assert_eq!(plan.next(), Some(Fault::Status(503)));
        plan.clear();
        assert_eq!(plan.next(), None);
    }
}
