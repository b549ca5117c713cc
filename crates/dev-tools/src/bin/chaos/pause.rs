//! A hung daemon (issue #22, item 2): SIGSTOP a worker while one of its
//! resumable uploads is in flight at the storage simulator, for longer than
//! its lease, until another daemon has finished the job; then SIGCONT it.
//!
//! The trigger is polled, not timed: the storage simulator reads TUS PATCH
//! bodies at a slow uplink's pace (`set_tus_patch_rate`) and says which
//! objects have a PATCH being received; the job planned at that object
//! names its worker, whose id names its pid (`pid_of_worker`). A stopped
//! process keeps its connection open, so the other daemon's PATCH must take
//! the upload's lock from it, as tus-node-server does.
//!
//! The checks: every pause caught an upload and outlasted the lease; the
//! job was final before the worker woke; the woken worker's late writes
//! were refused (its log says the lease was lost for that job); plus the
//! run's own: the audit of job writes finds no write through a stale lease,
//! every object was uploaded once, and every intake is linked once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use recording_relay_sim::StorageSim;
use rustix::process::{Pid, Signal, kill_process};
use serde::Serialize;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemons::pid_of_worker;
use crate::verify::Check;

/// Pids the kill loop must leave alone while they are stopped.
pub(crate) type Paused = Arc<Mutex<HashSet<u32>>>;

pub(crate) struct PauseOptions {
    /// Pauses to make, one at a time.
    pub count: usize,
    /// The daemons' lease: a pause lasts at least twice this.
    pub lease: Duration,
    /// Longest pause: resumed then even if the job is not final.
    pub longest: Duration,
    /// Where the daemons write their logs (`daemon-*.log`).
    pub log_dir: PathBuf,
}

/// One SIGSTOP … SIGCONT.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Pause {
    pub job_id: i64,
    pub pid: u32,
    pub object_path: String,
    pub stopped_at: DateTime<Utc>,
    pub stopped_for_s: f64,
    /// The job's state when the worker was woken.
    pub state_at_resume: String,
    /// The lease the stopped worker held, and the job's at resume.
    pub lease_held: i64,
    pub lease_at_resume: Option<i64>,
    /// The woken worker logged that the job's lease was lost (its late
    /// writes were refused or never made), within 20 s.
    pub refusal_logged: bool,
}

/// Until `count` pauses are done or `stop`: waits for a worker mid-upload,
/// stops it, waits, wakes it. Every stopped process is woken before this
/// returns.
pub(crate) async fn run(
    pool: PgPool,
    storage: StorageSim,
    opts: PauseOptions,
    paused: Paused,
    stop: CancellationToken,
    out: Arc<Mutex<Vec<Pause>>>,
) {
    while out.lock().unwrap_or_else(PoisonError::into_inner).len() < opts.count {
        let Some((job_id, pid, lease_held, object_path)) =
            wait_for_upload(&pool, &storage, &stop).await
        else {
            return;
        };
        let Some(target) = Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else {
            continue;
        };
        paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid);
        if kill_process(target, Signal::STOP).is_err() {
            // Killed by the kill loop between the pick and the stop.
            paused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&pid);
            continue;
        }
        let stopped_at = Utc::now();
        let began = Instant::now();
        crate::say(&format!(
            "SIGSTOP pid {pid}: job {job_id} mid-upload of {object_path} (lease {lease_held})"
        ));
        let refusals_before = refusals_logged(&opts.log_dir, job_id);
        // Wait for another daemon to finish the job, for at least two leases.
        let mut state = String::new();
        let mut lease_now = None;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(Some((s, l))) = sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT state::text, lease_id FROM recording_relay.recording_jobs WHERE id = $1",
            )
            .bind(job_id)
            .fetch_optional(&pool)
            .await
            {
                (state, lease_now) = (s, l);
            }
            let final_ = state != "pending" && state != "running";
            if (final_ && began.elapsed() >= opts.lease * 2) || began.elapsed() >= opts.longest {
                break;
            }
        }
        let stopped_for = began.elapsed();
        let _ = kill_process(target, Signal::CONT);
        paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
        crate::say(&format!(
            "SIGCONT pid {pid} after {:.1} s; job {job_id} is {state}",
            stopped_for.as_secs_f64()
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        let refusal_logged = loop {
            if refusals_logged(&opts.log_dir, job_id) > refusals_before {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        out.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Pause {
                job_id,
                pid,
                object_path,
                stopped_at,
                stopped_for_s: stopped_for.as_secs_f64(),
                state_at_resume: state,
                lease_held,
                lease_at_resume: lease_now,
                refusal_logged,
            });
    }
}

/// A running job whose resumable upload has a PATCH in flight now: its id,
/// its worker's pid, its lease and its object.
async fn wait_for_upload(
    pool: &PgPool,
    storage: &StorageSim,
    stop: &CancellationToken,
) -> Option<(i64, u32, i64, String)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let in_flight = storage.tus_uploads_in_flight();
        if in_flight.is_empty() {
            continue;
        }
        let found: Result<Option<(i64, String, i64, String)>, _> = sqlx::query_as(
            "SELECT id, locked_by, lease_id, object_path FROM recording_relay.recording_jobs
             WHERE state = 'running' AND object_path = ANY($1)
               AND locked_by IS NOT NULL AND lease_id IS NOT NULL
             LIMIT 1",
        )
        .bind(&in_flight)
        .fetch_optional(pool)
        .await;
        if let Ok(Some((id, worker, lease, path))) = found
            && let Some(pid) = pid_of_worker(&worker)
        {
            return Some((id, pid, lease, path));
        }
    }
}

/// Lines in the daemons' logs saying job `job_id`'s lease was lost.
fn refusals_logged(dir: &std::path::Path, job_id: i64) -> usize {
    let needle = format!("job.id={job_id} ");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("daemon-") && n.ends_with(".log"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| {
            text.lines()
                .filter(|l| l.contains(&needle) && l.contains("lease lost"))
                .count()
        })
        .sum()
}

/// The pause scenario's own checks.
pub(crate) fn checks(pauses: &[Pause], wanted: usize, lease: Duration) -> Vec<Check> {
    let short: Vec<String> = pauses
        .iter()
        .filter(|p| p.stopped_for_s < lease.as_secs_f64())
        .map(|p| format!("job {}: stopped only {:.1} s", p.job_id, p.stopped_for_s))
        .collect();
    let mut caught = Vec::new();
    if pauses.len() < wanted {
        caught.push(format!(
            "{} of {wanted} pauses: no more uploads in flight to catch",
            pauses.len()
        ));
    }
    caught.extend(short);
    let unfinished: Vec<String> = pauses
        .iter()
        .filter(|p| {
            p.state_at_resume == "pending"
                || p.state_at_resume == "running"
                || p.lease_at_resume.is_none_or(|l| l <= p.lease_held)
        })
        .map(|p| {
            format!(
                "job {}: {} (lease {:?}, the stopped worker held {}) when pid {} woke",
                p.job_id, p.state_at_resume, p.lease_at_resume, p.lease_held, p.pid
            )
        })
        .collect();
    let unrefused: Vec<String> = pauses
        .iter()
        .filter(|p| !p.refusal_logged)
        .map(|p| format!("job {}: pid {} logged no lost lease", p.job_id, p.pid))
        .collect();
    vec![
        Check {
            name: "every pause caught a worker mid-upload and outlasted its lease",
            passed: caught.is_empty(),
            details: caught,
        },
        Check {
            name: "another daemon finished every paused job before its worker woke",
            passed: unfinished.is_empty(),
            details: unfinished,
        },
        Check {
            name: "every woken worker found its lease lost (late writes refused)",
            passed: unrefused.is_empty(),
            details: unrefused,
        },
    ]
}
