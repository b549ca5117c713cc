//! `bench smoke`: every scenario, small, in about half a minute: checks the
//! harness, not the figures.

use super::*;

pub(super) async fn smoke(server: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let jobs_per_s = queue_run(
        server,
        &QueueArgs {
            jobs: 2000,
            processes: 2,
            concurrency: 24,
            pool: 10,
            floor: false,
        },
    )
    .await?;
    table_row(
        "smoke",
        "queue, 2000 jobs",
        &format!("{jobs_per_s:.0} jobs/s"),
        "-",
        "-",
        "-",
    );
    latency(server, 100).await?;
    ingest(
        server,
        &IngestArgs {
            rates: vec![100],
            step_secs: 1,
            clients: 4,
            closed_secs: 1,
            pin: false,
        },
    )
    .await?;
    relay(
        server,
        &RelayArgs {
            recordings: 1,
            size_mb: 20,
        },
    )
    .await?;
    backlog(
        server,
        &BacklogArgs {
            recordings: 8,
            min_mb: 1,
            max_mb: 4,
            concurrency: None,
            mb_per_second: None,
        },
    )
    .await?;
    playable(
        server,
        &PlayableArgs {
            sizes_mb: vec![1],
            samples: 2,
            warmup: 0,
            mb_per_second: 40,
        },
    )
    .await?;
    dbcost(&DbCostArgs {
        recordings: 5,
        idle_secs: 1,
    })
    .await?;
    instructions(server, &InstructionsArgs { requests: 20 }).await?;
    if t0.elapsed() > Duration::from_secs(600) {
        bail!("smoke took over 10 minutes");
    }
    say(format!(
        "smoke: every scenario ran, in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}
