//! Wiring: one process runs the listener, the worker, or both (and the
//! playback server when configured), against one pool, until the shared
//! cancellation token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::alerts::Alerter;
use crate::config::{Config, Role};
use crate::db::{self, DbError};
use crate::jobs::worker::default_worker_id;
use crate::jobs::{JobHandler, Queue, Worker, WorkerOptions};
use crate::playback::{self, PlaybackState};
use crate::webhook::{self, ConnectionLimits, WebhookState};

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
    pool: PgPool,
    listener: Option<TcpListener>,
    playback: Option<TcpListener>,
}

impl App {
    pub async fn build(config: Config, role: Role) -> Result<Self, AppError> {
        let pool = db::pool(&config)?;
        db::wait_until_reachable(&pool, DATABASE_PATIENCE).await?;
        db::ensure_migrated(&pool).await?;
        let listener = if matches!(role, Role::Listen | Role::Serve) {
            let addr = config.listener.addr;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })?;
            Some(listener)
        } else {
            None
        };
        let playback = match config.playback.addr {
            Some(addr) if matches!(role, Role::Listen | Role::Serve) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Bind { addr, source })?,
            ),
            _ => None,
        };
        Ok(Self {
            config,
            role,
            pool,
            listener,
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
        let mut parts = tokio::task::JoinSet::new();
        if let Some(listener) = self.listener {
            let state =
                WebhookState::from_config(&self.config, queue.clone()).map_err(AppError::Config)?;
            let limits = ConnectionLimits::from_config(&self.config);
            parts.spawn(webhook::run(
                listener,
                Arc::new(state),
                limits,
                shutdown.clone(),
            ));
        }
        if let Some(listener) = self.playback {
            let state = PlaybackState::from_config(&self.config, self.pool.clone())
                .map_err(|e| AppError::Config(e.to_string()))?;
            parts.spawn(playback::run(listener, Arc::new(state), shutdown.clone()));
        }
        if matches!(self.role, Role::Work | Role::Serve) {
            let mut opts = WorkerOptions::from_config(&self.config, default_worker_id());
            if let Some(url) = self.config.pipeline.alert_webhook_url.as_deref() {
                let alerter = Alerter::new(url, self.config.http.request_timeout)
                    .map_err(|e| AppError::Config(format!("pipeline.alert_webhook_url: {e}")))?;
                opts.alerter = Some(alerter);
            }
            parts.spawn(Worker::new(queue, handler, opts).run(shutdown.clone()));
        }
        while parts.join_next().await.is_some() {}
        self.pool.close().await;
        info!("stopped");
        Ok(())
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
