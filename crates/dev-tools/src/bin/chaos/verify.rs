//! The promise, checked: every webhook answered 2xx ends as exactly one
//! verified object linked to its intake (or a terminal state the fault plan
//! explains), whatever was killed in between. Plus the run's figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use recording_relay::jobs::{Job, JobState};
use recording_relay_sim::{StorageSim, TelnyxSim};
use serde::Serialize;
use uuid::Uuid;

use crate::daemons::{Crash, Kill, pid_of_worker};
use crate::plan::{Call, Expect};
use crate::postgres::Restart;
use crate::sender::SendStats;

/// Everything the checks look at.
pub(crate) struct Evidence<'a> {
    pub calls: &'a [Call],
    pub sources: &'a [String],
    pub stats: &'a SendStats,
    pub kills: &'a [Kill],
    pub crashes: &'a [Crash],
    pub restart: Option<&'a Restart>,
    pub jobs: &'a [Job],
    /// `(id, recording_id, recording_object_path)` of every intake.
    pub intakes: &'a [(Uuid, Option<String>, Option<String>)],
    pub storage: &'a StorageSim,
    pub bucket: &'a str,
    pub telnyx: &'a TelnyxSim,
    pub lease: Duration,
    pub poll: Duration,
    /// Succeeded jobs whose delete at Telnyx failed and is owed to the
    /// clean-up sweep (first retry a minute later: after the run), with
    /// the failure.
    pub owed_deletes: &'a HashMap<i64, String>,
    /// The daemons delete recordings at Telnyx (`pipeline.delete_from_telnyx`).
    pub deletes_at_telnyx: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// What failed (at most a few), or a note on what was excused.
    pub details: Vec<String>,
}

impl Check {
    fn new(name: &'static str, problems: Vec<String>) -> Self {
        Self {
            name,
            passed: problems.is_empty(),
            details: problems,
        }
    }

    fn with_note(mut self, note: Option<String>) -> Self {
        self.details.extend(note);
        self
    }
}

/// Why an attempt of a job failed, by the text the relay recorded. Each
/// kind maps to something the fault plan injects (or does not).
fn classify(kind: &str, error: &str) -> &'static str {
    const KNOWN: [(&str, &str); 15] = [
        ("lease expired", "lease expired (daemon killed)"),
        ("lease lost", "lease lost"),
        ("Telnyx rate limit hit (429)", "Telnyx 429"),
        ("Telnyx answered 5", "Telnyx 5xx"),
        ("Telnyx request failed", "Telnyx timeout/reset"),
        ("unexpected Telnyx response", "Telnyx answer cut off"),
        ("storage answered 5", "storage 5xx"),
        ("storage request failed", "storage timeout/reset"),
        (
            "resumable upload offset conflict",
            "storage TUS offset conflict",
        ),
        (
            "the recording download ended early",
            "Telnyx download cut off",
        ),
        ("database error", "database unavailable"),
        ("no intake matches", "no intake (yet)"),
        ("already holds recording", "intake taken"),
        ("handler panicked", "PANIC"),
        (
            "for the call session's call.initiated",
            "waiting for call.initiated",
        ),
    ];
    // Not failures: an operator's cancel + requeue pair (`operators.rs`).
    match kind {
        "cancelled" => return "cancelled by an operator",
        "requeued" => return "requeued by an operator",
        _ => {}
    }
    // The operators' opening incident (`operators.rs`): permanent, but
    // injected, and requeued.
    if error.contains("storage rejected the service key") {
        return "storage key refused (incident)";
    }
    if kind == "permanent" {
        return "permanent error";
    }
    KNOWN
        .iter()
        .find(|(needle, _)| error.contains(needle))
        .map_or("unclassified", |(_, label)| label)
}

/// Kinds of failed attempt that the injected faults (kills, PostgreSQL
/// restart, provider faults) account for.
fn injected(label: &str) -> bool {
    matches!(
        label,
        "lease expired (daemon killed)"
            | "lease lost"
            | "Telnyx 429"
            | "Telnyx 5xx"
            | "Telnyx timeout/reset"
            | "Telnyx answer cut off"
            | "storage 5xx"
            | "storage timeout/reset"
            | "storage TUS offset conflict"
            | "Telnyx download cut off"
            | "cancelled by an operator"
            | "requeued by an operator"
            | "storage key refused (incident)"
    )
}

struct HistoryEntry {
    kind: String,
    error: String,
    worker: Option<String>,
    at: Option<DateTime<Utc>>,
}

fn history(job: &Job) -> Vec<HistoryEntry> {
    let text =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    job.errors
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| HistoryEntry {
                    kind: text(e, "kind").unwrap_or_default(),
                    error: text(e, "error").unwrap_or_default(),
                    worker: text(e, "worker"),
                    at: text(e, "at")
                        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                        .map(|t| t.with_timezone(&Utc)),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A failed job is explained when it ran out of attempts and every attempt
/// failed of an injected fault (a database error only while PostgreSQL was
/// restarting, or just after).
fn failure_explained(
    job: &Job,
    expect: Expect,
    restart: Option<&Restart>,
    lease: Duration,
) -> Result<(), String> {
    let last = job.last_error.as_deref().unwrap_or("");
    if !(last.starts_with("gave up after") || last.starts_with("lease expired")) {
        return Err(format!(
            "ended failed without exhausting its attempts: {}",
            brief(last)
        ));
    }
    for e in history(job) {
        let label = classify(&e.kind, &e.error);
        let during_restart = label == "database unavailable"
            && restart.is_some_and(|r| {
                e.at.is_some_and(|at| {
                    at >= r.started
                        && at <= r.ended + chrono::Duration::from_std(lease * 3).unwrap_or_default()
                })
            });
        let planned = (label == "no intake (yet)" && expect == Expect::NoIntake)
            || (label == "waiting for call.initiated" && expect == Expect::SipHeader);
        if !(injected(label) || during_restart || planned) {
            return Err(format!(
                "attempt failed of something not injected ({label}): {}",
                brief(&e.error)
            ));
        }
    }
    Ok(())
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The last pipeline step a job completed.
fn progress(job: &Job) -> &'static str {
    if job.telnyx_deleted_at.is_some() {
        "deleted at Telnyx"
    } else if job.linked_at.is_some() {
        "linked (not deleted at Telnyx)"
    } else if job.stored_at.is_some() {
        "stored"
    } else if job.matched_at.is_some() {
        "matched"
    } else if job.resolved_at.is_some() {
        "resolved"
    } else {
        "nothing"
    }
}

/// One line of at most 160 characters (errors quote XML bodies).
fn brief(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

/// Keeps a failing check's output readable: the first few problems and a count.
fn capped(mut problems: Vec<String>) -> Vec<String> {
    const SHOW: usize = 12;
    if problems.len() > SHOW {
        let more = problems.len() - SHOW;
        problems.truncate(SHOW);
        problems.push(format!("… and {more} more"));
    }
    problems
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Figures {
    pub events: usize,
    pub deliveries: usize,
    pub redeliveries: usize,
    pub http_requests: usize,
    pub answers: BTreeMap<u16, usize>,
    pub sender_timeouts: usize,
    pub sender_connection_errors: usize,
    pub acknowledged: usize,
    pub never_acknowledged: usize,
    /// `call.initiated` deliveries (first and redeliveries) among `deliveries`.
    pub initiated_deliveries: usize,
    pub initiated_acknowledged: usize,
    /// Calls whose `call.initiated` was first sent after the recording's webhook.
    pub initiated_after_recording: usize,
    /// Second calls to a patient within ten minutes.
    pub patients_called_twice: usize,
    /// Jobs by `match_method` (`none`: not matched).
    pub match_methods: BTreeMap<String, usize>,
    pub jobs: usize,
    pub jobs_by_state: BTreeMap<String, usize>,
    pub attempts_histogram: BTreeMap<i32, usize>,
    pub failed_jobs: Vec<String>,
    pub time_to_succeed_p50_s: f64,
    pub time_to_succeed_p99_s: f64,
    pub time_to_succeed_max_s: f64,
    pub kills: usize,
    pub kills_with_jobs_in_flight: usize,
    pub jobs_rescued_after_kills: usize,
    pub kill_to_rescue_p50_s: f64,
    pub kill_to_rescue_max_s: f64,
    pub leases_lost_by_live_daemons: usize,
    pub daemon_crashes: usize,
    pub pg_restart_command_s: Option<f64>,
    pub pg_unavailable_s: Option<f64>,
    pub failed_attempts_by_cause: BTreeMap<String, usize>,
    pub objects: usize,
    pub bytes_stored: u64,
    pub resumable_uploads: usize,
    pub deleted_at_telnyx: usize,
    /// Succeeded, delete at Telnyx owed to the clean-up sweep.
    pub deletes_owed: usize,
}

pub(crate) struct Outcome {
    pub checks: Vec<Check>,
    pub figures: Figures,
}

pub(crate) fn verify(ev: &Evidence<'_>) -> Outcome {
    let mut f = Figures {
        events: ev.calls.len(),
        deliveries: ev.stats.deliveries,
        redeliveries: ev.stats.redeliveries,
        http_requests: ev.stats.requests,
        answers: ev.stats.answers.clone(),
        sender_timeouts: ev.stats.timeouts,
        sender_connection_errors: ev.stats.connection_errors,
        acknowledged: ev.stats.acked.len(),
        never_acknowledged: ev.calls.len() - ev.stats.acked.len(),
        initiated_deliveries: ev.stats.initiated_deliveries,
        initiated_acknowledged: ev.stats.initiated_acked.len(),
        initiated_after_recording: ev.calls.iter().filter(|c| c.initiated_after).count(),
        patients_called_twice: ev.calls.iter().filter(|c| c.repeats.is_some()).count(),
        jobs: ev.jobs.len(),
        kills: ev.kills.len(),
        daemon_crashes: ev.crashes.len(),
        pg_restart_command_s: ev.restart.map(|r| r.command.as_secs_f64()),
        pg_unavailable_s: ev.restart.map(|r| r.unavailable.as_secs_f64()),
        ..Figures::default()
    };
    let mut checks = Vec::new();
    let call_of_event: HashMap<&str, usize> = ev
        .calls
        .iter()
        .enumerate()
        .map(|(i, c)| (c.event_id.as_str(), i))
        .collect();
    // `recording-relay reconcile` enqueues a recording no job knows under
    // `reconcile:<recording id>` (a webhook lost in a failover).
    let call_of_reconciled: HashMap<String, usize> = ev
        .calls
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("reconcile:{}", c.recording.id), i))
        .collect();
    let mut jobs_of_call: HashMap<usize, Vec<&Job>> = HashMap::new();
    let mut strangers = Vec::new();
    for job in ev.jobs {
        let call = call_of_event
            .get(job.event_id.as_str())
            .or_else(|| call_of_reconciled.get(&job.event_id));
        match call {
            Some(&i) => jobs_of_call.entry(i).or_default().push(job),
            None => strangers.push(format!("job {} has unknown event {}", job.id, job.event_id)),
        }
        *f.jobs_by_state
            .entry(job.state.as_str().to_owned())
            .or_default() += 1;
        *f.attempts_histogram.entry(job.attempts).or_default() += 1;
        *f.match_methods
            .entry(
                job.match_method
                    .clone()
                    .unwrap_or_else(|| "none".to_owned()),
            )
            .or_default() += 1;
        for e in history(job) {
            *f.failed_attempts_by_cause
                .entry(classify(&e.kind, &e.error).to_owned())
                .or_default() += 1;
        }
    }

    // 1. Every acknowledged event has exactly one job.
    let mut problems = strangers;
    let mut acked: Vec<usize> = ev.stats.acked.iter().copied().collect();
    acked.sort_unstable();
    for &i in &acked {
        let n = jobs_of_call.get(&i).map_or(0, Vec::len);
        if n != 1 {
            problems.push(format!(
                "event {} was answered 2xx but has {n} jobs",
                ev.calls[i].event_id
            ));
        }
    }
    let unacked_with_job = (0..ev.calls.len())
        .filter(|i| !ev.stats.acked.contains(i) && jobs_of_call.contains_key(i))
        .count();
    let note = (f.never_acknowledged > 0).then(|| {
        format!(
            "note: {} events never got a 2xx (not promised); {unacked_with_job} of them have a job anyway",
            f.never_acknowledged
        )
    });
    checks.push(
        Check::new(
            "every 2xx-acknowledged event has exactly one job",
            capped(problems),
        )
        .with_note(note),
    );

    // 2. One live job per recording.
    let mut live: HashMap<&str, Vec<i64>> = HashMap::new();
    for job in ev.jobs {
        if let (Some(rec), false) = (
            job.recording_id.as_deref(),
            job.state == JobState::Duplicate,
        ) {
            live.entry(rec).or_default().push(job.id);
        }
    }
    let problems = live
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(rec, ids)| format!("recording {rec} has live jobs {ids:?}"))
        .collect();
    checks.push(Check::new(
        "no two live jobs per recording",
        capped(problems),
    ));

    // 3. Nothing left running or pending.
    let problems = ev
        .jobs
        .iter()
        .filter(|j| !j.state.is_final())
        .map(|j| {
            format!(
                "job {} is {} (attempt {}, {:?})",
                j.id,
                j.state.as_str(),
                j.attempts,
                j.last_error
            )
        })
        .collect();
    checks.push(Check::new(
        "no job left running or pending",
        capped(problems),
    ));

    // 4. Every job succeeded, or ended in a terminal state the plan explains.
    let mut problems = Vec::new();
    let mut excused = Vec::new();
    for (&i, jobs) in &jobs_of_call {
        let call = &ev.calls[i];
        for job in jobs {
            let expected = match call.expect {
                Expect::NoIntake => JobState::Unmatched,
                _ => JobState::Succeeded,
            };
            // A call whose `call.initiated` was never acknowledged has no
            // exact link: by phone and time a patient called twice may be
            // ambiguous, and unmatched is the fail-closed answer.
            let link_lost = call.expect == Expect::SipHeader
                && !ev.stats.initiated_acked.contains(&i)
                && job.state == JobState::Unmatched;
            if link_lost {
                excused.push(format!(
                    "job {} ({}) unmatched: its call.initiated never got a 2xx",
                    job.id, call.event_id
                ));
                continue;
            }
            if job.state == expected || !job.state.is_final() {
                // The visible reason must be the real one: an operator
                // reading `recording_jobs_unmatched` or an alert acts on it.
                let reason = brief(job.last_error.as_deref().unwrap_or(""));
                if job.state == JobState::Unmatched && !reason.contains("no intake matches") {
                    problems.push(format!(
                        "job {} ({}) ended unmatched, as expected, but gives as its reason: {reason}",
                        job.id, call.event_id
                    ));
                }
                continue;
            }
            if job.state == JobState::Failed {
                let line = format!(
                    "job {} ({}, {} attempts, got as far as {}): {}",
                    job.id,
                    call.event_id,
                    job.attempts,
                    progress(job),
                    brief(job.last_error.as_deref().unwrap_or(""))
                );
                f.failed_jobs.push(line.clone());
                match failure_explained(job, call.expect, ev.restart, ev.lease) {
                    Ok(()) => excused.push(line),
                    Err(why) => problems.push(format!("{line}: {why}")),
                }
                continue;
            }
            problems.push(format!(
                "job {} ({:?} call) ended {} instead of {}: {}",
                job.id,
                call.expect,
                job.state.as_str(),
                expected.as_str(),
                brief(job.last_error.as_deref().unwrap_or(""))
            ));
        }
    }
    let note = (!excused.is_empty()).then(|| {
        format!(
            "explained by injected faults (attempts exhausted): {}",
            excused.join("; ")
        )
    });
    checks.push(
        Check::new(
            "every job succeeded, or ended unmatched/failed as the fault plan explains",
            capped(problems),
        )
        .with_note(note),
    );

    checks.push(named_intake_check(ev, &jobs_of_call));

    // 5. Objects: matched intakes point at exactly their verified object;
    //    unmatched recordings are kept under unmatched/ and at Telnyx.
    let intake_rows: HashMap<Uuid, (&Option<String>, &Option<String>)> = ev
        .intakes
        .iter()
        .map(|(id, rec, path)| (*id, (rec, path)))
        .collect();
    let deleted: Vec<String> = ev.telnyx.deleted_ids();
    let deleted_set: HashSet<&str> = deleted.iter().map(String::as_str).collect();
    f.deleted_at_telnyx = deleted.len();
    let mut problems = Vec::new();
    let mut expected_objects: HashSet<String> = HashSet::new();
    for (&i, jobs) in &jobs_of_call {
        let call = &ev.calls[i];
        let rec = &call.recording;
        let Some(job) = jobs.first() else { continue };
        let source_sha = &ev.sources[i];
        let expected_path = match call.intake {
            Some(intake) => format!("intakes/{intake}/{}.wav", rec.id),
            None => format!("unmatched/{}.wav", rec.id),
        };
        if let Some(path) = &job.object_path {
            expected_objects.insert(path.clone());
        }
        let verify_object = |problems: &mut Vec<String>| {
            if job.object_path.as_deref() != Some(expected_path.as_str()) {
                problems.push(format!(
                    "job {}: object path {:?}, expected {expected_path}",
                    job.id, job.object_path
                ));
                return;
            }
            match ev.storage.object(ev.bucket, &expected_path) {
                None => problems.push(format!(
                    "job {}: {expected_path} is not in the bucket",
                    job.id
                )),
                Some(o) => {
                    if &o.sha256_hex != source_sha || o.size != rec.content.len() {
                        problems.push(format!(
                            "job {}: {expected_path} holds {} bytes sha256 {}, the source {} bytes {}",
                            job.id, o.size, o.sha256_hex, rec.content.len(), source_sha
                        ));
                    }
                    if job.object_sha256.as_deref() != Some(source_sha.as_str()) {
                        problems.push(format!(
                            "job {}: recorded sha256 {:?} differs from the source's",
                            job.id, job.object_sha256
                        ));
                    }
                }
            }
        };
        match (call.intake, job.state) {
            // Linked: also a job that then failed to delete the recording
            // at Telnyx (its last step) until its attempts ran out; the
            // recording is stored and playable, a requeue finishes it.
            (Some(intake), state) if state == JobState::Succeeded || job.linked_at.is_some() => {
                verify_object(&mut problems);
                match intake_rows.get(&intake) {
                    Some((rid, path)) => {
                        if path.as_deref() != Some(expected_path.as_str())
                            || rid.as_deref() != Some(rec.id.as_str())
                        {
                            problems.push(format!(
                                "intake {intake} holds recording {rid:?} at {path:?}, expected {} at {expected_path}",
                                rec.id
                            ));
                        }
                    }
                    None => problems.push(format!("intake {intake} is gone")),
                }
                let deleted =
                    job.telnyx_deleted_at.is_some() && deleted_set.contains(rec.id.as_str());
                // A delete that failed of an injected fault is owed to the
                // clean-up sweep (issue #21 item 6): the job succeeded, the
                // recording stays at Telnyx until the sweep's retry, unless
                // the failure was a hang that outlived the daemon's timeout
                // and then deleted it all the same (the sweep's retry then
                // finds it gone, which counts as deleted).
                let owed = ev
                    .owed_deletes
                    .get(&job.id)
                    .is_some_and(|e| injected(classify("retryable", e)));
                f.deletes_owed += usize::from(state == JobState::Succeeded && !deleted && owed);
                if ev.deletes_at_telnyx && state == JobState::Succeeded && !deleted && !owed {
                    problems.push(format!(
                        "job {}: succeeded but recording {} was not deleted at Telnyx (nor is its delete owed for an injected fault: {:?})",
                        job.id,
                        rec.id,
                        ev.owed_deletes.get(&job.id)
                    ));
                }
            }
            (None, JobState::Unmatched) => {
                verify_object(&mut problems);
                if deleted_set.contains(rec.id.as_str()) {
                    problems.push(format!(
                        "unmatched recording {} was deleted at Telnyx (must be kept)",
                        rec.id
                    ));
                }
            }
            (Some(intake), _) => {
                // Not linked: the intake must not point at anything.
                if let Some((_, Some(path))) = intake_rows.get(&intake) {
                    problems.push(format!(
                        "intake {intake} points at {path} though job {} ended {}",
                        job.id,
                        job.state.as_str()
                    ));
                }
            }
            (None, _) => {}
        }
    }
    // No intake may point at an object that is not its own call's.
    let own_path: HashMap<Uuid, String> = ev
        .calls
        .iter()
        .filter_map(|c| {
            c.intake
                .map(|i| (i, format!("intakes/{i}/{}.wav", c.recording.id)))
        })
        .collect();
    for (id, _, path) in ev.intakes {
        if let Some(path) = path
            && own_path.get(id) != Some(path)
        {
            problems.push(format!("intake {id} points at a foreign object {path}"));
        }
    }
    checks.push(Check::new(
        "every linked intake points at exactly one object whose sha256 is the source's",
        capped(problems),
    ));

    // 6. Nothing uploaded twice, nothing orphaned.
    let objects = ev.storage.list_objects(ev.bucket);
    f.objects = objects.len();
    let mut twice = Vec::new();
    let mut orphans = Vec::new();
    for path in &objects {
        if let Some(o) = ev.storage.object(ev.bucket, path) {
            f.bytes_stored += o.size;
            if o.upload_count != 1 {
                twice.push(format!("{path} was uploaded {} times", o.upload_count));
            }
        }
        if !expected_objects.contains(path) {
            orphans.push(format!("{path} belongs to no job"));
        }
    }
    f.resumable_uploads = ev.calls.iter().filter(|c| c.large).count();
    checks.push(Check::new(
        "every object was uploaded exactly once",
        capped(twice),
    ));
    checks.push(Check::new(
        "no orphan objects in the bucket",
        capped(orphans),
    ));

    // 7. Deleted at Telnyx only what was stored, verified and linked.
    let linked: HashSet<&str> = ev
        .jobs
        .iter()
        .filter(|j| j.linked_at.is_some() && j.stored_at.is_some())
        .filter_map(|j| j.recording_id.as_deref())
        .collect();
    let mut seen = HashSet::new();
    let problems = deleted
        .iter()
        .filter_map(|id| {
            if !seen.insert(id) {
                Some(format!("recording {id} was deleted twice"))
            } else if !linked.contains(id.as_str()) {
                Some(format!(
                    "recording {id} was deleted at Telnyx but its job never stored and linked it"
                ))
            } else {
                None
            }
        })
        .collect();
    checks.push(Check::new(
        "recordings deleted at Telnyx only after they were stored, verified and linked",
        capped(problems),
    ));

    // 8. Kill to rescue within lease + poll interval.
    checks.push(rescue_check(ev, &mut f));

    // 9. The daemons only died when killed.
    let problems = ev
        .crashes
        .iter()
        .map(|c| {
            format!(
                "daemon {} (pid {}) exited on its own: {}",
                c.slot, c.pid, c.status
            )
        })
        .collect();
    checks.push(Check::new("no daemon exited unless killed", problems));

    let mut secs: Vec<f64> = ev
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .filter_map(|j| Some((j.finished_at? - j.created_at).as_seconds_f64()))
        .collect();
    secs.sort_by(f64::total_cmp);
    f.time_to_succeed_p50_s = pct(&secs, 0.5);
    f.time_to_succeed_p99_s = pct(&secs, 0.99);
    f.time_to_succeed_max_s = secs.last().copied().unwrap_or(0.0);
    Outcome { checks, figures: f }
}

/// Every recording whose call named its intake (in `X-Intake-Id` or
/// `client_state`) landed on exactly that intake, by that name; no job of
/// any call is linked to an intake other than its call's.
fn named_intake_check(ev: &Evidence<'_>, jobs_of_call: &HashMap<usize, Vec<&Job>>) -> Check {
    let mut problems = Vec::new();
    let mut unnamed = 0;
    for (&i, jobs) in jobs_of_call {
        let call = &ev.calls[i];
        for job in jobs {
            let Some(intake) = job.intake_id else {
                continue;
            };
            let method = job.match_method.as_deref().unwrap_or("none");
            if call.intake != Some(intake) {
                problems.push(format!(
                    "job {} ({}) landed on intake {intake} (by {method}), its call's is {:?}",
                    job.id, call.event_id, call.intake
                ));
                continue;
            }
            // Enqueued by reconcile (its webhook was lost in a failover):
            // the listing names no intake, so phone and time matched it.
            if job.event_id.starts_with("reconcile:") {
                continue;
            }
            let named = match call.expect {
                // Only once its `call.initiated` got a 2xx does the relay
                // know the header.
                Expect::SipHeader if ev.stats.initiated_acked.contains(&i) => "sip_header",
                Expect::SipHeader => {
                    unnamed += 1;
                    continue;
                }
                Expect::ClientState => "client_state",
                Expect::PhoneAndTime | Expect::NoIntake => continue,
            };
            if method != named {
                problems.push(format!(
                    "job {} ({}{}) linked to its intake by {method}, not by {named}",
                    job.id,
                    call.event_id,
                    if call.repeats.is_some() {
                        ", a patient's second call"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    let note = (unnamed > 0).then(|| {
        format!(
            "note: {unnamed} calls' call.initiated never got a 2xx; they matched by phone and time"
        )
    });
    Check::new(
        "every recording whose call named its intake (X-Intake-Id or client_state) landed on exactly that intake, by that name, never on another",
        capped(problems),
    )
    .with_note(note)
}

/// Each `lease_expired` entry written for a killed process's job, against
/// the kill's time. A kill whose rescue window overlaps the PostgreSQL
/// restart cannot be rescued before the database is back: its bound starts
/// when the database is.
fn rescue_check(ev: &Evidence<'_>, f: &mut Figures) -> Check {
    let bound = ev.lease + ev.poll;
    let bound_c = chrono::Duration::from_std(bound).unwrap_or_default();
    let kill_of: HashMap<u32, &Kill> = ev.kills.iter().map(|k| (k.pid, k)).collect();
    let mut per_kill: HashMap<u32, Vec<f64>> = HashMap::new();
    let mut problems = Vec::new();
    let mut live_losses = 0;
    for job in ev.jobs {
        for e in history(job) {
            if e.kind != "lease_expired" {
                continue;
            }
            let (Some(at), Some(pid)) = (e.at, e.worker.as_deref().and_then(pid_of_worker)) else {
                continue;
            };
            // A lease this process lost before it was killed (the database
            // was down for most of a lease) is no rescue after a kill.
            let Some(kill) = kill_of.get(&pid).filter(|k| at >= k.at) else {
                live_losses += 1;
                continue;
            };
            let latency = at - kill.at;
            per_kill
                .entry(pid)
                .or_default()
                .push(latency.as_seconds_f64());
            let start = match ev.restart {
                Some(r) if kill.at < r.ended && kill.at + bound_c > r.started => {
                    r.ended.max(kill.at)
                }
                _ => kill.at,
            };
            if at > start + bound_c {
                problems.push(format!(
                    "job {} of daemon {} (pid {pid}, killed at {}) rescued {:.2} s after the kill (bound {:.1} s{})",
                    job.id,
                    kill.slot,
                    kill.at.format("%H:%M:%S%.3f"),
                    latency.as_seconds_f64(),
                    bound.as_secs_f64(),
                    if start > kill.at { ", counted from PostgreSQL's return" } else { "" }
                ));
            }
        }
    }
    let mut all: Vec<f64> = per_kill.values().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    f.kills_with_jobs_in_flight = per_kill.len();
    f.jobs_rescued_after_kills = all.len();
    f.kill_to_rescue_p50_s = pct(&all, 0.5);
    f.kill_to_rescue_max_s = all.last().copied().unwrap_or(0.0);
    f.leases_lost_by_live_daemons = live_losses;
    let fates: HashMap<i64, Vec<Fate>> = ev
        .jobs
        .iter()
        .map(|job| {
            let fate = history(job)
                .into_iter()
                .map(|e| Fate {
                    pid: e.worker.as_deref().and_then(pid_of_worker),
                    kind: e.kind,
                    at: e.at,
                })
                .collect();
            (job.id, fate)
        })
        .collect();
    problems.extend(missing_rescues(ev.kills, &fates, all.len()));
    Check::new(
        "jobs of a killed daemon are rescued within lease + poll interval",
        capped(problems),
    )
}

/// One entry of a job's history, as the rescue check reads it.
struct Fate {
    kind: String,
    /// The pid the entry's worker id names (the lease holder).
    pid: Option<u32>,
    at: Option<DateTime<Utc>>,
}

/// Every job a killed daemon left `running` must be rescued (a
/// `lease_expired` entry naming the dead worker) or cancelled by an
/// operator after the kill (the chaos operators cancel running jobs, and a
/// dead daemon's stay running longest). A daemon killed while idle, or a
/// `listen`-only one, leaves nothing and owes nothing. A kill whose jobs
/// could not be read (the database was down) owes what every kill did
/// before they were read: some rescue in the run.
fn missing_rescues(kills: &[Kill], fates: &HashMap<i64, Vec<Fate>>, rescues: usize) -> Vec<String> {
    let mut problems = Vec::new();
    for kill in kills {
        for id in kill.held.iter().flatten() {
            let ended = fates.get(id).is_some_and(|fate| {
                fate.iter().any(|f| {
                    (f.kind == "lease_expired" && f.pid == Some(kill.pid))
                        || (f.kind == "cancelled" && f.at.is_some_and(|at| at >= kill.at))
                })
            });
            if !ended {
                problems.push(format!(
                    "job {id}, running on daemon {} (pid {}) when it was killed at {}, was neither \
                     rescued nor cancelled",
                    kill.slot,
                    kill.pid,
                    kill.at.format("%H:%M:%S%.3f")
                ));
            }
        }
    }
    let unknown = kills.iter().filter(|k| k.held.is_none()).count();
    if unknown > 0 && rescues == 0 {
        problems.push(format!(
            "{unknown} kills came while the database did not answer, and no rescue was recorded"
        ));
    }
    problems
}

pub(crate) fn render(outcome: &Outcome, extra: &[String]) -> String {
    let f = &outcome.figures;
    let mut s = String::new();
    let _ = writeln!(s, "\n== chaos report");
    let _ = writeln!(
        s,
        "events {}: deliveries {} ({} redeliveries of the same data.id), HTTP requests {}",
        f.events, f.deliveries, f.redeliveries, f.http_requests
    );
    let _ = writeln!(
        s,
        "answers {:?}, sender timeouts {}, connection errors {}",
        f.answers, f.sender_timeouts, f.sender_connection_errors
    );
    let _ = writeln!(
        s,
        "2xx acknowledged {} recording events, never acknowledged {}",
        f.acknowledged, f.never_acknowledged
    );
    let _ = writeln!(
        s,
        "call.initiated: {} deliveries, {} calls acknowledged ({} first sent after the recording); \
         patients called twice {}; jobs by match_method {:?}",
        f.initiated_deliveries,
        f.initiated_acknowledged,
        f.initiated_after_recording,
        f.patients_called_twice,
        f.match_methods
    );
    for line in extra {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "kills {} ({} with jobs in flight, {} jobs rescued; kill→rescue p50 {:.2} s, max {:.2} s); leases lost by live daemons {}; crashes {}",
        f.kills,
        f.kills_with_jobs_in_flight,
        f.jobs_rescued_after_kills,
        f.kill_to_rescue_p50_s,
        f.kill_to_rescue_max_s,
        f.leases_lost_by_live_daemons,
        f.daemon_crashes
    );
    match (f.pg_restart_command_s, f.pg_unavailable_s) {
        (Some(c), Some(u)) => {
            let _ = writeln!(
                s,
                "PostgreSQL restart: pg_ctlcluster took {c:.2} s, new connections failed for {u:.2} s"
            );
        }
        _ => {
            let _ = writeln!(s, "PostgreSQL restart: none");
        }
    }
    let _ = writeln!(s, "jobs {}: {:?}", f.jobs, f.jobs_by_state);
    let _ = writeln!(s, "attempts histogram {:?}", f.attempts_histogram);
    let _ = writeln!(
        s,
        "time to succeed (webhook stored → job succeeded): p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        f.time_to_succeed_p50_s, f.time_to_succeed_p99_s, f.time_to_succeed_max_s
    );
    let _ = writeln!(
        s,
        "failed attempts by cause {:?}",
        f.failed_attempts_by_cause
    );
    let _ = writeln!(
        s,
        "objects {} ({} bytes, {} via resumable upload), deleted at Telnyx {}, deletes owed to the clean-up sweep {}",
        f.objects, f.bytes_stored, f.resumable_uploads, f.deleted_at_telnyx, f.deletes_owed
    );
    let _ = writeln!(s, "failed jobs {}", f.failed_jobs.len());
    for line in &f.failed_jobs {
        let _ = writeln!(s, "  {line}");
    }
    let _ = writeln!(s, "\n== checks");
    for c in &outcome.checks {
        let _ = writeln!(s, "{}  {}", if c.passed { "ok  " } else { "FAIL" }, c.name);
        for d in &c.details {
            let _ = writeln!(s, "        {d}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_faults_are_recognised_and_others_are_not() {
        for (kind, error) in [
            (
                "retryable",
                "Telnyx answered 500: An unexpected error occured.",
            ),
            ("retryable", "Telnyx rate limit hit (429); retry in 1s"),
            ("retryable", "Telnyx request failed: operation timed out"),
            ("retryable", "storage request failed: error sending request"),
            (
                "lease_expired",
                "lease expired: worker h:1:ab stopped heartbeating",
            ),
            ("cancelled", "cancelled by postgres"),
            ("retryable", "Telnyx request failed: error sending request"),
            ("requeued", "requeued by postgres"),
            (
                "permanent",
                "storage rejected the service key (403): check SUPABASE_SERVICE_ROLE_KEY",
            ),
        ] {
            assert!(injected(classify(kind, error)), "{error}");
        }
        for (kind, error) in [
            ("permanent", "not found at Telnyx: recording r"),
            ("retryable", "stored object has 3 bytes, 2 went through"),
            ("retryable", "handler panicked: boom"),
            ("retryable", "database error: pool timed out"),
        ] {
            assert!(!injected(classify(kind, error)), "{error}");
        }
    }

    #[test]
    fn a_wait_for_call_initiated_is_planned_only_for_calls_that_send_one() {
        let label = classify(
            "retryable",
            "waiting until 2026-12-07T05:53:29Z for the call session's call.initiated (its SIP \
             header is the exact link) before matching by phone and time (pipeline.link_wait)",
        );
        assert_eq!(label, "waiting for call.initiated");
        assert!(!injected(label));
    }

    #[test]
    fn briefs_are_one_short_line() {
        assert_eq!(brief("a\n  b"), "a b");
        let long = "x".repeat(500);
        assert_eq!(brief(&long).chars().count(), 161);
    }

    #[test]
    fn every_job_a_killed_daemon_left_running_is_rescued_or_cancelled() {
        let at = Utc::now();
        let kill = |held: Option<Vec<i64>>| Kill {
            slot: 0,
            pid: 7,
            at,
            held,
        };
        let fate = |kind: &str, pid, secs| Fate {
            kind: kind.to_owned(),
            pid,
            at: Some(at + chrono::Duration::seconds(secs)),
        };
        let fates: HashMap<i64, Vec<Fate>> = HashMap::from([
            (1, vec![fate("lease_expired", Some(7), 6)]),
            (2, vec![fate("cancelled", None, 2)]),
            (3, vec![fate("lease_expired", Some(8), 6)]),
            (4, vec![fate("cancelled", None, -2)]),
        ]);
        // Idle kills owe nothing; rescued and cancelled jobs are accounted.
        assert!(missing_rescues(&[kill(Some(vec![]))], &fates, 0).is_empty());
        assert!(missing_rescues(&[kill(Some(vec![1, 2]))], &fates, 1).is_empty());
        // Another daemon's rescue, or a cancel before the kill, is not this one's.
        assert_eq!(
            missing_rescues(&[kill(Some(vec![3, 4, 5]))], &fates, 1).len(),
            3
        );
        // An uncounted kill owes some rescue in the run.
        assert_eq!(missing_rescues(&[kill(None)], &fates, 0).len(), 1);
        assert!(missing_rescues(&[kill(None)], &fates, 1).is_empty());
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&[], 0.5), 0.0);
    }
}
