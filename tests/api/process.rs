//! The real binary as a process: signals and exit codes.

use std::process::Stdio;
use std::time::Duration;

use crate::testing;
use recording_relay::jobs::{JobState, NewJob, Queue};
use recording_relay_sim::{Fault, SimRecording};
use sqlx::PgPool;
use tokio::process::Command;

use crate::helpers::{Providers, STORAGE_KEY, TELNYX_KEY, eventually, intake_for, providers};

/// The real binary, with nothing of the test's environment but PATH.
pub(crate) fn binary() -> Command {
    testing::bare_command(env!("CARGO_BIN_EXE_recording-relay"))
}

#[tokio::test]
async fn bad_configuration_exits_2_listing_every_problem() {
    let out = binary()
        .args(["--config", "/nonexistent/recording-relay.toml", "serve"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));

    let out = binary()
        .arg("serve")
        .env("TELNYX_PUBLIC_KEY", "AAAA")
        .env("SUPABASE_URL", "http://storage.example.com")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "database.url is not set",
        "telnyx.public_key must decode to 32 bytes",
        "telnyx.api_key is not set",
        "supabase.url must use https outside loopback",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let out = binary().arg("frobnicate").output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[sqlx::test(migrations = false)]
async fn sigterm_releases_an_in_flight_job_and_exits_cleanly(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let Providers { telnyx, storage } = providers(true);
    let rec = SimRecording::sample("rec-slow");
    telnyx.add_recording(rec.clone());
    intake_for(&pool, &rec, &rec.to).await;
    // The download hangs: the job is mid-transfer when SIGTERM arrives.
    telnyx.fail_next_downloads(1, Fault::Hang(Duration::from_secs(60)));

    let queue = Queue::new(pool.clone());
    queue
        .enqueue(&NewJob {
            event_id: "ev-slow".into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            recording_id: Some(rec.id.clone()),
            max_attempts: 5,
            ..NewJob::default()
        })
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[worker]\nshutdown_timeout = \"1s\"\npoll_interval = \"200ms\"\n",
    )
    .unwrap();
    let child = binary()
        .args(["--config", config.to_str().unwrap(), "work"])
        .env("DATABASE_URL", testing::database_url_of(&pool, None))
        .env("TELNYX_API_KEY", TELNYX_KEY)
        .env("TELNYX_API_URL", telnyx.base_url())
        .env("SUPABASE_URL", storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", STORAGE_KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let started = eventually(Duration::from_secs(15), || async {
        telnyx.download_count("rec-slow") >= 1
    })
    .await;
    if !started {
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().unwrap().to_string()])
            .status()
            .await;
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "the download never started:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let job = queue.get_by_event_id("ev-slow").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);

    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits within the grace period plus release")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");

    let job = queue.get_by_event_id("ev-slow").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Pending, "released for another worker");
    assert_eq!(job.attempts, 0, "{:?}", job.errors);
    assert!(job.locked_by.is_none());
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE state = 'running'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(running, 0);
}

/// libfaketime's library, or `None` (then the test is skipped, except
/// under CI, where .ci/run installs it).
fn libfaketime() -> Option<&'static str> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    assert!(
        found.is_some() || std::env::var_os("CI").is_none(),
        "libfaketime is not installed (apt-get install libfaketime)"
    );
    found
}

/// Issue #22: a worker whose wall clock is ten minutes ahead of the
/// database's still waits `pipeline.link_wait` (two minutes, from the job's
/// `created_at`) for the call's `call.initiated` before letting phone and
/// time match. It used its own clock: the wait looked over at once, and
/// phone and time took the recording.
#[sqlx::test(migrations = false)]
async fn a_worker_whose_clock_is_ahead_still_waits_for_the_call_event(pool: PgPool) {
    let Some(lib) = libfaketime() else {
        eprintln!("skipped: libfaketime is not installed");
        return;
    };
    let pool = testing::prepare(pool).await;
    let Providers { telnyx, storage } = providers(true);
    let rec = SimRecording::sample("rec-skewed");
    telnyx.add_recording(rec.clone());
    // Phone and time would match this intake at once.
    intake_for(&pool, &rec, &rec.to).await;
    // Call events arrive at all (another call's), so recordings wait for theirs.
    sqlx::query(
        "INSERT INTO recording_relay.calls (call_session_id, first_event_id, first_event_type)
         VALUES ('sess-other', 'ev-other', 'call.initiated')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let queue = Queue::new(pool.clone());
    queue
        .enqueue(&NewJob {
            event_id: "ev-skewed".into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            recording_id: Some(rec.id.clone()),
            call: recording_relay::call::CallFacts {
                call_session_id: Some(rec.call_session_id.clone()),
                ..Default::default()
            },
            max_attempts: 5,
            ..NewJob::default()
        })
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[worker]\npoll_interval = \"200ms\"\n\n[pipeline]\nlink_wait = \"120s\"\n",
    )
    .unwrap();
    let mut child = binary()
        .args(["--config", config.to_str().unwrap(), "work"])
        .env("LD_PRELOAD", lib)
        .env("FAKETIME", "+600")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("DATABASE_URL", testing::database_url_of(&pool, None))
        .env("TELNYX_API_KEY", TELNYX_KEY)
        .env("TELNYX_API_URL", telnyx.base_url())
        .env("SUPABASE_URL", storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", STORAGE_KEY)
        .spawn()
        .unwrap();

    let settled = eventually(Duration::from_secs(20), || async {
        queue
            .get_by_event_id("ev-skewed")
            .await
            .unwrap()
            .is_some_and(|j| j.attempts >= 1 && j.state != JobState::Running)
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert!(settled, "the worker never finished an attempt");
    let job = queue.get_by_event_id("ev-skewed").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Pending, "{:?}", job.last_error);
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|e| e.contains("pipeline.link_wait")),
        "{:?}",
        job.last_error
    );
    // The next try is at the end of the wait on the database's clock.
    let wait = job.next_run_at - job.created_at;
    assert!(
        wait > chrono::Duration::seconds(100) && wait <= chrono::Duration::seconds(125),
        "{wait}"
    );
}
