//! `bench relay`: large recordings streamed from the Telnyx stand-in into the
//! storage stand-in by the real binary, beside a raw copy; and
//! `bench backlog`: a queue of many recordings of mixed sizes drained at the
//! daemon's default concurrency, beside a raw copy at the same concurrency.
//!
//! The raw copy is measured two ways, right before and right after the
//! daemon, and the faster is the reference: curl piped into curl
//! (`bench/raw-copy.sh`, a process pair per recording, which costs a few
//! milliseconds each), and a stream copy in this process (reqwest, no
//! hashing, no database). With many small recordings the process spawns
//! make curl the slower; the reference must not be a straw man.

use super::*;

pub(super) const SERVICE_KEY: &str = "bench-service-role-key";
pub(super) const TELNYX_KEY: &str = "KEY_bench";
pub(super) const BUCKET: &str = "call-recordings";

pub(super) async fn relay(server: &str, a: &RelayArgs) -> anyhow::Result<()> {
    let sizes = vec![a.size_mb * 1_000_000; a.recordings];
    // Every recording at once: the daemon runs as many jobs as there are.
    let run = relay_run(
        server,
        "bench_relay",
        &sizes,
        Some(a.recordings.max(1)),
        None,
    )
    .await?;
    let label = format!("{} x {} MB concurrently", a.recordings, a.size_mb);
    run.report("relay", &label, ">= 0.95");
    Ok(())
}

pub(super) async fn backlog(server: &str, a: &BacklogArgs) -> anyhow::Result<()> {
    // Sizes spread evenly over [min, max] MB, in a fixed shuffled order.
    let mut rng = fastrand::Rng::with_seed(0xb4c1_0600);
    let sizes: Vec<u64> = (0..a.recordings)
        .map(|_| rng.u64(a.min_mb * 1_000_000..=a.max_mb * 1_000_000))
        .collect();
    let run = relay_run(
        server,
        "bench_backlog",
        &sizes,
        a.concurrency,
        a.mb_per_second,
    )
    .await?;
    let link = match a.mb_per_second {
        Some(rate) => format!("{rate} MB/s per connection"),
        None => "loopback".to_owned(),
    };
    let label = format!(
        "backlog of {} x {}-{} MB, concurrency {}, {link}",
        a.recordings, a.min_mb, a.max_mb, run.concurrency
    );
    run.report("backlog", &label, ">= 0.90");
    Ok(())
}

/// What one relay run measured.
struct RelayRun {
    total_mb: f64,
    recordings: usize,
    concurrency: usize,
    relayed: Duration,
    /// Before and after the daemon: curl, then the stream copy.
    raw_before: (Duration, Duration),
    raw_after: (Duration, Duration),
    cpu: f64,
    peak: f64,
    idle_rss: f64,
}

impl RelayRun {
    fn report(&self, scenario: &str, label: &str, target: &str) {
        let curl = (self.raw_before.0 + self.raw_after.0) / 2;
        let stream = (self.raw_before.1 + self.raw_after.1) / 2;
        let (raw, how) = if stream <= curl {
            (stream, "stream copy")
        } else {
            (curl, "curl | curl")
        };
        let raw_mbs = self.total_mb / raw.as_secs_f64();
        let relay_mbs = self.total_mb / self.relayed.as_secs_f64();
        say(format!(
            "{scenario}: raw copy of {} recordings, {:.0} MB, {} at a time: curl | curl {} ms \
             before, {} ms after; stream copy {} ms before, {} ms after; reference ({how}): \
             {raw_mbs:.0} MB/s",
            self.recordings,
            self.total_mb,
            self.concurrency,
            ms(self.raw_before.0),
            ms(self.raw_after.0),
            ms(self.raw_before.1),
            ms(self.raw_after.1),
        ));
        say(format!(
            "{scenario}: recording-relay work ({} at a time): {} ms, {relay_mbs:.0} MB/s, \
             {:.1} recordings/s; daemon CPU {:.2} s; peak RSS {:.1} MiB (idle {:.1} MiB); \
             every object verified by SHA-256",
            self.concurrency,
            ms(self.relayed),
            self.recordings as f64 / self.relayed.as_secs_f64(),
            self.cpu,
            self.peak,
            self.idle_rss
        ));
        table_row(
            scenario,
            &format!("{label} (MB/s vs raw copy)"),
            &format!("{relay_mbs:.0} MB/s ({:.1} s)", self.relayed.as_secs_f64()),
            &format!(
                "{raw_mbs:.0} MB/s ({:.1} s, {how}, mean of before/after)",
                raw.as_secs_f64()
            ),
            &ratio(relay_mbs, raw_mbs),
            target,
        );
        table_row(
            scenario,
            "daemon peak RSS (VmHWM)",
            &format!("{:.1} MiB", self.peak),
            "-",
            "-",
            "< 100 MB",
        );
    }
}

/// Relays recordings of `sizes` bytes with `recording-relay work` at
/// `concurrency` (the daemon's default when `None`), between two raw copies
/// at the same concurrency. With `mb_per_second`, both stand-ins are served
/// through paced links (`pace.rs`) that every copy crosses; without, over
/// plain loopback, where the machine's CPU is the limit.
async fn relay_run(
    server: &str,
    database: &str,
    sizes: &[u64],
    concurrency: Option<usize>,
    mb_per_second: Option<u64>,
) -> anyhow::Result<RelayRun> {
    let url = fresh_database(server, database).await?;
    let size = sizes.iter().copied().max().unwrap_or(0);
    let total_mb = sizes.iter().sum::<u64>() as f64 / 1e6;
    let parallel = concurrency.unwrap_or_else(|| Config::default().worker.concurrency);
    let stop = CancellationToken::new();
    let stand_ins = StandIns::start(&stop, size, mb_per_second).await?;
    let (telnyx, storage, data_dir) = (&stand_ins.telnyx, &stand_ins.storage, &stand_ins.data_dir);

    let pool = PgPool::connect(&url).await?;
    let mut recordings = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut rec =
            SimRecording::sample(format!("bench-rec-{i}-{}", uuid::Uuid::new_v4().simple()));
        rec.content = SimAudio::generated(size, i as u64 + 1);
        let intake: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO public.intakes (room_name) VALUES ($1) RETURNING id")
                .bind(format!("bench-{i}"))
                .fetch_one(&pool)
                .await?;
        telnyx.add_recording(rec.clone());
        recordings.push((rec, intake));
    }

    // The raw copy right before and right after the daemon, so noise from
    // the shared machine (and disk writeback) hits both sides alike.
    let raw_before = raw_copies(telnyx, storage, &recordings, parallel, data_dir.path()).await?;

    // The daemon: `recording-relay work`, release, its own process.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    let worker = match concurrency {
        Some(n) => format!("[worker]\nconcurrency = {n}\npoll_interval = \"1s\"\n"),
        None => "[worker]\npoll_interval = \"1s\"\n".to_owned(),
    };
    std::fs::write(&config, worker)?;
    let log = std::fs::File::create(dir.path().join("work.log"))?;
    let mut daemon = Command::new(daemon_binary()?)
        .args(["--config"])
        .arg(&config)
        .arg("work")
        .env("DATABASE_URL", &url)
        .envs(provider_env(&telnyx.base_url(), &storage.base_url()))
        .env_remove("RUST_LOG")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting recording-relay work")?;
    let pid = daemon.id().context("daemon pid")?;
    // Ready once it LISTENs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listening: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND query ILIKE 'LISTEN%')",
        )
        .fetch_one(&pool)
        .await?;
        if listening {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the worker did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = peak_rss_mib(pid).unwrap_or(0.0);
    let idle_cpu = cpu_seconds(pid).unwrap_or(0.0);
    let queue = Queue::new(pool.clone());
    let t0 = Instant::now();
    for (i, (rec, intake)) in recordings.iter().enumerate() {
        // Telnyx's shape: no recording id; the leg and start time pick the
        // recording of the call, client_state names the intake.
        let mut event = testing::recording_saved_event(&format!("relay-{i}"), &rec.call_session_id);
        let p = &mut event["data"]["payload"];
        p["call_leg_id"] = rec.call_leg_id.clone().into();
        p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
        p["client_state"] = base64::engine::general_purpose::STANDARD
            .encode(intake.to_string())
            .into();
        let job = Envelope::parse(event.to_string().as_bytes())?.into_job(12);
        queue.enqueue(&job).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let (open, error): (i64, Option<String>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'running')), max(last_error)
             FROM recording_relay.recording_jobs",
        )
        .fetch_one(&pool)
        .await?;
        if let Some(error) = error {
            bail!("a relay job failed an attempt: {error}");
        }
        if open == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed = t0.elapsed();
    let peak = peak_rss_mib(pid).unwrap_or(0.0);
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - idle_cpu;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), daemon.wait()).await??;
    ensure!(status.success(), "the worker exited with {status}");

    let states: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state::text, last_error FROM recording_relay.recording_jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    for (state, err) in &states {
        ensure!(state == "succeeded", "a relay job ended {state}: {err:?}");
    }
    for (rec, intake) in &recordings {
        let path = format!("intakes/{intake}/{}.wav", rec.id);
        let o = storage
            .object(BUCKET, &path)
            .with_context(|| format!("{path} is missing"))?;
        ensure!(
            o.size == rec.content.len() && o.sha256_hex == rec.content.sha256_hex(),
            "{path} differs from the source"
        );
    }
    pool.close().await;
    let paths: Vec<String> = recordings
        .iter()
        .map(|(rec, intake)| format!("intakes/{intake}/{}.wav", rec.id))
        .collect();
    delete_objects(storage, &paths).await?;
    let raw_after = raw_copies(telnyx, storage, &recordings, parallel, data_dir.path()).await?;
    stop.cancel();
    Ok(RelayRun {
        total_mb,
        recordings: recordings.len(),
        concurrency: parallel,
        relayed,
        raw_before,
        raw_after,
        cpu,
        peak,
        idle_rss,
    })
}

/// Both raw copies, curl then stream: their wall times.
async fn raw_copies(
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    recordings: &[(SimRecording, uuid::Uuid)],
    parallel: usize,
    dir: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    let curl = raw_copy(telnyx, storage, recordings, parallel, dir).await?;
    let stream = stream_copy(telnyx, storage, recordings, parallel).await?;
    Ok((curl, stream))
}

/// Copies every recording in this process, `parallel` at a time: the
/// download's body streamed into the upload's, nothing else. Checks and
/// deletes the copies as [`raw_copy`] does.
async fn stream_copy(
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    recordings: &[(SimRecording, uuid::Uuid)],
    parallel: usize,
) -> anyhow::Result<Duration> {
    sync_disks().await;
    let http = reqwest::Client::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut copies = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for (i, (rec, _)) in recordings.iter().enumerate() {
        let slot = slots.clone().acquire_owned().await?;
        let (http, from) = (http.clone(), telnyx.download_url(&rec.id, "wav"));
        let to = format!(
            "{}/storage/v1/object/{BUCKET}/stream/{i}.wav",
            storage.base_url()
        );
        copies.spawn(async move {
            let _slot = slot;
            let source = http.get(from).send().await?.error_for_status()?;
            let mut upload = http
                .post(to)
                .bearer_auth(SERVICE_KEY)
                .header("apikey", SERVICE_KEY)
                .header("content-type", "audio/wav")
                .header("x-upsert", "true");
            if let Some(len) = source.content_length() {
                upload = upload.header("content-length", len);
            }
            let res = upload
                .body(reqwest::Body::wrap_stream(source.bytes_stream()))
                .send()
                .await?;
            ensure!(res.status().is_success(), "stream copy: {}", res.status());
            anyhow::Ok(())
        });
    }
    while let Some(copied) = copies.join_next().await {
        copied??;
    }
    let took = t0.elapsed();
    let mut paths = Vec::new();
    for (i, (rec, _)) in recordings.iter().enumerate() {
        let path = format!("stream/{i}.wav");
        let o = storage
            .object(BUCKET, &path)
            .context("a stream copy is missing")?;
        ensure!(
            o.size == rec.content.len(),
            "stream copy {i} has {} bytes",
            o.size
        );
        paths.push(path);
    }
    delete_objects(storage, &paths).await?;
    Ok(took)
}

/// Copies every recording with curl (download piped into upload),
/// `parallel` at a time; checks the sizes, deletes the copies and flushes
/// them to disk, so the next run starts from the same state. Returns the
/// copy's wall time.
pub(super) async fn raw_copy(
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    recordings: &[(SimRecording, uuid::Uuid)],
    parallel: usize,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let pairs = dir.join("pairs.txt");
    let lines: Vec<String> = recordings
        .iter()
        .enumerate()
        .map(|(i, (rec, _))| {
            format!(
                "{} {}/storage/v1/object/{BUCKET}/raw/{i}.wav",
                telnyx.download_url(&rec.id, "wav"),
                storage.base_url()
            )
        })
        .collect();
    std::fs::write(&pairs, lines.join("\n") + "\n")?;
    sync_disks().await;
    let t0 = Instant::now();
    let status = Command::new(bench_dir().join("raw-copy.sh"))
        .arg(&pairs)
        .arg(parallel.to_string())
        .env("SERVICE_KEY", SERVICE_KEY)
        .stdout(Stdio::null())
        .status()
        .await
        .context("running bench/raw-copy.sh")?;
    let took = t0.elapsed();
    ensure!(status.success(), "bench/raw-copy.sh failed: {status}");
    let mut paths = Vec::new();
    for (i, (rec, _)) in recordings.iter().enumerate() {
        let path = format!("raw/{i}.wav");
        let o = storage
            .object(BUCKET, &path)
            .context("a raw copy is missing")?;
        ensure!(
            o.size == rec.content.len(),
            "raw copy {i} has {} bytes",
            o.size
        );
        paths.push(path);
    }
    delete_objects(storage, &paths).await?;
    Ok(took)
}

pub(super) async fn delete_objects(storage: &StorageSim, paths: &[String]) -> anyhow::Result<()> {
    delete_objects_at(&reqwest::Client::new(), &storage.base_url(), paths).await
}

/// Deletes `paths` from the bucket of the storage server at `base_url`,
/// then flushes the disks.
pub(super) async fn delete_objects_at(
    http: &reqwest::Client,
    base_url: &str,
    paths: &[String],
) -> anyhow::Result<()> {
    for path in paths {
        let res = http
            .delete(format!("{base_url}/storage/v1/object/{BUCKET}/{path}"))
            .bearer_auth(SERVICE_KEY)
            .header("apikey", SERVICE_KEY)
            .send()
            .await?;
        ensure!(
            res.status().is_success(),
            "deleting {path}: {}",
            res.status()
        );
    }
    sync_disks().await;
    Ok(())
}

/// Writes dirty pages out, so one run's writeback does not slow the next.
pub(super) async fn sync_disks() {
    let _ = Command::new("sync").status().await;
}
