//! Wiring: one process runs the listener, the worker, or both (and the
//! playback server when configured) until the shared cancellation token
//! fires. Pools: the listener's (webhooks), the playback API's, the
//! worker's, and a small one for `/readyz` and the queue gauges
//! ([`crate::health`]). In
//! `serve` the worker has a pool of its own, as it has in `work`, so that
//! its heartbeats and writes never wait behind webhooks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, Role};
use crate::db::{self, DbError};
use crate::health::Health;
use crate::jobs::worker::default_worker_id;
use crate::jobs::{JobHandler, Queue, Worker, WorkerOptions};
use crate::ops::alerts::Alerter;
use crate::playback::{self, PlaybackState};
use crate::webhook::{self, WebhookState};

/// How long start-up waits for PostgreSQL before giving up (systemd then
/// restarts the unit).
const DATABASE_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// A process that is connected, checked and bound, but not yet serving: tests
/// read the bound port before starting it.
pub struct App {
    config: Config,
    role: Role,
    /// The listener's, or in `work` the worker's.
    pool: PgPool,
    /// In `serve`, the worker's own (`database.max_connections` more).
    worker_pool: Option<PgPool>,
    health_pool: PgPool,
    playback_pool: Option<PgPool>,
    listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    playback: Option<TcpListener>,
}

/// The accept queue asked of the kernel (which caps it at
/// `net.core.somaxconn`, 4096 on current kernels). With tokio's default,
/// 1024, one run in four of the flood test had a delivery take 1.1 s: the
/// flood's refused clients come back all at once, and a SYN dropped then
/// is retried after a second, half of Telnyx's patience (none in five
/// runs with 4096).
const ACCEPT_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    let bound = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std's bind does: a restarted daemon can bind at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    bound().map_err(|source| AppError::Bind { addr, source })
}

impl App {
    pub async fn build(mut config: Config, role: Role) -> Result<Self, AppError> {
        let pool = db::pool(&config)?;
        let worker_pool = match role {
            Role::Serve => Some(db::pool(&config)?),
            _ => None,
        };
        let health_pool = crate::health::pool(&config)?;
        let session = db::wait_until_ready(&config, &pool, DATABASE_PATIENCE).await?;
        info!(connection = %session.describe(), "database session checked");
        if matches!(role, Role::Work | Role::Serve) {
            warn_unless_notifications_arrive(&pool).await;
            crate::pipeline::intakes::warn_if_matching_is_unscoped(&config.pipeline, &pool).await;
        }
        let listener = if matches!(role, Role::Listen | Role::Serve) {
            config.listener.max_connections = crate::server::fit_to_open_files(
                config.listener.max_connections,
                other_open_files(&config),
            );
            Some(bind(config.listener.addr)?)
        } else {
            None
        };
        let metrics_listener = match config.metrics.addr {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let playback = match config.playback.addr {
            Some(addr) if matches!(role, Role::Listen | Role::Serve) => Some(bind(addr)?),
            _ => None,
        };
        let playback_pool = match playback {
            Some(_) => Some(db::playback_pool(&config)?),
            None => None,
        };
        Ok(Self {
            config,
            role,
            pool,
            worker_pool,
            health_pool,
            playback_pool,
            listener,
            metrics_listener,
            playback,
        })
    }

    /// Where the playback server listens, when it is on.
    pub fn playback_addr(&self) -> Option<SocketAddr> {
        self.playback.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until `shutdown` fires, then drains. Returns once every part
    /// has stopped.
    pub async fn run<H: JobHandler>(
        self,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<(), AppError> {
        let queue = Queue::new(self.pool.clone());
        let health = Arc::new(Health::new(self.health_pool.clone()));
        let mut parts = tokio::task::JoinSet::new();
        if let Some(listener) = self.listener {
            let state = WebhookState::from_config(&self.config, queue.clone(), health.clone())
                .map_err(AppError::Config)?;
            let limits = webhook::limits(&self.config);
            parts.spawn(webhook::run(
                listener,
                Arc::new(state),
                limits,
                shutdown.clone(),
            ));
        }
        if let Some(listener) = self.playback {
            let pool = self.playback_pool.clone().unwrap_or(self.pool.clone());
            let state = PlaybackState::from_config(&self.config, pool)
                .map_err(|e| AppError::Config(e.to_string()))?;
            parts.spawn(playback::run(listener, Arc::new(state), shutdown.clone()));
        }
        if matches!(self.role, Role::Work | Role::Serve) {
            let queue = Queue::new(self.worker_pool.clone().unwrap_or(self.pool.clone()));
            let mut opts = WorkerOptions::from_config(&self.config, default_worker_id());
            if let Some(url) = self.config.pipeline.alert_webhook_url.as_deref() {
                let alerter = Alerter::new(url, self.config.http.request_timeout)
                    .map_err(|e| AppError::Config(format!("pipeline.alert_webhook_url: {e}")))?;
                opts.alerter = Some(alerter);
            }
            let alerter = opts.alerter.clone();
            // Only deleting unresolved jobs' objects needs storage.
            let storage = match self.config.retention.unresolved_for {
                Some(_) => Some(
                    crate::providers::storage_api::StorageClient::from_config(&self.config)
                        .map_err(|e| AppError::Config(e.to_string()))?,
                ),
                None => None,
            };
            let telnyx = crate::providers::telnyx_api::TelnyxClient::from_config(&self.config)
                .map_err(|e| AppError::Config(e.to_string()))?;
            parts.spawn(crate::ops::missing::run_until(
                queue.clone(),
                telnyx,
                alerter.clone(),
                crate::ops::missing::Patience::from_config(&self.config.pipeline),
                self.config.retry.max_attempts,
                shutdown.clone(),
            ));
            parts.spawn(Worker::new(queue.clone(), handler, opts).run(shutdown.clone()));
            parts.spawn(prune_periodically(
                queue.clone(),
                self.config.retention.clone(),
                storage,
                alerter,
                shutdown.clone(),
            ));
        }
        if let Some(listener) = self.metrics_listener {
            parts.spawn(crate::health::serve_metrics(
                listener,
                health,
                shutdown.clone(),
            ));
        }
        systemd::ready();
        let watchdog = systemd::spawn_watchdog(shutdown.clone());
        shutdown.cancelled().await;
        systemd::stopping();
        while parts.join_next().await.is_some() {}
        watchdog.abort();
        self.pool.close().await;
        if let Some(pool) = &self.worker_pool {
            pool.close().await;
        }
        self.health_pool.close().await;
        if let Some(pool) = &self.playback_pool {
            pool.close().await;
        }
        info!("stopped");
        Ok(())
    }
}

/// File descriptors the process may hold besides the webhook listener's
/// connections: its pools, the playback and metrics listeners' connections,
/// and a margin for outbound HTTP and files.
fn other_open_files(config: &Config) -> u64 {
    let database = 2 * u64::from(config.database.max_connections)
        + u64::from(crate::health::HEALTH_CONNECTIONS)
        + 1;
    let playback = if config.playback.addr.is_some() {
        crate::playback::MAX_CONNECTIONS as u64
    } else {
        0
    };
    database
        + playback
        + crate::health::METRICS_CONNECTIONS as u64
        + crate::server::OTHER_OPEN_FILES
}

/// Workers pick jobs up on NOTIFY and poll as a fallback; without
/// notifications every pick-up waits for the poll, which an operator should
/// know about rather than discover.
async fn warn_unless_notifications_arrive(pool: &PgPool) {
    match db::notify_self_test(pool, NOTIFY_SELF_TEST_PATIENCE).await {
        Ok(took) => info!(took = ?took, "NOTIFY self-test passed"),
        Err(e) => tracing::warn!(
            error = %e,
            "NOTIFY self-test failed: notifications do not arrive, jobs are picked up by polling only (worker.poll_interval)"
        ),
    }
}

const NOTIFY_SELF_TEST_PATIENCE: Duration = Duration::from_secs(2);

/// Retention (see [`crate::ops::retention`]): deletes old finished jobs in small
/// batches, so the table stays small and vacuum keeps up, and keeps every
/// job that points at patient data unless configured otherwise. Every
/// worker does it; SKIP LOCKED and row locks keep them out of each other's
/// way.
async fn prune_periodically(
    queue: Queue,
    retention: crate::config::RetentionConfig,
    storage: Option<crate::providers::storage_api::StorageClient>,
    alerter: Option<Alerter>,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(retention.interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        // A paced pass through a large backlog can take minutes: it ends
        // at the next batch when shut down.
        match crate::ops::retention::run_once(
            &queue,
            &retention,
            storage.as_ref(),
            alerter.as_ref(),
            &shutdown,
        )
        .await
        {
            Ok(r) if r == crate::ops::retention::Report::default() => {}
            Ok(r) => info!(
                pruned = r.pruned,
                alerted = r.alerted,
                deleted = r.deleted,
                calls = r.calls,
                "retention pass"
            ),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        prune_playback_audit(&queue, retention.playback_audit_for).await;
    }
}

/// Batches of 500 until the backlog is gone (bounded per round, so a
/// years-old backlog does not hold a connection for long): busy playback
/// makes more than one batch an interval.
async fn prune_playback_audit(queue: &Queue, keep_for: Duration) {
    const BATCH: i32 = 500;
    const MOST_BATCHES_PER_ROUND: usize = 200;
    let mut pruned = 0;
    for _ in 0..MOST_BATCHES_PER_ROUND {
        match crate::playback::audit::prune(queue.pool(), keep_for, BATCH).await {
            Ok(n) => {
                pruned += n;
                if n < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning playback access records failed");
                break;
            }
        }
    }
    if pruned > 0 {
        info!(
            records = pruned,
            "pruned playback access records past their retention"
        );
    }
}

/// systemd's notify protocol; every call is a no-op outside systemd.
mod systemd {
    use tokio_util::sync::CancellationToken;
    use tracing::warn;

    /// After the schema check and the binds: the unit is up.
    pub(super) fn ready() {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            warn!(error = %e, "could not notify systemd");
        }
    }

    pub(super) fn stopping() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }

    /// Pings the watchdog at half its interval while the runtime is alive; a
    /// wedged runtime stops pinging and systemd restarts the unit.
    pub(super) fn spawn_watchdog(shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let Some(interval) = sd_notify::watchdog_enabled() else {
                return;
            };
            let mut every = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        })
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        info!(signal = name, "shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on SIGTERM by default.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The handler of a listener-only process, which claims no jobs.
pub struct NoJobs;

impl JobHandler for NoJobs {
    async fn handle(
        &self,
        job: crate::jobs::Job,
        _ctx: crate::jobs::JobContext,
    ) -> Result<crate::jobs::Outcome, crate::jobs::JobError> {
        Err(crate::jobs::JobError::retryable(format!(
            "job {} reached a process without a pipeline",
            job.id
        )))
    }
}
