//! Conformance suite: the daemon and its storage client against Supabase's
//! real storage server (storage-api), not our simulator. See `support` for
//! where the server comes from and when the suite is skipped.

mod support;

use std::time::{Duration, Instant};

use recording_relay::jobs::JobState;
use recording_relay::sim::{SimAudio, SimRecording};
use uuid::Uuid;

use crate::support::{Suite, bucket_name, stored_sha256, suite, telnyx};

const MIB: u64 = 1024 * 1024;

/// A job that hangs on a dead pooled connection takes 30-60 s; one that
/// does not finishes in a second or two.
const PROMPTLY: Duration = Duration::from_secs(20);

fn recording(id: &str, len: u64) -> SimRecording {
    let mut rec = SimRecording::sample(format!("{id}-{}", Uuid::new_v4().simple()));
    rec.content = SimAudio::generated(len, len ^ 0x5eed);
    rec
}

/// The bucket `setup-bucket` makes, under a name of the test's own.
async fn audio_bucket(s: &Suite, tag: &str) -> String {
    let bucket = bucket_name(tag);
    let config = s.config(&bucket, &telnyx());
    recording_relay::cli::setup_bucket(&config).await.unwrap();
    bucket
}

#[tokio::test]
async fn setup_bucket_creates_a_private_audio_bucket_and_check_passes() {
    let Some(s) = suite().await else { return };
    let bucket = bucket_name("setup");
    let config = s.config(&bucket, &telnyx());
    recording_relay::cli::setup_bucket(&config).await.unwrap();
    // Again: finds it and leaves it alone.
    recording_relay::cli::setup_bucket(&config).await.unwrap();
    let got = s
        .storage(&bucket)
        .get_bucket(&bucket)
        .await
        .unwrap()
        .unwrap();
    assert!(!got.public);
    assert_eq!(got.file_size_limit, Some(50 * MIB));
    let mut mimes = got.allowed_mime_types.unwrap();
    mimes.sort();
    assert_eq!(mimes, ["audio/mpeg", "audio/wav", "audio/x-wav"]);
    let checks = recording_relay::check::run(&config).await;
    let storage = checks.iter().find(|c| c.name == "storage").unwrap();
    assert!(storage.ok, "{storage:?}");
    let missing = s.config(&bucket_name("absent"), &telnyx());
    let checks = recording_relay::check::run(&missing).await;
    let storage = checks.iter().find(|c| c.name == "storage").unwrap();
    assert!(
        !storage.ok && storage.detail.contains("not found"),
        "{storage:?}"
    );
}

/// Relays `rec` through a fresh daemon and returns the final job.
async fn relay_one(
    s: &Suite,
    bucket: &str,
    rec: &SimRecording,
    prepare: impl AsyncFnOnce(&recording_relay::storage::StorageClient, &str),
) -> recording_relay::jobs::Job {
    let telnyx = telnyx();
    telnyx.add_recording(rec.clone());
    let intake = s.intake_for(rec, None).await;
    let path = format!("intakes/{intake}/{}.wav", rec.id);
    prepare(&s.storage(bucket), &path).await;
    let relay = s.relay(s.config(bucket, &telnyx), telnyx).await;
    relay.post(&format!("ev-{}", rec.id), rec).await;
    let job = relay.finished(&format!("ev-{}", rec.id), PROMPTLY).await;
    relay.stop().await;
    assert_eq!(job.intake_id, Some(intake));
    assert_eq!(job.object_path.as_deref(), Some(path.as_str()));
    job
}

async fn assert_stored(
    s: &Suite,
    bucket: &str,
    job: &recording_relay::jobs::Job,
    rec: &SimRecording,
) {
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(
        job.object_sha256.as_deref(),
        Some(rec.content.sha256_hex().as_str())
    );
    let path = job.object_path.as_deref().unwrap();
    assert_eq!(
        stored_sha256(&s.storage(bucket), path).await,
        rec.content.sha256_hex(),
        "the bucket holds the recording's bytes"
    );
    let linked: Option<String> =
        sqlx::query_scalar("SELECT recording_object_path FROM intakes WHERE id = $1")
            .bind(job.intake_id.unwrap())
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(linked.as_deref(), Some(path));
}

#[tokio::test]
async fn a_2_mb_recording_goes_up_in_one_post() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "post").await;
    let rec = recording("post", 2 * MIB);
    let job = relay_one(&s, &bucket, &rec, async |_, _| {}).await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!(job.attempts, 1);
}

#[tokio::test]
async fn a_20_mb_recording_goes_up_in_6_mib_tus_chunks() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "tus").await;
    let rec = recording("tus", 20 * MIB);
    let job = relay_one(&s, &bucket, &rec, async |_, _| {}).await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!(job.attempts, 1, "{:?}", job.last_error);
}

/// The object is already at the daemon's path (an earlier attempt stored
/// it unobserved): the server refuses the POST before reading its body and
/// keeps the connection open with the body unread. The daemon must adopt
/// the object at once, not hang on that connection.
#[tokio::test]
async fn a_duplicate_post_is_adopted_at_once() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "dup-post").await;
    let rec = recording("dup-post", 2 * MIB);
    let bytes = rec.content.to_vec();
    let started = Instant::now();
    let job = relay_one(&s, &bucket, &rec, async |storage, path| {
        storage
            .upload(path, "audio/wav", bytes.into(), None)
            .await
            .unwrap();
    })
    .await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!(
        (job.attempts, job.last_error.as_deref()),
        (1, None),
        "adopted in the first attempt, in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_duplicate_tus_upload_is_adopted_at_once() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "dup-tus").await;
    let rec = recording("dup-tus", 7 * MIB);
    let bytes = rec.content.to_vec();
    let job = relay_one(&s, &bucket, &rec, async |storage, path| {
        storage
            .upload(path, "audio/wav", bytes.into(), None)
            .await
            .unwrap();
    })
    .await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!((job.attempts, job.last_error.as_deref()), (1, None));
}
