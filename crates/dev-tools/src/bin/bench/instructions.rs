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
    // Several times slower under callgrind.
    let listener = start_listener_under(
        url,
        key,
        &[
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ],
        Duration::from_secs(180),
    )
    .await
    .context("the listener under valgrind (apt-get install valgrind)")?;
    let http = reqwest::Client::new();
    let url = format!("http://{}/webhooks/telnyx", listener.addr);
    for (body, headers) in signed_requests(key, &format!("callgrind-{requests}"), requests) {
        post_webhook(&http, &url, body, headers).await?;
    }
    listener.stop_within(Duration::from_secs(120)).await?;
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
