//! Catching missed webhooks: list the recordings Telnyx made in a window and
//! enqueue every one no job knows about. Idempotent, so a timer can run it
//! as often as it likes.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::jobs::{Enqueued, NewJob, Queue, QueueError};
use crate::providers::telnyx_api::{Recording, TelnyxClient, TelnyxError};

const PAGE_SIZE: u32 = 250;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Telnyx(#[from] TelnyxError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Recordings Telnyx listed in the window.
    pub listed: usize,
    /// Recordings a job already covers.
    pub known: usize,
    /// Recording ids enqueued now.
    pub enqueued: Vec<String>,
    /// Listed records that could not be read (no id, not an object): the
    /// rest of their page is still reconciled.
    pub(crate) unreadable: usize,
    /// The targeted look-up of announced calls whose recording is overdue
    /// (`ops::missing`), which `recording-relay reconcile` runs after the
    /// listing.
    pub overdue_calls: super::missing::Report,
}

pub async fn reconcile(
    queue: &Queue,
    telnyx: &TelnyxClient,
    since: Duration,
    max_attempts: i32,
) -> Result<Report, ReconcileError> {
    let from = Utc::now() - chrono::Duration::from_std(since).unwrap_or(chrono::Duration::days(1));
    let filters = [(
        "filter[created_at][gte]",
        from.to_rfc3339_opts(SecondsFormat::Secs, true),
    )];
    let mut report = Report::default();
    let mut page_number = 1;
    loop {
        let page = telnyx
            .list_recordings(&filters, page_number, PAGE_SIZE)
            .await?;
        let count = page.data.len() + page.skipped;
        if page.skipped > 0 {
            warn!(
                page = page_number,
                skipped = page.skipped,
                "Telnyx listed records without a usable id; skipped them"
            );
            report.unreadable += page.skipped;
        }
        for recording in page.data {
            report.listed += 1;
            if queue
                .has_job_for_recording(&recording.id, recording.call.call_session_id.as_deref())
                .await?
            {
                report.known += 1;
                continue;
            }
            match queue.enqueue(&job_for(&recording, max_attempts)).await? {
                Enqueued::Inserted(id) => {
                    info!(job.id = id, recording.id = %recording.id, "enqueued a recording whose webhook never arrived");
                    report.enqueued.push(recording.id);
                }
                // A webhook or another reconcile run got there in between.
                Enqueued::Duplicate => report.known += 1,
            }
        }
        let last = page
            .meta
            .total_pages
            .is_none_or(|total| page_number >= total);
        if count == 0 || last {
            return Ok(report);
        }
        page_number += 1;
    }
}

/// A job as if the webhook had arrived. The event id is derived from the
/// recording id, so running reconcile twice cannot enqueue twice.
pub(crate) fn job_for(r: &Recording, max_attempts: i32) -> NewJob {
    NewJob {
        event_id: format!("reconcile:{}", r.id),
        event_type: crate::webhook::event::RECORDING_SAVED.to_owned(),
        occurred_at: r.created_at,
        // No download URLs here: they are presigned and expire anyway.
        event: serde_json::json!({
            "source": "reconcile",
            "recording": {
                "id": r.id,
                "call_session_id": r.call.call_session_id,
                "call_control_id": r.call.call_control_id,
                "call_leg_id": r.call.call_leg_id,
                "connection_id": r.call.connection_id,
                "created_at": r.created_at,
                "recording_started_at": r.call.recording_started_at,
            }
        }),
        recording_id: Some(r.id.clone()),
        // All of it, the connection too: it is the tenant, without which
        // `pipeline.connection_organizations` could not scope the match of
        // a reconciled recording.
        call: r.call.clone(),
        max_attempts,
        ..NewJob::default()
    }
}
