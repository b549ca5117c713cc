//! `recording-relay jobs`: list, show, requeue, cancel and attach jobs, and
//! how a job is shown (phone numbers masked).

use clap::Subcommand;

use crate::jobs::{Job, JobState, Queue};
use crate::telemetry::mask_phone;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Newest jobs first.
    List {
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job with its error history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Make a failed, cancelled or unmatched job, or a pending one waiting
    /// in backoff, runnable now with fresh attempts (an unmatched one is
    /// matched again); --all-failed: every failed job.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all_failed"])))]
    Requeue {
        /// The job's id.
        id: Option<i64>,
        /// Requeue every failed job instead.
        #[arg(long)]
        all_failed: bool,
    },
    /// Stop a job.
    Cancel { id: i64 },
    /// Attach an unmatched recording to an intake and link it.
    Attach { id: i64, intake: uuid::Uuid },
}

fn parse_state(s: &str) -> Result<JobState, String> {
    JobState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown state {s:?}; one of {}", names.join(", "))
        })
}

pub(super) async fn run_jobs(queue: &Queue, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { state, limit, json } => {
            let jobs = queue.list(state, limit).await?;
            if json {
                let views: Vec<_> = jobs.iter().map(JobView::from).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_job_table(&jobs);
            }
        }
        JobsCommand::Show { id, json } => {
            let job = queue
                .get(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("job {id} not found"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&JobView::from(&job))?);
            } else {
                print_job(&job);
            }
        }
        JobsCommand::Requeue { id: Some(id), .. } => {
            queue.requeue(id).await?;
            println!("job {id} requeued");
        }
        JobsCommand::Requeue { id: None, .. } => {
            let n = queue.requeue_failed().await?;
            println!("{n} failed job(s) requeued");
        }
        JobsCommand::Cancel { id } => {
            queue.cancel(id).await?;
            println!("job {id} cancelled");
        }
        JobsCommand::Attach { id, intake } => {
            queue.attach(id, intake).await?;
            println!("job {id} attached to intake {intake}; a worker links it now");
        }
    }
    Ok(())
}

/// A job as the CLI shows it: phone numbers masked (the full ones are in
/// the table for whoever has SQL access).
#[derive(serde::Serialize)]
struct JobView<'a> {
    id: i64,
    event_id: &'a str,
    state: JobState,
    attempts: i32,
    max_attempts: i32,
    recording_id: Option<&'a str>,
    call_session_id: Option<&'a str>,
    intake_id: Option<uuid::Uuid>,
    match_method: Option<&'a str>,
    from: Option<String>,
    to: Option<String>,
    duration_millis: Option<i64>,
    object_path: Option<&'a str>,
    object_size: Option<i64>,
    object_sha256: Option<&'a str>,
    next_run_at: chrono::DateTime<chrono::Utc>,
    locked_by: Option<&'a str>,
    locked_until: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<&'a str>,
    errors: &'a serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl<'a> From<&'a Job> for JobView<'a> {
    fn from(j: &'a Job) -> Self {
        Self {
            id: j.id,
            event_id: &j.event_id,
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            recording_id: j.recording_id.as_deref(),
            call_session_id: j.call.call_session_id.as_deref(),
            intake_id: j.intake_id,
            match_method: j.match_method.as_deref(),
            from: j.call.from_number.as_deref().map(mask_phone),
            to: j.call.to_number.as_deref().map(mask_phone),
            duration_millis: j.call.duration_millis,
            object_path: j.object_path.as_deref(),
            object_size: j.object_size,
            object_sha256: j.object_sha256.as_deref(),
            next_run_at: j.next_run_at,
            locked_by: j.locked_by.as_deref(),
            locked_until: j.locked_until,
            last_error: j.last_error.as_deref(),
            errors: &j.errors,
            created_at: j.created_at,
            finished_at: j.finished_at,
        }
    }
}

fn print_job_table(jobs: &[Job]) {
    println!(
        "{:>8}  {:<10}  {:>5}  {:<38}  {:<20}  LAST ERROR",
        "ID", "STATE", "TRIES", "RECORDING", "UPDATED"
    );
    for j in jobs {
        let error: String = j
            .last_error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        println!(
            "{:>8}  {:<10}  {:>2}/{:<2}  {:<38}  {:<20}  {error}",
            j.id,
            j.state.as_str(),
            j.attempts,
            j.max_attempts,
            j.recording_id.as_deref().unwrap_or("-"),
            j.updated_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
}

fn print_job(j: &Job) {
    for (k, v) in job_rows(j) {
        println!("{k:>14}: {v}");
    }
}

/// `jobs show`: every row says something, also for a job that has not got
/// that far (no object, no numbers, no lease, no failed attempt).
fn job_rows(j: &Job) -> Vec<(&'static str, String)> {
    let v = JobView::from(j);
    let opt = |o: Option<&str>| o.unwrap_or("-").to_owned();
    let stored = j.object_path.is_some();
    let mut rows = vec![
        ("id", j.id.to_string()),
        ("event", j.event_id.clone()),
        ("state", j.state.as_str().to_owned()),
        ("attempts", format!("{}/{}", j.attempts, j.max_attempts)),
        ("recording", opt(j.recording_id.as_deref())),
        ("call session", opt(j.call.call_session_id.as_deref())),
        (
            "intake",
            j.intake_id.map_or("-".to_owned(), |i| i.to_string()),
        ),
        ("matched by", opt(j.match_method.as_deref())),
        (
            "from / to",
            match (v.from, v.to) {
                (None, None) => "- / - (not known yet: the Recordings API tells them)".to_owned(),
                (from, to) => format!(
                    "{} / {}",
                    from.as_deref().unwrap_or("-"),
                    to.as_deref().unwrap_or("-")
                ),
            },
        ),
        (
            "object",
            j.object_path
                .clone()
                .unwrap_or_else(|| "- (not stored yet)".to_owned()),
        ),
        // Where an attached recording was before its move into the
        // intake's folder; "(not deleted)" once linked without the
        // delete: an orphan when the job has finished.
        (
            "moved from",
            match (&j.moved_from, j.moved_from_deleted_at, j.linked_at) {
                (None, _, _) => "-".to_owned(),
                (Some(from), Some(_), _) => format!("{from} (deleted)"),
                (Some(from), None, Some(_)) => format!("{from} (not deleted)"),
                (Some(from), None, None) => from.clone(),
            },
        ),
        (
            "size / sha256",
            match (stored, j.object_size) {
                (false, _) => "-".to_owned(),
                (true, size) => format!(
                    "{} / {}",
                    size.map_or("-".to_owned(), |s| s.to_string()),
                    opt(j.object_sha256.as_deref())
                ),
            },
        ),
        ("next run", j.next_run_at.to_rfc3339()),
        (
            "lease",
            match (j.locked_by.as_deref(), j.locked_until) {
                (Some(by), Some(until)) => format!("{by} until {}", until.to_rfc3339()),
                (Some(by), None) => by.to_owned(),
                (None, _) => "- (no worker holds it)".to_owned(),
            },
        ),
        ("last error", opt(j.last_error.as_deref())),
    ];
    let history: Vec<String> = j
        .errors
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "\n    {}  attempt {}  {:<13} {}",
                e["at"].as_str().unwrap_or("-"),
                e["attempt"].as_i64().map_or("-".into(), |a| a.to_string()),
                e["kind"].as_str().unwrap_or("-"),
                e["error"].as_str().unwrap_or("-")
            )
        })
        .collect();
    rows.push((
        "history",
        if history.is_empty() {
            "- (no failed attempt)".to_owned()
        } else {
            history.concat()
        },
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallFacts;
    use crate::jobs::NewJob;
    use crate::jobs::queue::Enqueued;
    use sqlx::PgPool;

    /// A job just received: no recording, numbers, object or lease yet.
    #[sqlx::test(migrations = false)]
    async fn jobs_show_says_what_a_new_job_does_not_have_yet(pool: PgPool) {
        let queue = Queue::new(crate::testing::prepare(pool).await);
        let Enqueued::Inserted(id) = queue
            .enqueue(&NewJob {
                event_id: "ev-show".to_owned(),
                event_type: "call.recording.saved".to_owned(),
                event: serde_json::json!({"data": {"id": "ev-show"}}),
                call: CallFacts {
                    call_session_id: Some("session-show".to_owned()),
                    ..CallFacts::default()
                },
                max_attempts: 3,
                ..NewJob::default()
            })
            .await
            .unwrap()
        else {
            panic!("a new event is inserted");
        };
        let job = queue.get(id).await.unwrap().unwrap();
        let rows = job_rows(&job);
        for (name, value) in &rows {
            assert!(
                !value.trim().is_empty() && !value.starts_with(" /") && !value.ends_with("/ "),
                "{name} is blank: {rows:#?}"
            );
        }
        let row = |name: &str| &rows.iter().find(|(k, _)| *k == name).unwrap().1;
        assert_eq!(row("object"), "- (not stored yet)");
        assert_eq!(row("size / sha256"), "-");
        assert_eq!(row("lease"), "- (no worker holds it)");
        assert_eq!(row("history"), "- (no failed attempt)");
        assert!(
            row("from / to").starts_with("- / - (not known yet"),
            "{rows:#?}"
        );
        assert_eq!(row("call session"), "session-show");
    }
}
