//! A Storage outage and its backlog (issue #22): Storage refuses every
//! connection (`--cut storage`) for a long stretch while webhooks keep
//! arriving; then it comes back. What is measured here: how fast the
//! backlog drains against a raw copy of the same recordings at the same
//! concurrency, that no job ran out of attempts, and that no download used
//! a Telnyx URL past its lifetime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use recording_relay_sim::{StorageSim, TelnyxSim};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::plan::Call;
use crate::verify::Check;

/// The longest outage a retry schedule rides out when every delay draws
/// its ceiling, and the mean (full jitter draws half of it on average):
/// the sum of the ceilings of the `max_attempts - 1` delays.
pub(crate) fn coverage(base: Duration, cap: Duration, max_attempts: i32) -> (Duration, Duration) {
    let backoff = recording_relay::jobs::backoff::Backoff { base, cap };
    let most: Duration = (1..max_attempts).map(|a| backoff.ceiling(a)).sum();
    (most, most / 2)
}

pub(crate) struct Drain {
    /// Jobs made before the heal that finished after it.
    pub backlog: i64,
    pub finished: i64,
    pub bytes: i64,
    pub seconds: f64,
}

pub(crate) async fn drain(pool: &PgPool, healed: DateTime<Utc>) -> anyhow::Result<Drain> {
    let (backlog, finished, bytes, seconds): (i64, i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE created_at < $1), count(*),
                coalesce(sum(object_size), 0)::int8,
                extract(epoch FROM max(finished_at) - $1)::float8
         FROM recording_relay.recording_jobs WHERE finished_at > $1",
    )
    .bind(healed)
    .fetch_one(pool)
    .await
    .context("reading the drain")?;
    Ok(Drain {
        backlog,
        finished,
        bytes,
        seconds: seconds.unwrap_or(0.0),
    })
}

/// Jobs that failed with every attempt spent.
pub(crate) async fn out_of_attempts(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT format('job %s: %s attempts, last error %s', id, attempts, last_error)
         FROM recording_relay.recording_jobs
         WHERE state = 'failed' AND attempts >= max_attempts ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .context("reading the jobs out of attempts")
}

/// What the raw copy measured.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RawCopy {
    pub seconds: f64,
    pub bytes: u64,
    pub recordings: usize,
    pub concurrency: usize,
}

/// The physical reference: each recording downloaded from the Telnyx
/// stand-in and uploaded whole to the Storage stand-in (bucket `raw`), at
/// `concurrency` at once, over loopback like the daemons.
pub(crate) async fn raw_copy(
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    key: &str,
    calls: &[Call],
    concurrency: usize,
) -> anyhow::Result<RawCopy> {
    storage.create_bucket("raw", false, None, None);
    let client = reqwest::Client::new();
    let jobs: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            let format = c.recording.format.extension();
            (
                telnyx.download_url(&c.recording.id, format),
                format!(
                    "{}/storage/v1/object/raw/{}.{format}",
                    storage.base_url(),
                    c.recording.id
                ),
            )
        })
        .collect();
    let queue = Arc::new(tokio::sync::Mutex::new(jobs.into_iter()));
    let t0 = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (queue, client, key) = (queue.clone(), client.clone(), key.to_owned());
        workers.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let next = queue.lock().await.next();
                let Some((from, to)) = next else {
                    return Ok::<u64, anyhow::Error>(bytes);
                };
                let body = client.get(&from).send().await?.error_for_status()?;
                let len = body.content_length().unwrap_or(0);
                client
                    .post(&to)
                    .bearer_auth(&key)
                    .header("apikey", &key)
                    .header("content-type", "audio/wav")
                    .header("x-upsert", "true")
                    .body(reqwest::Body::wrap_stream(body.bytes_stream()))
                    .send()
                    .await?
                    .error_for_status()?;
                bytes += len;
            }
        });
    }
    let mut total = 0;
    while let Some(done) = workers.join_next().await {
        total += done.context("a raw copy worker panicked")??;
    }
    Ok(RawCopy {
        seconds: t0.elapsed().as_secs_f64(),
        bytes: total,
        recordings: calls.len(),
        concurrency,
    })
}

/// The outage's checks and figures; `raw` is what [`raw_copy`] measured
/// before the daemons started (they delete recordings at Telnyx).
pub(crate) async fn checks(
    pool: &PgPool,
    healed: DateTime<Utc>,
    outage: Duration,
    telnyx: &TelnyxSim,
    raw: RawCopy,
    schedule: (Duration, Duration, i32),
) -> anyhow::Result<(Vec<Check>, Vec<String>)> {
    let d = drain(pool, healed).await?;
    let spent = out_of_attempts(pool).await?;
    let expired = telnyx.expired_download_count();
    let (raw_s, raw_bytes, concurrency) = (raw.seconds, raw.bytes, raw.concurrency);
    let (most, mean) = coverage(schedule.0, schedule.1, schedule.2);
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let figures = vec![format!(
        "outage: Storage refused {:.0} s; backlog {} recordings; after it came back {} jobs finished \
         ({:.1} MiB) in {:.1} s = {:.1} recordings/s, {:.1} MiB/s; raw copy of all {} recordings \
         ({:.1} MiB) at concurrency {concurrency}: {:.1} s = {:.1} recordings/s, {:.1} MiB/s; \
         retry schedule (base {:?}, cap {:?}, {} attempts) covers an outage of at most {:.0} s, \
         {:.0} s on average; downloads refused as expired: {expired}",
        outage.as_secs_f64(),
        d.backlog,
        d.finished,
        mib(d.bytes as f64),
        d.seconds,
        rate(d.finished as f64, d.seconds),
        mib(rate(d.bytes as f64, d.seconds)),
        raw.recordings,
        mib(raw_bytes as f64),
        raw_s,
        rate(raw.recordings as f64, raw_s),
        mib(rate(raw_bytes as f64, raw_s)),
        schedule.0,
        schedule.1,
        schedule.2,
        most.as_secs_f64(),
        mean.as_secs_f64(),
    )];
    let checks = vec![
        Check {
            name: "no job failed for lack of attempts",
            passed: spent.is_empty(),
            details: spent.into_iter().take(12).collect(),
        },
        Check {
            name: "no download used an expired Telnyx URL (each attempt asks for fresh ones)",
            passed: expired == 0,
            details: if expired == 0 {
                Vec::new()
            } else {
                vec![format!("{expired} downloads refused as expired")]
            },
        },
        Check {
            name: "a backlog built up during the outage and drained after it",
            passed: d.backlog > 0,
            details: vec![format!("backlog {}", d.backlog)],
        },
    ];
    Ok((checks, figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_covers_hours() {
        let (most, mean) = coverage(Duration::from_secs(10), Duration::from_secs(3600), 12);
        // 10+20+…+2560 s (nine doublings), then the cap twice.
        assert_eq!(most, Duration::from_secs(10 * 511 + 2 * 3600));
        assert_eq!(mean, most / 2);
    }
}
