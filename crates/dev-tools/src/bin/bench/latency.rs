//! `bench latency`: enqueue → handler start, one job at a time (LISTEN/NOTIFY
//! pick-up).

use super::*;

/// Tells the bench when each job's handler started.
pub(super) struct Starts(mpsc::UnboundedSender<(String, Instant)>);

impl JobHandler for Starts {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        let _ = self.0.send((job.event_id, Instant::now()));
        Ok(Outcome::Succeeded)
    }
}

pub(super) async fn latency(server: &str, samples: usize) -> anyhow::Result<()> {
    let url = fresh_database(server, "bench_latency").await?;
    let (p50, p99, max) = pickups(&url, samples).await?;
    table_row(
        "latency",
        "pickup p50",
        &format!("{} ms", ms(p50)),
        "-",
        "-",
        "< 5 ms",
    );
    table_row(
        "latency",
        "pickup p99",
        &format!("{} ms", ms(p99)),
        "-",
        "-",
        "< 20 ms",
    );
    table_row(
        "latency",
        "pickup max",
        &format!("{} ms", ms(max)),
        "-",
        "-",
        "-",
    );
    Ok(())
}

/// `samples` sequential enqueue → handler start on `url`: (p50, p99, max).
pub(super) async fn pickups(
    url: &str,
    samples: usize,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let config = config_for(url);
    let pool = db::pool(&config)?;
    let queue = Queue::new(pool.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    // Production defaults: concurrency 4, a 5 s fallback poll, so every
    // pickup below comes from the NOTIFY.
    let opts = WorkerOptions::from_config(&config, default_worker_id());
    let worker = tokio::spawn(Worker::new(queue.clone(), Starts(tx), opts).run(stop.clone()));

    let mut measure = async |n: usize, label: &str| -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{label}-{i}");
            let job = new_job(&id, &format!("session-{id}"));
            let t0 = Instant::now();
            queue.enqueue(&job).await?;
            let (got, started) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a job was not picked up within 10 s")?
                .context("the worker stopped")?;
            ensure!(got == id, "picked up {got}, expected {id}");
            out.push(started.duration_since(t0));
        }
        Ok(out)
    };
    measure(20, "warmup").await?;
    let mut lat = measure(samples, "latency").await?;
    stop.cancel();
    worker.await?;
    pool.close().await;
    lat.sort();
    let (p50, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        *lat.last().unwrap_or(&Duration::ZERO),
    );
    say(format!(
        "latency: {samples} sequential enqueue -> handler start: p50 {} ms, p99 {} ms, max {} ms",
        ms(p50),
        ms(p99),
        ms(max)
    ));
    Ok((p50, p99, max))
}
