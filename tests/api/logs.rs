//! Secrets and personal data never reach the logs: the real binary, at
//! `RUST_LOG=debug` (every crate's debug output, ours and the libraries'),
//! relays a recording end to end against the simulators and refuses a few
//! bad requests; then its whole stderr is searched for every secret and
//! number it handled.
//!
//! `LOGAUDIT_LEVEL=trace` runs the same audit at another level;
//! `SHOW_LOG=1` prints the captured log.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::testing;
use recording_relay::jobs::{JobState, Queue};
use recording_relay_sim::{SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{eventually, intake_for};

const TELNYX_API_KEY: &str = "KEY0199aabbccddeeff_logaudit_telnyx";
const SERVICE_KEY: &str = "eyJhbGciOiJIUzI1NiJ9.logaudit-service-role.c2VjcmV0";
const DB_PASSWORD: &str = "pw-logaudit-5ecret";

/// `postgres://user@host/db` with a password added (the server trusts
/// loopback, so it is never asked for: it only has to be somewhere to leak).
fn with_password(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (user, host) = rest.split_once('@')?;
    (!user.contains(':')).then(|| format!("{scheme}://{user}:{DB_PASSWORD}@{host}"))
}

#[sqlx::test(migrations = false)]
async fn debug_logs_hold_no_secrets_phone_numbers_or_signed_urls(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_API_KEY.to_owned(),
        ..TelnyxSimConfig::default()
    })
    .unwrap();
    let storage = StorageSim::start(StorageSimConfig {
        service_key: SERVICE_KEY.to_owned(),
        ..StorageSimConfig::default()
    })
    .unwrap();
    storage.create_bucket("call-recordings", false, None, None);
    let rec = SimRecording::sample("rec-logaudit");
    telnyx.add_recording(rec.clone());
    // The host stores numbers in free formats; this one must match +15557650002.
    intake_for(&pool, &rec, "(555) 765-0002").await;

    let key = testing::signing_key();
    let database_url = testing::database_url_of(&pool, None);
    let database_url = with_password(&database_url).unwrap_or(database_url);
    // A config file that holds a secret and is world-readable: the binary
    // must warn about it without printing it.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[telnyx]\napi_key = \"{TELNYX_API_KEY}\"\n\
             [worker]\npoll_interval = \"200ms\"\n\
             [pipeline]\ndelete_from_telnyx = true\n"
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_recording-relay"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("LOGAUDIT_LEVEL").unwrap_or_else(|_| "debug".to_owned()),
        )
        .env("DATABASE_URL", &database_url)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("TELNYX_PUBLIC_KEY", testing::public_key_base64(&key))
        .env("TELNYX_API_KEY", TELNYX_API_KEY)
        .env("TELNYX_API_URL", telnyx.base_url())
        .env("SUPABASE_URL", storage.base_url())
        .env("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Every stderr line, and the port the listener bound.
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let collected = lines.clone();
    let reader = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.contains("webhook listener started")
                && let Some(addr) = line.split("addr=").nth(1)
                && let Some(tx) = addr_tx.take()
            {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
            collected.lock().unwrap().push(line);
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(20), addr_rx)
        .await
        .unwrap_or_else(|_| panic!("no listener:\n{}", lines.lock().unwrap().join("\n")))
        .unwrap();
    let url = format!("http://{addr}/webhooks/telnyx");
    let client = reqwest::Client::new();

    // Mint the presigned URLs the daemon could have been handed (their
    // signature changes every second) while it works.
    let minted = Arc::new(Mutex::new(BTreeSet::new()));
    let minting = {
        let (telnyx, minted) = (telnyx.clone(), minted.clone());
        tokio::spawn(async move {
            loop {
                let url = telnyx.download_url("rec-logaudit", "wav");
                if let Some(sig) = url.split("X-Amz-Signature=").nth(1) {
                    minted.lock().unwrap().insert(sig.to_owned());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Numbers in the payload (the original guide's example had them; some
    // deliveries do), so the listener sees them too.
    let mut event = testing::recording_saved_event("ev-logaudit", &rec.call_session_id);
    let p = &mut event["data"]["payload"];
    p["from"] = rec.from.clone().into();
    p["to"] = rec.to.clone().into();
    p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
    p["call_leg_id"] = rec.call_leg_id.clone().into();
    let body = event.to_string().into_bytes();
    let now = testing::unix_now();
    let mut signatures = Vec::new();
    let post = |headers: [(&'static str, String); 2], body: Vec<u8>| {
        let mut req = client.post(&url).header("content-type", "application/json");
        for (name, value) in headers {
            req = req.header(name, value);
        }
        req.body(body).send()
    };

    // Refused: a signature over other bytes, and a stale timestamp.
    let mut other = event.clone();
    other["data"]["id"] = "ev-forged".into();
    let forged = testing::signature_headers(&key, now, other.to_string().as_bytes());
    signatures.push(forged[1].1.clone());
    assert_eq!(post(forged, body.clone()).await.unwrap().status(), 401);
    let stale = testing::signature_headers(&key, now - 900, &body);
    signatures.push(stale[1].1.clone());
    assert_eq!(post(stale, body.clone()).await.unwrap().status(), 401);
    // Accepted, and relayed end to end.
    let good = testing::signature_headers(&key, now, &body);
    signatures.push(good[1].1.clone());
    assert_eq!(post(good, body.clone()).await.unwrap().status(), 200);

    let queue = Queue::new(pool.clone());
    let done = eventually(Duration::from_secs(30), || async {
        queue
            .get_by_event_id("ev-logaudit")
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.state.is_final())
    })
    .await;
    minting.abort();
    let job = queue.get_by_event_id("ev-logaudit").await.unwrap().unwrap();
    assert!(done, "{job:?}\n{}", lines.lock().unwrap().join("\n"));
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(telnyx.deleted_ids(), ["rec-logaudit"]);
    // Mint once more: the daemon may have fetched in the last 100 ms.
    let last = telnyx.download_url("rec-logaudit", "wav");
    if let Some(sig) = last.split("X-Amz-Signature=").nth(1) {
        minted.lock().unwrap().insert(sig.to_owned());
    }

    let pid = child.id().unwrap().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    reader.await.unwrap();
    let log = lines.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "{log}");

    // The run really was at debug level and really did the work.
    for expected in ["DEBUG", "job succeeded", "recording resolved", "***02"] {
        assert!(log.contains(expected), "{expected:?} missing from:\n{log}");
    }
    assert!(
        log.contains("holds secrets (telnyx.api_key)"),
        "the readable config file is warned about:\n{log}"
    );

    let minted = minted.lock().unwrap().clone();
    assert!(!minted.is_empty());
    let mut forbidden: Vec<(String, String)> = vec![
        ("Telnyx API key".into(), TELNYX_API_KEY.into()),
        ("Supabase service key".into(), SERVICE_KEY.into()),
        ("database password".into(), DB_PASSWORD.into()),
        ("phone number (E.164)".into(), rec.to.clone()),
        ("phone number (digits)".into(), "5557650002".into()),
        ("phone number (host format)".into(), "765-0002".into()),
        ("caller number (E.164)".into(), rec.from.clone()),
        ("caller number (digits)".into(), "5551230001".into()),
        ("presigned URL parameter".into(), "X-Amz-Signature".into()),
        ("presigned URL parameter".into(), "X-Amz-Credential".into()),
        ("signed URL token".into(), "token=".into()),
    ];
    for sig in &signatures {
        forbidden.push(("webhook signature".into(), sig.clone()));
    }
    for sig in &minted {
        forbidden.push(("presigned URL signature".into(), sig.clone()));
    }
    let leaks: Vec<String> = forbidden
        .iter()
        .filter(|(_, secret)| log.contains(secret.as_str()))
        .map(|(what, secret)| {
            let line = log
                .lines()
                .find(|l| l.contains(secret.as_str()))
                .unwrap_or("");
            format!("{what} in: {line}")
        })
        .collect();
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    assert!(leaks.is_empty(), "leaks:\n{}", leaks.join("\n"));
    eprintln!(
        "\nlog audit: {} stderr lines ({} bytes) at RUST_LOG=debug searched for {} secrets \
         ({} presigned URL signatures minted during the run): none found",
        log.lines().count(),
        log.len(),
        forbidden.len(),
        minted.len()
    );
}

#[tokio::test]
async fn database_errors_do_not_print_the_url_password() {
    for url in [
        format!("postgres://relay:{DB_PASSWORD}@127.0.0.1:notaport/zscribe"),
        format!("postgres://relay:{DB_PASSWORD}@127.0.0.1:1/zscribe"),
        format!("postgres://relay@127.0.0.1:1/zscribe?password={DB_PASSWORD}"),
        format!("mysql://relay:{DB_PASSWORD}@127.0.0.1/zscribe"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_recording-relay"))
            .arg("migrate")
            .env_clear()
            .env("RUST_LOG", "debug")
            .env("DATABASE_URL", &url)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{url}: {stderr}");
        assert!(!stderr.contains(DB_PASSWORD), "{url}:\n{stderr}");
    }
}
