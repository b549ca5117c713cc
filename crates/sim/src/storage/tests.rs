use super::*;
use crate::SimAudio;
use futures_util::StreamExt;
use reqwest::{Client, RequestBuilder, StatusCode};

const KEY: &str = "service-key-test";
const BUCKET: &str = "call-recordings";
const CHUNK: usize = 6 * 1024 * 1024;

/// Serializes the tests that hold many MiB at once, so the RSS check in
/// `large_uploads_stream_to_disk` measures the upload, not its neighbours.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client() -> Client {
    // no_proxy: a proxy from the environment must not see loopback tests.
    // No pool: a refused upload's connection is left with its body
    // unread (see `a_refused_upload_leaves_its_connection_unread`).
    Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

fn start_with(cfg: StorageSimConfig) -> StorageSim {
    let sim = StorageSim::start(StorageSimConfig {
        service_key: KEY.to_owned(),
        ..cfg
    })
    .expect("start");
    assert!(sim.create_bucket(BUCKET, false, None, Some(vec!["audio/*".to_owned()])));
    sim
}

fn start() -> StorageSim {
    start_with(StorageSimConfig::default())
}

fn url(sim: &StorageSim, path: &str) -> String {
    format!("{}/storage/v1{path}", sim.base_url())
}

fn authed(rb: RequestBuilder) -> RequestBuilder {
    rb.bearer_auth(KEY).header("apikey", KEY)
}

async fn status_json(rb: RequestBuilder) -> (StatusCode, Value) {
    let resp = rb.send().await.expect("send");
    let status = resp.status();
    let text = resp.text().await.expect("text");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts storage-api's error convention: HTTP 400 (500 stays 500)
/// and the real code in the body.
fn assert_storage_error(got: &(StatusCode, Value), code: &str, error: &str, message: &str) {
    let (status, body) = got;
    let http = if code == "500" { 500 } else { 400 };
    assert_eq!(status.as_u16(), http, "{body}");
    assert_eq!(body["statusCode"], code, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(body["message"], message, "{body}");
}

async fn put_object(
    c: &Client,
    sim: &StorageSim,
    name: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    status_json(
        authed(c.post(url(sim, &format!("/object/{BUCKET}/{name}"))))
            .header("content-type", "audio/wav")
            .header("x-upsert", "false")
            .body(body),
    )
    .await
}

/// A scratch directory removed on drop, even when the test fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("storage-sim-{tag}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

#[tokio::test]
async fn buckets_create_get_and_errors() {
    let sim = start();
    let c = client();
    let body = json!({"id": "recs", "name": "recs", "public": false, "file_size_limit": 1000, "allowed_mime_types": ["audio/wav", "audio/mpeg"]});
    let (status, created) = status_json(authed(c.post(url(&sim, "/bucket"))).json(&body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(created, json!({"name": "recs"}));

    let dup = status_json(authed(c.post(url(&sim, "/bucket"))).json(&body)).await;
    assert_storage_error(&dup, "409", "Duplicate", "The resource already exists");

    let (status, got) = status_json(authed(c.get(url(&sim, "/bucket/recs")))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["id"], "recs");
    assert_eq!(got["name"], "recs");
    assert_eq!(got["public"], false);
    assert_eq!(got["file_size_limit"], 1000);
    assert_eq!(
        got["allowed_mime_types"],
        json!(["audio/wav", "audio/mpeg"])
    );
    assert!(got["created_at"].is_string() && got["updated_at"].is_string());
    let info = sim.bucket("recs").expect("bucket");
    assert_eq!(info.file_size_limit, Some(1000));

    let missing = status_json(authed(c.get(url(&sim, "/bucket/nope")))).await;
    assert_storage_error(&missing, "404", "Bucket not found", "Bucket not found");
    assert_eq!(missing.1["code"], "NoSuchBucket");

    let (status, body) =
        status_json(authed(c.post(url(&sim, "/bucket"))).json(&json!({"public": true}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["statusCode"], "400");
    let (status, _) = status_json(
        authed(c.post(url(&sim, "/bucket")))
            .json(&json!({"name": "sized", "file_size_limit": "2MB"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sim.bucket("sized").and_then(|b| b.file_size_limit),
        Some(2 * MIB)
    );
    assert!(
        !sim.create_bucket("recs", true, None, None),
        "already exists"
    );
}

#[tokio::test]
async fn bad_keys_answer_400_with_a_403_body() {
    let sim = start();
    let c = client();
    let target = url(&sim, "/bucket/call-recordings");
    let wrong = status_json(c.get(&target).bearer_auth("nope").header("apikey", KEY)).await;
    assert_storage_error(&wrong, "403", "Unauthorized", "invalid signature");
    let no_auth = status_json(c.get(&target).header("apikey", KEY)).await;
    assert_storage_error(&no_auth, "403", "Unauthorized", "jwt must be provided");
    let no_apikey = status_json(c.get(&target).bearer_auth(KEY)).await;
    assert_storage_error(
        &no_apikey,
        "403",
        "Unauthorized",
        "No API key found in request",
    );
    let bad_apikey = status_json(c.get(&target).bearer_auth(KEY).header("apikey", "x")).await;
    assert_storage_error(&bad_apikey, "403", "Unauthorized", "Invalid API key");
    // An upload with a bad key is refused and nothing is stored.
    let up = status_json(
        c.post(url(&sim, "/object/call-recordings/a.wav"))
            .bearer_auth("nope")
            .header("apikey", KEY)
            .body(vec![0u8; 100_000]),
    )
    .await;
    assert_storage_error(&up, "403", "Unauthorized", "invalid signature");
    assert!(sim.list_objects(BUCKET).is_empty());
    let (status, body) = status_json(authed(c.get(url(&sim, "/nothing/here")))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "Not Found");
}

#[tokio::test]
async fn upload_info_download_and_delete() {
    let sim = start();
    let c = client();
    let content = SimAudio::generated(300_000, 1).to_vec();
    let name = "org 1/2024/call #1.wav";
    let path = format!("/object/{BUCKET}/{}", percent_encode(name, true));
    let (status, body) = status_json(
        authed(c.post(url(&sim, &path)))
            .header("content-type", "audio/wav")
            .header("cache-control", "max-age=3600")
            .header("x-upsert", "false")
            .body(content.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["Key"], format!("{BUCKET}/{name}"));
    let id = body["Id"].as_str().expect("Id").to_owned();
    assert!(Uuid::parse_str(&id).is_ok());

    let stored = sim.object(BUCKET, name).expect("stored");
    assert_eq!(stored.size, 300_000);
    assert_eq!(stored.sha256_hex, hex::encode(Sha256::digest(&content)));
    assert_eq!(stored.content_type, "audio/wav");
    assert_eq!(stored.cache_control, "max-age=3600");
    assert_eq!(stored.upload_count, 1);
    assert_eq!(stored.id, id);
    assert_eq!(sim.object_bytes(BUCKET, name).expect("bytes"), content);
    assert_eq!(sim.list_objects(BUCKET), [name]);

    let info_path = format!("/object/info/{BUCKET}/{}", percent_encode(name, true));
    let (status, info) = status_json(authed(c.get(url(&sim, &info_path)))).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["id"], id);
    assert_eq!(info["name"], name);
    assert_eq!(info["bucket_id"], BUCKET);
    assert_eq!(info["size"], 300_000);
    assert_eq!(info["content_type"], "audio/wav");
    assert_eq!(info["cache_control"], "max-age=3600");
    assert!(info["etag"].as_str().is_some_and(|e| e.starts_with('"')));
    assert!(
        info["last_modified"].is_string()
            && info["created_at"].is_string()
            && info["version"].is_string()
    );
    let auth_info = format!(
        "/object/info/authenticated/{BUCKET}/{}",
        percent_encode(name, true)
    );
    assert_eq!(
        status_json(authed(c.get(url(&sim, &auth_info)))).await.1["size"],
        300_000
    );

    let dl = format!(
        "/object/authenticated/{BUCKET}/{}",
        percent_encode(name, true)
    );
    let resp = authed(c.get(url(&sim, &dl))).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    assert_eq!(resp.bytes().await.expect("bytes"), content);
    let resp = authed(c.get(url(&sim, &dl)))
        .header("range", "bytes=100-199")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-range"], "bytes 100-199/300000");
    assert_eq!(resp.bytes().await.expect("bytes"), &content[100..200]);
    let no_key = status_json(c.get(url(&sim, &dl))).await;
    assert_storage_error(&no_key, "403", "Unauthorized", "jwt must be provided");

    let (status, body) = status_json(authed(c.delete(url(&sim, &path)))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"message": "Successfully deleted"}));
    let gone = status_json(authed(c.get(url(&sim, &info_path)))).await;
    assert_storage_error(&gone, "404", "not_found", "Object not found");
    let again = status_json(authed(c.delete(url(&sim, &path)))).await;
    assert_storage_error(&again, "404", "not_found", "Object not found");
    assert!(sim.object(BUCKET, name).is_none());
    let other_bucket = status_json(authed(c.get(url(&sim, "/object/info/nope/x.wav")))).await;
    assert_storage_error(&other_bucket, "404", "Bucket not found", "Bucket not found");
}

/// As on the real server: the refusal comes back at once, but a client
/// that sends its next request on the same connection waits until the
/// body hold ends; a fresh connection is answered.
#[tokio::test]
async fn a_refused_upload_leaves_its_connection_unread() {
    let sim = start_with(StorageSimConfig {
        unread_body_hold: Duration::from_secs(5),
        ..StorageSimConfig::default()
    });
    let pooled = Client::builder().no_proxy().build().unwrap();
    let upload = || {
        authed(pooled.post(url(&sim, &format!("/object/{BUCKET}/a.wav"))))
            .header("content-type", "audio/wav")
            .body(vec![7u8; 64 * 1024])
    };
    assert_eq!(upload().send().await.unwrap().status(), 200);
    let (status, body) = status_json(upload()).await;
    assert_storage_error(
        &(status, body),
        "409",
        "Duplicate",
        "The resource already exists",
    );
    let info = || authed(pooled.get(url(&sim, &format!("/object/info/{BUCKET}/a.wav"))));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), info().send())
            .await
            .is_err(),
        "the next request on that connection waits"
    );
    let fresh = authed(client().get(url(&sim, &format!("/object/info/{BUCKET}/a.wav"))));
    assert_eq!(fresh.send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn upload_conflicts_mime_types_and_size_limits() {
    let sim = start();
    let c = client();
    assert_eq!(
        put_object(&c, &sim, "a.wav", vec![1; 10]).await.0,
        StatusCode::OK
    );
    let dup = put_object(&c, &sim, "a.wav", vec![2; 10]).await;
    assert_storage_error(&dup, "409", "Duplicate", "The resource already exists");
    assert_eq!(
        sim.object_bytes(BUCKET, "a.wav").expect("kept"),
        vec![1; 10]
    );

    let target = url(&sim, &format!("/object/{BUCKET}/a.wav"));
    let upsert = status_json(
        authed(c.post(&target))
            .header("content-type", "audio/wav")
            .header("x-upsert", "true")
            .body(vec![3; 10]),
    )
    .await;
    assert_eq!(upsert.0, StatusCode::OK);
    let put = status_json(
        authed(c.put(&target))
            .header("content-type", "audio/wav")
            .body(vec![4; 12]),
    )
    .await;
    assert_eq!(put.0, StatusCode::OK, "PUT overwrites");
    let stored = sim.object(BUCKET, "a.wav").expect("stored");
    assert_eq!((stored.size, stored.upload_count), (12, 3));

    let text = status_json(
        authed(c.post(url(&sim, &format!("/object/{BUCKET}/b.txt"))))
            .header("content-type", "text/plain")
            .body("hi"),
    )
    .await;
    assert_storage_error(
        &text,
        "415",
        "invalid_mime_type",
        "mime type text/plain is not supported",
    );
    assert_eq!(text.1["code"], "InvalidMimeType");
    let mp3 = status_json(
        authed(c.post(url(&sim, &format!("/object/{BUCKET}/b.mp3"))))
            .header("content-type", "audio/mpeg")
            .body("id3"),
    )
    .await;
    assert_eq!(mp3.0, StatusCode::OK, "audio/* allows audio/mpeg");

    assert!(sim.create_bucket("small", false, Some(1000), None));
    let big = status_json(
        authed(c.post(url(&sim, "/object/small/big.wav")))
            .header("content-type", "audio/wav")
            .body(vec![0u8; 2000]),
    )
    .await;
    assert_storage_error(
        &big,
        "413",
        "Payload too large",
        "The object exceeded the maximum allowed size",
    );
    let streamed = reqwest::Body::wrap_stream(SimAudio::generated(5000, 1).stream());
    let big = status_json(
        authed(c.post(url(&sim, "/object/small/chunked.wav")))
            .header("content-type", "audio/wav")
            .body(streamed),
    )
    .await;
    assert_storage_error(
        &big,
        "413",
        "Payload too large",
        "The object exceeded the maximum allowed size",
    );
    let fits = status_json(
        authed(c.post(url(&sim, "/object/small/ok.wav")))
            .header("content-type", "audio/wav")
            .body(vec![0u8; 1000]),
    )
    .await;
    assert_eq!(fits.0, StatusCode::OK);
    assert_eq!(sim.list_objects("small"), ["ok.wav"]);

    let no_bucket = status_json(
        authed(c.post(url(&sim, "/object/nope/a.wav")))
            .header("content-type", "audio/wav")
            .body("x"),
    )
    .await;
    assert_storage_error(&no_bucket, "404", "Bucket not found", "Bucket not found");
}

#[tokio::test]
async fn public_urls_of_a_private_bucket_do_not_work() {
    let sim = start();
    let c = client();
    assert_eq!(
        put_object(&c, &sim, "p.wav", vec![7; 5]).await.0,
        StatusCode::OK
    );
    let private = status_json(c.get(url(&sim, &format!("/object/public/{BUCKET}/p.wav")))).await;
    assert_storage_error(&private, "404", "Bucket not found", "Bucket not found");

    assert!(sim.create_bucket("open", true, None, None));
    let up = status_json(
        authed(c.post(url(&sim, "/object/open/p.wav")))
            .header("content-type", "audio/wav")
            .body(vec![8; 5]),
    )
    .await;
    assert_eq!(up.0, StatusCode::OK);
    let resp = c
        .get(url(&sim, "/object/public/open/p.wav"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.expect("bytes"), vec![8; 5]);
}

async fn sign(c: &Client, sim: &StorageSim, name: &str, expires_in: Value) -> (StatusCode, Value) {
    status_json(
        authed(c.post(url(sim, &format!("/object/sign/{BUCKET}/{name}"))))
            .json(&json!({ "expiresIn": expires_in })),
    )
    .await
}

#[tokio::test]
async fn signed_urls_serve_ranges_and_expire() {
    let sim = start();
    let c = client();
    let content = SimAudio::generated(100_000, 2).to_vec();
    assert_eq!(
        put_object(&c, &sim, "s/one.wav", content.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        put_object(&c, &sim, "s/two.wav", vec![1; 10]).await.0,
        StatusCode::OK
    );

    let (status, body) = sign(&c, &sim, "s/one.wav", json!(60)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let signed = body["signedURL"].as_str().expect("signedURL").to_owned();
    assert!(
        signed.starts_with(&format!("/object/sign/{BUCKET}/s/one.wav?token=")),
        "{signed}"
    );
    let full = format!("{}/storage/v1{signed}", sim.base_url());

    let resp = c.get(&full).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    assert_eq!(resp.headers()["content-length"], "100000");
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    assert_eq!(resp.bytes().await.expect("bytes"), content);
    for (range, start, end) in [
        ("bytes=0-1", 0, 1),
        ("bytes=99000-", 99_000, 99_999),
        ("bytes=-10", 99_990, 99_999),
    ] {
        let resp = c
            .get(&full)
            .header("range", range)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/100000").as_str()
        );
        assert_eq!(
            resp.headers()["content-length"],
            (end - start + 1).to_string().as_str()
        );
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        assert_eq!(resp.bytes().await.expect("bytes"), &content[start..=end]);
    }
    let resp = c
        .get(&full)
        .header("range", "bytes=100000-")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(resp.headers()["content-range"], "bytes */100000");

    let token = signed.split("token=").nth(1).expect("token");
    let other = format!(
        "{}/storage/v1/object/sign/{BUCKET}/s/two.wav?token={token}",
        sim.base_url()
    );
    let wrong_path = status_json(c.get(&other)).await;
    assert_storage_error(&wrong_path, "400", "InvalidSignature", "Invalid signature");
    let forged = format!("{full}x");
    let forged = status_json(c.get(&forged)).await;
    assert_storage_error(&forged, "400", "InvalidJWT", "invalid signature");
    let garbage = status_json(c.get(format!(
        "{}/storage/v1/object/sign/{BUCKET}/s/one.wav?token=abc",
        sim.base_url()
    )))
    .await;
    assert_storage_error(&garbage, "400", "InvalidJWT", "jwt malformed");

    let missing = sign(&c, &sim, "s/none.wav", json!(60)).await;
    assert_storage_error(&missing, "404", "not_found", "Object not found");
    assert_eq!(
        sign(&c, &sim, "s/one.wav", json!(0)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        sign(&c, &sim, "s/one.wav", json!("soon")).await.0,
        StatusCode::BAD_REQUEST
    );

    let (_, body) = sign(&c, &sim, "s/two.wav", json!(1)).await;
    let short = format!(
        "{}/storage/v1{}",
        sim.base_url(),
        body["signedURL"].as_str().expect("signedURL")
    );
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let got = status_json(c.get(&short)).await;
        if got.0 == StatusCode::BAD_REQUEST {
            assert_storage_error(&got, "400", "InvalidJWT", "jwt expired");
            break;
        }
        assert_eq!(got.0, StatusCode::OK);
        assert!(Instant::now() < deadline, "signed URL never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

async fn tus_create(
    c: &Client,
    sim: &StorageSim,
    name: &str,
    len: u64,
    upsert: bool,
) -> reqwest::Response {
    let meta = format!(
        "bucketName {},objectName {},contentType {},cacheControl {}",
        b64(BUCKET),
        b64(name),
        b64("audio/wav"),
        b64("3600")
    );
    authed(c.post(url(sim, "/upload/resumable")))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", len.to_string())
        .header("upload-metadata", meta)
        .header("x-upsert", if upsert { "true" } else { "false" })
        .send()
        .await
        .expect("send")
}

async fn tus_patch_with(
    c: &Client,
    location: &str,
    offset: u64,
    chunk: Vec<u8>,
    upsert: bool,
) -> Result<reqwest::Response, reqwest::Error> {
    authed(c.patch(location))
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", offset.to_string())
        .header("content-type", "application/offset+octet-stream")
        .header("x-upsert", if upsert { "true" } else { "false" })
        .body(chunk)
        .send()
        .await
}

async fn tus_patch(
    c: &Client,
    location: &str,
    offset: u64,
    chunk: Vec<u8>,
) -> Result<reqwest::Response, reqwest::Error> {
    tus_patch_with(c, location, offset, chunk, false).await
}

async fn tus_offset(c: &Client, location: &str) -> (StatusCode, Option<u64>) {
    let resp = authed(c.head(location))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("send");
    let offset = resp
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (resp.status(), offset)
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned()
}

#[tokio::test]
async fn tus_upload_in_two_chunks_commits_the_object() {
    let _heavy = HEAVY.lock().await;
    let sim = start();
    let c = client();
    let audio = SimAudio::generated(CHUNK as u64 + 1000, 11);
    let all = audio.to_vec();
    let created = tus_create(&c, &sim, "tus/a.wav", audio.len(), false).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["tus-resumable"], "1.0.0");
    let loc = location(&created);
    assert!(
        loc.starts_with(&format!("{}/storage/v1/upload/resumable/", sim.base_url())),
        "{loc}"
    );

    let head = authed(c.head(&loc))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("send");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["upload-offset"], "0");
    assert_eq!(
        head.headers()["upload-length"],
        audio.len().to_string().as_str()
    );
    assert_eq!(head.headers()["cache-control"], "no-store");

    let first = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
        .await
        .expect("send");
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    assert_eq!(first.headers()["upload-offset"], CHUNK.to_string().as_str());
    assert_eq!(
        tus_offset(&c, &loc).await,
        (StatusCode::OK, Some(CHUNK as u64))
    );
    assert!(
        sim.object(BUCKET, "tus/a.wav").is_none(),
        "invisible until complete"
    );

    let last = tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..].to_vec())
        .await
        .expect("send");
    assert_eq!(last.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        last.headers()["upload-offset"],
        audio.len().to_string().as_str()
    );
    let stored = sim.object(BUCKET, "tus/a.wav").expect("committed");
    assert_eq!(stored.size, audio.len());
    assert_eq!(stored.sha256_hex, audio.sha256_hex());
    assert_eq!(stored.content_type, "audio/wav");
    assert_eq!(stored.cache_control, "max-age=3600");
    assert_eq!(stored.upload_count, 1);
    assert_eq!(sim.tus_patch_count(), 2);
    assert_eq!(
        tus_offset(&c, &loc).await,
        (StatusCode::OK, Some(audio.len()))
    );

    // Creating it again without upsert is refused up front.
    let dup = tus_create(&c, &sim, "tus/a.wav", 10, false).await;
    assert_eq!(dup.status(), StatusCode::CONFLICT);
    assert_eq!(
        dup.text().await.expect("text"),
        "The resource already exists"
    );
    let upsert = tus_create(&c, &sim, "tus/a.wav", 10, true).await;
    assert_eq!(upsert.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn tus_rejects_bad_chunks_offsets_and_uploads() {
    let _heavy = HEAVY.lock().await;
    let sim = start();
    let c = client();
    let len = CHUNK as u64 + 10;
    let loc = location(&tus_create(&c, &sim, "tus/b.wav", len, false).await);

    let small = tus_patch(&c, &loc, 0, vec![0u8; 1000]).await.expect("send");
    assert_eq!(
        small.status(),
        StatusCode::BAD_REQUEST,
        "a short non-final chunk"
    );
    let big = tus_patch(&c, &loc, 0, vec![0u8; CHUNK + 10])
        .await
        .expect("send");
    assert_eq!(big.status(), StatusCode::BAD_REQUEST, "a chunk over 6 MiB");
    assert_eq!(tus_offset(&c, &loc).await.1, Some(0));
    let wrong_offset = tus_patch(&c, &loc, 5, vec![0u8; 5]).await.expect("send");
    assert_eq!(wrong_offset.status(), StatusCode::CONFLICT);
    assert_eq!(
        wrong_offset.text().await.expect("text"),
        "Upload-Offset conflict\n"
    );
    let too_much = tus_patch(&c, &loc, 0, vec![0u8; CHUNK + 11])
        .await
        .expect("send");
    assert_eq!(too_much.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let no_type = authed(c.patch(&loc))
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .body(vec![0u8; 10])
        .send()
        .await
        .expect("send");
    assert_eq!(no_type.status(), StatusCode::FORBIDDEN);
    let no_version = authed(c.patch(&loc))
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .body(vec![0u8; 10])
        .send()
        .await
        .expect("send");
    assert_eq!(no_version.status(), StatusCode::PRECONDITION_FAILED);

    let unknown = format!("{}/storage/v1/upload/resumable/bm9wZQ", sim.base_url());
    assert_eq!(tus_offset(&c, &unknown).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        tus_patch(&c, &unknown, 0, vec![1])
            .await
            .expect("send")
            .status(),
        StatusCode::NOT_FOUND
    );

    assert!(sim.expire_upload(&loc));
    assert_eq!(tus_offset(&c, &loc).await.0, StatusCode::GONE);
    assert_eq!(
        tus_patch(&c, &loc, 0, vec![0u8; CHUNK])
            .await
            .expect("send")
            .status(),
        StatusCode::GONE
    );
    assert!(!sim.expire_upload("unknown"));

    let too_large = tus_create(&c, &sim, "tus/huge.wav", 51 * MIB, false).await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        too_large.text().await.expect("text"),
        "Maximum size exceeded\n"
    );
    let meta = format!(
        "bucketName {},objectName {},contentType {}",
        b64("nope"),
        b64("x.wav"),
        b64("audio/wav")
    );
    let no_bucket = authed(c.post(url(&sim, "/upload/resumable")))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .header("upload-metadata", meta)
        .send()
        .await
        .expect("send");
    assert_eq!(no_bucket.status(), StatusCode::NOT_FOUND);
    let meta = format!(
        "bucketName {},objectName {},contentType {}",
        b64(BUCKET),
        b64("x.txt"),
        b64("text/plain")
    );
    let bad_mime = authed(c.post(url(&sim, "/upload/resumable")))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .header("upload-metadata", meta)
        .send()
        .await
        .expect("send");
    assert_eq!(bad_mime.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        bad_mime.text().await.expect("text"),
        "mime type text/plain is not supported"
    );
    let bad_meta = authed(c.post(url(&sim, "/upload/resumable")))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .header("upload-metadata", "bucketName !!!")
        .send()
        .await
        .expect("send");
    assert_eq!(bad_meta.status(), StatusCode::BAD_REQUEST);
    let no_len = authed(c.post(url(&sim, "/upload/resumable")))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("send");
    assert_eq!(no_len.status(), StatusCode::BAD_REQUEST);
    let no_auth = status_json(
        c.post(url(&sim, "/upload/resumable"))
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "10"),
    )
    .await;
    assert_storage_error(&no_auth, "403", "Unauthorized", "jwt must be provided");
    assert!(sim.list_objects(BUCKET).is_empty());
}

#[tokio::test]
async fn tus_resumes_after_a_dropped_patch() {
    let _heavy = HEAVY.lock().await;
    let sim = start();
    let c = client();
    let audio = SimAudio::generated(2 * CHUNK as u64 + 5, 12);
    let all = audio.to_vec();
    let loc = location(&tus_create(&c, &sim, "tus/r.wav", audio.len(), false).await);

    // The connection dies 1 MiB into the first chunk: nothing counts.
    sim.fail_next(
        1,
        Fault::ResetMidBody {
            after_bytes: 1024 * 1024,
        },
    );
    assert!(tus_patch(&c, &loc, 0, all[..CHUNK].to_vec()).await.is_err());
    assert_eq!(tus_offset(&c, &loc).await, (StatusCode::OK, Some(0)));

    let first = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
        .await
        .expect("send");
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    // Dropped mid second chunk: the offset stays at the last whole chunk.
    sim.fail_next(
        1,
        Fault::ResetMidBody {
            after_bytes: 3 * 1024 * 1024,
        },
    );
    assert!(
        tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..2 * CHUNK].to_vec())
            .await
            .is_err()
    );
    let (_, offset) = tus_offset(&c, &loc).await;
    assert_eq!(offset, Some(CHUNK as u64));
    // A server error on a chunk is also retried from HEAD's offset.
    sim.fail_next(1, Fault::Status(500));
    let failed = tus_patch(&c, &loc, CHUNK as u64, all[CHUNK..2 * CHUNK].to_vec())
        .await
        .expect("send");
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);

    let mut offset = offset.unwrap_or_default();
    while offset < audio.len() {
        let end = (offset as usize + CHUNK).min(all.len());
        let resp = tus_patch(&c, &loc, offset, all[offset as usize..end].to_vec())
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        offset = resp.headers()["upload-offset"]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("offset");
    }
    let stored = sim.object(BUCKET, "tus/r.wav").expect("committed");
    assert_eq!(stored.sha256_hex, audio.sha256_hex());
    assert_eq!(stored.upload_count, 1);
    assert_eq!(sim.tus_patch_count(), 6);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn large_uploads_stream_to_disk() {
    let _heavy = HEAVY.lock().await;
    let tmp = temp_dir("stream");
    let dir = tmp.0.clone();
    let sim = start_with(StorageSimConfig {
        data_dir: Some(dir.clone()),
        global_file_size_limit: 200 * MIB,
        ..StorageSimConfig::default()
    });
    let c = client();
    let audio = SimAudio::generated(64 * MIB, 21);

    let before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let resp = authed(c.post(url(&sim, &format!("/object/{BUCKET}/big.wav"))))
        .header("content-type", "audio/wav")
        .body(reqwest::Body::wrap_stream(audio.stream()))
        .send()
        .await
        .expect("send");
    sampler.abort();
    assert_eq!(resp.status(), StatusCode::OK);
    let grew_mib = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before)
        / 1024;
    // Buffering the body would add 64 MiB; streaming adds a few MiB of
    // buffers (3 MiB measured alone). Generous, as tests share a process.
    assert!(
        grew_mib < 48,
        "RSS grew {grew_mib} MiB during a 64 MiB upload"
    );

    let stored = sim.object(BUCKET, "big.wav").expect("stored");
    assert_eq!(stored.size, 64 * MIB);
    assert_eq!(stored.sha256_hex, audio.sha256_hex());
    let files: Vec<_> = std::fs::read_dir(dir.join("objects"))
        .expect("objects")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].metadata().expect("meta").len(), 64 * MIB);
    assert_eq!(
        std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
        0,
        "no temp files left"
    );

    // Served back from disk, with ranges.
    let dl = url(&sim, &format!("/object/authenticated/{BUCKET}/big.wav"));
    let resp = authed(c.get(&dl))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let mut want = vec![0u8; 1000];
    audio.read_at(1000, &mut want);
    assert_eq!(resp.bytes().await.expect("bytes"), want);

    // A TUS upload into the same directory, overwriting (x-upsert on
    // every request, as storage-api checks it on each PATCH), which
    // frees the old file.
    let small = SimAudio::generated(CHUNK as u64 + 7, 22);
    let loc = location(&tus_create(&c, &sim, "big.wav", small.len(), true).await);
    let all = small.to_vec();
    let refused = tus_patch(&c, &loc, 0, all[..CHUNK].to_vec())
        .await
        .expect("send");
    assert_eq!(
        refused.status(),
        StatusCode::CONFLICT,
        "PATCH without x-upsert"
    );
    for (offset, chunk) in [(0, &all[..CHUNK]), (CHUNK as u64, &all[CHUNK..])] {
        let resp = tus_patch_with(&c, &loc, offset, chunk.to_vec(), true)
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
    let stored = sim.object(BUCKET, "big.wav").expect("stored");
    assert_eq!((stored.size, stored.upload_count), (small.len(), 2));
    assert_eq!(sim.object_bytes(BUCKET, "big.wav").expect("bytes"), all);
    assert_eq!(
        std::fs::read_dir(dir.join("objects"))
            .expect("objects")
            .count(),
        1
    );
    drop(sim);
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::read_dir(dir.join("objects")).map_or(0, |d| d.count()) > 0 {
        assert!(
            Instant::now() < deadline,
            "stopping the simulator removes its files"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn upload_faults_store_nothing() {
    let tmp = temp_dir("faults");
    let dir = tmp.0.clone();
    let sim = start_with(StorageSimConfig {
        data_dir: Some(dir.clone()),
        ..StorageSimConfig::default()
    });
    let c = client();
    let body = SimAudio::generated(200_000, 3).to_vec();

    sim.fail_next(1, Fault::Status(500));
    let failed = put_object(&c, &sim, "f.wav", body.clone()).await;
    assert_storage_error(&failed, "500", "internal", "Internal server error");

    sim.fail_next(1, Fault::Status(503));
    assert_eq!(
        put_object(&c, &sim, "f.wav", body.clone()).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    sim.fail_next(1, Fault::Reset);
    let sent = authed(c.post(url(&sim, &format!("/object/{BUCKET}/f.wav"))))
        .header("content-type", "audio/wav")
        .body(body.clone())
        .send()
        .await;
    assert!(sent.is_err(), "reset");

    sim.fail_next(
        1,
        Fault::ResetMidBody {
            after_bytes: 50_000,
        },
    );
    let sent = authed(c.post(url(&sim, &format!("/object/{BUCKET}/f.wav"))))
        .header("content-type", "audio/wav")
        .body(body.clone())
        .send()
        .await;
    assert!(sent.is_err(), "reset mid-body");
    assert!(
        sim.object(BUCKET, "f.wav").is_none(),
        "a broken-off upload stores nothing"
    );

    sim.fail_next(1, Fault::Hang(Duration::from_millis(400)));
    let quick = Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let err = authed(quick.post(url(&sim, &format!("/object/{BUCKET}/h.wav"))))
        .header("content-type", "audio/wav")
        .body(vec![1u8; 10])
        .send()
        .await
        .expect_err("timeout");
    assert!(err.is_timeout(), "{err:?}");

    // Faults on uploads leave other requests alone, and run out.
    assert_eq!(
        status_json(authed(c.get(url(&sim, &format!("/bucket/{BUCKET}")))))
            .await
            .0,
        StatusCode::OK
    );
    let ok = put_object(&c, &sim, "f.wav", body.clone()).await;
    assert_eq!(ok.0, StatusCode::OK);
    assert_eq!(sim.object(BUCKET, "f.wav").expect("stored").upload_count, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
        0,
        "temp files cleaned up"
    );

    // Faults on other requests.
    sim.fail_next_other(1, Fault::Status(500));
    let info = status_json(authed(
        c.get(url(&sim, &format!("/object/info/{BUCKET}/f.wav"))),
    ))
    .await;
    assert_storage_error(&info, "500", "internal", "Internal server error");
    sim.fail_next_other(1, Fault::ResetMidBody { after_bytes: 1000 });
    let resp = authed(c.get(url(&sim, &format!("/object/authenticated/{BUCKET}/f.wav"))))
        .send()
        .await
        .expect("headers");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut broke = false;
    while let Some(chunk) = stream.next().await {
        if chunk.is_err() {
            broke = true;
            break;
        }
    }
    assert!(broke, "download breaks off");

    // Random faults are seeded and can be switched off.
    sim.set_random_faults(1.0, vec![Fault::Status(500)]);
    assert_eq!(
        put_object(&c, &sim, "g.wav", vec![1]).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    sim.set_random_faults(0.0, vec![Fault::Status(500)]);
    assert_eq!(
        put_object(&c, &sim, "g.wav", vec![1]).await.0,
        StatusCode::OK
    );
    drop(sim);
}

#[tokio::test]
async fn stops_on_cancel() {
    let token = CancellationToken::new();
    let sim = StorageSim::start(StorageSimConfig {
        cancel: token.clone(),
        ..StorageSimConfig::default()
    })
    .expect("start");
    let addr = sim.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    token.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

async fn copy(c: &Client, sim: &StorageSim, body: Value, upsert: bool) -> (StatusCode, Value) {
    status_json(
        authed(c.post(url(sim, "/object/copy")))
            .header("x-upsert", if upsert { "true" } else { "false" })
            .json(&body),
    )
    .await
}

/// As storage-api's `copyObject`: the destination gets the source's bytes
/// and type and the source stays; a missing source is a 404 and an existing
/// destination a 409 unless `x-upsert: true`; the copy's bytes are its own,
/// in memory and on disk alike.
#[tokio::test]
async fn copies_keep_the_source_and_refuse_a_missing_source_or_an_existing_destination() {
    let dir = temp_dir("copy");
    for data_dir in [None, Some(dir.0.clone())] {
        let sim = start_with(StorageSimConfig {
            data_dir,
            ..StorageSimConfig::default()
        });
        let c = client();
        let content = SimAudio::generated(200_000, 3).to_vec();
        assert_eq!(
            put_object(&c, &sim, "unmatched/r.wav", content.clone())
                .await
                .0,
            200
        );
        let req = |src: &str, dst: &str| json!({"bucketId": BUCKET, "sourceKey": src, "destinationKey": dst});

        let (status, body) = copy(&c, &sim, req("unmatched/r.wav", "intakes/i/r.wav"), false).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["Key"], format!("{BUCKET}/intakes/i/r.wav"));
        let copied = sim.object(BUCKET, "intakes/i/r.wav").expect("copied");
        assert_eq!(copied.sha256_hex, hex::encode(Sha256::digest(&content)));
        assert_eq!(
            (copied.size, copied.content_type.as_str()),
            (200_000, "audio/wav")
        );
        assert_eq!(copied.upload_count, 1);
        assert_eq!(
            sim.object_bytes(BUCKET, "unmatched/r.wav")
                .expect("source stays"),
            content
        );

        // Deleting the source leaves the copy whole.
        let del = format!("/object/{BUCKET}/unmatched/r.wav");
        assert_eq!(status_json(authed(c.delete(url(&sim, &del)))).await.0, 200);
        assert_eq!(
            sim.object_bytes(BUCKET, "intakes/i/r.wav").expect("copy"),
            content
        );

        let missing = copy(&c, &sim, req("unmatched/r.wav", "intakes/j/r.wav"), false).await;
        assert_storage_error(&missing, "404", "not_found", "Object not found");
        assert!(sim.object(BUCKET, "intakes/j/r.wav").is_none());

        let other = SimAudio::generated(1_000, 4).to_vec();
        assert_eq!(
            put_object(&c, &sim, "unmatched/s.wav", other.clone())
                .await
                .0,
            200
        );
        let exists = copy(&c, &sim, req("unmatched/s.wav", "intakes/i/r.wav"), false).await;
        assert_storage_error(&exists, "409", "Duplicate", "The resource already exists");
        assert_eq!(
            sim.object_bytes(BUCKET, "intakes/i/r.wav").expect("kept"),
            content
        );
        let (status, _) = copy(&c, &sim, req("unmatched/s.wav", "intakes/i/r.wav"), true).await;
        assert_eq!(status, StatusCode::OK, "x-upsert: true replaces");
        assert_eq!(
            sim.object_bytes(BUCKET, "intakes/i/r.wav")
                .expect("replaced"),
            other
        );

        let no_bucket = copy(
            &c,
            &sim,
            json!({"bucketId": "nope", "sourceKey": "unmatched/s.wav", "destinationKey": "x.wav"}),
            false,
        )
        .await;
        assert_storage_error(&no_bucket, "404", "Bucket not found", "Bucket not found");
        let (status, body) = copy(&c, &sim, json!({"bucketId": BUCKET}), false).await;
        assert_eq!(
            (status.as_u16(), body["statusCode"].as_str()),
            (400, Some("400"))
        );
        let unauthenticated =
            status_json(c.post(url(&sim, "/object/copy")).json(&req("a", "b"))).await;
        assert_storage_error(
            &unauthenticated,
            "403",
            "Unauthorized",
            "jwt must be provided",
        );
    }
}

/// Issue #22: random faults reach object info, signing and deletion, not
/// only uploads, and turn off again. (The simulator has no listing route:
/// the relay never lists the bucket.)
#[tokio::test]
async fn random_other_faults_hit_info_signing_and_deletion() {
    let sim = start();
    let c = client();
    assert_eq!(
        put_object(&c, &sim, "o/a.wav", vec![1; 100]).await.0,
        StatusCode::OK
    );
    sim.set_random_other_faults(1.0, vec![Fault::Status(503)]);
    let info = authed(c.get(url(&sim, &format!("/object/info/{BUCKET}/o/a.wav"))));
    assert_eq!(status_json(info).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        sign(&c, &sim, "o/a.wav", json!(60)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let delete = authed(c.delete(url(&sim, &format!("/object/{BUCKET}/o/a.wav"))));
    assert_eq!(status_json(delete).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        sim.object(BUCKET, "o/a.wav").is_some(),
        "a faulted delete deletes nothing"
    );
    // Uploads are another plan: untouched.
    assert_eq!(
        put_object(&c, &sim, "o/b.wav", vec![2; 100]).await.0,
        StatusCode::OK
    );
    sim.set_random_other_faults(0.0, Vec::new());
    let info = authed(c.get(url(&sim, &format!("/object/info/{BUCKET}/o/a.wav"))));
    assert_eq!(status_json(info).await.0, StatusCode::OK);
}

/// Issue #22: a client that hangs mid-PATCH (a SIGSTOPped worker keeps its
/// connection open) does not hold the upload for ever. The next PATCH asks
/// it to release the lock, as tus-node-server does, takes the upload over
/// and completes it; the hung request ends without storing its chunk.
#[tokio::test]
async fn a_patch_on_an_upload_held_by_a_hung_client_takes_it_over() {
    let _heavy = HEAVY.lock().await;
    let sim = start();
    let c = client();
    sim.set_tus_patch_rate(Some(4 * 1024 * 1024));
    let audio = SimAudio::generated(2 * 1024 * 1024, 21);
    let all = audio.to_vec();
    let loc = location(&tus_create(&c, &sim, "tus/hung.wav", audio.len(), false).await);

    // The hung client: half a MiB, then nothing more, connection kept open.
    let first = bytes::Bytes::copy_from_slice(&all[..512 * 1024]);
    let stalled = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) })
        .chain(futures_util::stream::pending());
    let hung = {
        let (c, loc) = (c.clone(), loc.clone());
        tokio::spawn(async move {
            authed(c.patch(&loc))
                .header("tus-resumable", "1.0.0")
                .header("upload-offset", "0")
                .header("content-type", "application/offset+octet-stream")
                .header("content-length", all.len().to_string())
                .body(reqwest::Body::wrap_stream(stalled))
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.tus_uploads_in_flight() != vec!["tus/hung.wav".to_owned()] {
        assert!(Instant::now() < deadline, "the hung PATCH never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let taken = tus_patch(&c, &loc, 0, audio.to_vec()).await.expect("send");
    assert_eq!(taken.status(), StatusCode::NO_CONTENT);
    // Paced at 4 MiB/s: 2 MiB take half a second at least.
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    let stored = sim.object(BUCKET, "tus/hung.wav").expect("committed");
    assert_eq!(stored.sha256_hex, audio.sha256_hex());
    assert_eq!(stored.upload_count, 1);
    let hung = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("the hung request ended")
        .expect("join");
    assert!(
        hung.is_err(),
        "the released request gets no answer: {hung:?}"
    );
    assert!(sim.tus_uploads_in_flight().is_empty());
}
