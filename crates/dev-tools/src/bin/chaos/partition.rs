//! Cutting a daemon off (issue #22): from PostgreSQL (a partition: the
//! daemon's connections freeze), from both providers (a partition of the
//! daemons from Storage and Telnyx), or Storage alone refusing every
//! connection (an outage). Each through the loopback proxies of
//! `proxy.rs`, for longer than a lease, then healed.
//!
//! During a database cut every cut daemon's listener is probed with signed
//! webhooks: each must be answered 503 (Telnyx retries), never 2xx (an
//! acknowledgement nothing was stored for) and never left hanging. After
//! the heal, `CLAIMS_SQL` (a trigger in the run's `chaos` schema) tells
//! when the cut daemons picked up work again.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::plan::{Call, Kind, webhook_body};
use crate::proxy::{Mode, Proxy};
use crate::say;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub(crate) enum Link {
    /// The first `--cut-daemons` daemons from PostgreSQL (frozen).
    Db,
    /// Every daemon from Storage and Telnyx (frozen).
    Providers,
    /// Storage refuses every connection (an outage).
    Storage,
}

/// Every claim (`pending` → `running`), with who and when, installed
/// after `operators::AUDIT_SQL` (same schema).
pub(crate) const CLAIMS_SQL: &str = "
CREATE TABLE chaos.claims (job_id BIGINT, worker TEXT, at TIMESTAMPTZ DEFAULT clock_timestamp());
CREATE FUNCTION chaos.record_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'pending' AND NEW.state = 'running' THEN
        INSERT INTO chaos.claims (job_id, worker) VALUES (NEW.id, NEW.locked_by);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER chaos_claims AFTER UPDATE ON recording_relay.recording_jobs
    FOR EACH ROW EXECUTE FUNCTION chaos.record_claim();
";

/// The proxies a cut needs; the daemons are pointed at them.
#[derive(Default)]
pub(crate) struct Links {
    /// One per daemon slot (PostgreSQL), when the database is cut.
    pub db: Vec<Proxy>,
    pub storage: Option<Proxy>,
    pub telnyx: Option<Proxy>,
}

/// The address of a URL's server (`postgres://…@HOST:PORT/db`, `http://HOST:PORT`).
pub(crate) async fn address_of(url: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    let u = reqwest::Url::parse(url).context("parsing a URL to proxy")?;
    let host = u.host_str().context("the URL has no host")?.to_owned();
    let port = u.port().unwrap_or(default_port);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

/// The URL with its host and port replaced by `via`'s.
pub(crate) fn through(url: &str, via: SocketAddr) -> anyhow::Result<String> {
    let mut u = reqwest::Url::parse(url).context("parsing a URL to proxy")?;
    u.set_ip_host(via.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the host of {url}"))?;
    u.set_port(Some(via.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port of {url}"))?;
    Ok(u.to_string())
}

/// What the cut did and saw.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct CutReport {
    pub link: Option<Link>,
    pub started: Option<DateTime<Utc>>,
    pub healed: Option<DateTime<Utc>>,
    /// Webhooks sent to cut listeners during a database cut, by answer
    /// (`timeout`, `error` for no answer).
    pub probes: std::collections::BTreeMap<String, usize>,
    pub probe_slowest_ms: u64,
    /// Jobs the cut daemons held leases on when the cut began.
    pub leases_held_at_cut: i64,
}

pub(crate) struct Cut {
    pub link: Link,
    pub links: std::sync::Arc<Links>,
    pub at: Duration,
    pub length: Duration,
    /// The listeners of the cut daemons (probed during a database cut).
    pub listeners: Vec<SocketAddr>,
    pub key: SigningKey,
    pub calls: std::sync::Arc<Vec<Call>>,
    /// For a database cut: the run's own pool (not cut) and the cut
    /// daemons' pids, to cut while they hold leases.
    pub pool: PgPool,
    pub pids: Vec<u32>,
}

impl Cut {
    fn set(&self, mode: Mode) {
        match self.link {
            Link::Db => self.links.db.iter().for_each(|p| p.set_mode(mode)),
            Link::Providers | Link::Storage => {
                for p in [&self.links.storage, &self.links.telnyx]
                    .into_iter()
                    .flatten()
                {
                    p.set_mode(mode);
                }
            }
        }
    }

    /// Waits until `start + at`, cuts, probes, heals.
    pub(crate) async fn run(self, start: Instant) -> CutReport {
        let mut report = CutReport {
            link: Some(self.link),
            ..CutReport::default()
        };
        tokio::time::sleep_until(start + self.at).await;
        if self.link == Link::Db {
            // The point of the cut is a daemon that holds leases it cannot
            // renew: wait (a little) until a cut daemon holds one.
            let patterns: Vec<String> = self.pids.iter().map(|p| format!("%:{p}:%")).collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let held: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM recording_relay.recording_jobs
                     WHERE state = 'running' AND locked_by LIKE ANY($1)",
                )
                .bind(&patterns)
                .fetch_one(&self.pool)
                .await
                .unwrap_or(0);
                report.leases_held_at_cut = held;
                if held > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mode = match self.link {
            Link::Db | Link::Providers => Mode::Frozen,
            Link::Storage => Mode::Refused,
        };
        self.set(mode);
        let began = Instant::now();
        report.started = Some(Utc::now());
        say(&format!(
            "cut {:?} ({mode:?}) for {:?}; the cut daemons held {} leases",
            self.link, self.length, report.leases_held_at_cut
        ));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(4))
            .build()
            .expect("an HTTP client with default TLS settings builds");
        let mut n = 0usize;
        while began.elapsed() < self.length {
            if self.link == Link::Db && !self.listeners.is_empty() && !self.calls.is_empty() {
                let addr = self.listeners[n % self.listeners.len()];
                let call = &self.calls[fastrand::usize(..self.calls.len())];
                n += 1;
                let t0 = Instant::now();
                let answer = self.probe(&client, addr, call).await;
                let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
                report.probe_slowest_ms = report.probe_slowest_ms.max(ms);
                *report.probes.entry(answer).or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.set(Mode::Open);
        report.healed = Some(Utc::now());
        say(&format!(
            "healed {:?} after {:.1} s; probes of cut listeners: {:?}",
            self.link,
            began.elapsed().as_secs_f64(),
            report.probes
        ));
        report
    }

    async fn probe(&self, client: &reqwest::Client, addr: SocketAddr, call: &Call) -> String {
        let url = format!("http://{addr}/webhooks/telnyx");
        let body = webhook_body(call, Kind::Recording, 1, &url);
        let ts = recording_relay_dev_tools::testing::unix_now();
        let mut req = client.post(&url).header("content-type", "application/json");
        for (name, value) in
            recording_relay_dev_tools::testing::signature_headers(&self.key, ts, &body)
        {
            req = req.header(name, value);
        }
        match req.body(body).send().await {
            Ok(res) => res.status().as_u16().to_string(),
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        }
    }
}

/// After the heal: the first claim by one of `workers` (pids; all when
/// empty), and the first job stored, each in seconds after `healed`.
pub(crate) async fn resumed_after(
    pool: &PgPool,
    healed: DateTime<Utc>,
    pids: &[u32],
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let patterns: Vec<String> = pids.iter().map(|p| format!("%:{p}:%")).collect();
    let claim: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(at) - $1)::float8 FROM chaos.claims
         WHERE at > $1 AND (cardinality($2::text[]) = 0 OR worker LIKE ANY($2))",
    )
    .bind(healed)
    .bind(&patterns)
    .fetch_one(pool)
    .await
    .context("reading the claims after the heal")?;
    let stored: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(stored_at) - $1)::float8
         FROM recording_relay.recording_jobs WHERE stored_at > $1",
    )
    .bind(healed)
    .fetch_one(pool)
    .await
    .context("reading the first store after the heal")?;
    Ok((claim, stored))
}

/// The cut's own checks and figures: a cut listener answered every probe
/// 503 (database cut), and work was picked up again within `bound` of the
/// heal (by a cut daemon, for a database cut; a recording stored, for a
/// provider cut).
pub(crate) async fn checks(
    pool: &PgPool,
    cut: &CutReport,
    cut_pids: &[u32],
    bound: Duration,
) -> anyhow::Result<(Vec<crate::verify::Check>, Vec<String>)> {
    use crate::verify::Check;
    let mut checks = Vec::new();
    let mut figures = Vec::new();
    let (Some(link), Some(started), Some(healed)) = (cut.link, cut.started, cut.healed) else {
        anyhow::bail!("the cut never happened");
    };
    let (claim, stored) = resumed_after(pool, healed, cut_pids).await?;
    let secs = |t: Option<f64>| t.map_or("never".to_owned(), |t| format!("{t:.2} s"));
    figures.push(format!(
        "cut {link:?} from {started} for {:.1} s; after the heal: first claim by a cut daemon {}, \
         first recording stored {} (bound {:.0} s); probes of cut listeners {:?}, slowest answer {} ms; \
         leases held by the cut daemons when it began {}",
        (healed - started).as_seconds_f64(),
        secs(claim),
        secs(stored),
        bound.as_secs_f64(),
        cut.probes,
        cut.probe_slowest_ms,
        cut.leases_held_at_cut,
    ));
    if link == Link::Db {
        let answered_503 = cut.probes.get("503").copied().unwrap_or(0);
        let others: Vec<String> = cut
            .probes
            .iter()
            .filter(|(k, _)| k.as_str() != "503")
            .map(|(k, n)| format!("{n} probes answered {k}"))
            .collect();
        let mut details = others.clone();
        if answered_503 == 0 {
            details.push("no probe was sent during the cut".to_owned());
        }
        checks.push(Check {
            name: "a listener cut off from PostgreSQL answers 503 (not 2xx, not silence)",
            passed: others.is_empty() && answered_503 > 0,
            details,
        });
    }
    if link != Link::Db {
        // The cut must have cut: with the providers unreachable nothing can
        // be stored (the store is verified through Storage too). A request
        // that finished as the cut began gets two seconds' grace.
        let stored_during: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM recording_relay.recording_jobs
             WHERE stored_at > $1 + interval '2 seconds' AND stored_at < $2",
        )
        .bind(started)
        .bind(healed)
        .fetch_one(pool)
        .await?;
        checks.push(Check {
            name: "nothing is stored while the providers are cut off",
            passed: stored_during == 0,
            details: vec![format!(
                "{stored_during} recordings stored between the cut and the heal"
            )],
        });
    }
    let resumed = match link {
        Link::Db => claim,
        Link::Providers | Link::Storage => stored,
    };
    checks.push(Check {
        name: "work resumes within the stated bound after the heal",
        passed: resumed.is_some_and(|t| t <= bound.as_secs_f64()),
        details: vec![format!(
            "first {} {} after the heal (bound {:.0} s)",
            if link == Link::Db {
                "claim by a cut daemon"
            } else {
                "recording stored"
            },
            secs(resumed),
            bound.as_secs_f64()
        )],
    });
    Ok((checks, figures))
}
