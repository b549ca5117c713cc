//! `bench dbcost`: what relaying one recording costs ZScribe's database.
//!
//! The relay runs inside the app's own Supabase database, so every statement
//! it makes is the app's cost. This scenario starts a private cluster with
//! `pg_stat_statements` loaded (only a server start can load it), runs the
//! release `recording-relay serve` against it as a role of its own, and
//! counts, for that role only:
//! - idle: statements per minute with nothing to do;
//! - per recording, relayed the way ZScribe's calls arrive (`call.initiated`
//!   naming the intake in `X-Intake-Id`, then `call.recording.saved`, both
//!   signed, over the listener): statements, rows, WAL bytes and shared
//!   buffer hits, with the statements that write the most WAL.
//!
//! Counts, not timings: they do not move with the machine's load.

use recording_relay_dev_tools::demo::cluster::Cluster;

use super::*;

/// The daemon's role: `pg_stat_statements` keeps statements per role, so the
/// bench's own polling is left out of the figures.
const DAEMON_ROLE: &str = "relay_daemon";

#[derive(clap::Args, Clone)]
pub(super) struct DbCostArgs {
    /// Recordings relayed for the per-recording figures.
    #[arg(long, default_value_t = 200)]
    pub recordings: usize,
    /// How long the idle daemon is watched.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
}

/// One statement's totals for the daemon's role.
#[derive(sqlx::FromRow)]
struct Statement {
    query: String,
    calls: i64,
    rows: i64,
    wal_bytes: f64,
    shared_blks_hit: i64,
    shared_blks_read: i64,
    shared_blks_dirtied: i64,
}

pub(super) async fn dbcost(a: &DbCostArgs) -> anyhow::Result<()> {
    ensure!(a.recordings > 0, "--recordings must be at least 1");
    let cluster = Cluster::start_with(&[
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=top",
        "pg_stat_statements.max=5000",
        // Production settings where they change what is written: full-page
        // images after each checkpoint are part of the WAL a write costs.
        "full_page_writes=on",
    ])
    .await
    .context("starting a private cluster with pg_stat_statements")?;
    let result = run(&cluster, a).await;
    cluster.stop().await?;
    result
}

async fn run(cluster: &Cluster, a: &DbCostArgs) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(&cluster.server_url()).await?;
    sqlx::raw_sql("CREATE DATABASE bench_dbcost")
        .execute(&mut admin)
        .await?;
    let url = cluster.database_url("bench_dbcost");
    let pool = PgPool::connect(&url).await?;
    recording_relay_dev_tools::testing::create_host_schema(&pool).await?;
    db::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE EXTENSION pg_stat_statements;
         CREATE EXTENSION pg_walinspect;
         CREATE ROLE relay_daemon LOGIN SUPERUSER;",
    )
    .execute(&pool)
    .await?;
    vacuum_analyze(&url).await?;
    let daemon_url = url.replacen("postgres@", &format!("{DAEMON_ROLE}@"), 1);

    let stop = CancellationToken::new();
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_KEY.to_owned(),
        cancel: stop.child_token(),
        ..TelnyxSimConfig::default()
    })?;
    let storage = StorageSim::start(StorageSimConfig {
        service_key: SERVICE_KEY.to_owned(),
        cancel: stop.child_token(),
        ..StorageSimConfig::default()
    })?;
    storage.create_bucket(BUCKET, false, None, None);

    // ZScribe's rows: a patient and an intake per call, created as the call
    // began; the recording at Telnyx.
    let mut calls = Vec::new();
    for i in 0..a.recordings {
        let rec = SimRecording::sample(format!("dbcost-{i}-{}", uuid::Uuid::new_v4().simple()));
        let patient: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO public.patients (phone, name) VALUES ($1, 'bench patient') RETURNING id",
        )
        .bind(&rec.to)
        .fetch_one(&pool)
        .await?;
        let intake: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO public.intakes (patient_id, room_name, created_at)
             VALUES ($1, 'bench', $2) RETURNING id",
        )
        .bind(patient)
        .bind(rec.recording_started_at - chrono::Duration::seconds(30))
        .fetch_one(&pool)
        .await?;
        telnyx.add_recording(rec.clone());
        calls.push((rec, intake));
    }

    let key = testing::signing_key();
    let (telnyx_url, storage_url) = (telnyx.base_url(), storage.base_url());
    let daemon = start_daemon(
        &daemon_url,
        &key,
        "serve",
        &provider_env(&telnyx_url, &storage_url),
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let webhook_url = format!("http://{}/webhooks/telnyx", daemon.addr);
    let http = reqwest::Client::new();

    // Idle: whatever the daemon does with nothing to do, once each pooled
    // connection has made its first round (type look-ups, session settings).
    tokio::time::sleep(idle_window(a).min(Duration::from_secs(10))).await;
    reset(&pool).await?;
    let idle_window = idle_window(a);
    tokio::time::sleep(idle_window).await;
    let idle = statements(&pool).await?;
    let idle_calls: i64 = idle.iter().map(|s| s.calls).sum();
    let per_minute = idle_calls as f64 * 60.0 / idle_window.as_secs_f64();
    say(format!(
        "dbcost: idle for {} s: {idle_calls} statements ({per_minute:.1}/min)",
        idle_window.as_secs()
    ));
    for s in &idle {
        say(format!(
            "dbcost:   idle {:>6} x {}",
            s.calls,
            one_line(&s.query)
        ));
    }

    // The relay: every call's two webhooks, as Telnyx sends them.
    reset(&pool).await?;
    let wal_before: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await?;
    let t0 = Instant::now();
    for (i, (rec, intake)) in calls.iter().enumerate() {
        for body in [initiated(i, rec, *intake), saved(i, rec)] {
            post_signed(&http, &webhook_url, &key, body.to_string().into_bytes()).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (open, failed, succeeded): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'running')),
                    count(*) FILTER (WHERE state NOT IN ('pending', 'running', 'succeeded')),
                    count(*) FILTER (WHERE state = 'succeeded')
             FROM recording_relay.recording_jobs",
        )
        .fetch_one(&pool)
        .await?;
        ensure!(failed == 0, "{failed} jobs did not succeed");
        if open == 0 && succeeded >= a.recordings as i64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay did not finish in 10 minutes ({open} open)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let relay = statements(&pool).await?;
    let wal_total: f64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
            .bind(&wal_before)
            .fetch_one(&pool)
            .await?;
    // Where the WAL went, by record type (heap tuples, index entries,
    // full-page images), from the WAL itself.
    let kinds: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT \"resource_manager/record_type\", count, record_size::float8, fpi_size::float8
         FROM pg_get_wal_stats($1::pg_lsn, pg_current_wal_lsn(), true)
         WHERE count > 0
         ORDER BY combined_size DESC
         LIMIT 12",
    )
    .bind(&wal_before)
    .fetch_all(&pool)
    .await?;
    for (rec, intake) in &calls {
        let path = format!("intakes/{intake}/{}.wav", rec.id);
        ensure!(
            storage.object(BUCKET, &path).is_some(),
            "{path} was not stored"
        );
    }

    let n = a.recordings as f64;
    let sum = |f: fn(&Statement) -> f64| relay.iter().map(f).sum::<f64>() / n;
    let calls_per = sum(|s| s.calls as f64);
    let rows_per = sum(|s| s.rows as f64);
    let wal_per = sum(|s| s.wal_bytes);
    let hits_per = sum(|s| s.shared_blks_hit as f64);
    let reads_per = sum(|s| s.shared_blks_read as f64);
    let dirtied_per = sum(|s| s.shared_blks_dirtied as f64);
    say(format!(
        "dbcost: {} recordings relayed in {:.1} s; per recording: {calls_per:.1} statements, \
         {rows_per:.1} rows, {wal_per:.0} WAL bytes by the daemon's statements \
         ({:.0} by the whole cluster, autovacuum and checkpoints included), \
         {hits_per:.0} buffer hits, {reads_per:.1} reads, {dirtied_per:.1} pages dirtied",
        a.recordings,
        took.as_secs_f64(),
        wal_total / n
    ));
    say(
        "dbcost: whole-cluster WAL per recording, by record type (records, bytes, full-page images):",
    );
    for (kind, count, record, fpi) in &kinds {
        say(format!(
            "dbcost:   {:>6.2} x {:>6.0} B + {:>6.0} B FPI  {kind}",
            *count as f64 / n,
            record / n,
            fpi / n
        ));
    }
    say("dbcost: per recording, by statement (WAL bytes, calls, rows, buffer hits):");
    let mut by_wal: Vec<&Statement> = relay.iter().collect();
    by_wal.sort_by(|x, y| {
        y.wal_bytes
            .total_cmp(&x.wal_bytes)
            .then(y.calls.cmp(&x.calls))
    });
    for s in by_wal {
        say(format!(
            "dbcost:   {:>7.0} B {:>5.2} x {:>5.2} rows {:>6.1} hits  {}",
            s.wal_bytes / n,
            s.calls as f64 / n,
            s.rows as f64 / n,
            s.shared_blks_hit as f64 / n,
            one_line(&s.query)
        ));
    }
    table_row(
        "dbcost",
        "statements per relayed recording (idle: per minute)",
        &format!("{calls_per:.1} ({per_minute:.1}/min idle)"),
        "-",
        "-",
        "-",
    );
    table_row(
        "dbcost",
        "WAL bytes per relayed recording (daemon's statements / whole cluster)",
        &format!("{wal_per:.0} / {:.0}", wal_total / n),
        "-",
        "-",
        "-",
    );
    table_row(
        "dbcost",
        "rows and buffer hits per relayed recording",
        &format!("{rows_per:.1} rows, {hits_per:.0} hits"),
        "-",
        "-",
        "-",
    );

    daemon.stop_within(Duration::from_secs(30)).await?;
    pool.close().await;
    stop.cancel();
    Ok(())
}

fn idle_window(a: &DbCostArgs) -> Duration {
    Duration::from_secs(a.idle_secs.max(1))
}

async fn reset(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await?;
    Ok(())
}

async fn statements(pool: &PgPool) -> anyhow::Result<Vec<Statement>> {
    Ok(sqlx::query_as(
        "SELECT query, calls, rows, wal_bytes::float8 AS wal_bytes,
                shared_blks_hit, shared_blks_read, shared_blks_dirtied
         FROM pg_stat_statements
         WHERE userid = $1::regrole AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY calls DESC",
    )
    .bind(DAEMON_ROLE)
    .fetch_all(pool)
    .await?)
}

fn one_line(query: &str) -> String {
    let flat: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(110) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

/// ZScribe's dialer's `call.initiated`: the intake in `X-Intake-Id`.
fn initiated(i: usize, rec: &SimRecording, intake: uuid::Uuid) -> serde_json::Value {
    let id = format!("dbcost-initiated-{i}-{}", uuid::Uuid::new_v4().simple());
    testing::dialled_event_for(rec, &id, Some(&intake.to_string()))
}

/// The recording's `call.recording.saved` (official shape: no recording id).
fn saved(i: usize, rec: &SimRecording) -> serde_json::Value {
    let id = format!("dbcost-saved-{i}-{}", uuid::Uuid::new_v4().simple());
    testing::saved_event_for(rec, &id)
}
