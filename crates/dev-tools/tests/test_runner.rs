//! `scripts/test`, the README's test command, on a machine where no usable
//! server answers: it makes a throwaway cluster, hands it to cargo as
//! `DATABASE_URL`, and removes it afterwards. Cargo is replaced by a script
//! (`CARGO`, as cargo itself sets it) that only uses the server, so no test
//! suite runs inside this one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test")
}

/// A loopback port nothing listens on (the test's own listener is closed
/// again at once).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_test_command_runs_on_a_throwaway_cluster_when_no_server_answers_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    // Stands in for cargo: creates a database on the server it was given
    // (what #[sqlx::test] does) and says which arguments reached it.
    let fake_cargo = dir.path().join("cargo");
    std::fs::write(
        &fake_cargo,
        format!(
            "#!/bin/sh\nset -e\n\
             psql -X -q -v ON_ERROR_STOP=1 -d \"$DATABASE_URL\" -c 'CREATE DATABASE runner_check' \n\
             printf '%s\\n%s\\n' \"$DATABASE_URL\" \"$*\" > {}\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &fake_cargo,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let nowhere = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let out = Command::new(script())
        .args(["--test", "api", "--", "some_filter"])
        .env_remove("DATABASE_URL")
        .env("RECORDING_RELAY_TEST_DEFAULT_URL", &nowhere)
        .env("CARGO", &fake_cargo)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&format!(
            "no DATABASE_URL given and the server at {nowhere} is not usable"
        )) && stderr.contains("using a throwaway PostgreSQL cluster"),
        "{stderr}"
    );
    let seen = std::fs::read_to_string(&seen).expect("the fake cargo ran");
    let mut lines = seen.lines();
    let url = lines.next().unwrap();
    assert!(
        url.starts_with("postgres://postgres@127.0.0.1:") && url != nowhere,
        "{seen}"
    );
    assert_eq!(lines.next(), Some("test --test api -- some_filter"));

    let cluster_dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("scripts/test: throwaway cluster stopped and "))
        .and_then(|rest| rest.strip_suffix(" removed"))
        .unwrap_or_else(|| panic!("the cluster's removal is not reported:\n{stderr}"));
    assert!(
        !Path::new(cluster_dir).exists(),
        "{cluster_dir} was left behind"
    );
}

#[test]
fn the_test_command_refuses_a_named_server_that_does_not_answer() {
    let nowhere = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let out = Command::new(script())
        .env("DATABASE_URL", &nowhere)
        .env("CARGO", "/nonexistent/cargo")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("DATABASE_URL ({nowhere}) is not usable"))
            && stderr.contains("Connection refused"),
        "{stderr}"
    );
}
