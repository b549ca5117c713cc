//! `bench instructions`: the listener's instructions per webhook, counted by
//! `valgrind --tool=callgrind`.
//!
//! A figure that does not move with the machine's load (issue #23): the
//! same binary, inputs and environment give the same count whatever else
//! runs. Two runs of the release `recording-relay listen` under callgrind,
//! one with no webhook and one with `--requests` signed webhooks sent one
//! after another on one keep-alive connection; the difference, divided by
//! the requests, is what one webhook costs the listener (verification,
//! parsing, the INSERT's client side, the answer, the log line), without
//! start-up and shutdown.

use super::*;

#[derive(clap::Args, Clone)]
pub(super) struct InstructionsArgs {
    /// Webhooks of the measured run.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
}

pub(super) async fn instructions(server: &str, a: &InstructionsArgs) -> anyhow::Result<()> {
    ensure!(a.requests > 0, "--requests must be at least 1");
    let url = fresh_database(server, "bench_instructions").await?;
    let key = testing::signing_key();
    let empty = callgrind_listen(&url, &key, 0).await?;
    let loaded = callgrind_listen(&url, &key, a.requests).await?;
    let per_request = loaded.saturating_sub(empty) as f64 / a.requests as f64;
    say(format!(
        "instructions: listener under callgrind: {empty} instructions with no webhook, \
         {loaded} with {}: {per_request:.0} per webhook",
        a.requests
    ));
    table_row(
        "instructions",
        "listener instructions per webhook (callgrind, load-independent)",
        &format!("{:.0}k", per_request / 1000.0),
        "-",
        "-",
        "-",
    );
    Ok(())
}

/// Total instructions (`Ir`) of one `recording-relay listen` process that
/// answered `requests` webhooks, start-up and shutdown included.
async fn callgrind_listen(url: &str, key: &SigningKey, requests: usize) -> anyhow::Result<u64> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("callgrind.out");
    let log_path = dir.path().join("listen.log");
    let log = std::fs::File::create(&log_path)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(daemon_binary()?)
        .arg("listen")
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", &addr)
        .env("TELNYX_PUBLIC_KEY", testing::public_key_base64(key))
        .env_remove("RECORDING_RELAY_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting recording-relay listen under valgrind (apt-get install valgrind)")?;
    let http = reqwest::Client::new();
    // Several times slower under callgrind.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            bail!(
                "the listener did not become ready under callgrind:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (body, headers) in signed_requests(key, &format!("callgrind-{requests}"), requests) {
        let mut req = http
            .post(format!("http://{addr}/webhooks/telnyx"))
            .header("content-type", "application/json");
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let res = req.body(body).send().await?;
        ensure!(
            res.status().is_success(),
            "a webhook was answered {}",
            res.status()
        );
    }
    let pid = child.id().context("the listener's pid")?;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await??;
    ensure!(status.success(), "the listener exited with {status}");
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    if requests > 0 {
        // Where they go: the functions with the most instructions of their
        // own (start-up included, a small share at this many requests).
        if let Ok(annotated) = Command::new("callgrind_annotate")
            .arg("--threshold=80")
            .arg(&out)
            .output()
            .await
        {
            let annotated = String::from_utf8_lossy(&annotated.stdout);
            for line in annotated
                .lines()
                .skip_while(|l| !l.contains("file:function"))
                .skip(2)
                .take(25)
            {
                say(format!("instructions:   {}", line.trim()));
            }
        }
    }
    // Threads are written to one file; its `summary:` line is the total.
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no `summary:` line in callgrind's output")
}
