//! `bench playable`: what a clinician waits for. From the moment Telnyx
//! sends `call.recording.saved` to the moment the intake's link commits,
//! through the real `recording-relay serve` process, for recordings of
//! 1, 10 and 50 MB, one at a time.
//!
//! Both stand-ins are served through paced links (`pace.rs`, 40 MB/s each
//! way by default), so the transfer costs what it would over a real link.
//! The floor runs in the same process, interleaved sample by sample with
//! the relay: one API round trip to Telnyx, then the same bytes streamed
//! from Telnyx's download URL straight into one upload, through the same
//! links. The relay cannot beat it; the ratio says what the rest costs.
//!
//! A bench-only trigger on the job table stamps each step with
//! `clock_timestamp()` (pickup, resolve, match, store, link), so the report
//! says where the time between the floor and the relay goes. The end of a
//! sample is the link's NOTIFY arriving, which PostgreSQL sends at commit:
//! the moment the recording is playable, not a poll interval later.

use std::time::SystemTime;

use super::*;

const STEPS_SQL: &str = "
CREATE SCHEMA bench;
CREATE TABLE bench.steps (job_id BIGINT, step TEXT, at TIMESTAMPTZ);
CREATE FUNCTION bench.step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'received', clock_timestamp());
        RETURN NEW;
    END IF;
    IF OLD.state = 'pending' AND NEW.state = 'running' THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'claimed', clock_timestamp());
    END IF;
    IF OLD.resolved_at IS NULL AND NEW.resolved_at IS NOT NULL THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'resolved', clock_timestamp());
    END IF;
    IF OLD.matched_at IS NULL AND NEW.matched_at IS NOT NULL THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'matched', clock_timestamp());
    END IF;
    IF OLD.stored_at IS NULL AND NEW.stored_at IS NOT NULL THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'stored', clock_timestamp());
    END IF;
    IF OLD.linked_at IS NULL AND NEW.linked_at IS NOT NULL THEN
        INSERT INTO bench.steps VALUES (NEW.id, 'linked', clock_timestamp());
        PERFORM pg_notify('bench_linked', NEW.event_id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER bench_steps AFTER INSERT OR UPDATE ON recording_relay.recording_jobs
    FOR EACH ROW EXECUTE FUNCTION bench.step();
";

/// The steps, in order, and the stage each one ends.
const STAGES: [(&str, &str); 6] = [
    ("received", "webhook answered and stored"),
    ("claimed", "pickup"),
    ("resolved", "resolve (Recordings API)"),
    ("matched", "match"),
    ("stored", "upload + verify"),
    ("linked", "link"),
];

/// One relayed sample: the whole wait, and the time each stage took.
struct Sample {
    total: Duration,
    stages: [Duration; 6],
}

pub(super) async fn playable(server: &str, a: &PlayableArgs) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_playable").await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(STEPS_SQL).execute(&pool).await?;
    let stop = CancellationToken::new();
    let largest = a.sizes_mb.iter().copied().max().unwrap_or(1) * 1_000_000;
    let stand_ins = StandIns::start(&stop, largest, Some(a.mb_per_second)).await?;
    let telnyx = &stand_ins.telnyx;
    // Both name their links (the public origins).
    let (telnyx_url, storage_url) = (telnyx.base_url(), stand_ins.storage.base_url());

    let key = SigningKey::from_bytes(&[42; 32]);
    let daemon = start_serve(&url, &key, &telnyx_url, &storage_url).await?;
    let webhook_url = format!("http://{}/webhooks/telnyx", daemon.addr);
    let mut linked = sqlx::postgres::PgListener::connect(&url).await?;
    linked.listen("bench_linked").await?;
    let http = reqwest::Client::new();
    let patient: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO public.patients (phone, name) VALUES ('(555) 765-0002', 'bench patient')
         RETURNING id",
    )
    .fetch_one(&pool)
    .await?;

    say(format!(
        "playable: links at {} MB/s each way; {} samples per size after {} warm-up",
        a.mb_per_second, a.samples, a.warmup
    ));
    let mut seq = 0;
    for &size_mb in &a.sizes_mb {
        let size = size_mb * 1_000_000;
        let mut relayed = Vec::new();
        let mut floors = Vec::new();
        for i in 0..a.warmup + a.samples {
            seq += 1;
            let rec = recording(telnyx, seq, size);
            let floor = floor_copy(&http, &telnyx_url, &storage_url, &rec, seq).await?;
            let sample = relay_one(
                &http,
                &pool,
                &mut linked,
                &webhook_url,
                &key,
                &rec,
                patient,
                seq,
            )
            .await?;
            if i >= a.warmup {
                floors.push(floor);
                relayed.push(sample);
            }
        }
        report(size_mb, a.mb_per_second, &relayed, &mut floors);
    }
    daemon.stop().await?;
    pool.close().await;
    stop.cancel();
    Ok(())
}

fn recording(telnyx: &TelnyxSim, seq: usize, size: u64) -> SimRecording {
    let mut rec = SimRecording::sample(format!("playable-{seq}-{}", uuid::Uuid::new_v4().simple()));
    rec.content = SimAudio::generated(size, seq as u64);
    telnyx.add_recording(rec.clone());
    rec
}

/// The floor of one recording: the Recordings API round trip any relay
/// needs for the download URL, then the download streamed into one upload.
async fn floor_copy(
    http: &reqwest::Client,
    telnyx_url: &str,
    storage_url: &str,
    rec: &SimRecording,
    seq: usize,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let api = http
        .get(format!("{telnyx_url}/recordings/{}", rec.id))
        .bearer_auth(TELNYX_KEY)
        .send()
        .await?;
    ensure!(
        api.status().is_success(),
        "the floor's API call: {}",
        api.status()
    );
    let answer: serde_json::Value = api.json().await?;
    let download = answer["data"]["download_urls"]["wav"]
        .as_str()
        .context("the Recordings API named no WAV download")?;
    let source = http.get(download).send().await?.error_for_status()?;
    let path = format!("floor/{seq}.wav");
    let stored = http
        .post(format!("{storage_url}/storage/v1/object/{BUCKET}/{path}"))
        .bearer_auth(SERVICE_KEY)
        .header("apikey", SERVICE_KEY)
        .header("content-type", "audio/wav")
        .header("content-length", rec.content.len())
        .body(reqwest::Body::wrap_stream(source.bytes_stream()))
        .send()
        .await?;
    ensure!(
        stored.status().is_success(),
        "the floor's upload: {}",
        stored.status()
    );
    let took = t0.elapsed();
    delete_objects_at(http, storage_url, &[path]).await?;
    Ok(took)
}

/// One recording through the daemon: its call's `call.initiated` (naming
/// the intake in `X-Intake-Id`, as ZScribe's dialer does) first, untimed,
/// then the timed `call.recording.saved`, until the link commits.
#[allow(clippy::too_many_arguments)]
async fn relay_one(
    http: &reqwest::Client,
    pool: &PgPool,
    linked: &mut sqlx::postgres::PgListener,
    webhook_url: &str,
    key: &SigningKey,
    rec: &SimRecording,
    patient: uuid::Uuid,
    seq: usize,
) -> anyhow::Result<Sample> {
    let intake: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO public.intakes (patient_id, room_name, created_at)
         VALUES ($1, 'bench', $2) RETURNING id",
    )
    .bind(patient)
    .bind(rec.recording_started_at - chrono::Duration::seconds(30))
    .fetch_one(pool)
    .await?;
    let initiated =
        testing::dialled_event_for(rec, &format!("initiated-{seq}"), Some(&intake.to_string()));
    post_signed(http, webhook_url, key, initiated.to_string().into_bytes()).await?;
    let event_id = format!("saved-{seq}-{}", uuid::Uuid::new_v4().simple());
    let saved = testing::saved_event_for(rec, &event_id)
        .to_string()
        .into_bytes();
    let sent_at = SystemTime::now();
    let t0 = Instant::now();
    post_signed(http, webhook_url, key, saved).await?;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), linked.recv())
            .await
            .context("no link within 60 s")??;
        if n.payload() == event_id {
            break;
        }
    }
    let total = t0.elapsed();
    let steps: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT s.step, s.at FROM bench.steps s
         JOIN recording_relay.recording_jobs j ON j.id = s.job_id
         WHERE j.event_id = $1 ORDER BY s.at",
    )
    .bind(&event_id)
    .fetch_all(pool)
    .await?;
    let (linked_to,): (Option<String>,) =
        sqlx::query_as("SELECT recording_object_path FROM public.intakes WHERE id = $1")
            .bind(intake)
            .fetch_one(pool)
            .await?;
    ensure!(
        linked_to.is_some_and(|p| p.contains(&rec.id) && p.contains(&intake.to_string())),
        "recording {} was not linked on its intake",
        rec.id
    );
    // Stage by stage on the database's clock; the first from the sender's
    // (the same host clock).
    let mut stages = [Duration::ZERO; 6];
    let mut previous = chrono::DateTime::<chrono::Utc>::from(sent_at);
    for (i, (step, _)) in STAGES.iter().enumerate() {
        let at = steps
            .iter()
            .find(|(s, _)| s == step)
            .map(|(_, at)| *at)
            .with_context(|| format!("job {event_id} has no {step} step"))?;
        stages[i] = (at - previous).to_std().unwrap_or_default();
        previous = at;
    }
    // The job finishes (a delete at Telnyx may follow the link) before the
    // next sample, so samples do not overlap.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: String = sqlx::query_scalar(
            "SELECT state::text FROM recording_relay.recording_jobs WHERE event_id = $1",
        )
        .bind(&event_id)
        .fetch_one(pool)
        .await?;
        if state == "succeeded" {
            break;
        }
        ensure!(Instant::now() < deadline, "job {event_id} ended {state}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Sample { total, stages })
}

fn report(size_mb: u64, mb_per_second: u64, relayed: &[Sample], floors: &mut [Duration]) {
    let mut totals: Vec<Duration> = relayed.iter().map(|s| s.total).collect();
    totals.sort_unstable();
    floors.sort_unstable();
    let (p50, p99) = (percentile(&totals, 50.0), percentile(&totals, 99.0));
    let (f50, f99) = (percentile(floors, 50.0), percentile(floors, 99.0));
    let wire = Duration::from_secs_f64(size_mb as f64 / mb_per_second as f64);
    say(format!(
        "playable {size_mb} MB: relay p50 {} ms, p99 {} ms; floor p50 {} ms, p99 {} ms \
         (the bytes alone at {mb_per_second} MB/s: {} ms)",
        ms(p50),
        ms(p99),
        ms(f50),
        ms(f99),
        ms(wire)
    ));
    let mut line = format!("playable {size_mb} MB: median per stage:");
    for (i, (_, stage)) in STAGES.iter().enumerate() {
        let mut d: Vec<Duration> = relayed.iter().map(|s| s.stages[i]).collect();
        d.sort_unstable();
        line.push_str(&format!(" {stage} {} ms;", ms(percentile(&d, 50.0))));
    }
    say(line.trim_end_matches(';'));
    let secs = |d: Duration| d.as_secs_f64();
    table_row(
        "playable",
        &format!("{size_mb} MB webhook → linked p50 (vs floor)"),
        &format!("{} ms", ms(p50)),
        &format!("{} ms", ms(f50)),
        &ratio(secs(p50), secs(f50)),
        "<= 1.05",
    );
    table_row(
        "playable",
        &format!("{size_mb} MB webhook → linked p99 (vs floor)"),
        &format!("{} ms", ms(p99)),
        &format!("{} ms", ms(f99)),
        &ratio(secs(p99), secs(f99)),
        "<= 1.10",
    );
}

/// `recording-relay serve` (listen and work, production defaults) on a free
/// port, pointed at the paced links.
async fn start_serve(
    url: &str,
    key: &SigningKey,
    telnyx_url: &str,
    storage_url: &str,
) -> anyhow::Result<Listener> {
    let env = provider_env(telnyx_url, storage_url);
    start_daemon(url, key, "serve", &env, &[], Duration::from_secs(20)).await
}
