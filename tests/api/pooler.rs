//! Through a real PgBouncer (Debian's package, stock settings), in session
//! and in transaction mode, the way Supabase users reach their database
//! through Supavisor.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::testing;
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::helpers::{eventually, spawn_with};
use crate::process::binary;

/// A PgBouncer in front of the shared test server, on a port of its own,
/// with nothing but the settings a stock install has plus the pool mode.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// None (with a loud message) when PgBouncer is not installed outside
    /// CI; in CI its absence fails the test.
    async fn start(mode: &str) -> Option<Self> {
        let Some(binary) = pgbouncer_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "pgbouncer is not installed (apt-get install pgbouncer)"
            );
            eprintln!("SKIPPED: pgbouncer is not installed (apt-get install pgbouncer)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // PgBouncer refuses to run as root: as root, it runs as postgres,
        // who must be able to read and write here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = free_port();
        let server = server_address();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = {mode}\nlogfile = {}\npidfile = {}\n",
                server.0,
                server.1,
                dir.path().join("userlist.txt").display(),
                dir.path().join("pgbouncer.log").display(),
                dir.path().join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        let child = cmd
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgbouncer");
        let ready = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let log = dir.path().join("pgbouncer.log");
        assert!(ready, "pgbouncer did not listen:\n{}", read(&log));
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }

    fn url_for(&self, pool: &PgPool) -> String {
        testing::database_url_of(pool, Some(self.port))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser does not pass a kill on; the pidfile names the real process.
        let pidfile = self._dir.path().join("pgbouncer.pid");
        if let Ok(pid) = std::fs::read_to_string(pidfile) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.start_kill();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn pgbouncer_binary() -> Option<PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Host and port of the test server, from DATABASE_URL.
fn server_address() -> (String, u16) {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    (options.get_host().to_owned(), options.get_port())
}

/// `check --json` through `url`, as a map of check name to (ok, detail).
async fn check_through(url: &str) -> Vec<(String, bool, String)> {
    let out = binary()
        .args(["check", "--json"])
        .env("DATABASE_URL", url)
        .output()
        .await
        .unwrap();
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["ok"].as_bool().unwrap(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn find<'a>(checks: &'a [(String, bool, String)], name: &str) -> &'a (String, bool, String) {
    checks
        .iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[sqlx::test(migrations = false)]
async fn the_daemon_works_through_a_session_mode_pooler_with_stock_settings(pool: PgPool) {
    let Some(bouncer) = PgBouncer::start("session").await else {
        return;
    };
    let pool = testing::prepare(pool).await;
    let url = bouncer.url_for(&pool);

    let checks = check_through(&url).await;
    let (_, ok, detail) = find(&checks, "connection");
    assert!(*ok, "{detail}");
    assert!(detail.contains("pooler or proxy"), "{detail}");
    let (_, ok, detail) = find(&checks, "notify");
    assert!(*ok && detail.contains("arrived"), "{detail}");
    let (_, ok, detail) = find(&checks, "migrations");
    assert!(*ok, "{detail}");

    // The listener starts through it (session timeouts checked) and
    // commits a webhook.
    let app = tokio::time::timeout(
        Duration::from_secs(20),
        spawn_with(pool.clone(), url, |_| {}),
    )
    .await
    .expect("the listener started through the pooler");
    let event = testing::recording_saved_event("ev-pooled", "5e0d4b8e-6f3a-4c0e-9f57-1b2a3c4d5e6f");
    let res = app.post_signed(event.to_string().as_bytes()).await;
    assert_eq!(res.status(), 200);
    let jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE event_id = 'ev-pooled'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(jobs, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_transaction_mode_pooler_is_refused_quickly_with_the_url_to_use(pool: PgPool) {
    let Some(bouncer) = PgBouncer::start("transaction").await else {
        return;
    };
    let pool = testing::prepare(pool).await;
    let url = bouncer.url_for(&pool);

    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        binary()
            .arg("listen")
            .env("DATABASE_URL", &url)
            .env(
                "TELNYX_PUBLIC_KEY",
                testing::public_key_base64(&testing::signing_key()),
            )
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .output(),
    )
    .await
    .expect("the daemon gave up by itself")
    .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(stderr.contains("transaction mode"), "{stderr}");
    assert!(stderr.contains("session-mode pooler"), "{stderr}");

    let checks = check_through(&url).await;
    let (_, ok, detail) = find(&checks, "connection");
    assert!(!*ok);
    assert!(detail.contains("transaction mode"), "{detail}");
}
