//! The run's own database, and restarting the PostgreSQL server under it.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use recording_relay_dev_tools::testing;
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

/// Creates `chaos_<random>` on the server of `server_url`; returns its name
/// and URL.
pub(crate) async fn create_database(server_url: &str) -> anyhow::Result<(String, String)> {
    let name = format!("chaos_{:016x}", fastrand::u64(..));
    let mut conn = PgConnection::connect(server_url)
        .await
        .context("connecting to PostgreSQL to create the run's database")?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {name}"))?;
    conn.close().await.ok();
    let url = testing::with_database(server_url, &name);
    Ok((name, url))
}

pub(crate) async fn drop_database(server_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(server_url).await?;
    testing::drop_database(&mut conn, name).await?;
    conn.close().await.ok();
    Ok(())
}

/// `VERSION/NAME` of the cluster to restart; by default the newest
/// version's `main` (as `.ci/run` starts it).
pub(crate) fn default_cluster() -> String {
    let newest = std::fs::read_dir("/etc/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|v| Some((v.parse::<f64>().ok()?, v)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v);
    format!("{}/main", newest.unwrap_or_else(|| "15".to_owned()))
}

#[derive(Debug, Clone)]
pub(crate) struct Restart {
    pub started: DateTime<Utc>,
    /// How long `pg_ctlcluster … restart` took.
    pub command: Duration,
    /// From the start of the restart until a new connection succeeded.
    pub unavailable: Duration,
    pub ended: DateTime<Utc>,
}

async fn pg_ctlcluster(cluster: &str, action: &str) -> anyhow::Result<()> {
    let Some((version, name)) = cluster.split_once('/') else {
        bail!("--pg-cluster must be VERSION/NAME, e.g. 15/main");
    };
    let out = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, name, action])
        .output()
        .await
        .context("running pg_ctlcluster")?;
    if !out.status.success() {
        bail!(
            "pg_ctlcluster {cluster} {action} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `pg_ctlcluster --skip-systemctl-redirect VERSION NAME restart` (or, with
/// `down_for`, stop, wait, start), then waits until a new connection to
/// `db_url` works.
pub(crate) async fn restart(
    cluster: &str,
    db_url: &str,
    down_for: Duration,
) -> anyhow::Result<Restart> {
    let started = Utc::now();
    let t0 = Instant::now();
    if down_for.is_zero() {
        pg_ctlcluster(cluster, "restart").await?;
    } else {
        pg_ctlcluster(cluster, "stop").await?;
        tokio::time::sleep(down_for).await;
        pg_ctlcluster(cluster, "start").await?;
    }
    let command = t0.elapsed();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = PgConnection::connect(db_url).await
            && sqlx::query("SELECT 1").execute(&mut c).await.is_ok()
        {
            c.close().await.ok();
            break;
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not come back within 60 s of the restart");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Restart {
        started,
        command,
        unavailable: t0.elapsed(),
        ended: Utc::now(),
    })
}
