//! The daemons under test: real `recording-relay serve` processes, each on a
//! port of its own that survives its restarts, killed with SIGKILL and
//! started again while the run goes on.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use tokio::process::{Child, Command};

/// Everything a daemon needs besides its port.
#[derive(Clone)]
pub(crate) struct DaemonEnv {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub database_url: String,
    /// Per slot, when set: the slot's own way to the database (a proxy
    /// that can cut it off alone, `partition.rs`).
    pub slot_database_urls: Vec<String>,
    pub public_key: String,
    pub telnyx_api_key: String,
    pub telnyx_url: String,
    pub storage_url: String,
    pub storage_key: String,
    pub log_dir: PathBuf,
}

/// One SIGKILL, as logged when it was sent.
#[derive(Debug, Clone)]
pub(crate) struct Kill {
    pub slot: usize,
    pub pid: u32,
    pub at: DateTime<Utc>,
    /// The jobs the killed process left `running`, read just after the
    /// kill (`None` when the database could not say, e.g. during its
    /// restart). A kill that left nothing behind owes no rescue.
    pub held: Option<Vec<i64>>,
}

/// A process that exited without being told to.
#[derive(Debug, Clone)]
pub(crate) struct Crash {
    pub slot: usize,
    pub pid: u32,
    pub status: String,
}

/// Which command a process runs: `serve` (both halves), or one half of a
/// split deployment (issue #22, item 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Serve,
    Listen,
    Work,
}

impl Role {
    fn command(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Listen => "listen",
            Role::Work => "work",
        }
    }

    /// Whether the process answers webhooks (and `/readyz`) on its port.
    pub(crate) fn listens(self) -> bool {
        self != Role::Work
    }
}

pub(crate) struct Daemon {
    pub slot: usize,
    pub addr: SocketAddr,
    pub role: Role,
    /// Seconds the process's wall clock is off (libfaketime), if any.
    pub skew: Option<i64>,
    child: Option<Child>,
    pid: u32,
    generation: u32,
    log: PathBuf,
}

impl Daemon {
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The running process's pid (0 while none runs).
    pub(crate) fn pid(&self) -> u32 {
        if self.child.is_some() { self.pid } else { 0 }
    }
}

/// A free loopback port, chosen once per slot so restarts reuse it (and the
/// sender's list of listeners stays valid).
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

fn log_file(path: &Path, banner: &str) -> anyhow::Result<(File, File)> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "\n===== {banner} =====")?;
    Ok((f.try_clone()?, f))
}

impl DaemonEnv {
    pub(crate) fn spawn(&self, slot: usize, addr: SocketAddr) -> anyhow::Result<Daemon> {
        self.spawn_as(slot, addr, Role::Serve, None)
    }

    /// A process running `role`, its wall clock `skew` seconds off.
    pub(crate) fn spawn_as(
        &self,
        slot: usize,
        addr: SocketAddr,
        role: Role,
        skew: Option<i64>,
    ) -> anyhow::Result<Daemon> {
        let mut d = Daemon {
            slot,
            addr,
            role,
            skew,
            child: None,
            pid: 0,
            generation: 0,
            log: self.log_dir.join(format!("daemon-{slot}.log")),
        };
        self.start(&mut d)?;
        Ok(d)
    }

    fn start(&self, d: &mut Daemon) -> anyhow::Result<()> {
        d.generation += 1;
        let (out, err) = log_file(
            &d.log,
            &format!(
                "generation {} of `{}` started {}{}",
                d.generation,
                d.role.command(),
                Utc::now(),
                d.skew
                    .map(|s| format!(", clock off by {s:+} s"))
                    .unwrap_or_default()
            ),
        )?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--config", path_str(&self.config)?, d.role.command()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        if let Some(skew) = d.skew {
            // libfaketime: the wall clock only; monotonic time (timeouts,
            // the heartbeat's pace) stays true, as on a host whose NTP is off.
            let lib = libfaketime()?;
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME", format!("{skew:+}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
            .env(
                "DATABASE_URL",
                self.slot_database_urls
                    .get(d.slot)
                    .unwrap_or(&self.database_url),
            )
            .env("LISTEN_ADDR", d.addr.to_string())
            .env("TELNYX_PUBLIC_KEY", &self.public_key)
            .env("TELNYX_API_KEY", &self.telnyx_api_key)
            .env("TELNYX_API_URL", &self.telnyx_url)
            .env("SUPABASE_URL", &self.storage_url)
            .env("SUPABASE_SERVICE_ROLE_KEY", &self.storage_key)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        d.pid = child.id().unwrap_or(0);
        d.child = Some(child);
        Ok(())
    }

    /// SIGKILL, reap, start again. Returns the kill as logged.
    pub(crate) async fn kill_and_restart(&self, d: &mut Daemon) -> anyhow::Result<Kill> {
        let Some(mut child) = d.child.take() else {
            bail!("daemon {} is not running", d.slot);
        };
        let kill = Kill {
            slot: d.slot,
            pid: d.pid,
            at: Utc::now(),
            held: None,
        };
        child.start_kill().context("sending SIGKILL")?;
        child.wait().await.context("reaping a killed daemon")?;
        self.start(d)?;
        Ok(kill)
    }

    /// Restarts a daemon that exited on its own, reporting how it ended.
    pub(crate) fn check_alive(&self, d: &mut Daemon) -> anyhow::Result<Option<Crash>> {
        let Some(child) = d.child.as_mut() else {
            return Ok(None);
        };
        let Some(status) = child.try_wait()? else {
            return Ok(None);
        };
        let crash = Crash {
            slot: d.slot,
            pid: d.pid,
            status: status.to_string(),
        };
        d.child = None;
        self.start(d)?;
        Ok(Some(crash))
    }
}

/// SIGTERM every daemon and wait for each (bounded). Returns the exit
/// status of each, `None` when it had to be killed.
pub(crate) async fn stop_all(
    daemons: &mut [Daemon],
    patience: Duration,
) -> Vec<(usize, Option<i32>)> {
    for d in daemons.iter() {
        if d.child.is_some() {
            let _ = Command::new("kill")
                .args(["-TERM", &d.pid.to_string()])
                .status()
                .await;
        }
    }
    let mut out = Vec::new();
    for d in daemons.iter_mut() {
        let Some(mut child) = d.child.take() else {
            continue;
        };
        match tokio::time::timeout(patience, child.wait()).await {
            Ok(Ok(status)) => out.push((d.slot, status.code())),
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                out.push((d.slot, None));
            }
        }
    }
    out
}

/// libfaketime's multi-threaded library (Debian package `libfaketime`), or
/// `CHAOS_LIBFAKETIME`.
pub(crate) fn libfaketime() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHAOS_LIBFAKETIME") {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("libfaketime not found: `apt-get install libfaketime` or set CHAOS_LIBFAKETIME")
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The daemons' settings: short leases and fast retries so a run takes
/// minutes, provider timeouts low so an injected hang costs seconds.
pub(crate) struct Tuning {
    pub lease: Duration,
    pub poll: Duration,
    pub concurrency: usize,
    pub http_timeout: Duration,
    /// `pipeline.link_wait`: how long a recording waits for its session's
    /// `call.initiated`.
    pub link_wait: Duration,
    /// `retry.base`, `retry.cap`, `retry.max_attempts`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub max_attempts: i32,
    /// `pipeline.delete_from_telnyx`.
    pub delete_from_telnyx: bool,
}

pub(crate) fn config_toml(t: &Tuning) -> String {
    let d = |d: Duration| format!("\"{}ms\"", d.as_millis());
    format!(
        "# Written by the chaos test.\n\
         [database]\nmax_connections = 8\n\n\
         [worker]\nconcurrency = {concurrency}\npoll_interval = {poll}\nlease = {lease}\nshutdown_timeout = \"5s\"\n\n\
         [retry]\nbase = {retry_base}\ncap = {retry_cap}\nmax_attempts = {max_attempts}\n\n\
         [pipeline]\nmatch_attempts = 2\nmatch_retry_delay = \"300ms\"\ndelete_from_telnyx = {delete}\nlink_wait = {link_wait}\n\n\
         [http]\nconnect_timeout = \"1s\"\nrequest_timeout = {http}\nread_idle_timeout = {http}\n",
        concurrency = t.concurrency,
        poll = d(t.poll),
        lease = d(t.lease),
        http = d(t.http_timeout),
        link_wait = d(t.link_wait),
        retry_base = d(t.retry_base),
        retry_cap = d(t.retry_cap),
        max_attempts = t.max_attempts,
        delete = t.delete_from_telnyx,
    )
}

/// The worker id is `host:pid:random` (see `default_worker_id`): the pid
/// ties a lease to the process that held it.
pub(crate) fn pid_of_worker(worker: &str) -> Option<u32> {
    let mut parts = worker.rsplitn(3, ':');
    let _random = parts.next()?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_name_their_pid() {
        assert_eq!(pid_of_worker("host:4242:0a1b2c"), Some(4242));
        assert_eq!(pid_of_worker("a:b:4242:0a1b2c"), Some(4242));
        assert_eq!(pid_of_worker("nonsense"), None);
    }

    #[test]
    fn the_config_is_valid_for_serve() {
        let text = config_toml(&Tuning {
            lease: Duration::from_secs(6),
            poll: Duration::from_secs(1),
            concurrency: 4,
            http_timeout: Duration::from_secs(2),
            link_wait: Duration::from_secs(250),
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(2),
            max_attempts: 12,
            delete_from_telnyx: true,
        });
        let config = recording_relay::config::Config::from_toml(&text).unwrap();
        assert_eq!(config.worker.lease, Duration::from_secs(6));
        assert!(config.pipeline.delete_from_telnyx);
        assert_eq!(config.http.read_idle_timeout, Duration::from_secs(2));
        assert_eq!(config.pipeline.link_wait, Duration::from_secs(250));
        assert_eq!(config.retry.cap, Duration::from_secs(2));
        assert_eq!(config.retry.max_attempts, 12);
    }
}
