//! Conformance suite: the daemon and its storage client against Supabase's
//! real storage server (storage-api), not our simulator. See `support` for
//! where the server comes from and when the suite is skipped.

mod support;
use recording_relay_test_kit as testing;

use std::time::{Duration, Instant};

use recording_relay::jobs::JobState;
use recording_relay::providers::storage_api::{Bucket, StorageClient, StorageError, TUS_CHUNK};
use recording_relay_sim::{Fault, SimAudio, SimRecording};
use uuid::Uuid;

use crate::support::{Suite, bucket_name, stored_sha256, suite, telnyx};

const MIB: u64 = 1024 * 1024;

/// A job that hangs on a dead pooled connection takes 30-60 s; one that
/// does not finishes in a second or two.
const PROMPTLY: Duration = Duration::from_secs(20);

fn recording(id: &str, len: u64) -> SimRecording {
    let mut rec = SimRecording::sample(format!("{id}-{}", Uuid::new_v4().simple()));
    rec.content = SimAudio::generated(len, len ^ 0x5eed);
    // A patient of its own: the tests share one database, and the daemon
    // rightly refuses to guess between patients sharing a number.
    rec.to = format!("+1555{:07}", fastrand::u32(..10_000_000));
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
    let checks =
        recording_relay::ops::check::run(&config, recording_relay::config::Role::Serve).await;
    let storage = checks.iter().find(|c| c.name == "storage").unwrap();
    assert!(storage.ok, "{storage:?}");
    let missing = s.config(&bucket_name("absent"), &telnyx());
    let checks =
        recording_relay::ops::check::run(&missing, recording_relay::config::Role::Serve).await;
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
    prepare: impl AsyncFnOnce(&StorageClient, &str),
) -> recording_relay::jobs::Job {
    let telnyx = telnyx();
    telnyx.add_recording(rec.clone());
    let intake = s.intake_for(rec, None).await;
    let path = format!("intakes/{intake}/{}.wav", rec.id);
    prepare(&s.storage(bucket), &path).await;
    let relay = s.relay(s.config(bucket, &telnyx), telnyx).await;
    relay.post(&format!("ev-{}", rec.id), rec).await;
    // A hang on a dead connection takes 30-60 s; 20 MB through TUS on a
    // loaded machine can take a while too, so it gets longer.
    let within = if rec.content.len() > 8 * MIB {
        Duration::from_secs(90)
    } else {
        PROMPTLY
    };
    let job = relay.finished(&format!("ev-{}", rec.id), within).await;
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
        sqlx::query_scalar("SELECT recording_object_path FROM public.intakes WHERE id = $1")
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

/// Seen on this server: another object of the same size at the daemon's
/// path was adopted and linked. Its bytes must be compared, and the
/// recording must replace it.
#[tokio::test]
async fn a_different_object_of_the_same_size_is_replaced_not_adopted() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "foreign").await;
    let rec = recording("foreign", 2 * MIB);
    let foreign = SimAudio::generated(rec.content.len(), 42).to_vec();
    assert_ne!(foreign, rec.content.to_vec());
    let job = relay_one(&s, &bucket, &rec, async |storage, path| {
        storage
            .upload(path, "audio/wav", foreign.into(), None)
            .await
            .unwrap();
    })
    .await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!((job.attempts, job.last_error.as_deref()), (1, None));
}

/// Runs `f` and fails the test if it takes long enough to be the hang.
async fn promptly<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn bytes(len: u64) -> Vec<u8> {
    SimAudio::generated(len, 3).to_vec()
}

/// Every early refusal of an upload is read as what it is (not as a broken
/// connection), and the next request on the same client does not hang.
async fn refused(
    storage: &StorageClient,
    path: &str,
    content_type: &str,
    len: u64,
) -> StorageError {
    let err = promptly(
        "the refused upload",
        storage.upload(path, content_type, bytes(len).into(), Some(len)),
    )
    .await
    .expect_err("refused");
    // Answered at all (a bad key is refused again): what matters is that
    // it is not sent on the refused upload's connection and left hanging.
    let _ = promptly(
        "the request after a refused upload",
        storage.get_bucket(storage.bucket()),
    )
    .await;
    err
}

#[tokio::test]
async fn a_refused_mime_type_is_permanent_and_says_so() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "mime").await;
    let err = refused(&s.storage(&bucket), "x/a.txt", "text/plain", 2 * MIB).await;
    assert!(
        matches!(err, StorageError::MimeNotAllowed(_)) && !err.is_retryable(),
        "{err:?}"
    );
    // Through the daemon: the bucket takes mp3 only, the daemon stores wav.
    let mp3_only = bucket_name("mp3-only");
    s.storage(&mp3_only)
        .create_bucket(&Bucket {
            id: mp3_only.clone(),
            name: mp3_only.clone(),
            public: false,
            file_size_limit: None,
            allowed_mime_types: Some(vec!["audio/mpeg".into()]),
        })
        .await
        .unwrap();
    let rec = recording("mime", 2 * MIB);
    let telnyx = telnyx();
    telnyx.add_recording(rec.clone());
    s.intake_for(&rec, None).await;
    let relay = s.relay(s.config(&mp3_only, &telnyx), telnyx).await;
    relay.post("ev-mime", &rec).await;
    let job = relay.finished("ev-mime", PROMPTLY).await;
    relay.stop().await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts, 1, "permanent: not retried");
    let error = job.last_error.unwrap_or_default();
    assert!(error.contains("content type"), "{error}");
}

#[tokio::test]
async fn a_file_over_the_bucket_limit_is_too_large() {
    let Some(s) = suite().await else { return };
    let bucket = bucket_name("small");
    let storage = s.storage(&bucket);
    storage
        .create_bucket(&Bucket {
            id: bucket.clone(),
            name: bucket.clone(),
            public: false,
            file_size_limit: Some(MIB),
            allowed_mime_types: None,
        })
        .await
        .unwrap();
    let err = refused(&storage, "big.wav", "audio/wav", 2 * MIB).await;
    assert!(
        matches!(err, StorageError::TooLarge(_)) && !err.is_retryable(),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_bad_key_is_unauthorized() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "key").await;
    let mut config = s.config(&bucket, &telnyx());
    // Signed with another secret: what a rotated or mistyped key looks like.
    config.supabase.service_role_key = Some(
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.\
         3TKJpwz4pNd4WwTxbRS7AqcFh1Vl7HA1GTgspTmgE2s"
            .to_owned()
            .into(),
    );
    let storage = StorageClient::from_config(&config).unwrap();
    let err = refused(&storage, "a.wav", "audio/wav", 2 * MIB).await;
    assert!(matches!(err, StorageError::Unauthorized(_)), "{err:?}");
    assert!(
        err.to_string().contains("SUPABASE_SERVICE_ROLE_KEY"),
        "{err}"
    );
    let checks =
        recording_relay::ops::check::run(&config, recording_relay::config::Role::Serve).await;
    let check = checks.iter().find(|c| c.name == "storage").unwrap();
    assert!(!check.ok, "{check:?}");
}

#[tokio::test]
async fn a_missing_bucket_is_not_found() {
    let Some(s) = suite().await else { return };
    let bucket = bucket_name("missing");
    let storage = s.storage(&bucket);
    assert_eq!(storage.get_bucket(&bucket).await.unwrap(), None);
    let err = refused(&storage, "a.wav", "audio/wav", 2 * MIB).await;
    assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn a_signed_url_answers_range_with_206() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "range").await;
    let storage = s.storage(&bucket);
    let data = bytes(300_000);
    storage
        .upload("calls/a.wav", "audio/wav", data.clone().into(), None)
        .await
        .unwrap();
    let url = storage
        .signed_url("calls/a.wav", Duration::from_secs(60))
        .await
        .unwrap();
    let res = reqwest::Client::new()
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(
        res.headers()["content-range"].to_str().unwrap(),
        format!("bytes 1000-1999/{}", data.len())
    );
    assert_eq!(res.bytes().await.unwrap(), data[1000..2000]);
    // Without the token it is not public.
    let bare = url.split('?').next().unwrap();
    let res = reqwest::get(bare).await.unwrap();
    assert!(!res.status().is_success(), "{}", res.status());
}

/// An interrupted PATCH leaves the server at whatever byte it got to (not
/// a chunk boundary); the upload resumes from there and the object is
/// whole. Then the same through the daemon: the download dies mid-chunk,
/// the next attempt resumes.
#[tokio::test]
async fn tus_resumes_at_an_offset_that_is_not_a_chunk_boundary() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "resume").await;
    let storage = s.storage(&bucket);
    let total = 2 * TUS_CHUNK + 12_345;
    let data = bytes(total);
    let upload = storage
        .tus_create("calls/resumed.wav", "audio/wav", total)
        .await
        .unwrap();
    // The first chunk breaks off after 1.5 MiB + a little.
    let cut = 3 * MIB / 2 + 777;
    let partial = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&data[..cut as usize])),
        Err(std::io::Error::other("the source broke off")),
    ]);
    let err = storage
        .tus_patch(&upload, 0, reqwest::Body::wrap_stream(partial), TUS_CHUNK)
        .await
        .expect_err("the body broke off");
    assert!(err.is_retryable(), "{err:?}");
    let (offset, length) = promptly("HEAD", async {
        // The server may still be writing what it received.
        loop {
            let got = storage.tus_offset(&upload).await.unwrap().unwrap();
            if got.0 > 0 {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(length, Some(total));
    assert!(
        offset > 0 && offset <= cut && offset % TUS_CHUNK != 0,
        "offset {offset} after {cut} bytes"
    );
    let mut at = offset;
    while at < total {
        let len = TUS_CHUNK.min(total - at);
        let chunk = data[at as usize..(at + len) as usize].to_vec();
        at = storage
            .tus_patch(&upload, at, chunk.into(), len)
            .await
            .unwrap();
    }
    assert_eq!(
        stored_sha256(&storage, "calls/resumed.wav").await,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    );

    let rec = recording("resume", 20 * MIB);
    let telnyx = telnyx();
    telnyx.fail_next_downloads(
        1,
        Fault::ResetMidBody {
            after_bytes: 8 * MIB + 4321,
        },
    );
    telnyx.add_recording(rec.clone());
    s.intake_for(&rec, None).await;
    let relay = s.relay(s.config(&bucket, &telnyx), telnyx).await;
    relay.post("ev-resume", &rec).await;
    let job = relay.finished("ev-resume", Duration::from_secs(60)).await;
    relay.stop().await;
    assert_stored(&s, &bucket, &job, &rec).await;
    assert_eq!(job.attempts, 2, "{:?}", job.errors);
}

/// Direct reads with a user's own token write no audit row (issue #19): by
/// default the server refuses a signed-in user's own `createSignedUrl` and
/// download even of their organization's recording. With the DBA's opt-in
/// (`direct_storage_reads_allow`, unaudited) they read exactly what the
/// relay linked to their organization's intakes: not B's, not `unmatched/`.
#[tokio::test]
async fn a_users_own_signed_url_is_refused_by_default_and_the_opt_in_grants_only_linked_recordings()
{
    let Some(s) = suite().await else { return };
    let Some(secret) = s.server.jwt_secret.clone() else {
        eprintln!("!!!!! SKIPPING the RLS case: no JWT secret (STORAGE_TEST_JWT_SECRET)");
        return;
    };
    // The bucket the policy covers (migration 20261125000007).
    let bucket = "call-recordings";
    let storage = s.storage(bucket);
    if storage.get_bucket(bucket).await.unwrap().is_none() {
        recording_relay::cli::setup_bucket(&s.config(bucket, &telnyx()))
            .await
            .unwrap();
    }
    let refuse = "SELECT recording_relay.direct_storage_reads_refuse()";
    sqlx::query(refuse).execute(&s.pool).await.unwrap();
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut paths = Vec::new();
    for org in [org_a, org_b] {
        let rec = recording("rls", 1000);
        let intake = s.intake_for(&rec, Some(org)).await;
        let path = format!("intakes/{intake}/{}.wav", rec.id);
        storage
            .upload(&path, "audio/wav", bytes(1000).into(), None)
            .await
            .unwrap();
        // What the link step writes: the column and the relay's record.
        sqlx::query(
            "UPDATE public.intakes SET recording_id = $2, recording_object_path = $3 WHERE id = $1",
        )
        .bind(intake)
        .bind(&rec.id)
        .bind(&path)
        .execute(&s.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path)
             VALUES ($1, $2, $3)",
        )
        .bind(intake)
        .bind(&rec.id)
        .bind(&path)
        .execute(&s.pool)
        .await
        .unwrap();
        paths.push(path);
    }
    // An intake of A pointed by hand at an unmatched recording.
    let stray = recording("rls-stray", 1000);
    let unmatched = format!("unmatched/{}.wav", stray.id);
    storage
        .upload(&unmatched, "audio/wav", bytes(1000).into(), None)
        .await
        .unwrap();
    let pointing = s.intake_for(&stray, Some(org_a)).await;
    sqlx::query("UPDATE public.intakes SET recording_object_path = $2 WHERE id = $1")
        .bind(pointing)
        .bind(&unmatched)
        .execute(&s.pool)
        .await
        .unwrap();
    let user_of_a = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({
            "sub": Uuid::new_v4(),
            "role": "authenticated",
            "aud": "authenticated",
            "exp": crate::testing::unix_now() + 600,
            "app_metadata": { "organization_id": org_a },
        }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let read = async |path: &str| {
        let res = client
            .get(format!(
                "{}/storage/v1/object/authenticated/{bucket}/{path}",
                s.server.url
            ))
            .bearer_auth(&user_of_a)
            .send()
            .await
            .unwrap();
        (res.status(), res.text().await.unwrap_or_default())
    };
    // supabase-js `createSignedUrl` with the user's session.
    let sign = async |path: &str| {
        let res = client
            .post(format!(
                "{}/storage/v1/object/sign/{bucket}/{path}",
                s.server.url
            ))
            .bearer_auth(&user_of_a)
            .json(&serde_json::json!({ "expiresIn": 60 }))
            .send()
            .await
            .unwrap();
        (res.status(), res.text().await.unwrap_or_default())
    };

    let (status, body) = sign(&paths[0]).await;
    assert!(
        !status.is_success(),
        "by default A signs nothing, not even A's own: {body}"
    );
    let (status, body) = read(&paths[0]).await;
    assert!(
        !status.is_success(),
        "by default A downloads nothing: {body}"
    );

    sqlx::query("SELECT recording_relay.direct_storage_reads_allow()")
        .execute(&s.pool)
        .await
        .unwrap();
    let (status, body) = read(&paths[0]).await;
    assert_eq!(status, 200, "with the opt-in A reads A's recording: {body}");
    let (status, body) = sign(&paths[0]).await;
    assert_eq!(status, 200, "and signs it: {body}");
    for other in [&paths[1], &unmatched] {
        let (status, body) = read(other).await;
        assert!(!status.is_success(), "A must not read {other}");
        assert!(body.contains("not found"), "{body}");
        let (status, body) = sign(other).await;
        assert!(!status.is_success(), "A must not sign {other}: {body}");
    }
    sqlx::query(refuse).execute(&s.pool).await.unwrap();
}

/// The move of an attached recording rests on these answers of the real
/// `POST /object/copy`: the copy has the source's bytes and type and the
/// source stays; without `x-upsert: true` an existing destination is a 409
/// and is left as it was; a missing source is a 404.
#[tokio::test]
async fn a_copy_keeps_the_source_and_refuses_a_missing_source_or_an_existing_destination() {
    let Some(s) = suite().await else { return };
    let bucket = audio_bucket(&s, "copy").await;
    let storage = s.storage(&bucket);
    let data = bytes(300_000);
    storage
        .upload("unmatched/r.wav", "audio/wav", data.clone().into(), None)
        .await
        .unwrap();

    storage
        .copy_object("unmatched/r.wav", "intakes/i/r.wav")
        .await
        .unwrap();
    let read = |path: &'static str| {
        let storage = storage.clone();
        async move {
            storage
                .download(path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec()
        }
    };
    assert_eq!(read("intakes/i/r.wav").await, data);
    assert_eq!(read("unmatched/r.wav").await, data, "the source stays");
    let info = storage
        .object_info("intakes/i/r.wav")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (info.size, info.content_type.as_deref()),
        (300_000, Some("audio/wav"))
    );

    let other = bytes(1_000);
    storage
        .upload("unmatched/s.wav", "audio/wav", other.into(), None)
        .await
        .unwrap();
    let exists = storage
        .copy_object("unmatched/s.wav", "intakes/i/r.wav")
        .await
        .unwrap_err();
    assert!(matches!(exists, StorageError::Duplicate), "{exists:?}");
    assert_eq!(read("intakes/i/r.wav").await, data, "not overwritten");

    let missing = storage
        .copy_object("unmatched/none.wav", "intakes/j/none.wav")
        .await
        .unwrap_err();
    assert!(matches!(missing, StorageError::NotFound(_)), "{missing:?}");
    assert_eq!(
        storage.object_info("intakes/j/none.wav").await.unwrap(),
        None
    );
}
