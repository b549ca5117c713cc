use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::testing;
use ed25519_dalek::SigningKey;
use recording_relay::app::{App, NoJobs};
use recording_relay::config::{Config, Role};
use recording_relay::jobs::{Job, JobHandler, Queue};
use recording_relay::pipeline::Pipeline;
use recording_relay::providers::storage_api::RECORDINGS_BUCKET;
use recording_relay_sim::{SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig};
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) struct TestApp {
    pub addr: SocketAddr,
    /// The playback server, when the test's config turned it on.
    pub playback_addr: Option<SocketAddr>,
    pub pool: PgPool,
    pub key: SigningKey,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
}

/// Settings for a test process: loopback port 0, a fresh signing key.
pub(crate) fn test_config(database_url: String, key: &SigningKey) -> Config {
    let mut config = Config::default();
    config.database.url = Some(database_url.into());
    config.listener.addr = "127.0.0.1:0".parse().unwrap();
    config.telnyx.public_key = Some(testing::public_key_base64(key));
    config.worker.poll_interval = Duration::from_millis(500);
    config
}

/// Starts the listener (no worker) against the test database.
pub(crate) async fn spawn_listener(pool: PgPool) -> TestApp {
    let pool = testing::prepare(pool).await;
    let url = testing::database_url_of(&pool, None);
    spawn_with(pool, url, |_| {}).await
}

pub(crate) async fn spawn_with(
    pool: PgPool,
    database_url: String,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let key = testing::signing_key();
    let mut config = test_config(database_url, &key);
    tweak(&mut config);
    start(pool, key, config, Role::Listen, NoJobs).await
}

/// Starts listener and worker in one process (`serve`) against the test
/// database, with `handler` running the jobs.
pub(crate) async fn spawn_serving<H: JobHandler>(
    pool: PgPool,
    tweak: impl FnOnce(&mut Config),
    handler: H,
) -> TestApp {
    let pool = testing::prepare(pool).await;
    let url = testing::database_url_of(&pool, None);
    let key = testing::signing_key();
    let mut config = test_config(url, &key);
    // A worker process also looks up recordings that never came (Telnyx's
    // API): a key it never gets to use, as `serve` requires one.
    config.telnyx.api_key = Some("KEY_unused".to_owned().into());
    tweak(&mut config);
    start(pool, key, config, Role::Serve, handler).await
}

/// Builds the app from `config`, binds its ports and runs it in the
/// background with `handler`.
async fn start<H: JobHandler>(
    pool: PgPool,
    key: SigningKey,
    config: Config,
    role: Role,
    handler: H,
) -> TestApp {
    let app = App::build(config, role).await.expect("app builds");
    let addr = app.local_addr().expect("listener bound");
    let playback_addr = app.playback_addr();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move {
        app.run(handler, token).await.expect("app runs");
    });
    TestApp {
        addr,
        playback_addr,
        pool,
        key,
        client: reqwest::Client::new(),
        shutdown,
        handle,
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` signed at `timestamp` like Telnyx would.
    pub(crate) async fn post_signed_at(&self, body: &[u8], timestamp: i64) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/webhooks/telnyx"))
            .header("content-type", "application/json");
        for (name, value) in testing::signature_headers(&self.key, timestamp, body) {
            req = req.header(name, value);
        }
        req.body(body.to_vec()).send().await.expect("request sent")
    }

    pub(crate) async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post_signed_at(body, testing::unix_now()).await
    }

    pub(crate) async fn job_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM recording_relay.recording_jobs")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub(crate) async fn quarantine_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM recording_relay.webhook_quarantine")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// A TCP forwarder in front of PostgreSQL that can be cut and restored, to
/// make the database unreachable for the app without stopping the server.
pub(crate) struct CuttableProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    /// Connections, numbered from 0 in accept order, that are closed at once.
    refused: Arc<Mutex<std::ops::Range<usize>>>,
}

impl CuttableProxy {
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let refused = Arc::new(Mutex::new(0..0));
        let (up2, cut2, refused2) = (up.clone(), cut.clone(), refused.clone());
        let accepted = AtomicUsize::new(0);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let number = accepted.fetch_add(1, Ordering::SeqCst);
                if !up2.load(Ordering::SeqCst) || refused2.lock().unwrap().contains(&number) {
                    drop(inbound);
                    continue;
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            cut,
            refused,
        }
    }

    /// Closes the connections numbered `numbers` (from 0, in accept order)
    /// as soon as they arrive, like a server going away and coming back.
    pub(crate) fn refuse_connections(&self, numbers: std::ops::Range<usize>) {
        *self.refused.lock().unwrap() = numbers;
    }

    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The daemon (listener + worker + real pipeline) against the Telnyx and
/// Storage simulators, with fast retries.
pub(crate) struct PipelineApp {
    pub app: TestApp,
    pub telnyx: TelnyxSim,
    pub storage: StorageSim,
    pub bucket: String,
}

pub(crate) const TELNYX_KEY: &str = "KEY_test_telnyx";
pub(crate) const STORAGE_KEY: &str = "test-service-role-key";

/// The Telnyx and Storage simulators with the test keys.
pub(crate) struct Providers {
    pub telnyx: TelnyxSim,
    pub storage: StorageSim,
}

/// Starts both simulators; with `with_bucket`, a private `call-recordings`
/// bucket that accepts anything.
pub(crate) fn providers(with_bucket: bool) -> Providers {
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_KEY.to_owned(),
        ..TelnyxSimConfig::default()
    })
    .unwrap();
    let storage = StorageSim::start(StorageSimConfig {
        service_key: STORAGE_KEY.to_owned(),
        ..StorageSimConfig::default()
    })
    .unwrap();
    if with_bucket {
        storage.create_bucket("call-recordings", false, None, None);
    }
    Providers { telnyx, storage }
}

pub(crate) async fn spawn_pipeline(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> PipelineApp {
    let pool = testing::prepare(pool).await;
    let Providers { telnyx, storage } = providers(false);
    let bucket = "call-recordings".to_owned();
    storage.create_bucket(
        &bucket,
        false,
        Some(RECORDINGS_BUCKET.file_size_limit),
        Some(RECORDINGS_BUCKET.mime_types()),
    );
    let key = testing::signing_key();
    let mut config = test_config(testing::database_url_of(&pool, None), &key);
    config.telnyx.api_key = Some(TELNYX_KEY.to_owned().into());
    config.telnyx.api_url = telnyx.base_url();
    config.supabase.url = Some(storage.base_url());
    config.supabase.service_role_key = Some(STORAGE_KEY.to_owned().into());
    config.supabase.bucket = bucket.clone();
    config.worker.poll_interval = Duration::from_millis(200);
    config.retry.base = Duration::from_millis(100);
    config.retry.cap = Duration::from_millis(300);
    config.pipeline.match_attempts = 2;
    config.pipeline.match_retry_delay = Duration::from_millis(100);
    tweak(&mut config);

    let pipeline = Pipeline::from_config(&config).unwrap();
    PipelineApp {
        app: start(pool, key, config, Role::Serve, pipeline).await,
        telnyx,
        storage,
        bucket,
    }
}

/// A patient and an intake created just before `rec` started, as ZScribe
/// does when an agent starts an intake call.
pub(crate) async fn intake_for(pool: &PgPool, rec: &SimRecording, phone: &str) -> Uuid {
    let patient: Uuid =
        sqlx::query_scalar("INSERT INTO public.patients (phone) VALUES ($1) RETURNING id")
            .bind(phone)
            .fetch_one(pool)
            .await
            .unwrap();
    sqlx::query_scalar(
        "INSERT INTO public.intakes (patient_id, room_name, created_at)
         VALUES ($1, 'room', $2 - interval '30 seconds') RETURNING id",
    )
    .bind(patient)
    .bind(rec.recording_started_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The webhook Telnyx sends for `rec` (official shape: no recording id).
pub(crate) fn webhook_for(event_id: &str, rec: &SimRecording) -> Vec<u8> {
    let mut event = testing::recording_saved_event(event_id, &rec.call_session_id);
    let p = &mut event["data"]["payload"];
    p["call_leg_id"] = rec.call_leg_id.clone().into();
    p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
    event.to_string().into_bytes()
}

impl PipelineApp {
    pub(crate) async fn job(&self, event_id: &str) -> Option<Job> {
        Queue::new(self.app.pool.clone())
            .get_by_event_id(event_id)
            .await
            .unwrap()
    }

    /// Waits until the job for `event_id` reaches a final state.
    pub(crate) async fn finished_job(&self, event_id: &str) -> Job {
        let found = eventually(Duration::from_secs(30), || async {
            self.job(event_id).await.is_some_and(|j| j.state.is_final())
        })
        .await;
        let job = self.job(event_id).await;
        assert!(found, "job {event_id} did not finish: {job:?}");
        job.unwrap()
    }
}

/// Receives alert webhooks.
pub(crate) struct AlertSink {
    addr: SocketAddr,
    received: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>>,
}

impl AlertSink {
    pub(crate) async fn start() -> Self {
        use http_body_util::BodyExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            if let Ok(v) = serde_json::from_slice(&body) {
                                let _ = tx.send(v);
                            }
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Self {
            addr,
            received: tokio::sync::Mutex::new(rx),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/alerts", self.addr)
    }

    pub(crate) async fn next(&self) -> serde_json::Value {
        // Generous: on two cores busy with the whole suite, a claim, a
        // failed run, the alert sweep and its POST took over 10 s once.
        tokio::time::timeout(Duration::from_secs(30), self.received.lock().await.recv())
            .await
            .expect("an alert arrives")
            .expect("sink open")
    }

    /// An alert already received and not yet taken, if any.
    pub(crate) fn try_next(&self) -> Option<serde_json::Value> {
        self.received.try_lock().ok()?.try_recv().ok()
    }
}

impl PipelineApp {
    /// A recording at Telnyx and the intake of its call (the patient is the
    /// sample's `to`, +15557650002).
    pub(crate) async fn recorded_call(&self, id: &str) -> (SimRecording, Uuid) {
        let rec = SimRecording::sample(id);
        self.telnyx.add_recording(rec.clone());
        let intake = intake_for(&self.app.pool, &rec, "+15557650002").await;
        (rec, intake)
    }

    /// POSTs `event`, signed, and expects it stored.
    pub(crate) async fn post_event(&self, event: &serde_json::Value) {
        let res = self.app.post_signed(event.to_string().as_bytes()).await;
        assert_eq!(res.status(), 200);
    }

    pub(crate) async fn stop(self) {
        self.app.stop().await;
    }
}
