//! Unsigned traffic cannot crowd Telnyx out of the listener, nor the worker
//! out of the database: 1,100 keep-alive clients from one address and a
//! monitoring host scraping as fast as it is answered, while signed
//! webhooks arrive from another address and a job runs. Loopback only:
//! 127.0.0.1, .2 and .3 are three sources to the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::testing;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use recording_relay::jobs::{Job, JobContext, JobError, JobHandler, JobState, Outcome};
use sqlx::PgPool;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, eventually, spawn_serving};

/// The flood of the report: 1,100 clients from one address, each asking
/// for `/healthz` every 2 s on a connection it keeps open.
const FLOOD_CLIENTS: usize = 1_100;
const FLOOD_EVERY: Duration = Duration::from_secs(2);
const FLOOD_SOURCE: [u8; 4] = [127, 0, 0, 1];
/// Telnyx.
const TELNYX_SOURCE: [u8; 4] = [127, 0, 0, 2];
/// A monitoring host scraping `/metrics` and `/readyz` back to back on as
/// many connections as it may hold.
const SCRAPE_SOURCE: [u8; 4] = [127, 0, 0, 3];
const SCRAPERS: usize = 32;
/// Signed webhooks sent during the flood, one every 100 ms.
const WEBHOOKS: usize = 60;
/// Telnyx gives up on a delivery after this.
const TELNYX_PATIENCE: Duration = Duration::from_secs(2);
/// Heartbeats every 2 s: a missed one leaves a gap of 4 s.
const LEASE: Duration = Duration::from_secs(6);
const MOST_HEARTBEAT_GAP: Duration = Duration::from_secs(3);
/// Finished jobs in the table, so that a scrape which reads the history
/// costs what it would in production.
const HISTORY: usize = 20_000;

/// Holds every job until released.
#[derive(Clone)]
struct HoldUntil(CancellationToken);

impl JobHandler for HoldUntil {
    async fn handle(&self, _job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        self.0.cancelled().await;
        Ok(Outcome::Succeeded)
    }
}

/// The test opens about 2,400 sockets (both ends of every connection are
/// in this process): raise the soft limit to what it needs, or say why not.
fn enough_file_descriptors() -> bool {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const NEEDED: u64 = 4096;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|soft| soft >= NEEDED) {
        return true;
    }
    let raised = Rlimit {
        current: Some(limit.maximum.map_or(NEEDED, |hard| hard.min(NEEDED))),
        maximum: limit.maximum,
    };
    if setrlimit(Resource::Nofile, raised).is_ok()
        && getrlimit(Resource::Nofile)
            .current
            .is_none_or(|soft| soft >= NEEDED)
    {
        return true;
    }
    let why = format!(
        "the flood test needs {NEEDED} open files, and RLIMIT_NOFILE allows {:?} (hard {:?})",
        limit.current, limit.maximum
    );
    // In CI a skipped flood test would be a pass that proved nothing.
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    false
}

async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

async fn open(source: [u8; 4], to: SocketAddr) -> Option<SendRequest<Empty<Bytes>>> {
    let stream = connect_from(source, to).await.ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// What a group of clients got.
#[derive(Default)]
struct Tally {
    /// Clients that have sent their first request (or had it refused).
    started: AtomicUsize,
    answered: AtomicUsize,
    refused: AtomicUsize,
}

/// One keep-alive client: asks for `paths` in turn, resting `rest` after
/// each answer or refusal, and opens a new connection when its own closes.
async fn keep_asking(
    source: [u8; 4],
    to: SocketAddr,
    paths: &'static [&'static str],
    rest: Duration,
    tally: Arc<Tally>,
    stop: CancellationToken,
) {
    let mut sender = None;
    let mut started = false;
    for path in paths.iter().cycle() {
        if stop.is_cancelled() {
            return;
        }
        if sender.as_ref().is_none_or(SendRequest::is_closed) {
            sender = open(source, to).await;
        }
        if !std::mem::replace(&mut started, true) {
            tally.started.fetch_add(1, Ordering::SeqCst);
        }
        let asked = async {
            let s = sender.as_mut()?;
            s.ready().await.ok()?;
            let req = hyper::Request::get(*path)
                .header("host", "relay")
                .body(Empty::new())
                .unwrap();
            let res = s.send_request(req).await.ok()?;
            res.into_body().collect().await.ok()
        };
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = asked => answer,
        };
        if answer.is_some() {
            tally.answered.fetch_add(1, Ordering::SeqCst);
        } else {
            tally.refused.fetch_add(1, Ordering::SeqCst);
            sender = None;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rest) => {}
        }
    }
}

fn clients(
    n: usize,
    source: [u8; 4],
    app: &TestApp,
    paths: &'static [&'static str],
    rest: Duration,
    stop: &CancellationToken,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    for _ in 0..n {
        tokio::spawn(keep_asking(
            source,
            app.addr,
            paths,
            rest,
            tally.clone(),
            stop.clone(),
        ));
    }
    tally
}

/// How the job's lease was kept while it was watched.
#[derive(Debug)]
struct LeaseWatch {
    longest_gap: Duration,
    renewals: usize,
    /// The job left `running` or was claimed again (an attempt burnt).
    lost: Option<(JobState, i32)>,
}

/// Samples the job's lease every 50 ms until `stop`.
async fn watch_lease(pool: PgPool, id: i64, stop: CancellationToken) -> LeaseWatch {
    let mut last: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut changed = Instant::now();
    let mut watch = LeaseWatch {
        longest_gap: Duration::ZERO,
        renewals: 0,
        lost: None,
    };
    while !stop.is_cancelled() {
        let (state, attempts, until): (JobState, i32, Option<chrono::DateTime<chrono::Utc>>) =
            sqlx::query_as(
                "SELECT state, attempts, locked_until FROM recording_relay.recording_jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if state != JobState::Running || attempts != 1 {
            watch.lost.get_or_insert((state, attempts));
        }
        if until != last {
            if last.is_some() {
                watch.renewals += 1;
            }
            last = until;
            changed = Instant::now();
        }
        watch.longest_gap = watch.longest_gap.max(changed.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch
}

async fn fill_history(pool: &PgPool) {
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, finished_at)
         SELECT 'old-' || g, 'call.recording.saved', '{}', 'succeeded', now() - interval '1 day'
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(HISTORY).unwrap())
    .execute(pool)
    .await
    .unwrap();
    sqlx::raw_sql("ANALYZE recording_relay.recording_jobs")
        .execute(pool)
        .await
        .unwrap();
}

/// Telnyx: a new connection per delivery from its own address, and no
/// more patience than Telnyx has.
fn telnyx_client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(TELNYX_SOURCE))
        .pool_max_idle_per_host(0)
        .timeout(TELNYX_PATIENCE)
        .build()
        .unwrap()
}

/// Sends one signed webhook as Telnyx would: `Ok(time)` when it was stored
/// within Telnyx's patience.
async fn deliver(
    client: &reqwest::Client,
    app_url: &str,
    key: &ed25519_dalek::SigningKey,
    event_id: &str,
) -> Result<Duration, String> {
    let body = testing::recording_saved_event(event_id, &format!("sess-{event_id}")).to_string();
    let mut req = client
        .post(app_url)
        .header("content-type", "application/json");
    for (name, value) in testing::signature_headers(key, testing::unix_now(), body.as_bytes()) {
        req = req.header(name, value);
    }
    let started = Instant::now();
    let res = req.body(body).send().await.map_err(|e| format!("{e}"))?;
    let status = res.status();
    let answer: serde_json::Value = res.json().await.map_err(|e| format!("{e}"))?;
    let took = started.elapsed();
    if status == 200 && answer["status"] == "stored" && took < TELNYX_PATIENCE {
        Ok(took)
    } else {
        Err(format!("{status} {answer} after {took:?}"))
    }
}

#[sqlx::test(migrations = false)]
async fn a_flood_of_unsigned_keep_alive_clients_and_scrapes_neither_sheds_telnyx_nor_starves_the_worker(
    pool: PgPool,
) {
    if !enough_file_descriptors() {
        return;
    }
    let release = CancellationToken::new();
    let app = spawn_serving(
        pool,
        |c| {
            c.worker.concurrency = 1;
            c.worker.lease = LEASE;
        },
        HoldUntil(release.clone()),
    )
    .await;
    fill_history(&app.pool).await;
    let telnyx = telnyx_client();
    let webhook_url = app.url("/webhooks/telnyx");

    // A job that runs for the whole flood.
    deliver(&telnyx, &webhook_url, &app.key, "ev-job")
        .await
        .expect("the first webhook is stored");
    let job_id = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT id FROM recording_relay.recording_jobs WHERE event_id = 'ev-job' AND state = 'running'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            job_id().await.is_some()
        })
        .await,
        "the job never started"
    );
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_lease(
        app.pool.clone(),
        job_id().await.unwrap(),
        watch_stop.clone(),
    ));

    let flood_stop = CancellationToken::new();
    let scrapes = clients(
        SCRAPERS,
        SCRAPE_SOURCE,
        &app,
        &["/metrics", "/readyz"],
        Duration::ZERO,
        &flood_stop,
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            scrapes.answered.load(Ordering::SeqCst) >= SCRAPERS
        })
        .await,
        "the scrapes never got going"
    );
    let flood = clients(
        FLOOD_CLIENTS,
        FLOOD_SOURCE,
        &app,
        &["/healthz"],
        FLOOD_EVERY,
        &flood_stop,
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            flood.started.load(Ordering::SeqCst) == FLOOD_CLIENTS
        })
        .await,
        "the flood never got going"
    );

    let started = tokio::time::Instant::now();
    let mut deliveries = tokio::task::JoinSet::new();
    for i in 0..WEBHOOKS {
        let (telnyx, url, key) = (telnyx.clone(), webhook_url.clone(), app.key.clone());
        deliveries.spawn(async move {
            // Pacing, not synchronisation: Telnyx's deliveries spread over time.
            tokio::time::sleep_until(started + Duration::from_millis(100) * i as u32).await;
            deliver(&telnyx, &url, &key, &format!("ev-flood-{i}")).await
        });
    }
    let results = deliveries.join_all().await;
    let scrapes_during = scrapes.answered.load(Ordering::SeqCst);
    flood_stop.cancel();
    watch_stop.cancel();
    let lease = watcher.await.unwrap();
    release.cancel();

    let mut stored: Vec<Duration> = results.iter().filter_map(|r| r.clone().ok()).collect();
    stored.sort();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "flood: {} answered, {} refused; scrapes answered: {scrapes_during} ({} refused); \
         webhooks stored in time: {}/{WEBHOOKS}, median {:?}, slowest {:?}; lease: {lease:?}",
        flood.answered.load(Ordering::SeqCst),
        flood.refused.load(Ordering::SeqCst),
        scrapes.refused.load(Ordering::SeqCst),
        stored.len(),
        stored.get(stored.len() / 2),
        stored.last(),
    );
    assert!(
        failed.is_empty(),
        "{} of {WEBHOOKS} signed webhooks were not stored within 2 s, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(lease.lost, None, "the job lost its lease: {lease:?}");
    assert!(
        lease.longest_gap < MOST_HEARTBEAT_GAP && lease.renewals > 0,
        "a heartbeat was missed: {lease:?}"
    );
    let job = || {
        sqlx::query_as::<_, (JobState, i32)>(
            "SELECT state, attempts FROM recording_relay.recording_jobs WHERE event_id = 'ev-job'",
        )
        .fetch_one(&app.pool)
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            job().await.unwrap() == (JobState::Succeeded, 1)
        })
        .await,
        "the job did not succeed on its first attempt"
    );
    app.stop().await;
}

/// A connection from `source` to the listener, ready for requests.
async fn kept_alive(app: &TestApp) -> SendRequest<Empty<Bytes>> {
    open(FLOOD_SOURCE, app.addr)
        .await
        .expect("a connection to the listener")
}

async fn healthz(sender: &mut SendRequest<Empty<Bytes>>) -> bool {
    let req = hyper::Request::get("/healthz")
        .header("host", "relay")
        .body(Empty::new())
        .unwrap();
    match sender.ready().await {
        Ok(()) => sender
            .send_request(req)
            .await
            .is_ok_and(|res| res.status() == 200),
        Err(_) => false,
    }
}

/// hyper starts the header-read timeout again while it waits for the next
/// request, so it is the idle timeout too; a client that keeps asking is
/// let go once its connection is `max_connection_age` old.
#[sqlx::test(migrations = false)]
async fn a_kept_alive_connection_is_closed_when_idle_and_when_old(pool: PgPool) {
    let app = crate::overload::spawn_bounded(pool, |c| {
        c.listener.header_read_timeout = Duration::from_secs(1);
        c.listener.max_connection_age = Duration::from_secs(2);
    })
    .await;
    let mut idle = kept_alive(&app).await;
    assert!(healthz(&mut idle).await);
    assert!(
        eventually(Duration::from_secs(5), || async { idle.is_closed() }).await,
        "an idle connection stayed open"
    );

    let mut busy = kept_alive(&app).await;
    let opened = Instant::now();
    let mut answered = 0;
    while !busy.is_closed() && opened.elapsed() < Duration::from_secs(10) {
        if healthz(&mut busy).await {
            answered += 1;
        }
        // Pacing well inside the idle timeout, not synchronisation.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        busy.is_closed(),
        "a client that keeps asking kept its connection for {:?}",
        opened.elapsed()
    );
    assert!(answered > 3, "the connection was kept alive: {answered}");
    app.stop().await;
}

/// What every connection may send before its signature is checked is
/// bounded as a whole: while one body holds the budget, the next webhook
/// is answered 503 at once; once the budget is free its retry is stored.
#[sqlx::test(migrations = false)]
async fn a_body_over_the_listeners_byte_budget_is_shed_and_lands_on_its_retry(pool: PgPool) {
    use tokio::io::AsyncWriteExt as _;
    const BUDGET: usize = 4096;
    let app = crate::overload::spawn_bounded(pool, |c| {
        c.listener.max_body_bytes = BUDGET;
        c.listener.body_budget_bytes = BUDGET;
        // Generous, so only the budget can refuse a request.
        c.listener.request_timeout = Duration::from_secs(60);
    })
    .await;
    // An unsigned body that stops short of its declared length, holding
    // all but a few bytes of the budget.
    let mut holder = connect_from(FLOOD_SOURCE, app.addr).await.unwrap();
    holder
        .write_all(
            format!(
                "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: {BUDGET}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    holder.write_all(&[b'x'; BUDGET - 16]).await.unwrap();

    let event = |id: &str| {
        testing::recording_saved_event(id, &format!("sess-{id}"))
            .to_string()
            .into_bytes()
    };
    let served = &app;
    let answer = |id: String| async move {
        let res = served.post_signed(&event(&id)).await;
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        (status, body["status"].as_str().unwrap_or("").to_owned())
    };
    // Until the listener has read the holder's bytes, a webhook may still
    // be stored: each try is an event of its own.
    let tries = AtomicUsize::new(0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            answer(format!("ev-budget-{n}")).await == (503, "shed".to_owned())
        })
        .await,
        "every webhook was taken while the budget was held"
    );
    let shed = format!("ev-budget-{}", tries.load(Ordering::SeqCst));
    drop(holder);
    assert!(
        eventually(Duration::from_secs(5), || async {
            answer(shed.clone()).await == (200, "stored".to_owned())
        })
        .await,
        "the retry was not stored once the budget was free"
    );
    app.stop().await;
}

/// Found by the review of issue #19: one address that opened 32 unsigned
/// POSTs of 1 MiB and stalled each before its last byte held the whole
/// 32 MiB budget, and every Telnyx delivery meanwhile was shed. A source
/// now holds at most its share (a sixteenth, or one whole body).
#[sqlx::test(migrations = false)]
async fn one_unsigned_source_cannot_hold_the_whole_body_budget(pool: PgPool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: usize = 4096;
    const HOLDERS: usize = 16;
    const HOLDER_SOURCE: [u8; 4] = [127, 0, 0, 4];
    let app = crate::overload::spawn_bounded(pool, |c| {
        c.listener.max_body_bytes = BODY;
        c.listener.body_budget_bytes = BODY * HOLDERS;
        // Generous, so only the budget can refuse a request.
        c.listener.request_timeout = Duration::from_secs(60);
        c.listener.max_in_flight = 4 * HOLDERS;
    })
    .await;
    // Sixteen bodies from one address, each stopping 16 bytes short: the
    // whole budget, were a source allowed to take it.
    let mut holders = Vec::new();
    for _ in 0..HOLDERS {
        let mut holder = connect_from(HOLDER_SOURCE, app.addr).await.unwrap();
        holder
            .write_all(
                format!(
                    "POST /webhooks/telnyx HTTP/1.1\r\nhost: relay\r\ncontent-length: {BODY}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        holder.write_all(&[b'x'; BODY - 16]).await.unwrap();
        holders.push(holder);
    }
    // The listener has read them once it answers one of them: past its
    // share, the source's further bodies are shed at once.
    let mut refused = 0;
    for holder in &mut holders {
        let mut answer = [0u8; 12];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(2), holder.read(&mut answer)).await
            && answer[..n].starts_with(b"HTTP/1.1 503")
        {
            refused += 1;
        }
    }
    assert!(
        refused >= HOLDERS - 1,
        "one source held more than its share: {refused} of {HOLDERS} bodies refused"
    );
    // Telnyx, from another address, is stored meanwhile.
    let event = testing::recording_saved_event("ev-share", "sess-share")
        .to_string()
        .into_bytes();
    let res = app.post_signed(&event).await;
    assert_eq!(res.status().as_u16(), 200);
    drop(holders);
    app.stop().await;
}
