//! Hostile input at the listener: every request here gets the right answer
//! quickly, stores nothing it should not (verified garbage is quarantined,
//! as docs/DESIGN.md says), and leaves the daemon healthy.
//!
//! Each test prints how fast every case was answered (`cargo test hostile
//! -- --nocapture`); RELIABILITY.md quotes those figures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::testing;
use recording_relay::config::Config;
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, spawn_listener, spawn_with};

/// An answer that should come without any waiting on our side.
const QUICK: Duration = Duration::from_secs(1);

async fn listener_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let pool = testing::prepare(pool).await;
    let url = testing::database_url_of(&pool, None);
    spawn_with(pool, url, tweak).await
}

fn event(id: &str) -> Vec<u8> {
    testing::recording_saved_event(id, &format!("sess-{id}"))
        .to_string()
        .into_bytes()
}

/// What came back on a raw connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Closed (or reset) without a response.
    Closed,
    /// Still open, silent, when we stopped waiting.
    Nothing,
}

/// Reads until the end of a response head, a close, or `patience`.
async fn read_answer(stream: &mut (impl AsyncReadExt + Unpin), patience: Duration) -> Answer {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
            }
        }
    };
    let finished = tokio::time::timeout(patience, read).await;
    let status = std::str::from_utf8(&buf)
        .ok()
        .and_then(|text| text.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, finished) {
        (Some(code), _) => Answer::Status(code),
        (None, Ok(_)) => Answer::Closed,
        (None, Err(_)) => Answer::Nothing,
    }
}

/// Sends `head` and `body` at once on a fresh connection.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (Answer, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let answer = read_answer(&mut stream, Duration::from_secs(10)).await;
    (answer, started.elapsed())
}

/// Sends `prefix` at once, then `bytes` one at a time, `gap` apart, while
/// watching for the answer.
async fn trickle(
    addr: SocketAddr,
    prefix: Vec<u8>,
    bytes: Vec<u8>,
    gap: Duration,
) -> (Answer, Duration) {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        if writer.write_all(&prefix).await.is_err() {
            return;
        }
        for byte in bytes {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
        // Keep the write half open: a finished sender is not a closed client.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let answer = read_answer(&mut reader, Duration::from_secs(10)).await;
    let took = started.elapsed();
    sender.abort();
    (answer, took)
}

fn signed_head(app: &TestApp, body: &[u8], extra: &str) -> String {
    let [(ts_name, ts), (sig_name, sig)] =
        testing::signature_headers(&app.key, testing::unix_now(), body);
    format!(
        "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: {}\r\n\
         {ts_name}: {ts}\r\n{sig_name}: {sig}\r\n{extra}\r\n",
        body.len()
    )
}

/// A measured case, for the printed table.
struct Timings(Vec<(String, String, Duration)>);

impl Timings {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn add(&mut self, case: &str, answer: impl std::fmt::Debug, took: Duration) {
        self.0.push((case.to_owned(), format!("{answer:?}"), took));
    }

    fn print(&self, title: &str) {
        eprintln!("\n{title}");
        for (case, answer, took) in &self.0 {
            eprintln!(
                "  {case:<58} {answer:<14} {:>8.1} ms",
                took.as_secs_f64() * 1000.0
            );
        }
    }
}

/// Sends one request through reqwest and times it.
async fn timed(req: reqwest::RequestBuilder) -> (u16, Duration, reqwest::Response) {
    let started = Instant::now();
    let res = req.send().await.expect("answered");
    (res.status().as_u16(), started.elapsed(), res)
}

async fn assert_still_healthy(app: &TestApp, event_id: &str) {
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let res = app.post_signed(&event(event_id)).await;
    assert_eq!(res.status(), 200, "a valid event is still stored");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);
}

#[sqlx::test(migrations = false)]
async fn wrong_methods_paths_and_headers_are_refused_quickly(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut t = Timings::new();
    let body = event("ev-x");

    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FROBNICATE"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, took, res) = timed(app.client.request(m, app.url("/webhooks/telnyx"))).await;
        assert_eq!(status, 405, "{method}");
        assert_eq!(res.headers()["allow"], "POST");
        assert!(took < QUICK);
        t.add(&format!("{method} /webhooks/telnyx"), status, took);
    }
    for path in [
        "/",
        "/webhooks/telnyx/",
        "/WEBHOOKS/TELNYX",
        "/webhooks/telnyx/../../etc/passwd",
        "/webhooks/telnyx%00",
    ] {
        let (status, took, _) = timed(app.client.post(app.url(path)).body(body.clone())).await;
        assert_eq!(status, 404, "{path}");
        assert!(took < QUICK);
        t.add(&format!("POST {path}"), status, took);
    }

    // No content-type: the signature, not a header, vouches for the bytes.
    let mut req = app.client.post(app.url("/webhooks/telnyx"));
    for (name, value) in testing::signature_headers(&app.key, testing::unix_now(), &body) {
        req = req.header(name, value);
    }
    let (status, took, _) = timed(req.body(body.clone())).await;
    assert_eq!(status, 200, "signed, no content-type");
    t.add("signed, no content-type", status, took);
    let (status, took, _) = timed(
        app.client
            .post(app.url("/webhooks/telnyx"))
            .body(event("ev-unsigned")),
    )
    .await;
    assert_eq!(status, 401, "unsigned, no content-type");
    t.add("unsigned, no content-type", status, took);

    // Header bytes that are not UTF-8 (allowed on the wire as obs-text).
    let (answer, took) = raw(
        app.addr,
        &format!(
            "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: {}\r\n\
             telnyx-signature-ed25519: AAAA\r\n",
            body.len()
        ),
        &[b"telnyx-timestamp: 17\xff\xfe\r\n\r\n".as_slice(), &body].concat(),
    )
    .await;
    assert_eq!(answer, Answer::Status(401), "non-UTF-8 timestamp header");
    t.add("non-UTF-8 bytes in telnyx-timestamp", answer, took);

    // Two different Content-Lengths: the framing is ambiguous (request smuggling).
    let (answer, took) = raw(
        app.addr,
        "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"12345",
    )
    .await;
    assert_eq!(answer, Answer::Status(400), "conflicting content-length");
    t.add("two different content-lengths", answer, took);

    // Too many header fields.
    let many: String = (0..200).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let (answer, took) = raw(
        app.addr,
        &format!(
            "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\n{many}content-length: 0\r\n\r\n"
        ),
        b"",
    )
    .await;
    assert_eq!(answer, Answer::Status(431), "200 header fields");
    t.add("200 header fields", answer, took);
    for (_, answer, took) in &t.0 {
        assert!(*took < QUICK, "{answer} took {took:?}");
    }

    t.print("methods, paths, headers");
    assert_eq!(app.job_count().await, 1, "only the signed event");
    assert_eq!(app.quarantine_count().await, 0);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn compressed_bodies_are_refused_unread(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut t = Timings::new();
    let bomb = gzip_bomb(BOMB_INFLATED);
    assert!(
        bomb.len() < 1024 * 1024,
        "fits under the body limit: {}",
        bomb.len()
    );

    // Signed over the compressed bytes, so the encoding is the only reason to refuse.
    for encoding in ["gzip", "GZIP", "deflate", "br", "identity, gzip"] {
        let mut req = app
            .client
            .post(app.url("/webhooks/telnyx"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding);
        for (name, value) in testing::signature_headers(&app.key, testing::unix_now(), &bomb) {
            req = req.header(name, value);
        }
        let (status, took, res) = timed(req.body(bomb.clone())).await;
        assert_eq!(status, 415, "{encoding}");
        assert_eq!(res.headers()["accept-encoding"], "identity");
        assert!(took < QUICK, "{encoding}: {took:?}");
        t.add(
            &format!(
                "{} KiB gzip bomb, content-encoding: {encoding}",
                bomb.len() / 1024
            ),
            status,
            took,
        );
    }
    // A declared 1 GB compressed body is refused on its headers alone.
    let (answer, took) = raw(
        app.addr,
        "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-encoding: gzip\r\n\
         content-length: 1000000000\r\n\r\n",
        b"",
    )
    .await;
    assert!(matches!(answer, Answer::Status(413 | 415)), "{answer:?}");
    assert!(took < QUICK);
    t.add("gzip, content-length 1e9, no body sent", answer, took);

    // `identity` is no encoding at all.
    let body = event("ev-identity");
    let mut req = app
        .client
        .post(app.url("/webhooks/telnyx"))
        .header("content-encoding", "identity");
    for (name, value) in testing::signature_headers(&app.key, testing::unix_now(), &body) {
        req = req.header(name, value);
    }
    let (status, took, _) = timed(req.body(body)).await;
    assert_eq!(status, 200);
    t.add("content-encoding: identity, signed", status, took);

    t.print("compressed bodies");
    assert_eq!(app.job_count().await, 1);
    assert_eq!(app.quarantine_count().await, 0);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn oversized_bodies_are_refused_with_or_without_a_length(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut t = Timings::new();

    // Declared too large: refused on the header, the body is never sent.
    for len in [1024 * 1024 + 1, 1_000_000_000_000u64] {
        let (answer, took) = raw(
            app.addr,
            &format!(
                "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: {len}\r\n\r\n"
            ),
            b"",
        )
        .await;
        assert_eq!(answer, Answer::Status(413), "{len}");
        assert!(took < QUICK);
        t.add(&format!("content-length {len}, no body sent"), answer, took);
    }
    // Declared honestly and sent.
    let big = vec![b' '; 1024 * 1024 + 1];
    let started = Instant::now();
    let status = app.post_signed(&big).await.status().as_u16();
    assert_eq!(status, 413);
    t.add(
        "1 MiB + 1 byte, signed, with content-length",
        status,
        started.elapsed(),
    );

    // Chunked, no length: the limit counts bytes as they arrive.
    let stream = futures_util::stream::iter(
        (0..64).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 * 1024]))),
    );
    let (status, took, _) = timed(
        app.client
            .post(app.url("/webhooks/telnyx"))
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    assert_eq!(status, 413);
    t.add("4 MiB chunked, no content-length", status, took);
    for (case, _, took) in &t.0 {
        assert!(*took < QUICK, "{case}: {took:?}");
    }

    t.print("oversized bodies");
    assert_eq!(app.job_count().await, 0);
    assert_eq!(app.quarantine_count().await, 0);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn slow_clients_are_cut_off(pool: PgPool) {
    let header_timeout = Duration::from_millis(500);
    let app = listener_with(pool, |c| c.listener.header_read_timeout = header_timeout).await;
    let request_timeout = Config::default().listener.request_timeout;
    let mut t = Timings::new();

    // Slowloris: the head one byte every 50 ms would take ~10 s.
    let body = event("ev-slow");
    let head = signed_head(&app, &body, "");
    let (answer, took) = trickle(
        app.addr,
        Vec::new(),
        head.clone().into_bytes(),
        Duration::from_millis(50),
    )
    .await;
    assert!(
        matches!(answer, Answer::Closed | Answer::Status(408)),
        "{answer:?}"
    );
    assert!(
        took >= header_timeout && took < header_timeout + QUICK,
        "cut off after the header timeout, not before: {took:?}"
    );
    t.add(
        &format!("headers 1 byte/50 ms ({} bytes)", head.len()),
        answer,
        took,
    );

    // A connection that never says anything holds no slot for long.
    let started = Instant::now();
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    let answer = read_answer(&mut idle, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(answer, Answer::Closed);
    assert!(took < header_timeout + QUICK, "{took:?}");
    t.add("connect, send nothing", answer, took);

    // Headers at once, then the body one byte every 100 ms: ~100 s for this
    // body, far past the request budget.
    let (answer, took) = trickle(
        app.addr,
        head.into_bytes(),
        body.clone(),
        Duration::from_millis(100),
    )
    .await;
    assert!(
        matches!(answer, Answer::Status(408) | Answer::Closed),
        "{answer:?}"
    );
    assert!(
        took >= request_timeout && took < request_timeout + QUICK,
        "answered when the request budget ran out: {took:?}"
    );
    t.add("body 1 byte/100 ms after complete headers", answer, took);

    t.print("slow clients");
    assert_eq!(app.job_count().await, 0);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn connections_are_bounded_and_idle_ones_are_reclaimed(pool: PgPool) {
    let header_timeout = Duration::from_millis(600);
    let app = listener_with(pool, |c| {
        c.listener.max_connections = 2;
        c.listener.header_read_timeout = header_timeout;
    })
    .await;
    // Two silent connections take both slots.
    let _a = TcpStream::connect(app.addr).await.unwrap();
    let _b = TcpStream::connect(app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A third client waits for a slot (the kernel accepts the TCP connection,
    // the listener does not serve it) until the header timeout frees one.
    let started = Instant::now();
    let res = reqwest::Client::new()
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), 200);
    assert!(
        took >= header_timeout / 2,
        "it had to wait for a slot: {took:?}"
    );
    assert!(took < header_timeout + QUICK, "{took:?}");
    eprintln!(
        "\nconnection limit 2, two idle connections: third client served after {:.1} ms",
        took.as_secs_f64() * 1000.0
    );
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn verified_but_hostile_bodies_are_quarantined_or_ignored(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut t = Timings::new();

    let nested_arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let nested_objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let mut invalid_utf8 =
        br#"{"data":{"id":"ev-utf8","event_type":"call.recording.saved","payload":{"to":""#
            .to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe\xc3(");
    invalid_utf8.extend_from_slice(br#""}}}"#);
    let huge_float = r#"{"data":{"id":"ev-inf","event_type":"call.recording.saved","payload":{"duration_millis":1e400}}}"#;
    let quarantined: Vec<(&str, Vec<u8>)> = vec![
        ("10,000 nested arrays", nested_arrays.into_bytes()),
        ("10,000 nested objects", nested_objects.into_bytes()),
        (
            "duplicate data.id",
            br#"{"data":{"id":"ev-real","event_type":"call.recording.saved","payload":{},"id":"ev-smuggled"}}"#.to_vec(),
        ),
        (
            "duplicate data.id, escaped",
            br#"{"data":{"id":"ev-real","\u0069d":"ev-smuggled","event_type":"call.recording.saved","payload":{}}}"#.to_vec(),
        ),
        (
            "duplicate data.event_type",
            br#"{"data":{"id":"ev-t","event_type":"call.hangup","payload":{},"event_type":"call.recording.saved"}}"#.to_vec(),
        ),
        (
            "duplicate data",
            br#"{"data":{"id":"ev-d1","event_type":"call.recording.saved","payload":{}},"data":{"id":"ev-d2","event_type":"call.recording.saved","payload":{}}}"#.to_vec(),
        ),
        ("non-UTF-8 inside a string", invalid_utf8),
        ("non-UTF-8 bytes only", b"\xff\xfe\x00\x7b\x80".to_vec()),
        ("duration_millis: 1e400", huge_float.as_bytes().to_vec()),
    ];
    for (case, body) in &quarantined {
        let started = Instant::now();
        let res = app.post_signed(body).await;
        let took = started.elapsed();
        let status = res.status().as_u16();
        let v: Value = res.json().await.unwrap();
        assert_eq!(
            (status, v["status"].as_str()),
            (400, Some("quarantined")),
            "{case}: {v}"
        );
        let kept: Vec<u8> = sqlx::query_scalar(
            "SELECT raw_body FROM recording_relay.webhook_quarantine ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(&kept, body, "{case}: kept byte for byte");
        assert!(took < QUICK, "{case}: {took:?}");
        t.add(case, status, took);
    }
    assert_eq!(app.job_count().await, 0, "nothing quarantined became a job");

    // Integers beyond i64 or negative are read as "unknown", not refused: the
    // Recordings API supplies the duration.
    for (id, duration) in [("ev-big", "99999999999999999999999"), ("ev-neg", "-1")] {
        let mut v = testing::recording_saved_event(id, "sess-n");
        v["data"]["payload"]["duration_millis"] = "DURATION".into();
        let body = v
            .to_string()
            .replace(r#""DURATION""#, duration)
            .into_bytes();
        let started = Instant::now();
        let status = app.post_signed(&body).await.status().as_u16();
        assert_eq!(status, 200, "{id}");
        t.add(
            &format!("duration_millis: {duration}"),
            status,
            started.elapsed(),
        );
        let d: Option<i64> = sqlx::query_scalar(
            "SELECT duration_millis FROM recording_relay.recording_jobs WHERE event_id = $1",
        )
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(d, None, "{id}");
    }

    // Another event type, validly signed: acknowledged, not stored.
    let mut other = testing::recording_saved_event("ev-hangup", "sess-h");
    other["data"]["event_type"] = "call.hangup".into();
    let started = Instant::now();
    let res = app.post_signed(other.to_string().as_bytes()).await;
    let status = res.status().as_u16();
    assert_eq!(status, 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "ignored");
    t.add("signed call.hangup", status, started.elapsed());

    t.print("verified hostile bodies");
    assert_eq!(app.job_count().await, 2, "the two odd-duration events only");
    assert_eq!(app.quarantine_count().await, quarantined.len() as i64);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn replays_are_deduplicated_or_refused(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut t = Timings::new();
    let body = event("ev-replayed");
    let headers = testing::signature_headers(&app.key, testing::unix_now(), &body);
    let send = |headers: [(&'static str, String); 2], body: Vec<u8>| {
        let mut req = app
            .client
            .post(app.url("/webhooks/telnyx"))
            .header("content-type", "application/json");
        for (name, value) in headers {
            req = req.header(name, value);
        }
        timed(req.body(body))
    };
    let (status, took, _) = send(headers.clone(), body.clone()).await;
    assert_eq!(status, 200);
    t.add("original delivery", status, took);
    // The same captured request again, inside the 300 s window: a duplicate.
    let (status, took, res) = send(headers, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "duplicate");
    t.add("identical replay within the window", status, took);
    // A request captured 10 minutes ago (a new event id, so dedupe cannot help).
    let old = event("ev-old");
    let stale = testing::signature_headers(&app.key, testing::unix_now() - 600, &old);
    let (status, took, _) = send(stale, old).await;
    assert_eq!(status, 401);
    t.add("replay of a request signed 600 s ago", status, took);
    for (case, _, took) in &t.0 {
        assert!(*took < QUICK, "{case}: {took:?}");
    }

    t.print("replays");
    assert_eq!(app.job_count().await, 1);
    assert_still_healthy(&app, "ev-after").await;
    app.stop().await;
}

/// How much the gzip bomb inflates to: 128 MiB of zeros.
const BOMB_INFLATED: usize = 128 << 20;
/// CRC-32 of [`BOMB_INFLATED`] zero bytes (Python: `zlib.crc32(bytes(128 << 20))`),
/// so the bomb is a well-formed gzip member any decompressor would inflate.
const BOMB_CRC32: u32 = 0x8065_4151;

/// A gzip member of about 850 KB that inflates to 128 MiB of zeros: one
/// fixed-Huffman deflate block holding a literal zero and then 258-byte
/// back-references at distance 1 (13 bits each).
fn gzip_bomb(inflated: usize) -> Vec<u8> {
    assert_eq!(inflated, BOMB_INFLATED, "the CRC is for this size");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut bits = BitWriter::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed Huffman codes
    bits.code(0x30, 8); // literal 0
    let mut left = inflated - 1;
    while left >= 258 {
        bits.code(0b1100_0101, 8); // symbol 285: length 258
        bits.code(0, 5); // distance code 0: distance 1
        left -= 258;
    }
    for _ in 0..left {
        bits.code(0x30, 8);
    }
    bits.code(0, 7); // symbol 256: end of block
    out.extend(bits.finish());
    out.extend_from_slice(&BOMB_CRC32.to_le_bytes());
    // ISIZE: the inflated length modulo 2^32.
    out.extend_from_slice(&u32::try_from(inflated & 0xffff_ffff).unwrap().to_le_bytes());
    out
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Header fields and extra bits: least significant bit first.
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push((self.acc & 0xff) as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Huffman codes: most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
        self.put(reversed, len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push((self.acc & 0xff) as u8);
        }
        self.out
    }
}
