use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use recording_relay::app::{App, NoJobs};
use recording_relay::config::{Config, Role};
use recording_relay::testing;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub key: SigningKey,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
}

/// Settings for a test process: loopback port 0, a fresh signing key.
pub fn test_config(database_url: String, key: &SigningKey) -> Config {
    let mut config = Config::default();
    config.database.url = Some(database_url.into());
    config.listener.addr = "127.0.0.1:0".parse().unwrap();
    config.telnyx.public_key = Some(testing::public_key_base64(key));
    config.worker.poll_interval = Duration::from_millis(500);
    config
}

/// Starts the listener (no worker) against the test database.
pub async fn spawn_listener(pool: PgPool) -> TestApp {
    let pool = testing::prepare(pool).await;
    let url = testing::database_url_of(&pool, None);
    spawn_with(pool, url, |_| {}).await
}

pub async fn spawn_with(
    pool: PgPool,
    database_url: String,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let key = testing::signing_key();
    let mut config = test_config(database_url, &key);
    tweak(&mut config);
    let app = App::build(config, Role::Listen).await.expect("app builds");
    let addr = app.local_addr().expect("listener bound");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move {
        app.run(NoJobs, token).await.expect("app runs");
    });
    TestApp {
        addr,
        pool,
        key,
        client: reqwest::Client::new(),
        shutdown,
        handle,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` signed at `timestamp` like Telnyx would.
    pub async fn post_signed_at(&self, body: &[u8], timestamp: i64) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/webhooks/telnyx"))
            .header("content-type", "application/json");
        for (name, value) in testing::signature_headers(&self.key, timestamp, body) {
            req = req.header(name, value);
        }
        req.body(body.to_vec()).send().await.expect("request sent")
    }

    pub async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post_signed_at(body, testing::unix_now()).await
    }

    pub async fn job_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM recording_jobs")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn quarantine_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM webhook_quarantine")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// A TCP forwarder in front of PostgreSQL that can be cut and restored, to
/// make the database unreachable for the app without stopping the server.
pub struct CuttableProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl CuttableProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
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
        Self { port, up, cut }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
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
