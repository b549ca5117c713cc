//! A throwaway PostgreSQL cluster for `demo --embedded-postgres`: made with
//! the installed server binaries in a temporary directory, reachable only
//! through a unix socket in that directory, and removed afterwards.
//!
//! Why: Debian's `postgresql` package runs a cluster that asks for a
//! password on 127.0.0.1, so a newcomer's first command would fail there.
//! With the server binaries alone the demo needs no setup and leaves nothing
//! behind. `initdb` and `postgres` refuse to run as root, so as root the
//! cluster belongs to an unprivileged user (`postgres`, which the package
//! creates).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::process::{Child, Command};

/// The socket's name (`.s.PGSQL.{port}`) and the server's `port` setting.
/// No TCP port is opened, so any number will do.
const PORT: u16 = 5432;
const READY_PATIENCE: Duration = Duration::from_secs(60);
const STOP_PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) found in /usr/lib/postgresql/*/bin, \
         pg_config --bindir or PATH: install the server package (apt-get install postgresql)"
    )]
    NoBinaries,
    #[error(
        "running as root, the throwaway cluster needs an unprivileged user to own it; \
         no user {0:?} in /etc/passwd (Debian's postgresql package creates it)"
    )]
    NoUser(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed ({status}):\n{output}")]
    Initdb { status: String, output: String },
    #[error("the throwaway PostgreSQL did not start: {reason}\n{log}")]
    Start { reason: String, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster. [`stop`](Self::stop) shuts it down and
/// removes its directory; dropping it does the same, synchronously, for the
/// error paths.
pub struct Cluster {
    server: Option<Child>,
    /// Declared after `server` so that it is removed after the server stopped.
    dir: tempfile::TempDir,
    bindir: PathBuf,
}

impl Cluster {
    /// Runs `initdb` and starts the server; returns once it accepts connections.
    pub async fn start() -> Result<Self, ClusterError> {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start), with extra server settings (`name=value`,
    /// each passed as `-c`): the benchmark of the relay's database cost
    /// loads `pg_stat_statements`, which only a server start can.
    pub async fn start_with(settings: &[&str]) -> Result<Self, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let owner = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("recording-relay-demo-pg-")
            .tempdir()
            .map_err(io("creating the cluster's temporary directory"))?;
        let data = dir.path().join("data");
        let socket = dir.path().join("socket");
        std::fs::create_dir(&socket).map_err(io("creating the socket directory"))?;
        if let Some((uid, gid)) = owner {
            for path in [dir.path(), socket.as_path()] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(io(format!("handing {} to the server user", path.display())))?;
            }
        }

        let out = server_command(&bindir.join("initdb"), owner, dir.path())
            .arg("--pgdata")
            .arg(&data)
            // A fixed superuser name, whoever runs it; trust is safe because
            // the only way in is the socket in this private directory.
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync"])
            .output()
            .await
            .map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(ClusterError::Initdb {
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }

        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).map_err(io("creating the server log"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))
                .map_err(io("handing the server log to the server user"))?;
        }
        let log_err = log.try_clone().map_err(io("opening the server log"))?;
        let server = server_command(&bindir.join("postgres"), owner, dir.path())
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket)
            .arg("-p")
            .arg(PORT.to_string())
            // No TCP at all; a throwaway cluster needs no durability.
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "unix_socket_permissions=0700"])
            .args(settings.iter().flat_map(|s| ["-c", s]))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C at the terminal reaches only the
            // demo, which then stops the daemon before the server.
            .process_group(0)
            .spawn()
            .map_err(io("starting postgres"))?;
        let mut cluster = Self {
            server: Some(server),
            dir,
            bindir,
        };
        cluster.wait_until_ready().await?;
        Ok(cluster)
    }

    async fn wait_until_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_PATIENCE;
        let url = self.server_url();
        loop {
            if let Some(server) = self.server.as_mut()
                && let Ok(Some(status)) = server.try_wait()
            {
                self.server = None;
                return Err(self.start_error(format!("postgres exited ({status})")));
            }
            match sqlx::PgConnection::connect(&url).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(self.start_error(format!("not ready after 60 s: {e}")));
                }
                // Polled: the server says it is ready only in its log.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn start_error(&self, reason: String) -> ClusterError {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        ClusterError::Start { reason, log }
    }

    /// The cluster's `postgres` database, through the socket.
    pub fn server_url(&self) -> String {
        url_for(&self.dir.path().join("socket"), "postgres")
    }

    /// The same server, another database.
    pub fn database_url(&self, database: &str) -> String {
        url_for(&self.dir.path().join("socket"), database)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Fast shutdown (open sessions are ended), then the directory goes.
    pub async fn stop(mut self) -> Result<(), ClusterError> {
        if let Some(mut server) = self.server.take() {
            if let Some(pid) = server.id() {
                interrupt(pid);
            }
            match tokio::time::timeout(STOP_PATIENCE, server.wait()).await {
                Ok(status) => {
                    status.map_err(io("waiting for postgres to stop"))?;
                }
                Err(_) => {
                    let _ = server.kill().await;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        if let Some(pid) = server.id() {
            interrupt(pid);
        }
        let deadline = Instant::now() + STOP_PATIENCE;
        while Instant::now() < deadline {
            if !matches!(server.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = server.start_kill();
    }
}

/// SIGINT is PostgreSQL's "fast shutdown".
fn interrupt(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    }
}

fn url_for(socket_dir: &Path, database: &str) -> String {
    let path = socket_dir.to_string_lossy();
    let dir = percent_encoding::utf8_percent_encode(&path, percent_encoding::NON_ALPHANUMERIC);
    format!("postgres://postgres@localhost:{PORT}/{database}?host={dir}")
}

/// A command that runs as the cluster's owner, with its working directory
/// in the cluster's (the owner may not be allowed into the caller's).
pub fn server_command(program: &Path, owner: Option<(u32, u32)>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd).kill_on_drop(true);
    if let Some((uid, gid)) = owner {
        // std drops root's supplementary groups when it changes the uid.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Who owns the cluster: the caller, unless it is root.
pub fn server_user() -> Result<Option<(u32, u32)>, ClusterError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    const USER: &str = "postgres";
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
    passwd_entry(&passwd, USER)
        .map(Some)
        .ok_or(ClusterError::NoUser(USER))
}

fn passwd_entry(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user).then_some(())?;
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// The newest installed server: Debian keeps each major version in
/// `/usr/lib/postgresql/N/bin`, outside PATH.
pub fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    from_pg_config
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .find(|dir| has_server(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_user_is_read_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_entry(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_entry(passwd, "post"), None);
        assert_eq!(passwd_entry("postgres:x:oops\n", "postgres"), None);
    }

    #[test]
    fn urls_point_at_the_socket_directory() {
        let url = url_for(Path::new("/tmp/recording-relay-demo-pg-Ab1/socket"), "demo");
        assert_eq!(
            url,
            "postgres://postgres@localhost:5432/demo?host=%2Ftmp%2Frecording%2Drelay%2Ddemo%2Dpg%2DAb1%2Fsocket"
        );
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        assert_eq!(options.get_database(), Some("demo"));
        assert_eq!(
            options.get_socket(),
            Some(&PathBuf::from("/tmp/recording-relay-demo-pg-Ab1/socket"))
        );
    }
}
