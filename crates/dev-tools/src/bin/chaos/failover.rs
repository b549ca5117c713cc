//! A PostgreSQL failover (issue #22): a private primary and a streaming
//! replica made from it with `pg_basebackup`, both in a temporary
//! directory; everyone (the daemons, the run itself) reaches the database
//! through one loopback proxy (`proxy.rs`), which plays the part of the
//! address that moves to the new primary (PgBouncer, a floating IP, a DNS
//! name).
//!
//! The failover: the replica's replication link freezes for `lag` first
//! (the replica falls behind, as an asynchronous one may), then the primary
//! dies (SIGKILL to its process group), the replica is promoted, and the
//! proxy resets every connection and points at it. With asynchronous
//! replication what the primary committed in that window is gone:
//! webhooks answered 2xx among it. `recording-relay reconcile` lists the
//! recordings at Telnyx and brings them back. With `synchronous` the
//! primary waits for the replica before each commit returns (its
//! `synchronous_standby_names`), so a frozen link holds the answers back
//! (503, Telnyx retries) instead, and nothing acknowledged is lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use recording_relay_dev_tools::demo::cluster;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::proxy::{Mode, Proxy};
use crate::say;

pub(crate) struct Pair {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    primary: Option<Child>,
    replica: Option<Child>,
    pub replica_port: u16,
    replication: Proxy,
    /// Where everyone reaches the database.
    pub front: Proxy,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Failover {
    pub replication_frozen: DateTime<Utc>,
    pub primary_killed: DateTime<Utc>,
    pub promoted_after_s: f64,
    /// From the kill until a new connection through the proxy worked.
    pub unavailable_s: f64,
    pub synchronous: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(crate::daemons::free_port()?.port())
}

fn url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

impl Pair {
    /// Makes and starts both servers; returns once the replica streams.
    pub(crate) async fn start(synchronous: bool) -> anyhow::Result<Self> {
        let bindir = cluster::find_bindir().context("no PostgreSQL server binaries found")?;
        let owner = cluster::server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("recording-relay-chaos-failover-")
            .tempdir()
            .context("creating the failover's directory")?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let primary_port = free_port()?;
        let replica_port = free_port()?;
        let mut pair = Self {
            replication: Proxy::start(SocketAddr::from(([127, 0, 0, 1], primary_port))).await?,
            front: Proxy::start(SocketAddr::from(([127, 0, 0, 1], primary_port))).await?,
            dir,
            bindir,
            owner,
            primary: None,
            replica: None,
            replica_port,
        };
        let primary = pair.dir.path().join("primary");
        pair.run(
            "initdb",
            &[
                "--pgdata".as_ref(),
                primary.as_os_str(),
                "--username=postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        )
        .await?;
        let settings = [
            "wal_level=replica".to_owned(),
            "max_wal_senders=4".to_owned(),
        ];
        pair.primary = Some(pair.server("primary", primary_port, &settings)?);
        wait_ready(&url(primary_port)).await?;
        let replica = pair.dir.path().join("replica");
        let port = primary_port.to_string();
        pair.run(
            "pg_basebackup",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                replica.as_os_str(),
                "-R".as_ref(),
                "--no-sync".as_ref(),
            ],
        )
        .await?;
        // Stream through the replication proxy, which the failover freezes.
        let conninfo = format!(
            "\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=replica'\n",
            pair.replication.addr.port()
        );
        let auto = replica.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).context("reading the replica's settings")?;
        text.push_str(&conninfo);
        std::fs::write(&auto, text).context("writing the replica's settings")?;
        pair.replica =
            Some(pair.server("replica", replica_port, &["hot_standby=on".to_owned()])?);
        wait_ready(&url(replica_port)).await?;
        let mut c = PgConnection::connect(&url(primary_port)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let streaming: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication WHERE state = 'streaming')",
            )
            .fetch_one(&mut c)
            .await?;
            if streaming {
                break;
            }
            if Instant::now() > deadline {
                bail!("the replica did not stream within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if synchronous {
            // Only now that the replica streams (the base backup would
            // wait for it), and only on the primary: the promoted replica
            // has no standby to wait for.
            for sql in [
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "SELECT pg_reload_conf()",
            ] {
                sqlx::raw_sql(sql)
                    .execute(&mut c)
                    .await
                    .context("making replication synchronous")?;
            }
        }
        c.close().await.ok();
        say(&format!(
            "failover pair: primary 127.0.0.1:{primary_port}, streaming replica 127.0.0.1:{replica_port} ({}), \
             everyone through 127.0.0.1:{}",
            if synchronous {
                "synchronous"
            } else {
                "asynchronous"
            },
            pair.front.addr.port()
        ));
        Ok(pair)
    }

    /// The URL everyone uses (the `postgres` database, through the proxy).
    pub(crate) fn server_url(&self) -> String {
        url(self.front.addr.port())
    }

    async fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
        let out = cluster::server_command(&self.bindir.join(program), self.owner, self.dir.path())
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn server(&self, name: &str, port: u16, settings: &[String]) -> anyhow::Result<Child> {
        let log_path = self.dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))?;
        }
        let mut cmd =
            cluster::server_command(&self.bindir.join("postgres"), self.owner, self.dir.path());
        cmd.arg("-D")
            .arg(self.dir.path().join(name))
            .args(["-p", &port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        for s in settings {
            cmd.args(["-c", s]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the {name}"))
    }

    /// Freezes replication, waits `lag`, kills the primary, promotes the
    /// replica and points the proxy at it.
    pub(crate) async fn fail_over(
        &mut self,
        lag: Duration,
        synchronous: bool,
    ) -> anyhow::Result<Failover> {
        self.replication.set_mode(Mode::Frozen);
        let replication_frozen = Utc::now();
        say(&format!(
            "failover: replication frozen; the primary dies in {lag:?}"
        ));
        tokio::time::sleep(lag).await;
        let t0 = Instant::now();
        let primary_killed = Utc::now();
        if let Some(mut primary) = self.primary.take() {
            // The whole group: the backends too, as when the host dies.
            kill_group(&primary);
            let _ = primary.wait().await;
        }
        self.front.set_mode(Mode::Refused);
        let mut c = PgConnection::connect(&url(self.replica_port)).await?;
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut c)
            .await
            .context("promoting the replica")?;
        c.close().await.ok();
        if !promoted {
            bail!("the replica was not promoted within 60 s");
        }
        let promoted_after_s = t0.elapsed().as_secs_f64();
        self.front
            .switch_to(SocketAddr::from(([127, 0, 0, 1], self.replica_port)));
        self.front.set_mode(Mode::Open);
        wait_ready(&self.server_url()).await?;
        let unavailable_s = t0.elapsed().as_secs_f64();
        say(&format!(
            "failover: replica promoted {promoted_after_s:.2} s after the primary died; \
             the database was unavailable {unavailable_s:.2} s"
        ));
        Ok(Failover {
            replication_frozen,
            primary_killed,
            promoted_after_s,
            unavailable_s,
            synchronous,
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for child in [self.primary.take(), self.replica.take()]
            .into_iter()
            .flatten()
        {
            kill_group(&child);
            drop(child);
        }
    }
}

/// SIGKILL to the process group the server leads (`process_group(0)`).
fn kill_group(server: &Child) {
    if let Some(pid) = server
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = PgConnection::connect(url).await
            && sqlx::query("SELECT 1").execute(&mut c).await.is_ok()
        {
            c.close().await.ok();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL at {url} not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `recording-relay reconcile --since …` against the new primary: lists
/// the recordings at Telnyx and enqueues those no job knows. Returns its
/// output (a JSON report).
pub(crate) async fn reconcile(
    env: &crate::daemons::DaemonEnv,
    since: Duration,
) -> anyhow::Result<String> {
    let out = Command::new(&env.binary)
        .args(["--config"])
        .arg(&env.config)
        .args(["reconcile", "--json", "--since"])
        .arg(format!("{}s", since.as_secs().max(60)))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.database_url)
        .env("TELNYX_API_KEY", &env.telnyx_api_key)
        .env("TELNYX_API_URL", &env.telnyx_url)
        .env("TELNYX_PUBLIC_KEY", &env.public_key)
        .env("SUPABASE_URL", &env.storage_url)
        .env("SUPABASE_SERVICE_ROLE_KEY", &env.storage_key)
        .output()
        .await
        .context("running recording-relay reconcile")?;
    if !out.status.success() {
        bail!(
            "recording-relay reconcile failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Acknowledged webhooks (their event ids) the database has no job for.
pub(crate) async fn lost_acknowledged(
    pool: &sqlx::PgPool,
    calls: &[crate::plan::Call],
    stats: &std::sync::Mutex<crate::sender::SendStats>,
) -> anyhow::Result<Vec<String>> {
    let known: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs")
            .fetch_all(pool)
            .await
            .context("reading the jobs after the failover")?
            .into_iter()
            .collect();
    let acked: Vec<usize> = stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .acked
        .iter()
        .copied()
        .collect();
    let mut lost: Vec<String> = acked
        .into_iter()
        .map(|i| calls[i].event_id.clone())
        .filter(|e| !known.contains(e))
        .collect();
    lost.sort();
    Ok(lost)
}

/// The jobs `reconcile` made, over all its attempts (`reconcile:` event
/// ids).
pub(crate) async fn reconciled_jobs(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE event_id LIKE 'reconcile:%'",
    )
    .fetch_one(pool)
    .await
    .context("counting reconcile's jobs")?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// How many recordings `reconcile --json` says it enqueued (its last
/// attempt).
pub(crate) fn enqueued(report: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(report)
        .ok()
        .and_then(|v| v.get("enqueued")?.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Asynchronous: the failover lost acknowledged webhooks (what the
/// scenario shows) and reconcile enqueued at least as many recordings
/// (the promise checks then see each one stored). Synchronous: nothing
/// acknowledged was lost.
pub(crate) fn check(f: &Failover, lost: &[String], enqueued: usize) -> crate::verify::Check {
    let mut details: Vec<String> = lost.iter().take(12).map(|e| format!("lost: {e}")).collect();
    details.push(format!("reconcile enqueued {enqueued}"));
    if f.synchronous {
        crate::verify::Check {
            name: "with synchronous replication the failover lost no acknowledged webhook",
            passed: lost.is_empty(),
            details,
        }
    } else {
        crate::verify::Check {
            name: "the asynchronous failover lost acknowledged webhooks and reconcile enqueued them again",
            passed: !lost.is_empty() && enqueued >= lost.len(),
            details,
        }
    }
}
