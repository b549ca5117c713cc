//! What the demo tells a person: one line for each change of each job, as
//! it happens, and a table at the end.
//!
//! The lines come from the database, not from the daemon's logs: a trigger
//! (in the demo's own database only) sends every new version of a job row
//! with `pg_notify`, so no step is missed between two looks, even a retry
//! that goes running → pending → running within milliseconds.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::say;

pub const CHANNEL: &str = "recording_relay_demo_story";

/// Installed after the migrations, in the demo's database only; production
/// schemas never have it.
const TRIGGER_SQL: &str = r#"
CREATE FUNCTION public.recording_relay_demo_story() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('recording_relay_demo_story', json_build_object(
        'id', NEW.id,
        'event_id', NEW.event_id,
        'state', NEW.state,
        'attempts', NEW.attempts,
        'recording_id', NEW.recording_id,
        'duration_millis', NEW.duration_millis,
        'resolved', NEW.resolved_at IS NOT NULL,
        'intake_id', NEW.intake_id,
        'match_method', NEW.match_method,
        'object_path', NEW.object_path,
        'object_size', NEW.object_size,
        'object_sha256', NEW.object_sha256,
        'stored', NEW.stored_at IS NOT NULL,
        'linked', NEW.linked_at IS NOT NULL,
        'deleted', NEW.telnyx_deleted_at IS NOT NULL,
        'last_error', left(NEW.last_error, 300),
        'retry_in', greatest(0, extract(epoch FROM NEW.next_run_at - now()))::numeric(10, 1)
    )::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER recording_relay_demo_story
    AFTER INSERT OR UPDATE ON recording_relay.recording_jobs
    FOR EACH ROW EXECUTE FUNCTION public.recording_relay_demo_story();
"#;

pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(TRIGGER_SQL).execute(pool).await?;
    Ok(())
}

/// One version of a job row, as the trigger sends it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Snapshot {
    pub id: i64,
    pub event_id: String,
    pub state: String,
    pub attempts: i32,
    pub recording_id: Option<String>,
    pub duration_millis: Option<i64>,
    pub resolved: bool,
    pub intake_id: Option<Uuid>,
    pub match_method: Option<String>,
    pub object_path: Option<String>,
    pub object_size: Option<i64>,
    pub object_sha256: Option<String>,
    pub stored: bool,
    pub linked: bool,
    pub deleted: bool,
    pub last_error: Option<String>,
    pub retry_in: Option<f64>,
}

/// The lines worth telling between two versions of one job (`None`: it is new).
pub fn changes(before: Option<&Snapshot>, now: &Snapshot) -> Vec<String> {
    let Some(before) = before else {
        return vec![format!(
            "job {} queued: the webhook is committed, Telnyx has its 200",
            now.id
        )];
    };
    let mut lines = Vec::new();
    if now.resolved && !before.resolved {
        lines.push(format!(
            "Recordings API: recording {}, {}",
            now.recording_id.as_deref().unwrap_or("?"),
            now.duration_millis
                .map_or("duration unknown".to_owned(), |ms| format!(
                    "{} long",
                    super::m_ss(ms / 1000)
                ))
        ));
    }
    if now.intake_id.is_some() && now.intake_id != before.intake_id {
        lines.push(format!(
            "matched intake {} by {}",
            short(now.intake_id),
            match now.match_method.as_deref() {
                Some("phone_and_time") => "phone number and call time",
                Some("client_state") => "the call's client_state",
                Some("call_initiated" | "intake_header" | "sip_header") => {
                    "the X-Intake-Id of its call.initiated"
                }
                Some(other) => other,
                None => "?",
            }
        ));
    }
    if now.stored && !before.stored {
        lines.push(format!(
            "stored as {} ({:.1} MB, SHA-256 {}…)",
            now.object_path.as_deref().unwrap_or("?"),
            now.object_size.unwrap_or(0) as f64 / 1e6,
            now.object_sha256
                .as_deref()
                .map_or("?", |s| &s[..s.len().min(12)])
        ));
    }
    if now.linked && !before.linked {
        lines.push(format!("linked on intake {}", short(now.intake_id)));
    }
    if now.deleted && !before.deleted {
        lines.push("deleted at Telnyx (stored, verified and linked first)".to_owned());
    }
    if now.state != before.state || now.attempts != before.attempts {
        lines.push(match now.state.as_str() {
            "running" => format!("claimed by a worker, attempt {}", now.attempts),
            "pending" => format!(
                "back in the queue, retry in {:.1} s: {}",
                now.retry_in.unwrap_or(0.0),
                now.last_error.as_deref().unwrap_or("released")
            ),
            "succeeded" => "succeeded".to_owned(),
            "unmatched" => format!(
                "unmatched: kept for an operator ({})",
                now.last_error.as_deref().unwrap_or("no intake")
            ),
            other => format!(
                "{other}: {}",
                now.last_error.as_deref().unwrap_or("no error recorded")
            ),
        });
    }
    lines
}

fn short(id: Option<Uuid>) -> String {
    id.map_or("?".to_owned(), |id| id.simple().to_string()[..8].to_owned())
}

/// Whether a job has ended (its last line is told).
fn finished(state: &str) -> bool {
    !matches!(state, "pending" | "running")
}

/// Listens before the first webhook is sent and prints until `stop`. The
/// receiver counts jobs whose final line is printed, so the table comes
/// after the story, not in the middle of it.
pub async fn listen(
    pool: &PgPool,
    labels: HashMap<String, String>,
    stop: CancellationToken,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, watch::Receiver<usize>)> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    let started = Instant::now();
    let (finished_tx, finished_rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        let mut seen: HashMap<i64, Snapshot> = HashMap::new();
        loop {
            let note = tokio::select! {
                _ = stop.cancelled() => return,
                note = listener.recv() => note,
            };
            let Ok(note) = note else {
                say("lost the story's connection; the table below still tells the end");
                return;
            };
            let Ok(now) = serde_json::from_str::<Snapshot>(note.payload()) else {
                continue;
            };
            let label = labels
                .get(&now.event_id)
                .map_or(now.event_id.as_str(), String::as_str);
            for line in changes(seen.get(&now.id), &now) {
                println!(
                    "{:>6.2}s  {label:<7}  {line}",
                    started.elapsed().as_secs_f64()
                );
            }
            seen.insert(now.id, now);
            finished_tx.send_replace(seen.values().filter(|s| finished(&s.state)).count());
        }
    });
    Ok((task, finished_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Snapshot {
        Snapshot {
            id: 7,
            event_id: "ev".into(),
            state: "pending".into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn each_change_is_one_line_and_heartbeats_are_none() {
        let queued = job();
        assert_eq!(changes(None, &queued).len(), 1);
        let running = Snapshot {
            state: "running".into(),
            attempts: 1,
            ..queued.clone()
        };
        assert_eq!(
            changes(Some(&queued), &running),
            ["claimed by a worker, attempt 1"]
        );
        // A heartbeat rewrites the row without changing what we tell.
        assert!(changes(Some(&running), &running.clone()).is_empty());
        let matched = Snapshot {
            resolved: true,
            recording_id: Some("rec-1".into()),
            duration_millis: Some(180_000),
            intake_id: Some(Uuid::nil()),
            match_method: Some("phone_and_time".into()),
            ..running.clone()
        };
        assert_eq!(
            changes(Some(&running), &matched),
            [
                "Recordings API: recording rec-1, 3:00 long",
                "matched intake 00000000 by phone number and call time"
            ]
        );
        let retry = Snapshot {
            state: "pending".into(),
            last_error: Some("storage answered 503".into()),
            retry_in: Some(1.5),
            ..matched.clone()
        };
        assert_eq!(
            changes(Some(&matched), &retry),
            ["back in the queue, retry in 1.5 s: storage answered 503"]
        );
    }
}
