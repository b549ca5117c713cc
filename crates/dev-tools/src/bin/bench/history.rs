//! `bench history`: the queue with millions of finished jobs in its table
//! and the retention pass running, against the same measures on an empty
//! table: claim throughput and pickup latency.

use super::*;

pub(super) async fn history(server: &str, a: &HistoryArgs) -> anyhow::Result<()> {
    let queue_args = QueueArgs {
        jobs: a.jobs,
        processes: 2,
        concurrency: 250,
        pool: 10,
        floor: false,
    };
    let empty = fresh_database(server, "bench_history_empty").await?;
    checkpoint(&empty).await?;
    let empty_rate = queue_run_on(server, &empty, &queue_args).await?;
    let empty_pickup = pickups(&empty, a.samples).await?;

    let full = fresh_database(server, "bench_history").await?;
    fill_with_finished_jobs(&full, a.rows).await?;
    checkpoint(&full).await?;
    let retention = RetentionLoop::start(&full).await?;
    let full_rate = queue_run_on(server, &full, &queue_args).await?;
    let full_pickup = pickups(&full, a.samples).await?;
    let (passes, pruned) = retention.stop().await?;
    say(format!(
        "history: retention ran {passes} passes during the measures and pruned {pruned} jobs"
    ));

    let rows = a.rows;
    table_row(
        "history",
        &format!("claims, {rows} finished jobs + retention vs empty table (jobs/s)"),
        &format!("{full_rate:.0}"),
        &format!("{empty_rate:.0}"),
        &ratio(full_rate, empty_rate),
        ">= 0.90",
    );
    for (label, full, empty) in [
        ("p50", full_pickup.0, empty_pickup.0),
        ("p99", full_pickup.1, empty_pickup.1),
    ] {
        table_row(
            "history",
            &format!("pickup {label}, {rows} finished jobs + retention vs empty table"),
            &format!("{} ms", ms(full)),
            &format!("{} ms", ms(empty)),
            &ratio(full.as_secs_f64(), empty.as_secs_f64()),
            "<= 1.10",
        );
    }
    Ok(())
}

/// `rows` succeeded jobs shaped like real ones (the webhook body Telnyx
/// sends, a stored and linked recording), finished over the last 30 days:
/// 2 % of them past the default 30-day retention, so the retention pass
/// has work during the run, as it does in production. Oldest first, as a
/// table that grew over time holds them: the first fill interleaved the
/// ages (`g % 1000`), so the due rows sat on about one page in eight of
/// the 6 GB and retention rewrote pages all over the table, which a table
/// filled in time order does not make it do (claims 0.76x the empty table
/// with the interleaved fill, 0.79x in time order; pickup p99 2.18x, 0.97x).
async fn fill_with_finished_jobs(url: &str, rows: u64) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    let event = String::from_utf8(webhook_body("history", "history-session"))?;
    let t0 = Instant::now();
    const CHUNK: u64 = 500_000;
    let mut start = 1;
    while start <= rows {
        let end = (start + CHUNK - 1).min(rows);
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs (
                 event_id, event_type, event, recording_id, call_session_id, state, attempts,
                 finished_at, created_at, updated_at, object_path, object_sha256, object_size,
                 content_type, stored_at)
             SELECT 'history-' || g, 'call.recording.saved', $3::jsonb, 'rec-' || g,
                    'session-' || g, 'succeeded', 1, t, t, t,
                    'recordings/' || g || '.wav', repeat('ab', 32), 2880044, 'audio/wav', t
             FROM generate_series($1::bigint, $2::bigint) g,
                  LATERAL (SELECT now() - ($4::bigint - g)::float8 / $4
                                  * interval '30 days' / 0.98 AS t) at",
        )
        .bind(i64::try_from(start)?)
        .bind(i64::try_from(end)?)
        .bind(&event)
        .bind(i64::try_from(rows)?)
        .execute(&mut conn)
        .await?;
        start = end + 1;
    }
    let filled = t0.elapsed();
    sqlx::raw_sql("VACUUM ANALYZE recording_relay.recording_jobs")
        .execute(&mut conn)
        .await?;
    let size: String = sqlx::query_scalar(
        "SELECT pg_size_pretty(pg_total_relation_size('recording_relay.recording_jobs'))",
    )
    .fetch_one(&mut conn)
    .await?;
    say(format!(
        "history: {rows} finished jobs in {} s, vacuumed in {} s more; the table is {size}",
        filled.as_secs(),
        (t0.elapsed() - filled).as_secs()
    ));
    Ok(())
}

/// Writes every dirty buffer out before a measure. Filling the table
/// dirties its 6 GB (the rows, then VACUUM's hint bits and visibility map);
/// without this the measure ran while PostgreSQL wrote that back, which a
/// table that grew over months does not do (claims 0.67x the empty table
/// without it, 0.86x with it: same build, no retention either time).
async fn checkpoint(url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
    Ok(())
}

/// The daemon's retention pass (default settings, no unresolved-job
/// deletion), back to back with a pause as short as a busy interval's,
/// until stopped.
struct RetentionLoop {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>,
}

impl RetentionLoop {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let config = config_for(url);
        let queue = Queue::new(db::pool(&config)?);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let (mut passes, mut pruned) = (0, 0);
            while !token.is_cancelled() {
                let report = recording_relay::ops::retention::run_once(
                    &queue,
                    &config.retention,
                    None,
                    None,
                    &token,
                )
                .await?;
                passes += 1;
                pruned += report.pruned;
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Ok((passes, pruned))
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.stop.cancel();
        self.task.await?
    }
}
