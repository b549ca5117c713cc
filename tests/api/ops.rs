//! Operator tooling: `check`, `reconcile`, `/metrics`, requeue wake-ups.

use std::time::{Duration, Instant};

use crate::testing;
use recording_relay::call::CallFacts;
use recording_relay::jobs::{JobState, NewJob, Queue};
use recording_relay_sim::SimRecording;
use sqlx::PgPool;
use tokio::process::Command;

use crate::helpers::{
    Providers, STORAGE_KEY, TELNYX_KEY, eventually, intake_for, providers, spawn_pipeline,
    webhook_for,
};

/// The binary with a complete environment pointing at `p` and `db`.
fn relay(p: &Providers, db: &str, telnyx_key: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recording-relay"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db)
        .env(
            "TELNYX_PUBLIC_KEY",
            testing::public_key_base64(&testing::signing_key()),
        )
        .env("TELNYX_API_KEY", telnyx_key)
        .env("TELNYX_API_URL", p.telnyx.base_url())
        .env("SUPABASE_URL", p.storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", STORAGE_KEY)
        .kill_on_drop(true);
    cmd
}

async fn check(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd.arg("check").output().await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn line<'a>(output: &'a str, name: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{output}"))
}

/// Found by `bench queue` (issue #23): sqlx 0.9.0 stopped turning Nagle's
/// algorithm off (upstream issue launchbadge/sqlx#4335; 0.9.1 restores it).
/// A statement the client wrote in two pieces then waited for the server's
/// delayed ACK, 40 ms: one worker's batches of 500 jobs ran at 9k jobs/s
/// instead of 21k. Every connection the binary opens to PostgreSQL must set
/// `TCP_NODELAY`; strace shows the system calls, whatever the crate does.
#[sqlx::test(migrations = false)]
async fn every_connection_to_postgresql_turns_nagles_algorithm_off(pool: PgPool) {
    // Found on PATH here, since the binary runs with a bare environment.
    let strace = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("strace"))
            .find(|candidate| candidate.is_file())
    });
    let Some(strace) = strace else {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace is not installed (apt-get install strace)"
        );
        eprintln!("skipped: strace is not installed");
        return;
    };
    let pool = testing::prepare(pool).await;
    let db = testing::database_url_of(&pool, None);
    let port = pool.connect_options().get_port();
    let good = providers(true);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let daemon = relay(&good, &db, TELNYX_KEY);
    let daemon = daemon.as_std();
    let mut cmd = Command::new(&strace);
    cmd.args(["-f", "-qq", "-e", "trace=connect,setsockopt,close", "-o"])
        .arg(&trace)
        .arg(daemon.get_program())
        .args(daemon.get_args())
        .arg("check")
        .env_clear();
    for (name, value) in daemon.get_envs() {
        if let Some(value) = value {
            cmd.env(name, value);
        }
    }
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Each connect() to PostgreSQL's port that did not fail at once, by
    // file descriptor, must be followed by TCP_NODELAY set on that
    // descriptor before it is closed or connects anywhere again.
    let trace = std::fs::read_to_string(&trace).unwrap();
    let fd_of = |call: &str, line: &str| -> Option<String> {
        let rest = &line[line.find(&format!("{call}("))? + call.len() + 1..];
        Some(rest[..rest.find(',')?].to_owned())
    };
    let mut open: Vec<String> = Vec::new();
    let mut connections = 0;
    for line in trace.lines() {
        if line.contains("connect(")
            && line.contains(&format!("htons({port})"))
            && (line.ends_with("= 0") || line.contains("EINPROGRESS"))
        {
            let fd = fd_of("connect", line).unwrap();
            assert!(
                !open.contains(&fd),
                "fd {fd} connected again without TCP_NODELAY:\n{trace}"
            );
            open.push(fd);
            connections += 1;
        } else if line.contains("TCP_NODELAY, [1]") && line.ends_with("= 0") {
            let fd = fd_of("setsockopt", line).unwrap();
            open.retain(|o| *o != fd);
        } else if let Some(fd) = fd_of("close", line) {
            assert!(
                !open.contains(&fd),
                "fd {fd} closed without TCP_NODELAY:\n{trace}"
            );
        }
    }
    assert!(
        connections > 0,
        "no connection to port {port} traced:\n{trace}"
    );
    assert!(
        open.is_empty(),
        "connections to PostgreSQL without TCP_NODELAY (fds {open:?}):\n{trace}"
    );
}

#[sqlx::test(migrations = false)]
async fn check_reports_each_broken_dependency_on_its_own_line(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let db = testing::database_url_of(&pool, None);

    let good = providers(true);
    let (code, out) = check(&mut relay(&good, &db, TELNYX_KEY)).await;
    assert_eq!(code, Some(0), "{out}");
    for name in ["config", "database", "migrations", "telnyx", "storage"] {
        assert!(line(&out, name).starts_with("ok"), "{out}");
    }

    let (code, out) = check(&mut relay(&good, &db, "KEY_wrong")).await;
    assert_eq!(code, Some(1));
    let telnyx = line(&out, "telnyx");
    assert!(
        telnyx.starts_with("FAIL") && telnyx.contains("TELNYX_API_KEY"),
        "{out}"
    );
    assert!(
        !out.contains("KEY_wrong"),
        "the key itself is never printed"
    );

    let no_bucket = providers(false);
    let (code, out) = check(&mut relay(&no_bucket, &db, TELNYX_KEY)).await;
    assert_eq!(code, Some(1));
    let storage = line(&out, "storage");
    assert!(
        storage.starts_with("FAIL") && storage.contains("setup-bucket"),
        "{out}"
    );
}

#[sqlx::test(migrations = false)]
async fn check_reports_unapplied_migrations(pool: PgPool) {
    crate::testing::create_host_schema(&pool).await.unwrap();
    let db = testing::database_url_of(&pool, None);
    let p = providers(true);
    let (code, out) = check(&mut relay(&p, &db, TELNYX_KEY)).await;
    assert_eq!(code, Some(1));
    assert!(line(&out, "database").starts_with("ok"), "{out}");
    let migrations = line(&out, "migrations");
    assert!(
        migrations.starts_with("FAIL") && migrations.contains("recording-relay migrate"),
        "{out}"
    );
}

#[sqlx::test(migrations = false)]
async fn reconcile_enqueues_exactly_the_missing_recordings_once(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let db = testing::database_url_of(&pool, None);
    let p = providers(true);
    let queue = Queue::new(pool.clone());
    let known = SimRecording::sample("rec-known");
    let unresolved = SimRecording::sample("rec-unresolved");
    let missed = SimRecording::sample("rec-missed");
    for r in [&known, &unresolved, &missed] {
        p.telnyx.add_recording(r.clone());
    }
    let job = |event: &str, recording: Option<&str>, session: &str| NewJob {
        event_id: event.into(),
        event_type: "call.recording.saved".into(),
        event: serde_json::json!({}),
        recording_id: recording.map(str::to_owned),
        call: CallFacts {
            call_session_id: Some(session.to_owned()),
            ..CallFacts::default()
        },
        max_attempts: 5,
        ..NewJob::default()
    };
    queue
        .enqueue(&job("ev-known", Some("rec-known"), &known.call_session_id))
        .await
        .unwrap();
    // A webhook job that has not resolved its recording id yet.
    queue
        .enqueue(&job("ev-unresolved", None, &unresolved.call_session_id))
        .await
        .unwrap();

    for expected in [vec!["rec-missed"], vec![]] {
        let out = relay(&p, &db, TELNYX_KEY)
            .args(["reconcile", "--since", "1h", "--json"])
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["listed"], 3);
        assert_eq!(report["enqueued"], serde_json::json!(expected), "{report}");
    }
    let job = queue
        .get_by_event_id("reconcile:rec-missed")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.recording_id.as_deref(), Some("rec-missed"));
    assert_eq!(job.state, JobState::Pending);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM recording_relay.recording_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 3);
}

/// Every line of the text format: a comment, or `name{labels} value`.
fn assert_prometheus_text(text: &str) {
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics end marker");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
    }
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[sqlx::test(migrations = false)]
async fn metrics_parse_and_move_with_traffic(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    let scrape = || async {
        let res = p
            .app
            .client
            .get(p.app.url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap()
    };
    let before = scrape().await;
    assert_prometheus_text(&before);

    let (rec, _) = p.recorded_call("rec-metrics").await;
    assert_eq!(
        p.app.post_signed(&webhook_for("ev-m", &rec)).await.status(),
        200
    );
    let _ = p
        .app
        .client
        .post(p.app.url("/webhooks/telnyx"))
        .body("x")
        .send()
        .await
        .unwrap();
    p.finished_job("ev-m").await;

    // Families show up once they have a sample; no provider failed here.
    recording_relay::metrics::metrics().provider_error("telnyx", "unavailable");
    let after = scrape().await;
    assert_prometheus_text(&after);
    // Counters are process-wide (other tests run alongside): they only grow.
    let stored = "recording_relay_webhooks_total{outcome=\"stored\",status=\"200\"}";
    assert!(
        sample(&after, stored) >= sample(&before, stored) + 1.0,
        "{after}"
    );
    let refused = "recording_relay_webhooks_total{outcome=\"unauthorized\",status=\"401\"}";
    assert!(sample(&after, refused) >= sample(&before, refused) + 1.0);
    let bytes = "recording_relay_relayed_bytes_total";
    assert!(sample(&after, bytes) >= sample(&before, bytes) + rec.content.len() as f64);
    // Receipt to linked intake, the relay's end-to-end figure.
    let linked = "recording_relay_processing_seconds_count";
    assert!(
        sample(&after, linked) >= sample(&before, linked) + 1.0,
        "{after}"
    );
    // Queue gauges are this database's, read at most every few seconds.
    let succeeded = "recording_relay_jobs{state=\"succeeded\"}";
    assert!(
        eventually(Duration::from_secs(10), || async {
            sample(&scrape().await, succeeded) == 1.0
        })
        .await,
        "{}",
        scrape().await
    );
    let after = scrape().await;
    assert_eq!(
        sample(&after, "recording_relay_jobs{state=\"pending\"}"),
        0.0
    );
    assert_eq!(sample(&after, "recording_relay_database_up"), 1.0);
    assert!(
        after.contains("recording_relay_job_duration_seconds_bucket{"),
        "{after}"
    );
    every_charted_metric_is_exported(&after);
    p.stop().await;
}

/// The shipped alert rules and dashboard chart only metrics the daemon
/// exports: a renamed metric breaks this test, not an alert in production.
fn every_charted_metric_is_exported(scrape: &str) {
    let exported: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let ops = concat!(env!("CARGO_MANIFEST_DIR"), "/ops");
    let rules =
        std::fs::read_to_string(format!("{ops}/prometheus/recording-relay-alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ops}/grafana/recording-relay-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    // Alert expressions run from `expr:` up to the rule's `for:`.
    let mut in_expr = false;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("expr:") {
            in_expr = true;
            exprs.push(rest.to_owned());
        } else if line.starts_with("for:") {
            in_expr = false;
        } else if in_expr {
            exprs.push(line.to_owned());
        }
    }
    assert!(exprs.len() > 15, "{exprs:?}");
    let mut charted = 0;
    for expr in &exprs {
        for name in metric_names(expr) {
            let base = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exported.contains(&base),
                "{name} (in `{expr}`) is not exported; exported: {exported:?}"
            );
            charted += 1;
        }
    }
    assert!(charted > 15);
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("recording_relay_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// `promtool check rules` and the rules' own unit tests, with Debian's
/// `prometheus` package.
#[tokio::test]
async fn the_alert_rules_pass_promtool_and_their_tests() {
    let Ok(promtool) = which("promtool") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return;
    };
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/prometheus");
    for args in [
        ["check", "rules", "recording-relay-alerts.yml"],
        ["test", "rules", "recording-relay-alerts.test.yml"],
    ] {
        let out = tokio::process::Command::new(&promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|p| p.exists())
        .ok_or(())
}

#[sqlx::test(migrations = false)]
async fn requeue_wakes_a_listening_worker_at_once(pool: PgPool) {
    // The worker polls only every hour: a pickup in well under that proves
    // the requeue's NOTIFY woke it.
    let p = spawn_pipeline(pool, |c| c.worker.poll_interval = Duration::from_secs(3600)).await;
    let rec = SimRecording::sample("rec-requeue");
    intake_for(&p.app.pool, &rec, "+15557650002").await;
    // Not at Telnyx yet: the first run fails for good.
    let mut event: serde_json::Value = serde_json::from_slice(&webhook_for("ev-rq", &rec)).unwrap();
    event["data"]["payload"]["recording_id"] = rec.id.clone().into();
    p.post_event(&event).await;
    let job = p.finished_job("ev-rq").await;
    assert_eq!(job.state, JobState::Failed);

    p.telnyx.add_recording(rec.clone());
    let started = Instant::now();
    Queue::new(p.app.pool.clone())
        .requeue(job.id)
        .await
        .unwrap();
    let job = p.finished_job("ev-rq").await;
    let took = started.elapsed();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("requeue to succeeded (pickup + whole pipeline): {took:?}");
    p.stop().await;
}

/// Issue #10: an unmatched job is the only record of its object. With
/// `retention.unresolved_for` set it is deleted together with the object,
/// and only after an alert that went out `unresolved_alert_before` earlier.
#[sqlx::test(migrations = false)]
async fn retention_deletes_an_unresolved_job_with_its_object_only_after_an_alert(pool: PgPool) {
    use recording_relay::config::RetentionConfig;
    use recording_relay::ops::alerts::Alerter;
    use recording_relay::ops::retention::run_once;
    use recording_relay::providers::storage_api::StorageClient;
    use tokio_util::sync::CancellationToken;

    let pool = testing::prepare(pool).await;
    let queue = Queue::new(pool.clone());
    let p = providers(true);
    let sink = crate::helpers::AlertSink::start().await;
    let timeout = Duration::from_secs(5);
    let running = CancellationToken::new();
    let storage = StorageClient::new(
        &p.storage.base_url(),
        STORAGE_KEY.to_owned().into(),
        "call-recordings",
        timeout,
        timeout,
        timeout,
    )
    .unwrap();
    let path = "unmatched/rec-old.wav";
    storage
        .upload(path, "audio/wav", vec![7u8; 100].into(), Some(100))
        .await
        .unwrap();
    for (event, recording, object, days) in [
        ("ev-old", "rec-old", Some(path), 100),
        ("ev-recent", "rec-recent", None, 10),
    ] {
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs
                 (event_id, event_type, event, state, finished_at, last_error, recording_id, object_path)
             VALUES ($1, 'call.recording.saved', '{}', 'unmatched',
                     now() - $2 * interval '1 day', 'no intake matches', $3, $4)",
        )
        .bind(event)
        .bind(f64::from(days))
        .bind(recording)
        .bind(object)
        .execute(&pool)
        .await
        .unwrap();
    }
    let old = queue.get_by_event_id("ev-old").await.unwrap().unwrap();
    let day = Duration::from_secs(86_400);

    // By default: kept, however old.
    let report = run_once(&queue, &RetentionConfig::default(), None, None, &running)
        .await
        .unwrap();
    assert_eq!(report.deleted + report.pruned as usize, 0);
    assert!(queue.get(old.id).await.unwrap().is_some());

    let config = RetentionConfig {
        unresolved_for: Some(90 * day),
        unresolved_alert_before: 7 * day,
        ..RetentionConfig::default()
    };
    let alerter = Alerter::new(&sink.url(), timeout).unwrap();
    // First pass: an alert, nothing deleted (it was never announced).
    let report = run_once(&queue, &config, Some(&storage), Some(&alerter), &running)
        .await
        .unwrap();
    assert_eq!((report.alerted, report.deleted), (1, 0));
    let alert = sink.next().await;
    assert_eq!(alert["kind"], "recording_relay.job_retention_due");
    assert_eq!(alert["job_id"], old.id);
    assert_eq!(alert["object_path"], path);
    let delete_after: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(alert["delete_after"].clone()).unwrap();
    assert!(
        delete_after > chrono::Utc::now() + chrono::Duration::days(6),
        "at least the configured notice: {delete_after}"
    );
    assert!(p.storage.object("call-recordings", path).is_some());
    // Again at once: no second alert, still nothing deleted.
    let report = run_once(&queue, &config, Some(&storage), Some(&alerter), &running)
        .await
        .unwrap();
    assert_eq!((report.alerted, report.deleted), (0, 0));

    // A week after the alert: the job goes, and its object with it.
    sqlx::query(
        "UPDATE recording_relay.recording_jobs SET retention_alerted_at = now() - interval '8 days'
         WHERE id = $1",
    )
    .bind(old.id)
    .execute(&pool)
    .await
    .unwrap();
    let report = run_once(&queue, &config, Some(&storage), Some(&alerter), &running)
        .await
        .unwrap();
    assert_eq!((report.alerted, report.deleted), (0, 1));
    assert!(queue.get(old.id).await.unwrap().is_none());
    assert!(p.storage.object("call-recordings", path).is_none());
    assert!(
        queue.get_by_event_id("ev-recent").await.unwrap().is_some(),
        "not due yet"
    );
}

/// Issue #19: `retention_alerted_at` outlived a requeue. An operator who
/// was told "this job will be deleted" and requeued it to keep it had it
/// deleted, with its object, the next time it ended unmatched, with no
/// fresh alert.
#[sqlx::test(migrations = false)]
async fn a_job_requeued_after_a_retention_alert_is_alerted_again_before_deletion(pool: PgPool) {
    use recording_relay::config::RetentionConfig;
    use recording_relay::ops::alerts::Alerter;
    use recording_relay::ops::retention::run_once;
    use recording_relay::providers::storage_api::StorageClient;
    use tokio_util::sync::CancellationToken;

    let pool = testing::prepare(pool).await;
    let queue = Queue::new(pool.clone());
    let p = providers(true);
    let sink = crate::helpers::AlertSink::start().await;
    let timeout = Duration::from_secs(5);
    let running = CancellationToken::new();
    let storage = StorageClient::new(
        &p.storage.base_url(),
        STORAGE_KEY.to_owned().into(),
        "call-recordings",
        timeout,
        timeout,
        timeout,
    )
    .unwrap();
    let path = "unmatched/rec-kept.wav";
    storage
        .upload(path, "audio/wav", vec![7u8; 100].into(), Some(100))
        .await
        .unwrap();
    // Unmatched for 100 days, and alerted 8 days ago: due for deletion.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO recording_relay.recording_jobs
             (event_id, event_type, event, state, finished_at, last_error, recording_id,
              object_path, retention_alerted_at, max_attempts)
         VALUES ('ev-kept', 'call.recording.saved', '{}', 'unmatched',
                 now() - interval '100 days', 'no intake matches', 'rec-kept', $1,
                 now() - interval '8 days', 3)
         RETURNING id",
    )
    .bind(path)
    .fetch_one(&pool)
    .await
    .unwrap();
    // The operator keeps it: requeued, it runs and ends unmatched again...
    queue.requeue(id).await.unwrap();
    let lease = queue
        .claim("w", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0)
        .lease()
        .unwrap();
    queue
        .finish_unsuccessfully(
            &lease,
            JobState::Unmatched,
            "unmatched",
            "no intake matches",
        )
        .await
        .unwrap();
    // ...and 100 days later is due again.
    sqlx::query(
        "UPDATE recording_relay.recording_jobs SET finished_at = now() - interval '100 days'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();

    let day = Duration::from_secs(86_400);
    let config = RetentionConfig {
        unresolved_for: Some(90 * day),
        unresolved_alert_before: 7 * day,
        ..RetentionConfig::default()
    };
    let alerter = Alerter::new(&sink.url(), timeout).unwrap();
    let report = run_once(&queue, &config, Some(&storage), Some(&alerter), &running)
        .await
        .unwrap();
    assert_eq!(
        (report.alerted, report.deleted),
        (1, 0),
        "a fresh alert, nothing deleted"
    );
    assert_eq!(sink.next().await["job_id"], id);
    assert!(queue.get(id).await.unwrap().is_some());
    assert!(p.storage.object("call-recordings", path).is_some());
}

/// Issue #10: a webhook job that refused its session as ambiguous ("enqueue
/// the right one by recording id (reconcile)") hid the session's recordings
/// from reconcile, so that advice could never work.
#[sqlx::test(migrations = false)]
async fn reconcile_enqueues_the_recordings_of_a_session_whose_job_gave_up(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let db = testing::database_url_of(&pool, None);
    let p = providers(true);
    let queue = Queue::new(pool.clone());
    let first = SimRecording::sample("rec-part-1");
    let mut second = SimRecording::sample("rec-part-2");
    second.call_session_id = first.call_session_id.clone();
    p.telnyx.add_recording(first.clone());
    p.telnyx.add_recording(second.clone());
    queue
        .enqueue(&NewJob {
            event_id: "ev-ambiguous".into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            call: CallFacts {
                call_session_id: Some(first.call_session_id.clone()),
                ..CallFacts::default()
            },
            max_attempts: 5,
            ..NewJob::default()
        })
        .await
        .unwrap();
    let lease = queue
        .claim("w", 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0)
        .lease()
        .unwrap();
    queue
        .finish_unsuccessfully(
            &lease,
            JobState::Failed,
            "permanent",
            "2 recordings of call session fit this event; enqueue the right one by recording id (reconcile)",
        )
        .await
        .unwrap();

    let out = relay(&p, &db, TELNYX_KEY)
        .args(["reconcile", "--since", "1h", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut enqueued: Vec<String> = serde_json::from_value(report["enqueued"].clone()).unwrap();
    enqueued.sort();
    assert_eq!(enqueued, ["rec-part-1", "rec-part-2"], "{report}");
}

/// A `recording_relay.calls` row as the listener writes it from a
/// verified `call.initiated` (issue #21), `minutes_ago` minutes old.
async fn announced_call(
    pool: &PgPool,
    session: &str,
    intake: Option<uuid::Uuid>,
    minutes_ago: i32,
) {
    sqlx::query(
        "INSERT INTO recording_relay.calls
             (call_session_id, intake_id, from_number, to_number, connection_id,
              first_event_id, first_event_type, received_at)
         VALUES ($1, $2, '+15551230001', '+15557650002', '1684641123236054244',
                 'ev-' || $1, 'call.initiated', now() - make_interval(mins => $3))",
    )
    .bind(session)
    .bind(intake)
    .bind(minutes_ago)
    .execute(pool)
    .await
    .unwrap();
}

fn telnyx_client(p: &Providers) -> recording_relay::providers::telnyx_api::TelnyxClient {
    let timeout = Duration::from_secs(5);
    recording_relay::providers::telnyx_api::TelnyxClient::new(
        &p.telnyx.base_url(),
        TELNYX_KEY.to_owned().into(),
        recording_relay::providers::telnyx_api::Timeouts {
            connect: timeout,
            request: timeout,
            read_idle: timeout,
        },
    )
    .unwrap()
}

/// Issue #21, item 4: a call known from `call.initiated` whose recording
/// webhook never came is looked up by its session, and what Telnyx has is
/// enqueued, once.
#[sqlx::test(migrations = false)]
async fn an_overdue_call_whose_recording_telnyx_has_is_enqueued(pool: PgPool) {
    use recording_relay::ops::missing::{Patience, check_overdue_calls};
    let pool = testing::prepare(pool).await;
    let queue = Queue::new(pool.clone());
    let p = providers(true);
    let telnyx = telnyx_client(&p);
    let late = SimRecording::sample("rec-late");
    p.telnyx.add_recording(late.clone());
    let not_yet = SimRecording::sample("rec-not-yet-due");
    p.telnyx.add_recording(not_yet.clone());
    announced_call(&pool, &late.call_session_id, None, 45).await;
    // Announced ten minutes ago: its webhook may well be on its way.
    announced_call(&pool, &not_yet.call_session_id, None, 10).await;
    let patience = Patience::from_config(&Default::default());

    let report = check_overdue_calls(&queue, &telnyx, None, patience, 5)
        .await
        .unwrap();
    assert_eq!(report.asked, 1, "{report:?}");
    assert_eq!(report.enqueued, ["rec-late"]);
    assert!(report.missing.is_empty());
    let job = queue
        .get_by_event_id("reconcile:rec-late")
        .await
        .unwrap()
        .expect("the late recording is enqueued");
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(
        job.call.call_session_id.as_deref(),
        Some(late.call_session_id.as_str())
    );

    // Settled: not asked about again, not enqueued twice.
    let again = check_overdue_calls(&queue, &telnyx, None, patience, 5)
        .await
        .unwrap();
    assert_eq!(again.asked, 0, "{again:?}");
    assert!(again.enqueued.is_empty());
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM recording_relay.recording_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
}

/// Issue #21, item 4: a call whose recording Telnyx never made is reported
/// (metric and alert, with the session and the intake, no phone number)
/// once, however many passes and workers look, not left silent.
#[sqlx::test(migrations = false)]
async fn an_overdue_call_without_a_recording_is_reported_missing_once(pool: PgPool) {
    use recording_relay::ops::alerts::Alerter;
    use recording_relay::ops::missing::{Patience, check_overdue_calls};
    let pool = testing::prepare(pool).await;
    let queue = Queue::new(pool.clone());
    let p = providers(true);
    let telnyx = telnyx_client(&p);
    let sink = crate::helpers::AlertSink::start().await;
    let alerter = Alerter::new(&sink.url(), Duration::from_secs(5)).unwrap();
    let gone = uuid::Uuid::new_v4().to_string();
    let waiting = uuid::Uuid::new_v4().to_string();
    let intake = uuid::Uuid::new_v4();
    // Three hours: past `recording_missing_after` (2 h by default).
    announced_call(&pool, &gone, Some(intake), 180).await;
    // Overdue, not yet missing: asked about, not reported.
    announced_call(&pool, &waiting, None, 45).await;
    let patience = Patience::from_config(&Default::default());
    let missing = || recording_relay::metrics::metrics().recordings_missing.get();
    let before = missing();

    let (a, b) = tokio::join!(
        check_overdue_calls(&queue, &telnyx, Some(&alerter), patience, 5),
        check_overdue_calls(&queue, &telnyx, Some(&alerter), patience, 5),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.asked + b.asked, 2, "{a:?} {b:?}");
    let reported: Vec<String> = a.missing.into_iter().chain(b.missing).collect();
    assert_eq!(reported, std::slice::from_ref(&gone));
    assert_eq!(missing() - before, 1);
    let alert = sink.next().await;
    assert_eq!(alert["kind"], "recording_relay.recording_missing");
    assert_eq!(alert["call_session_id"], gone.as_str());
    assert_eq!(alert["intake_id"], intake.to_string());
    let text = alert.to_string();
    assert!(
        !text.contains("5551230001") && !text.contains("5557650002"),
        "{text}"
    );

    // Asked about again later (the recheck period over): still reported
    // once, and the waiting call not yet at all.
    sqlx::query(
        "UPDATE recording_relay.calls SET recording_checked_at = now() - interval '1 hour'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let again = check_overdue_calls(&queue, &telnyx, Some(&alerter), patience, 5)
        .await
        .unwrap();
    assert_eq!(again.asked, 1, "{again:?}");
    assert!(again.missing.is_empty());
    assert_eq!(missing() - before, 1);
    // The send is awaited inside the pass: an alert would be here by now.
    assert!(sink.try_next().is_none(), "a second alert went out");
    let marked: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT recording_missing_at FROM recording_relay.calls WHERE call_session_id = $1",
    )
    .bind(&gone)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(marked.is_some());
}
