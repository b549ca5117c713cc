//! A PostgreSQL cluster of the test's own, for tests that stop the
//! database (never the shared one on 5432): `initdb` into a temporary
//! directory, reachable only through a unix socket there, stopped and
//! started again with `pg_ctl`. As root it belongs to `postgres` (initdb
//! refuses root), as anyone else to the caller.

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) struct PrivateCluster {
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    /// Holds `data/`, `socket/` and `server.log`; removed on drop.
    dir: tempfile::TempDir,
}

impl PrivateCluster {
    /// `None` when no PostgreSQL server binaries are installed.
    pub(crate) fn bindir() -> Option<PathBuf> {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, bin)| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin)
    }

    /// initdb and start; returns once the server accepts connections.
    pub(crate) fn start(bindir: PathBuf) -> Self {
        let owner = rustix::process::geteuid().is_root().then(|| {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
            passwd
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.first() == Some(&"postgres"))
                        .then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
                })
                .expect("as root, the cluster needs the postgres user (apt-get install postgresql)")
        });
        let dir = tempfile::Builder::new()
            .prefix("recording-relay-private-pg-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("socket")).unwrap();
        if let Some((uid, gid)) = owner {
            for p in [dir.path().to_owned(), dir.path().join("socket")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
            }
        }
        let cluster = Self { bindir, owner, dir };
        cluster.run(
            "initdb",
            &[
                "--pgdata=data",
                "--username=postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        cluster.pg_ctl_start();
        cluster
    }

    /// The `postgres` database, through the socket.
    pub(crate) fn url(&self) -> String {
        let socket = self.dir.path().join("socket");
        let host = percent_encoding::utf8_percent_encode(
            &socket.to_string_lossy(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        format!("postgres://postgres@localhost:5432/postgres?host={host}")
    }

    /// Fast shutdown: sessions are ended, new connections refused.
    pub(crate) fn stop(&self) {
        self.run(
            "pg_ctl",
            &["--pgdata=data", "--mode=fast", "--wait", "stop"],
        );
    }

    pub(crate) fn pg_ctl_start(&self) {
        // Socket only, no TCP port; a throwaway needs no fsync. The server
        // runs in data/, so the socket's directory is named in full.
        let options = format!(
            "--options=-k {} -c listen_addresses= -c fsync=off -p 5432",
            self.dir.path().join("socket").display()
        );
        self.run(
            "pg_ctl",
            &[
                "--pgdata=data",
                "--log=server.log",
                "--wait",
                &options,
                "start",
            ],
        );
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Whether it runs or not: an immediate stop, then the directory goes.
        let _ = self
            .command("pg_ctl")
            .args(["--pgdata=data", "--mode=immediate", "--wait", "stop"])
            .output();
    }
}
