//! The simulator against Telnyx's documented behaviour, over real HTTP.

use super::*;
use futures_util::StreamExt;
use reqwest::{Client, StatusCode};
use std::time::Instant;

const KEY: &str = "KEY_test";

fn client() -> Client {
    // no_proxy: a proxy from the environment must not see loopback tests.
    Client::builder().no_proxy().build().expect("client")
}

fn sim_with(ttl: Duration) -> TelnyxSim {
    TelnyxSim::start(TelnyxSimConfig {
        api_key: KEY.to_owned(),
        download_url_ttl: ttl,
        ..TelnyxSimConfig::default()
    })
    .expect("start")
}

fn sim() -> TelnyxSim {
    sim_with(Duration::from_secs(600))
}

async fn get_json(c: &Client, url: &str, key: &str) -> (StatusCode, Value) {
    let resp = c.get(url).bearer_auth(key).send().await.expect("send");
    let status = resp.status();
    (status, resp.json().await.expect("json"))
}

fn assert_telnyx_error(body: &Value, code: &str, title: &str) {
    assert_eq!(body["errors"][0]["code"], code, "{body}");
    assert_eq!(body["errors"][0]["title"], title, "{body}");
    assert!(body["errors"][0]["detail"].is_string(), "{body}");
}

async fn list_query(sim: &TelnyxSim, q: &[(&str, &str)]) -> (StatusCode, Value) {
    let resp = client()
        .get(format!("{}/recordings", sim.base_url()))
        .bearer_auth(KEY)
        .query(q)
        .send()
        .await
        .expect("send");
    let status = resp.status();
    (status, resp.json().await.expect("json"))
}

#[tokio::test]
async fn download_urls_offer_only_the_recorded_format_unless_told() {
    let sim = sim();
    let mut rec = SimRecording::sample("3f0c2a51-6f7e-4d2b-9a1c-0e5d4b3a2f10");
    rec.format = AudioFormat::Mp3;
    rec.content = SimAudio::Bytes(Bytes::from_static(b"ID3\x04\x00fake mp3 frames"));
    sim.add_recording(rec.clone());
    let c = client();
    let url = format!("{}/recordings/{}", sim.base_url(), rec.id);
    let (_, body) = get_json(&c, &url, KEY).await;
    let urls = &body["data"]["download_urls"];
    assert!(urls.get("wav").is_none(), "{urls}");
    let mp3 = urls["mp3"].as_str().expect("mp3").to_owned();
    let resp = c.get(&mp3).send().await.expect("send");
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.expect("bytes"), rec.content.to_vec());
    let wav = sim.download_url(&rec.id, "wav");
    assert_eq!(
        c.get(&wav).send().await.expect("send").status(),
        StatusCode::NOT_FOUND
    );

    sim.set_behaviour(TelnyxSimBehaviour {
        only_recorded_format: false,
        ..TelnyxSimBehaviour::default()
    });
    let (_, body) = get_json(&c, &url, KEY).await;
    assert!(body["data"]["download_urls"]["wav"].is_string());
    assert!(body["data"]["download_urls"]["mp3"].is_string());
}

#[tokio::test]
async fn numbers_and_timestamp_shapes_follow_the_switches() {
    let sim = sim();
    let rec = SimRecording::sample("8d1e6f3a-2b4c-4a5d-8e7f-1a2b3c4d5e6f");
    sim.add_recording(rec.clone());
    let c = client();
    let url = format!("{}/recordings/{}", sim.base_url(), rec.id);
    sim.set_behaviour(TelnyxSimBehaviour {
        numbers: false,
        ..TelnyxSimBehaviour::default()
    });
    let (_, body) = get_json(&c, &url, KEY).await;
    assert!(body["data"].get("from").is_none() && body["data"].get("to").is_none());
    let (_, listed) = list_query(&sim, &[]).await;
    assert!(listed["data"][0].get("to").is_none(), "{listed}");

    let t = rec.recording_started_at;
    let expected = [
        t.to_rfc3339_opts(SecondsFormat::Millis, true),
        t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
        t.format("%Y-%m-%d %H:%M:%S%.3f+0000").to_string(),
        t.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
    ];
    for (shape, want) in SimTimestamps::ALL.into_iter().zip(expected) {
        sim.set_behaviour(TelnyxSimBehaviour {
            timestamps: shape,
            ..TelnyxSimBehaviour::default()
        });
        let (_, body) = get_json(&c, &url, KEY).await;
        assert_eq!(
            body["data"]["recording_started_at"],
            want.as_str(),
            "{shape:?}"
        );
        if shape != SimTimestamps::Rfc3339 {
            assert!(
                DateTime::parse_from_rfc3339(&want).is_err(),
                "{want} is meant not to be RFC 3339"
            );
        }
    }
}

#[tokio::test]
async fn uuid_filters_answer_422_and_unknown_filters_400() {
    let sim = sim();
    let rec = SimRecording::sample("5b2a9c1d-7e3f-4a6b-8c9d-0e1f2a3b4c5d");
    sim.add_recording(rec.clone());

    let (status, body) = list_query(&sim, &[("filter[call_session_id]", "sess-1")]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["errors"][0]["source"]["parameter"],
        "filter[call_session_id]"
    );
    let (status, _) = list_query(&sim, &[("filter[call_leg_id]", "leg-1")]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) =
        list_query(&sim, &[("filter[call_session_id]", &rec.call_session_id)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["meta"]["total_results"], 1);
    let (_, body) = list_query(&sim, &[("filter[connection_id]", "nope")]).await;
    assert_eq!(body["meta"]["total_results"], 0);

    for key in [
        "filter[session_id]",
        "filter[created_at][gt]",
        "filter[sip_call_id]",
        "limit",
    ] {
        let (status, body) = list_query(&sim, &[(key, "x")]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}");
        assert_eq!(body["errors"][0]["source"]["parameter"], key);
    }

    sim.set_behaviour(TelnyxSimBehaviour {
        uuid_filters: false,
        refuse_unknown_filters: false,
        ..TelnyxSimBehaviour::default()
    });
    let (status, body) = list_query(&sim, &[("filter[call_session_id]", "sess-1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["meta"]["total_results"], 0);
    let (status, _) = list_query(&sim, &[("limit", "x")]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn rate_limit_answers_carry_the_configured_hints() {
    let sim = sim();
    sim.set_behaviour(TelnyxSimBehaviour {
        retry_after: Some("7".into()),
        ratelimit_reset: None,
        ..TelnyxSimBehaviour::default()
    });
    sim.fail_next(1, Fault::Status(429));
    let resp = client()
        .get(format!("{}/recordings", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(resp.headers().get("x-ratelimit-reset").is_none());
}

#[test]
fn generated_audio_is_a_deterministic_seekable_wav() {
    let audio = SimAudio::generated(100_001, 7);
    let all = audio.to_vec();
    assert_eq!(all.len(), 100_001);
    assert_eq!(&all[0..4], b"RIFF");
    assert_eq!(&all[8..16], b"WAVEfmt ");
    assert_eq!(
        u32::from_le_bytes([all[4], all[5], all[6], all[7]]),
        100_001 - 8
    );
    assert_eq!(&all[36..40], b"data");
    assert_eq!(
        u32::from_le_bytes([all[40], all[41], all[42], all[43]]),
        100_001 - 44
    );
    assert_eq!(
        u32::from_le_bytes([all[24], all[25], all[26], all[27]]),
        8000
    );
    for (offset, len) in [
        (0, 10),
        (40, 10),
        (45, 3),
        (46, 4),
        (99_990, 11),
        (12_345, 6789),
    ] {
        let mut buf = vec![0u8; len];
        audio.read_at(offset as u64, &mut buf);
        assert_eq!(buf, &all[offset..offset + len], "offset {offset}");
    }
    assert_eq!(audio.to_vec(), all, "same seed, same bytes");
    assert_ne!(
        SimAudio::generated(100_001, 8).to_vec(),
        all,
        "seed matters"
    );
    assert_eq!(audio.sha256_hex(), hex::encode(Sha256::digest(&all)));
    let bytes = SimAudio::Bytes(Bytes::from(all.clone()));
    assert_eq!(bytes.sha256_hex(), audio.sha256_hex());
    assert_eq!(
        SimAudio::generated(10, 1).to_vec(),
        SimAudio::wav_header(10)[..10]
    );
    let sample = SimRecording::sample("rec-1");
    assert_eq!(sample.content.len(), 44 + 8000 * 2 * 60);
    assert_eq!(sample.duration_millis, 60_000);
}

#[tokio::test]
async fn generated_stream_matches_read_at() {
    let audio = SimAudio::generated(300_007, 3);
    let mut got = Vec::new();
    let mut s = std::pin::pin!(audio.stream_range(5, 250_000));
    while let Some(chunk) = s.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(got, audio.to_vec()[5..250_000]);
}

#[tokio::test]
async fn get_recording_requires_the_bearer_key() {
    let sim = sim();
    let rec = SimRecording::sample("rec-get");
    sim.add_recording(rec.clone());
    let c = client();
    let url = format!("{}/recordings/rec-get", sim.base_url());
    assert!(sim.base_url().starts_with("http://127.0.0.1:") && sim.base_url().ends_with("/v2"));

    let (status, body) = get_json(&c, &url, KEY).await;
    assert_eq!(status, StatusCode::OK);
    let d = &body["data"];
    assert_eq!(d["record_type"], "recording");
    assert_eq!(d["id"], "rec-get");
    assert_eq!(d["call_session_id"], rec.call_session_id);
    assert_eq!(d["call_control_id"], rec.call_control_id);
    assert_eq!(d["call_leg_id"], rec.call_leg_id);
    assert_eq!(d["channels"], "single");
    assert_eq!(d["duration_millis"], 60_000);
    assert_eq!(d["from"], "+15551230001");
    assert_eq!(d["to"], "+15557650002");
    assert_eq!(d["status"], "completed");
    assert_eq!(d["source"], "call");
    let created: DateTime<Utc> = d["created_at"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("created_at");
    assert_eq!(created, rec.created_at);
    assert!(d["recording_started_at"].is_string() && d["updated_at"].is_string());
    let u = d["download_urls"]["wav"].as_str().expect("url");
    assert!(
        u.starts_with(&format!("http://{}/downloads/rec-get.wav?", sim.addr())),
        "{u}"
    );
    assert!(
        u.contains("X-Amz-Expires=600") && u.contains("X-Amz-Signature="),
        "{u}"
    );
    assert!(
        d["download_urls"].get("mp3").is_none(),
        "only the recorded format: {d}"
    );

    let (status, body) = get_json(&c, &url, "KEY_wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_telnyx_error(&body, "10009", "Authentication failed");
    let resp = c.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let (status, body) = get_json(&c, &format!("{}/recordings/nope", sim.base_url()), KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_telnyx_error(&body, "10005", "Resource not found");
    assert_eq!(sim.request_count("/v2/recordings"), 4);
}

const EVEN: &str = "6c7e1b52-3f0a-4d36-9a0e-5c1f2b7d8e01";
const ODD: &str = "0b5d2c4e-8f1a-4e6b-b7c3-9d2e1f0a3b42";

#[tokio::test]
async fn list_filters_orders_and_pages() {
    let sim = sim();
    let base = Utc::now().trunc_subsecs(3) - chrono::Duration::hours(1);
    for i in 0..5i64 {
        let mut r = SimRecording::sample(format!("rec-{i}"));
        // Added out of order to check the created_at ordering.
        r.created_at = base + chrono::Duration::minutes(10 * (4 - i));
        r.call_session_id = if i % 2 == 0 { EVEN } else { ODD }.into();
        r.to = format!("+1555000000{i}");
        sim.add_recording(r);
    }
    let c = client();
    let list = |q: Vec<(&'static str, String)>| {
        let c = c.clone();
        let url = format!("{}/recordings", sim.base_url());
        async move {
            let resp = c
                .get(url)
                .bearer_auth(KEY)
                .query(&q)
                .send()
                .await
                .expect("send");
            let status = resp.status();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|d| d["id"].as_str().unwrap_or("").to_owned())
            .collect()
    };

    let (status, body) = list(vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&body), ["rec-4", "rec-3", "rec-2", "rec-1", "rec-0"]);
    assert_eq!(
        body["meta"],
        json!({"page_number": 1, "page_size": 20, "total_pages": 1, "total_results": 5})
    );

    let (_, body) = list(vec![("filter[call_session_id]", EVEN.into())]).await;
    assert_eq!(ids(&body), ["rec-4", "rec-2", "rec-0"]);
    let (_, body) = list(vec![("filter[to]", "+15550000003".into())]).await;
    assert_eq!(ids(&body), ["rec-3"]);
    let leg = sim.recording("rec-1").expect("rec-1").call_leg_id;
    let (_, body) = list(vec![("filter[call_leg_id]", leg)]).await;
    assert_eq!(ids(&body), ["rec-1"]);
    let (_, body) = list(vec![("filter[from]", "+19999999999".into())]).await;
    assert_eq!(ids(&body), Vec::<String>::new());
    assert_eq!(body["meta"]["total_results"], 0);

    let t =
        |m: i64| (base + chrono::Duration::minutes(m)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let (_, body) = list(vec![
        ("filter[created_at][gte]", t(10)),
        ("filter[created_at][lte]", t(30)),
    ])
    .await;
    assert_eq!(ids(&body), ["rec-3", "rec-2", "rec-1"]);

    let (_, body) = list(vec![
        ("page[size]", "2".into()),
        ("page[number]", "2".into()),
    ])
    .await;
    assert_eq!(ids(&body), ["rec-2", "rec-1"]);
    assert_eq!(
        body["meta"],
        json!({"page_number": 2, "page_size": 2, "total_pages": 3, "total_results": 5})
    );
    let (_, body) = list(vec![
        ("page[size]", "2".into()),
        ("page[number]", "3".into()),
    ])
    .await;
    assert_eq!(ids(&body), ["rec-0"]);

    let (status, body) = list(vec![("page[size]", "251".into())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_telnyx_error(&body, "10015", "Bad Request");
    assert_eq!(body["errors"][0]["source"]["parameter"], "page[size]");
    let (status, _) = list(vec![("page[size]", "250".into())]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = list(vec![("page[number]", "0".into())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = list(vec![("filter[created_at][gte]", "yesterday".into())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn delete_returns_the_recording_then_it_is_gone() {
    let sim = sim();
    sim.add_recording(SimRecording::sample("rec-del"));
    sim.add_recording(SimRecording::sample("rec-keep"));
    let c = client();
    let url = format!("{}/recordings/rec-del", sim.base_url());
    let (_, before) = get_json(&c, &url, KEY).await;
    let wav = before["data"]["download_urls"]["wav"]
        .as_str()
        .expect("wav")
        .to_owned();

    let resp = c.delete(&url).bearer_auth(KEY).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["data"]["id"], "rec-del");
    assert_eq!(sim.deleted_ids(), ["rec-del"]);

    let (status, body) = get_json(&c, &url, KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_telnyx_error(&body, "10005", "Resource not found");
    let resp = c.delete(&url).bearer_auth(KEY).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (_, listed) = get_json(&c, &format!("{}/recordings", sim.base_url()), KEY).await;
    assert_eq!(listed["meta"]["total_results"], 1);

    let resp = c.get(&wav).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(
        resp.text()
            .await
            .expect("text")
            .contains("<Code>NoSuchKey</Code>")
    );
    assert_eq!(sim.deleted_ids(), ["rec-del"]);
}

#[tokio::test]
async fn presigned_downloads_serve_bytes_and_ranges_without_auth() {
    let sim = sim();
    let mut rec = SimRecording::sample("rec-dl");
    rec.content = SimAudio::generated(2 * 1024 * 1024 + 3, 99);
    sim.add_recording(rec.clone());
    let c = client();
    let (_, body) = get_json(&c, &format!("{}/recordings/rec-dl", sim.base_url()), KEY).await;
    let wav = body["data"]["download_urls"]["wav"]
        .as_str()
        .expect("wav")
        .to_owned();
    assert!(body["data"]["download_urls"].get("mp3").is_none());
    let mp3 = sim.download_url("rec-dl", "mp3");

    let resp = c.get(&wav).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    assert_eq!(
        resp.headers()["content-length"],
        (2 * 1024 * 1024 + 3).to_string().as_str()
    );
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    let got = resp.bytes().await.expect("bytes");
    assert_eq!(hex::encode(Sha256::digest(&got)), rec.content.sha256_hex());

    // Recorded as wav: there is no mp3 file behind a (validly signed) URL.
    let resp = c.get(&mp3).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.text().await.expect("text").contains("NoSuchKey"));
    // The lax switch serves both, the same bytes under each type.
    sim.set_behaviour(TelnyxSimBehaviour {
        only_recorded_format: false,
        ..TelnyxSimBehaviour::default()
    });
    let resp = c.get(&mp3).send().await.expect("send");
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.expect("bytes").len(), got.len());
    sim.set_behaviour(TelnyxSimBehaviour::default());

    let all = rec.content.to_vec();
    let len = all.len();
    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=2097150-", 2_097_150, len - 1),
        ("bytes=-5", len - 5, len - 1),
    ] {
        let resp = c
            .get(&wav)
            .header("range", range)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/{len}").as_str()
        );
        assert_eq!(
            resp.headers()["content-length"],
            (end - start + 1).to_string().as_str()
        );
        assert_eq!(resp.bytes().await.expect("bytes"), &all[start..=end]);
    }
    let resp = c
        .get(&wav)
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );

    // The bearer token is not needed, and a wrong one is ignored like S3 does.
    let resp = c
        .get(&wav)
        .bearer_auth("whatever")
        .header("range", "bytes=0-3")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.bytes().await.expect("bytes"), &b"RIFF"[..]);
    assert_eq!(sim.download_count("rec-dl"), 8);
    assert_eq!(sim.request_count("/downloads/"), 8);
}

#[tokio::test]
async fn presigned_urls_expire_and_reject_tampering() {
    let sim = sim_with(Duration::from_secs(1));
    sim.add_recording(SimRecording::sample("rec-exp"));
    let c = client();
    let (_, body) = get_json(&c, &format!("{}/recordings/rec-exp", sim.base_url()), KEY).await;
    let wav = body["data"]["download_urls"]["wav"]
        .as_str()
        .expect("wav")
        .to_owned();
    assert!(
        wav.contains("X-Amz-Expires=1") || wav.contains("X-Amz-Expires=2"),
        "{wav}"
    );

    let resp = c
        .get(&wav)
        .header("range", "bytes=0-3")
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.status(),
        StatusCode::PARTIAL_CONTENT,
        "fresh URL works"
    );

    let tampered = wav.replace("rec-exp.wav", "rec-exp.mp3");
    let resp = c.get(&tampered).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["content-type"], "application/xml");
    assert!(
        resp.text()
            .await
            .expect("text")
            .contains("<Code>SignatureDoesNotMatch</Code>")
    );
    let resp = c
        .get(wav.split('?').next().unwrap_or_default())
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let resp = c
            .get(&wav)
            .header("range", "bytes=0-3")
            .send()
            .await
            .expect("send");
        if resp.status() == StatusCode::FORBIDDEN {
            let text = resp.text().await.expect("text");
            assert!(
                text.contains("<Code>AccessDenied</Code><Message>Request has expired</Message>"),
                "{text}"
            );
            // Counted as expired; the refused signatures above were not.
            assert_eq!(sim.expired_download_count(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "URL never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A fresh GET mints a fresh URL that works again.
    let fresh = sim.download_url("rec-exp", "wav");
    let resp = c
        .get(&fresh)
        .header("range", "bytes=0-3")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn api_faults_reach_the_client() {
    let sim = sim();
    sim.add_recording(SimRecording::sample("rec-f"));
    let c = client();
    let url = format!("{}/recordings/rec-f", sim.base_url());

    sim.fail_next(1, Fault::Status(429));
    let resp = c.get(&url).bearer_auth(KEY).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["x-ratelimit-reset"], "1");
    assert_telnyx_error(
        &resp.json().await.expect("json"),
        "10011",
        "Too many requests",
    );

    sim.fail_next(2, Fault::Status(503));
    for _ in 0..2 {
        let (status, body) = get_json(&c, &url, KEY).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_telnyx_error(&body, "10007", "Unexpected error");
    }

    sim.fail_next(1, Fault::Reset);
    let err = c
        .get(&url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect_err("reset");
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");

    sim.fail_next(1, Fault::Hang(Duration::from_millis(400)));
    let quick = Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let err = quick
        .get(&url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect_err("timeout");
    assert!(err.is_timeout(), "{err:?}");

    sim.fail_next(1, Fault::ResetMidBody { after_bytes: 20 });
    let resp = c
        .get(&url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.is_err(), "body breaks off");

    // Faults on the API leave downloads alone, and run out.
    sim.fail_next(1, Fault::Status(500));
    let wav = sim.download_url("rec-f", "wav");
    assert_eq!(
        c.get(&wav).send().await.expect("send").status(),
        StatusCode::OK
    );
    assert_eq!(
        get_json(&c, &url, KEY).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(get_json(&c, &url, KEY).await.0, StatusCode::OK);
}

#[tokio::test]
async fn download_faults_reach_the_client() {
    let sim = sim();
    let mut rec = SimRecording::sample("rec-df");
    rec.content = SimAudio::generated(512 * 1024, 5);
    sim.add_recording(rec);
    let c = client();
    let wav = sim.download_url("rec-df", "wav");

    sim.fail_next_downloads(
        1,
        Fault::ResetMidBody {
            after_bytes: 100_000,
        },
    );
    let resp = c.get(&wav).send().await.expect("headers arrive");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "524288");
    let mut got = 0usize;
    let mut stream = resp.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => got += b.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must break off");
    assert!(got <= 100_000, "got {got}");

    sim.fail_next_downloads(1, Fault::Status(500));
    let resp = c.get(&wav).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        resp.text()
            .await
            .expect("text")
            .contains("<Code>InternalError</Code>")
    );

    sim.fail_next_downloads(1, Fault::Reset);
    assert!(c.get(&wav).send().await.is_err());

    // API requests are not affected by download faults.
    sim.fail_next_downloads(1, Fault::Status(503));
    assert_eq!(
        get_json(&c, &format!("{}/recordings/rec-df", sim.base_url()), KEY)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        c.get(&wav).send().await.expect("send").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let resp = c.get(&wav).send().await.expect("send");
    assert_eq!(resp.bytes().await.expect("bytes").len(), 512 * 1024);
    assert_eq!(sim.download_count("rec-df"), 5);
}

#[tokio::test]
async fn random_faults_follow_the_seed() {
    let run = || async {
        let sim = sim();
        sim.add_recording(SimRecording::sample("rec-r"));
        sim.set_random_faults(0.5, vec![Fault::Status(500), Fault::Status(503)]);
        let c = client();
        let url = format!("{}/recordings/rec-r", sim.base_url());
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(get_json(&c, &url, KEY).await.0.as_u16());
        }
        sim.clear_faults();
        assert_eq!(get_json(&c, &url, KEY).await.0, StatusCode::OK);
        statuses
    };
    let (a, b) = (run().await, run().await);
    assert_eq!(a, b, "same seed, same faults");
    assert!(
        a.contains(&200) && (a.contains(&500) || a.contains(&503)),
        "{a:?}"
    );
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let err = TelnyxSim::start(TelnyxSimConfig::default()).expect_err("no runtime");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
    let err = crate::StorageSim::start(crate::StorageSimConfig::default()).expect_err("no runtime");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

#[tokio::test]
async fn stops_on_cancel_and_on_drop() {
    let token = CancellationToken::new();
    let sim = TelnyxSim::start(TelnyxSimConfig {
        cancel: token.clone(),
        ..TelnyxSimConfig::default()
    })
    .expect("start");
    let addr = sim.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    token.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let sim = TelnyxSim::start(TelnyxSimConfig::default()).expect("start");
    let addr = sim.addr();
    let clone = sim.clone();
    drop(sim);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_ok(),
        "a clone keeps it alive"
    );
    drop(clone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
