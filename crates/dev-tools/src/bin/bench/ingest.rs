//! `bench ingest`: signed webhooks against the real binary at fixed offered
//! rates and closed-loop, beside pgbench running the same INSERT.

use super::*;

/// The webhook INSERT exactly as `Queue::enqueue` runs it, for pgbench.
/// Unique event ids from the client id and a random uuid.
pub(super) const PGBENCH_SCRIPT: &str = "INSERT INTO recording_relay.recording_jobs (event_id, event_type, occurred_at, event, recording_id, call_session_id, call_control_id, call_leg_id, connection_id, client_state, from_number, to_number, duration_millis, channels, recording_started_at, recording_ended_at, max_attempts) VALUES ('pgbench-' || :client_id || '-' || gen_random_uuid(), 'call.recording.saved', '2025-11-19T10:34:00Z'::timestamptz, :event::jsonb, NULL, :session, 'v3:' || :session, 'leg-' || :session, '1494404757140276705', NULL, NULL, NULL, NULL, 'single', '2025-11-19T10:30:00Z'::timestamptz, '2025-11-19T10:33:00Z'::timestamptz, 12) ON CONFLICT DO NOTHING RETURNING id;\n";

/// pgbench's tps with `clients` connections for `secs`, or `None` when
/// pgbench is not installed.
pub(super) async fn pgbench(url: &str, clients: usize, secs: u64) -> anyhow::Result<Option<f64>> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("webhook-insert.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let event = String::from_utf8(webhook_body("pgbench", "pgbench-session"))?;
    let out = match Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &clients.to_string(), "-T", &secs.to_string()])
        .args([
            "-D",
            &format!("event={event}"),
            "-D",
            "session=pgbench-session",
        ])
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output()
        .await
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    Ok(Some(tps))
}

pub(super) struct Listener {
    pub(super) child: Child,
    pub(super) addr: String,
    pub(super) _logs: tempfile::TempDir,
}

/// Starts `recording-relay listen` (release) on a free loopback port, run by
/// `wrapper` when given (`valgrind --tool=callgrind …`, `taskset -c 0`: the
/// daemon's path and arguments follow it), ready within `patience`.
pub(super) async fn start_listener_under(
    url: &str,
    key: &SigningKey,
    wrapper: &[String],
    patience: Duration,
) -> anyhow::Result<Listener> {
    start_daemon(url, key, "listen", &[], wrapper, patience).await
}

/// `recording-relay <role>` (release) on a free loopback port, with `env`
/// besides the database and the webhook key, run by `wrapper` if any.
pub(super) async fn start_daemon(
    url: &str,
    key: &SigningKey,
    role: &str,
    env: &[(&str, &str)],
    wrapper: &[String],
    patience: Duration,
) -> anyhow::Result<Listener> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let logs = tempfile::tempdir()?;
    let log = std::fs::File::create(logs.path().join("listen.log"))?;
    let daemon = daemon_binary()?;
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&daemon);
            c
        }
        None => Command::new(&daemon),
    };
    let mut child = command
        .arg(role)
        .envs(env.iter().copied())
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", &addr)
        .env("TELNYX_PUBLIC_KEY", testing::public_key_base64(key))
        .env_remove("RECORDING_RELAY_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting recording-relay {role} {wrapper:?}"))?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let log = std::fs::read_to_string(logs.path().join("listen.log")).unwrap_or_default();
            bail!("recording-relay {role} did not become ready:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Listener {
        child,
        addr,
        _logs: logs,
    })
}

impl Listener {
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.stop_within(Duration::from_secs(20)).await
    }

    /// SIGTERM, then waits `patience` for a clean exit.
    pub(super) async fn stop_within(mut self, patience: Duration) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SIGTERM: the daemon drains and exits 0.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(patience, self.child.wait()).await??;
        ensure!(status.success(), "the listener exited with {status}");
        Ok(())
    }
}

/// Pre-signed requests, so the load generator only sends.
pub(super) fn signed_requests(
    key: &SigningKey,
    prefix: &str,
    n: usize,
) -> Vec<(Bytes, [(&'static str, String); 2])> {
    let now = testing::unix_now();
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}-{}", uuid::Uuid::new_v4().simple());
            let body = webhook_body(&id, &format!("session-{id}"));
            let headers = testing::signature_headers(key, now, &body);
            (Bytes::from(body), headers)
        })
        .collect()
}

#[derive(Default)]
pub(super) struct Outcomes {
    /// Of the requests answered 200.
    pub(super) latencies: Vec<Duration>,
    pub(super) errors: usize,
    /// Of these errors, the 503s a saturated listener sheds.
    pub(super) shed: usize,
    pub(super) over_2s: usize,
    /// The slowest answer of any kind (a shed 503 too).
    pub(super) slowest: Duration,
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    Stored,
    Shed,
    Failed,
}

pub(super) async fn send(
    http: &reqwest::Client,
    url: &str,
    (body, headers): (Bytes, [(&'static str, String); 2]),
) -> Sent {
    let mut req = http.post(url).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    match req.body(body).send().await {
        Ok(r) => {
            let status = r.status();
            let _ = r.bytes().await;
            match status {
                reqwest::StatusCode::OK => Sent::Stored,
                reqwest::StatusCode::SERVICE_UNAVAILABLE => Sent::Shed,
                _ => Sent::Failed,
            }
        }
        Err(_) => Sent::Failed,
    }
}

impl Outcomes {
    fn record(&mut self, sent: Sent, took: Duration) {
        match sent {
            Sent::Stored => self.latencies.push(took),
            Sent::Shed => {
                self.errors += 1;
                self.shed += 1;
            }
            Sent::Failed => self.errors += 1,
        }
        if took > Duration::from_secs(2) {
            self.over_2s += 1;
        }
        self.slowest = self.slowest.max(took);
    }

    fn merge(&mut self, other: Outcomes) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.shed += other.shed;
        self.over_2s += other.over_2s;
        self.slowest = self.slowest.max(other.slowest);
    }
}

pub(super) fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// `clients` connections, each sending the next request when the last is
/// answered, for `secs`. Returns requests per second answered 200.
pub(super) async fn closed_loop(
    addr: &str,
    key: &SigningKey,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(f64, Outcomes)> {
    let http = http_client()?;
    let url = format!("http://{addr}/webhooks/telnyx");
    // Enough for 10k req/s over the whole run (a client that runs out stops
    // early; the rate is counted over the time actually taken).
    let per_client = (10_000 * secs as usize / clients).max(100);
    let end = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let reqs = signed_requests(key, &format!("closed-{c}"), per_client);
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            for req in reqs {
                if Instant::now() >= end {
                    break;
                }
                let t = Instant::now();
                let sent = send(&http, &url, req).await;
                out.record(sent, t.elapsed());
            }
            out
        }));
    }
    let mut all = Outcomes::default();
    for t in tasks {
        all.merge(t.await?);
    }
    let rate = all.latencies.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((rate, all))
}

/// Open loop: requests start on schedule whatever the answers do; latency
/// counts from the scheduled start (no coordinated omission).
pub(super) async fn fixed_rate(
    addr: &str,
    key: &SigningKey,
    rate: u32,
    secs: u64,
) -> anyhow::Result<(f64, Outcomes)> {
    let http = http_client()?;
    let url = Arc::new(format!("http://{addr}/webhooks/telnyx"));
    let n = rate as usize * secs as usize;
    let reqs = signed_requests(key, &format!("rate{rate}"), n);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(n);
    for (i, req) in reqs.into_iter().enumerate() {
        let at = t0 + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(at).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let sent = send(&http, &url, req).await;
            (sent, at.elapsed())
        }));
    }
    let mut out = Outcomes::default();
    for t in tasks {
        let (sent, took) = t.await?;
        out.record(sent, took);
    }
    let achieved = out.latencies.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((achieved, out))
}

pub(super) fn summarize(o: &mut Outcomes) -> (Duration, Duration, Duration) {
    o.latencies.sort();
    (
        percentile(&o.latencies, 50.0),
        percentile(&o.latencies, 99.0),
        o.latencies.last().copied().unwrap_or_default(),
    )
}

/// Twice the capacity just measured, offered open-loop: the listener must
/// shed what it cannot take (503 at once, Telnyx retries) and keep taking
/// what it can, every answer inside Telnyx's 2 s.
async fn overload(
    listener: &Listener,
    key: &SigningKey,
    sustained: f64,
    secs: u64,
) -> anyhow::Result<()> {
    let offered = (2.0 * sustained).round().max(1.0) as u32;
    let (achieved, o) = fixed_rate(&listener.addr, key, offered, secs).await?;
    let share = if sustained > 0.0 {
        achieved / sustained
    } else {
        0.0
    };
    say(format!(
        "ingest: 2x capacity, {offered} req/s offered for {secs} s: {achieved:.0} req/s answered 200 \
         ({share:.2}x the sustained {sustained:.0}), {} shed, {} other errors, slowest answer {} ms, {} over 2 s",
        o.shed,
        o.errors - o.shed,
        ms(o.slowest),
        o.over_2s
    ));
    table_row(
        "ingest",
        &format!("2x capacity offered ({offered} req/s): shedding"),
        &format!(
            "{achieved:.0} req/s 200 ({share:.2}x sustained), {} shed, slowest {} ms, {} > 2 s",
            o.shed,
            ms(o.slowest),
            o.over_2s
        ),
        &format!("{sustained:.0}"),
        &ratio(achieved, sustained),
        ">= 0.90, none > 2 s",
    );
    Ok(())
}

/// (the listener's CPUs, the load generator's CPU) for `taskset`: the last
/// CPU for the clients, the rest for the server.
fn pin_cpus() -> Option<(String, String)> {
    let n = std::thread::available_parallelism().ok()?.get();
    (n >= 2).then(|| {
        let server = if n == 2 {
            "0".to_owned()
        } else {
            format!("0-{}", n - 2)
        };
        (server, (n - 1).to_string())
    })
}

pub(super) async fn ingest(server: &str, a: &IngestArgs) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_ingest").await?;
    let key = testing::signing_key();

    // pgbench right before and right after the daemon's closed loop, so
    // noise from the shared machine hits both sides alike.
    // Pinned: this process (the load generator, and pgbench, which
    // inherits it) on the last CPU, the listener on the others, so the two
    // clients never take the server's CPU; PostgreSQL runs anywhere.
    let wrapper = match (a.pin, pin_cpus()) {
        (true, Some((server_cpus, client_cpu))) => {
            let pinned = std::process::Command::new("taskset")
                .args(["-a", "-cp", &client_cpu, &std::process::id().to_string()])
                .stdout(Stdio::null())
                .status()
                .context("running taskset")?;
            ensure!(pinned.success(), "taskset failed: {pinned}");
            say(format!(
                "ingest: pinned: load generator and pgbench on CPU {client_cpu}, listener on CPU {server_cpus}"
            ));
            vec!["taskset".to_owned(), "-c".to_owned(), server_cpus]
        }
        (true, None) => bail!("--pin needs at least 2 CPUs"),
        (false, _) => Vec::new(),
    };
    let before = pgbench(&url, a.clients, a.closed_secs).await?;
    let listener = start_listener_under(&url, &key, &wrapper, Duration::from_secs(20)).await?;
    // A short warm-up: connections, prepared statements.
    let _ = closed_loop(&listener.addr, &key, a.clients, 1).await?;
    let listener_pid = listener.child.id().context("listener pid")?;
    let cpu_before = (cpu_seconds(listener_pid), cpu_seconds(std::process::id()));
    let (rate, mut o) = closed_loop(&listener.addr, &key, a.clients, a.closed_secs).await?;
    let cpu_after = (cpu_seconds(listener_pid), cpu_seconds(std::process::id()));
    let per_request = |before: Option<f64>, after: Option<f64>| {
        let served = o.latencies.len().max(1) as f64;
        after
            .zip(before)
            .map_or(0.0, |(a, b)| (a - b) / served * 1e6)
    };
    let listener_us = per_request(cpu_before.0, cpu_after.0);
    let generator_us = per_request(cpu_before.1, cpu_after.1);
    let after = pgbench(&url, a.clients, a.closed_secs).await?;
    let (p50, p99, max) = summarize(&mut o);
    let pg = before.zip(after).map(|(b, a)| (b + a) / 2.0);
    match (before, after) {
        (Some(b), Some(a2)) => say(format!(
            "ingest: pgbench, same INSERT, {} clients, {} s: {b:.0} inserts/s before, {a2:.0} after",
            a.clients, a.closed_secs
        )),
        _ => say("ingest: pgbench is not installed; no ceiling to compare with"),
    }
    say(format!(
        "ingest: closed loop, {} connections, {} s: {rate:.0} req/s, p50 {} ms, p99 {} ms, max {} ms, \
         {} errors; CPU per request: listener {listener_us:.0} us, load generator {generator_us:.0} us",
        a.clients,
        a.closed_secs,
        ms(p50),
        ms(p99),
        ms(max),
        o.errors
    ));
    let pg_tps = pg.unwrap_or(0.0);
    table_row(
        "ingest",
        &format!(
            "max sustained, {} connections (req/s vs pgbench inserts/s, mean of before/after)",
            a.clients
        ),
        &format!("{rate:.0}"),
        &if pg.is_some() {
            format!("{pg_tps:.0}")
        } else {
            "-".to_owned()
        },
        &ratio(rate, pg_tps),
        ">= 0.80",
    );

    overload(&listener, &key, rate, a.step_secs).await?;
    for &r in &a.rates {
        let (achieved, mut o) = fixed_rate(&listener.addr, &key, r, a.step_secs).await?;
        let (p50, p99, max) = summarize(&mut o);
        say(format!(
            "ingest: {r} req/s offered for {} s: {achieved:.0} req/s answered 200, p50 {} ms, \
             p99 {} ms, max {} ms, {} errors, {} over 2 s",
            a.step_secs,
            ms(p50),
            ms(p99),
            ms(max),
            o.errors,
            o.over_2s
        ));
        let target = if r == 2000 {
            "p99 < 50 ms, none > 2 s"
        } else {
            "none > 2 s"
        };
        table_row(
            "ingest",
            &format!("{r} req/s offered"),
            &format!(
                "{achieved:.0} req/s, p50 {} / p99 {} / max {} ms, {} errors, {} > 2 s",
                ms(p50),
                ms(p99),
                ms(max),
                o.errors,
                o.over_2s
            ),
            "-",
            "-",
            target,
        );
    }
    listener.stop().await?;
    let pool = PgPool::connect(&url).await?;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recording_relay.recording_jobs WHERE event_id NOT LIKE 'pgbench-%'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    say(format!("ingest: {stored} webhooks stored in all"));
    Ok(())
}
