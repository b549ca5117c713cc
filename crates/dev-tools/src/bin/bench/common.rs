//! What every scenario shares: output rows, fresh databases, the daemon
//! binary beside this one, percentiles.

use super::*;

pub(super) fn say(line: impl AsRef<str>) {
    println!("bench: {}", line.as_ref());
}

/// One row of the results table (collected by bench/run-all.sh).
pub(super) fn table_row(
    scenario: &str,
    measure: &str,
    ours: &str,
    reference: &str,
    ratio: &str,
    target: &str,
) {
    println!("TABLE|{scenario}|{measure}|{ours}|{reference}|{ratio}|{target}");
}

/// Drops and recreates `name`, with the stand-in host tables and the
/// daemon's migrations, then `VACUUM ANALYZE`. Returns its URL.
pub(super) async fn fresh_database(server: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .context("connecting to PostgreSQL")?;
    recording_relay_dev_tools::testing::recreate_database(&mut admin, name).await?;
    let url = format!("{server}/{name}");
    let pool = PgPool::connect(&url).await?;
    recording_relay_dev_tools::testing::create_host_schema(&pool).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    vacuum_analyze(&url).await?;
    Ok(url)
}

pub(super) async fn vacuum_analyze(url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await?;
    Ok(())
}

pub(super) fn config_for(url: &str) -> Config {
    let mut c = Config::default();
    c.database.url = Some(url.to_owned().into());
    c
}

/// The daemon beside this binary. Under `cargo run --bin bench` (which
/// builds only this binary) it is built first, with the same profile, so a
/// stale daemon is never measured.
pub(super) fn daemon_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let me = std::env::current_exe()?;
    let daemon = me.with_file_name("recording-relay");
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = me
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "release");
        BUILT
            .get_or_init(|| {
                let mut build = std::process::Command::new(cargo);
                build.args([
                    "build",
                    "--quiet",
                    "-p",
                    "recording-relay",
                    "--bin",
                    "recording-relay",
                ]);
                if release {
                    build.arg("--release");
                }
                match build.current_dir(env!("CARGO_MANIFEST_DIR")).status() {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(format!("building recording-relay failed: {s}")),
                    Err(e) => Err(format!("running cargo: {e}")),
                }
            })
            .clone()
            .map_err(anyhow::Error::msg)?;
    }
    ensure!(
        daemon.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        daemon.display()
    );
    Ok(daemon)
}

/// The repository's `bench/` (peer scripts, raw-copy baseline), two levels
/// above this crate.
pub(super) fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench")
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub(super) fn ratio(ours: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}", ours / reference)
    } else {
        "-".to_owned()
    }
}

/// Peak resident set (VmHWM) of a process, in MiB.
pub(super) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time (user + system) a process used so far, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The environment that points a `serve` or `work` daemon at the
/// stand-ins (their keys are the bench's).
pub(super) fn provider_env<'a>(
    telnyx_url: &'a str,
    storage_url: &'a str,
) -> [(&'static str, &'a str); 5] {
    [
        ("TELNYX_API_KEY", TELNYX_KEY),
        ("TELNYX_API_URL", telnyx_url),
        ("SUPABASE_URL", storage_url),
        ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
        ("STORAGE_BUCKET", BUCKET),
    ]
}

/// The Telnyx and Storage stand-ins of a relay scenario, with the bucket,
/// and, when a bandwidth is given, each behind a paced link (`pace.rs`)
/// that its URLs name, so API calls, downloads and uploads all cross it.
pub(super) struct StandIns {
    pub(super) telnyx: TelnyxSim,
    pub(super) storage: StorageSim,
    /// The storage simulator's files: in memory (/dev/shm) when it is
    /// there, since writing gigabytes back to a shared disk would stall the
    /// database's commits, which the raw copies do not make, and measure
    /// the disk rather than the relay.
    pub(super) data_dir: tempfile::TempDir,
    _links: Option<(super::pace::Paced, super::pace::Paced)>,
}

impl StandIns {
    /// Both stand-ins, stopped with `stop`; objects up to `largest` bytes;
    /// links of `mb_per_second` each way per connection, or plain loopback.
    pub(super) async fn start(
        stop: &CancellationToken,
        largest: u64,
        mb_per_second: Option<u64>,
    ) -> anyhow::Result<Self> {
        let shm = Path::new("/dev/shm");
        let data_dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)?
        } else {
            tempfile::tempdir()?
        };
        let links = match mb_per_second {
            Some(_) => Some((
                super::pace::PacedListener::bind().await?,
                super::pace::PacedListener::bind().await?,
            )),
            None => None,
        };
        let origin = |l: &super::pace::PacedListener| format!("http://{}", l.addr);
        let telnyx = TelnyxSim::start(TelnyxSimConfig {
            api_key: TELNYX_KEY.to_owned(),
            cancel: stop.child_token(),
            public_origin: links.as_ref().map(|(t, _)| origin(t)),
            ..TelnyxSimConfig::default()
        })?;
        let storage = StorageSim::start(StorageSimConfig {
            service_key: SERVICE_KEY.to_owned(),
            data_dir: Some(data_dir.path().to_owned()),
            global_file_size_limit: largest.max(64 << 20) * 2,
            cancel: stop.child_token(),
            public_origin: links.as_ref().map(|(_, s)| origin(s)),
            ..StorageSimConfig::default()
        })?;
        let links = links.zip(mb_per_second).map(|((t, s), rate)| {
            (
                t.serve(telnyx.addr(), rate * 1_000_000),
                s.serve(storage.addr(), rate * 1_000_000),
            )
        });
        storage.create_bucket(BUCKET, false, None, None);
        Ok(Self {
            telnyx,
            storage,
            data_dir,
            _links: links,
        })
    }
}

/// POSTs a webhook `body` to `url`, signed with `key` as Telnyx signs it;
/// an answer other than 2xx is an error.
pub(super) async fn post_signed(
    http: &reqwest::Client,
    url: &str,
    key: &SigningKey,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let headers = testing::signature_headers(key, testing::unix_now(), &body);
    post_webhook(http, url, body, headers).await
}

/// POSTs a webhook `body` with its signature `headers` (signed beforehand
/// or just now); an answer other than 2xx is an error.
pub(super) async fn post_webhook(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
    headers: [(&'static str, String); 2],
) -> anyhow::Result<()> {
    let mut req = http.post(url).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let res = req.body(body).send().await?;
    ensure!(
        res.status().is_success(),
        "webhook answered {}",
        res.status()
    );
    Ok(())
}

/// A signed `call.recording.saved` body, as Telnyx sends it.
pub(super) fn webhook_body(event_id: &str, call_session_id: &str) -> Vec<u8> {
    testing::recording_saved_event(event_id, call_session_id)
        .to_string()
        .into_bytes()
}

pub(super) fn new_job(event_id: &str, call_session_id: &str) -> NewJob {
    let body = webhook_body(event_id, call_session_id);
    Envelope::parse(&body)
        .expect("a well-formed event")
        .into_job(12)
}
