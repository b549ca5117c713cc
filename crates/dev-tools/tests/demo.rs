//! The demo binary as a newcomer runs it (`cargo demo`): on the server
//! DATABASE_URL names, on a throwaway cluster of its own, and with `--keep`.

use std::process::Stdio;
use std::time::Duration;

use recording_relay_dev_tools::testing;
use tokio::process::Command;

/// The demo binary, with nothing of the test's environment but PATH.
fn binary() -> Command {
    testing::bare_command(env!("CARGO_BIN_EXE_demo"))
}

#[tokio::test]
async fn the_demo_runs_end_to_end() {
    // Its own database name, so a developer's demo database is left alone.
    let name = format!("recording_relay_demo_test_{}", std::process::id());
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let out = binary()
        .args(["--database-url", &server, "--database-name", &name])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
        .await
        .unwrap();
    testing::drop_database(&mut admin, &name).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_the_demo_told_its_story(&stdout);
    // The daemon's own log lines are not mixed into the story: they went to
    // the file the demo named.
    let log = log_file_of(&stdout);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("webhook listener started"), "{logged}");
    for quiet in [
        stdout.as_ref(),
        String::from_utf8_lossy(&out.stderr).as_ref(),
    ] {
        assert!(!quiet.contains("webhook listener started"), "{quiet}");
        assert!(!quiet.contains(" INFO "), "{quiet}");
    }
    let _ = std::fs::remove_file(log);
}

fn log_file_of(stdout: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("log lines go to "))
        .unwrap_or_else(|| panic!("no log file named:\n{stdout}"));
    let rest = &line[line.find("go to ").unwrap() + 6..];
    std::path::PathBuf::from(rest.split(' ').next().unwrap())
}

/// What every demo run must show: the jobs' changes as they happened, and a
/// table whose every row is the expected end with the same bytes.
fn assert_the_demo_told_its_story(stdout: &str) {
    for call in ["call 1", "call 2", "call 3", "call 4"] {
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains(&format!("{call}   ")))
            .collect();
        let told = |what: &str| lines.iter().position(|l| l.contains(what));
        let queued = told("queued").unwrap_or_else(|| panic!("{call} never queued:\n{stdout}"));
        let claimed = told("claimed by a worker, attempt 1").expect("claimed");
        let stored = told("stored as ").expect("stored");
        assert!(
            queued < claimed && claimed < stored,
            "{call} out of order:\n{stdout}"
        );
        if call == "call 3" {
            assert!(told("unmatched: kept for an operator").is_some_and(|u| u > stored));
            assert!(told("back in the queue, retry in").is_some(), "{stdout}");
        } else {
            let linked = told("linked on intake").expect("linked");
            let deleted = told("deleted at Telnyx").expect("deleted");
            let done = told("succeeded").expect("succeeded");
            assert!(
                stored < linked && linked < deleted && deleted < done,
                "{stdout}"
            );
        }
    }
    let header = stdout
        .lines()
        .position(|l| {
            l.split_whitespace().collect::<Vec<_>>()
                == [
                    "call",
                    "intake",
                    "recording",
                    "duration",
                    "state",
                    "object",
                    "SHA-256",
                ]
        })
        .unwrap_or_else(|| panic!("no table:\n{stdout}"));
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(header + 2)
        .take(4)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expected = [
        ("1", "3:00", "succeeded", "intakes/"),
        ("2", "12:00", "succeeded", "intakes/"),
        ("3", "0:30", "unmatched", "unmatched/"),
        ("4", "2:00", "succeeded", "intakes/"),
    ];
    for (row, (call, duration, state, prefix)) in rows.iter().zip(expected) {
        assert_eq!(row.len(), 7, "{row:?}");
        assert_eq!(
            (row[0], row[3], row[4]),
            (call, duration, state),
            "{stdout}"
        );
        assert!(row[5].starts_with(prefix), "{stdout}");
        assert_eq!(
            row[6], "matches",
            "every recording's SHA-256 matches the source: {stdout}"
        );
    }
    assert!(stdout.contains("206 Partial Content"), "{stdout}");
    // Issue #21: the patient called twice within ten minutes has two
    // intakes, and each call's recording is on its own (the demo checks
    // each job's intake against the one the call named).
    assert_ne!(rows[0][1], rows[3][1], "{stdout}");
    assert!(
        stdout.contains("calls 1 and 4 called the same patient six minutes apart"),
        "{stdout}"
    );
    // NEEDS BRANCH `initiated` (issue #21: the listener stores call.initiated
    // and matching links by X-Intake-Id): both were linked by the header,
    // not by phone number and time.
    for call in ["call 1", "call 4"] {
        let matched = stdout
            .lines()
            .find(|l| l.contains(&format!("{call}   ")) && l.contains("matched intake"))
            .unwrap_or_else(|| panic!("{call} never matched:\n{stdout}"));
        assert!(
            !matched.contains("by phone number and call time"),
            "{call} was not linked by its X-Intake-Id: {matched}"
        );
    }
}

/// `demo --embedded-postgres` as a newcomer runs it: no DATABASE_URL, its
/// own cluster; `--keep` then leaves a player link that plays, and a signal
/// ends it with the cluster removed.
#[tokio::test]
async fn the_demo_runs_on_a_throwaway_cluster_and_keeps_a_playable_link() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = binary()
        .args(["--embedded-postgres", "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let link = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stdout.push_str(&line);
            stdout.push('\n');
            if let Some(at) = line.find("http://").filter(|_| line.contains("#token=")) {
                return Some(line[at..].trim().to_owned());
            }
        }
        None
    })
    .await;
    let Ok(Some(link)) = link else {
        let _ = child.start_kill();
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "no player link:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    assert!(
        stdout.contains("--embedded-postgres: using a throwaway PostgreSQL cluster"),
        "{stdout}"
    );
    let cluster_dir = stdout
        .lines()
        .find_map(|l| {
            l.split_once("throwaway cluster ready in ")
                .map(|(_, rest)| rest.to_owned())
        })
        .and_then(|rest| {
            rest.split(": ")
                .nth(1)
                .map(|s| s.split(',').next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no cluster directory:\n{stdout}"));
    assert!(std::path::Path::new(&cluster_dir).is_dir(), "{cluster_dir}");
    assert_the_demo_told_its_story(&stdout);

    // The link is the player page with a token the playback API accepts.
    let (page, token) = link.split_once("#token=").unwrap();
    let (base, intake) = page.split_once("/play/").unwrap();
    let http = reqwest::Client::new();
    let res = http.get(page).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = http
        .get(format!("{base}/v1/intakes/{intake}/recording"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "available", "{body}");
    assert_eq!(body["duration_seconds"], 180, "{body}");
    let audio = http
        .get(body["url"].as_str().unwrap())
        .header("range", "bytes=0-43")
        .send()
        .await
        .unwrap();
    assert_eq!(audio.status(), 206);
    assert_eq!(&audio.bytes().await.unwrap()[..4], b"RIFF");

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rest = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    })
    .await
    .expect("the demo ends after SIGTERM");
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{rest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rest.contains("throwaway cluster stopped"), "{rest}");
    assert!(
        !std::path::Path::new(&cluster_dir).exists(),
        "{cluster_dir} was left behind"
    );
    let _ = std::fs::remove_file(log_file_of(&stdout));
}

/// Plain `demo`, as `cargo demo` runs it (cargo passes the default
/// address as DATABASE_URL): a throwaway cluster, whatever answers on
/// 127.0.0.1:5432, since the demo drops and recreates its database and that
/// server may be shared. The server DATABASE_URL names is never touched.
#[tokio::test]
async fn plain_demo_runs_on_a_throwaway_cluster_and_leaves_the_default_server_alone() {
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        binary()
            .env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )
            .output(),
    )
    .await
    .expect("the demo finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("no server named: using a throwaway PostgreSQL cluster (--database-url or DATABASE_URL names one to use instead)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("recreating recording_relay_demo on the throwaway cluster"),
        "{stdout}"
    );
    assert_the_demo_told_its_story(&stdout);
    assert!(stdout.contains("throwaway cluster stopped"), "{stdout}");
    let _ = std::fs::remove_file(log_file_of(&stdout));
}
