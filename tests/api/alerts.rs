//! The shipped alert rules end to end (issue #24): Debian's Prometheus
//! loads ops/prometheus/recording-relay-alerts.yml and scrapes the real
//! daemon's /metrics while the test induces each fault a rule names. The
//! matching alert must reach `firing` in Prometheus's own alerts API,
//! alone, and leave it once the fault ends.
//!
//! Time runs sixty times faster for the rules: each minute in a `for:` or
//! a range selector becomes a second (`for: 5m` → `for: 5s`, `[5m]` →
//! `[5s]`), with a scrape and an evaluation every second. Thresholds on
//! values (a queue lag over 300 s) stay as shipped, so no lag alert fires
//! here; the promtool tests cover those at their real durations.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use recording_relay::db;
use recording_relay::jobs::{JobState, NewJob, Queue};
use recording_relay_sim::{Fault, SimRecording};
use tokio::process::{Child, Command};

use crate::helpers::{Providers, STORAGE_KEY, TELNYX_KEY, intake_for, providers};
use crate::private_cluster::PrivateCluster;
use crate::process::binary;
use crate::testing;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/ops/prometheus/recording-relay-alerts.yml"
);
/// How long an alert may take to fire or clear, on a busy CI machine.
const PATIENCE: Duration = Duration::from_secs(90);

#[tokio::test]
async fn each_fault_a_rule_names_fires_its_alert_in_prometheus_and_clears_when_it_ends() {
    let prometheus = std::path::Path::new("/usr/bin/prometheus");
    let bindir = PrivateCluster::bindir();
    if !prometheus.exists() || bindir.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus or the PostgreSQL server binaries are not installed \
             (apt-get install prometheus postgresql)"
        );
        eprintln!(
            "SKIPPED: prometheus or the PostgreSQL server binaries are not installed \
             (apt-get install prometheus postgresql)"
        );
        return;
    }
    let cluster = PrivateCluster::start(bindir.unwrap());
    let pool = sqlx::PgPool::connect(&cluster.url()).await.unwrap();
    testing::create_host_schema(&pool).await.unwrap();
    db::migrate(&pool).await.unwrap();
    let queue = Queue::new(pool.clone());
    let Providers { telnyx, storage } = providers(true);

    let metrics_port = free_port();
    let config = cluster.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\naddr = \"127.0.0.1:0\"\n\
             [metrics]\naddr = \"127.0.0.1:{metrics_port}\"\n\
             [worker]\npoll_interval = \"200ms\"\n\
             [retry]\nbase = \"200ms\"\ncap = \"500ms\"\n"
        ),
    )
    .unwrap();
    let key = testing::signing_key();
    let mut daemon = binary()
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("DATABASE_URL", cluster.url())
        .env("TELNYX_PUBLIC_KEY", testing::public_key_base64(&key))
        .env("TELNYX_API_KEY", TELNYX_KEY)
        .env("TELNYX_API_URL", telnyx.base_url())
        .env("SUPABASE_URL", storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", STORAGE_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cluster.path().join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    let prom = Prometheus::start(prometheus, cluster.path(), metrics_port).await;
    let relay_log =
        || std::fs::read_to_string(cluster.path().join("relay.log")).unwrap_or_default();

    // Up and scraped, and nothing fires on a healthy relay.
    prom.wait(PATIENCE, "the daemon scraped as up", |p| async move {
        p.query("up{job=\"recording-relay\"} == 1").await > 0
    })
    .await;
    assert_eq!(prom.firing().await, Vec::<String>::new(), "{}", relay_log());

    // 1. A job fails for good: its recording is not at Telnyx (404).
    let gone = SimRecording::sample("rec-alerts-gone");
    intake_for(&pool, &gone, &gone.to).await;
    enqueue(&queue, "ev-alerts-gone", &gone).await;
    prom.fires_alone("RecordingRelayJobsFailed").await;
    let job = queue
        .get_by_event_id("ev-alerts-gone")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    // Fixed the way the alert says: the recording is back, the job requeued.
    telnyx.add_recording(gone.clone());
    let out = binary()
        .args(["jobs", "requeue", &job.id.to_string()])
        .env("DATABASE_URL", cluster.url())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    prom.clears("RecordingRelayJobsFailed").await;
    assert_eq!(
        state_of(&queue, "ev-alerts-gone").await,
        JobState::Succeeded
    );

    // 2. The Telnyx stand-in answers 500 to everything while a job waits.
    telnyx.set_random_faults(1.0, vec![Fault::Status(500)]);
    let rec = SimRecording::sample("rec-alerts-telnyx");
    telnyx.add_recording(rec.clone());
    intake_for(&pool, &rec, &rec.to).await;
    enqueue(&queue, "ev-alerts-telnyx", &rec).await;
    let alert = prom.fires_alone("RecordingRelayProviderFailing").await;
    assert_eq!(alert["labels"]["provider"], "telnyx", "{alert}");
    telnyx.clear_faults();
    prom.clears("RecordingRelayProviderFailing").await;
    assert_eq!(
        state_of(&queue, "ev-alerts-telnyx").await,
        JobState::Succeeded
    );

    // 3. The database stops (the private cluster, never the shared one).
    pool.close().await;
    cluster.stop();
    prom.fires_alone("RecordingRelayDatabaseDown").await;
    cluster.pg_ctl_start();
    prom.clears("RecordingRelayDatabaseDown").await;

    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon exited:\n{}",
        relay_log()
    );
    assert_eq!(prom.firing().await, Vec::<String>::new(), "{}", relay_log());
    let _ = daemon.start_kill();
}

async fn enqueue(queue: &Queue, event_id: &str, rec: &SimRecording) {
    queue
        .enqueue(&NewJob {
            event_id: event_id.into(),
            event_type: "call.recording.saved".into(),
            event: serde_json::json!({}),
            recording_id: Some(rec.id.clone()),
            // Retried for as long as the test's fault lasts.
            max_attempts: 10_000,
            ..NewJob::default()
        })
        .await
        .unwrap();
}

async fn state_of(queue: &Queue, event_id: &str) -> JobState {
    let mut state = JobState::Pending;
    for _ in 0..200 {
        state = queue
            .get_by_event_id(event_id)
            .await
            .unwrap()
            .unwrap()
            .state;
        if !matches!(state, JobState::Pending | JobState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state
}

/// A port free at the time of asking (Prometheus and the metrics listener
/// need one named in advance).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped rules, sixty times faster: every `for: Nm` and `[Nm]`
/// becomes seconds. Fails if no duration was rewritten (the rules would
/// then run at their real pace and the test time out).
fn sixty_times_faster(rules: &str) -> String {
    let mut out = String::with_capacity(rules.len());
    let mut rewritten = 0;
    for line in rules.lines() {
        let mut line = line.to_owned();
        let trimmed = line.trim_start();
        if let Some(minutes) = trimmed
            .strip_prefix("for: ")
            .and_then(|d| d.strip_suffix('m'))
            .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        {
            line = line.replace(&format!("for: {minutes}m"), &format!("for: {minutes}s"));
            rewritten += 1;
        }
        let mut rest = line.as_str();
        let mut rewrote = String::new();
        while let Some(open) = rest.find('[') {
            let (before, after) = rest.split_at(open + 1);
            rewrote.push_str(before);
            let digits = after.chars().take_while(char::is_ascii_digit).count();
            if digits > 0 && after[digits..].starts_with("m]") {
                rewrote.push_str(&after[..digits]);
                rewrote.push('s');
                rest = &after[digits + 1..];
                rewritten += 1;
            } else {
                rest = after;
            }
        }
        rewrote.push_str(rest);
        out.push_str(&rewrote);
        out.push('\n');
    }
    assert!(rewritten > 5, "no durations in minutes found in the rules");
    out
}

#[test]
fn the_rules_rewrite_turns_minutes_into_seconds_and_nothing_else() {
    let rules = "        expr: sum(rate(x[5m])) > 300 and y[10m:1m]\n        for: 10m\n        summary: \"5m\"\n";
    let fast = sixty_times_faster(&format!("{rules}{rules}{rules}"));
    assert_eq!(
        fast.lines().take(3).collect::<Vec<_>>(),
        [
            "        expr: sum(rate(x[5s])) > 300 and y[10m:1m]",
            "        for: 10s",
            "        summary: \"5m\"",
        ]
    );
}

/// Debian's Prometheus, scraping the daemon and evaluating the rules every
/// second; killed on drop.
struct Prometheus {
    _child: Child,
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(binary: &std::path::Path, dir: &std::path::Path, metrics_port: u16) -> Self {
        let rules = std::fs::read_to_string(RULES).unwrap();
        std::fs::write(dir.join("rules.yml"), sixty_times_faster(&rules)).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: recording-relay\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{metrics_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let prom = Self {
            _child: child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        prom.wait(
            Duration::from_secs(60),
            "Prometheus ready",
            |p| async move {
                p.http
                    .get(format!("{}/-/ready", p.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        prom
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "success", "{answer}");
        answer["data"].clone()
    }

    /// How many series `expr` returns now.
    async fn query(&self, expr: &str) -> usize {
        let q = percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        self.get(&format!("/api/v1/query?query={q}")).await["result"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Every alert the API lists (pending or firing).
    async fn alerts(&self) -> Vec<serde_json::Value> {
        self.get("/api/v1/alerts").await["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn firing(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .alerts()
            .await
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                a["labels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// Polls until `name` fires, then checks that nothing else does; the
    /// alert as the API gave it.
    async fn fires_alone(&self, name: &str) -> serde_json::Value {
        let started = std::time::Instant::now();
        self.wait(PATIENCE, &format!("{name} firing"), |p| async move {
            p.firing().await.iter().any(|n| n == name)
        })
        .await;
        eprintln!("{name} firing after {:?}", started.elapsed());
        assert_eq!(self.firing().await, [name], "only {name} fires");
        self.alerts()
            .await
            .into_iter()
            .find(|a| a["labels"]["alertname"] == name)
            .unwrap()
    }

    /// Polls until `name` is neither pending nor firing.
    async fn clears(&self, name: &str) {
        let started = std::time::Instant::now();
        self.wait(PATIENCE, &format!("{name} cleared"), |p| async move {
            !p.alerts()
                .await
                .iter()
                .any(|a| a["labels"]["alertname"] == name)
        })
        .await;
        eprintln!("{name} cleared after {:?}", started.elapsed());
    }

    async fn wait<'a, F, Fut>(&'a self, patience: Duration, what: &str, mut condition: F)
    where
        F: FnMut(&'a Self) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        while !condition(self).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not {what} within {patience:?}; alerts: {:#?}",
                self.alerts().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
