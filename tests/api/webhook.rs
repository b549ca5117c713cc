use std::time::Duration;

use crate::testing;
use base64::Engine as _;
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{CuttableProxy, spawn_listener, spawn_with};

type Headers = Vec<(&'static str, String)>;

fn event(id: &str) -> Vec<u8> {
    testing::recording_saved_event(id, &format!("sess-{id}"))
        .to_string()
        .into_bytes()
}

#[sqlx::test(migrations = false)]
async fn a_signed_event_is_stored_once_committed(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let res = app.post_signed(&event("ev-1")).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "stored");

    let (event_id, session, state): (String, String, String) = sqlx::query_as(
        "SELECT event_id, call_session_id, state::text FROM recording_relay.recording_jobs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (event_id.as_str(), session.as_str(), state.as_str()),
        ("ev-1", "sess-ev-1", "pending")
    );
    assert!(body["job_id"].as_i64().is_some());
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_original_guides_path_is_accepted_too(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let body = event("ev-guide-path");
    let mut req = app.client.post(app.url("/api/webhooks/telnyx/recording"));
    for (name, value) in testing::signature_headers(&app.key, testing::unix_now(), &body) {
        req = req.header(name, value);
    }
    let res = req.body(body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn bad_signatures_are_refused_and_nothing_is_stored(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let body = event("ev-1");
    let now = testing::unix_now();
    let good = testing::signature_headers(&app.key, now, &body);
    let other_key = testing::signing_key();

    let mut flipped = body.clone();
    flipped[10] ^= 0x01;
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        ("flipped body byte", good.to_vec(), flipped),
        (
            "wrong key",
            testing::signature_headers(&other_key, now, &body).to_vec(),
            body.clone(),
        ),
        ("missing signature", vec![good[0].clone()], body.clone()),
        ("missing timestamp", vec![good[1].clone()], body.clone()),
        (
            "malformed base64",
            vec![good[0].clone(), (good[1].0, "***not base64***".to_owned())],
            body.clone(),
        ),
        (
            "short signature",
            vec![
                good[0].clone(),
                (
                    good[1].0,
                    base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
                ),
            ],
            body.clone(),
        ),
        (
            "302 s old",
            testing::signature_headers(&app.key, now - 302, &body).to_vec(),
            body.clone(),
        ),
        // `now` ages while the cases run: a margin keeps "ahead" ahead (the
        // exact 300/301 s boundary is the unit test's, on a fixed clock).
        (
            "305 s ahead",
            testing::signature_headers(&app.key, now + 305, &body).to_vec(),
            body.clone(),
        ),
    ];
    for (name, headers, body) in cases {
        let mut req = app.client.post(app.url("/webhooks/telnyx"));
        for (h, v) in headers {
            req = req.header(h, v);
        }
        let res = req.body(body).send().await.unwrap();
        assert_eq!(res.status(), 401, "{name}");
    }
    assert_eq!(app.job_count().await, 0);
    assert_eq!(app.quarantine_count().await, 0);

    // Within the tolerance on both sides is accepted. (The exact ±300/301 s
    // boundary is tested with a fixed clock in webhook::verify; over HTTP the
    // second can tick between signing and checking, hence the margins.)
    assert_eq!(
        app.post_signed_at(&body_for("ev-a"), now - 295)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_signed_at(&body_for("ev-b"), now + 290)
            .await
            .status(),
        200
    );
    app.stop().await;
}

fn body_for(id: &str) -> Vec<u8> {
    event(id)
}

#[sqlx::test(migrations = false)]
async fn concurrent_redeliveries_store_exactly_one_row(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let body = event("ev-dup");
    let sends = (0..5).map(|_| app.post_signed(&body));
    let responses = futures_util::future::join_all(sends).await;
    let mut outcomes = Vec::new();
    for res in responses {
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        outcomes.push(v["status"].as_str().unwrap().to_owned());
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["duplicate", "duplicate", "duplicate", "duplicate", "stored"]
    );
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn verified_garbage_is_quarantined_with_400(pool: PgPool) {
    let app = spawn_listener(pool).await;
    for (i, body) in [
        b"this is not json".to_vec(),
        br#"{"data":{"event_type":"call.recording.saved"}}"#.to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
    ]
    .into_iter()
    .enumerate()
    {
        let res = app.post_signed(&body).await;
        assert_eq!(res.status(), 400, "case {i}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["status"], "quarantined");
        let kept: Vec<u8> = sqlx::query_scalar(
            "SELECT raw_body FROM recording_relay.webhook_quarantine ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(kept, body, "kept byte for byte");
    }
    assert_eq!(app.quarantine_count().await, 3);
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn other_event_types_are_acknowledged_but_not_stored(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let mut v = testing::recording_saved_event("ev-h", "sess");
    v["data"]["event_type"] = "call.hangup".into();
    let res = app.post_signed(v.to_string().as_bytes()).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["status"], "ignored");
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn oversized_bodies_get_413(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let big = vec![b' '; 1024 * 1024 + 1];
    let res = app.post_signed(&big).await;
    assert_eq!(res.status(), 413);

    // Without a content-length (chunked), the limit still holds.
    let stream = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 * 1024]))),
    );
    let res = app
        .client
        .post(app.url("/webhooks/telnyx"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(app.job_count().await, 0);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn routing_methods_and_health(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let get = app
        .client
        .get(app.url("/webhooks/telnyx"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    let missing = app.client.post(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn database_outage_answers_503_and_the_listener_recovers(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let proxy = CuttableProxy::start(testing::database_server_addr()).await;
    let url = testing::database_url_of(&pool, Some(proxy.port));
    let app = spawn_with(pool, url, |_| {}).await;
    assert_eq!(app.post_signed(&event("before")).await.status(), 200);

    proxy.cut();
    let started = std::time::Instant::now();
    let res = app.post_signed(&event("during")).await;
    assert_eq!(res.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered inside Telnyx's window"
    );
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    proxy.restore();
    // Telnyx's retry of the same event now lands.
    let res = app.post_signed(&event("during")).await;
    assert_eq!(res.status(), 200);
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(ids, ["before", "during"]);
    app.stop().await;
}

/// Found by the chaos run: a daemon restarted just before a PostgreSQL
/// restart got its first ping through, then failed the session check on a
/// new connection and exited 1 instead of waiting for the database.
#[sqlx::test(migrations = false)]
async fn a_database_that_goes_away_during_start_up_is_waited_for(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let proxy = CuttableProxy::start(testing::database_server_addr()).await;
    // The first connection (the pool's ping) gets through; the next three,
    // the session check's and the schema check's, find the server gone.
    proxy.refuse_connections(1..4);
    let url = testing::database_url_of(&pool, Some(proxy.port));
    let app = spawn_with(pool, url, |_| {}).await;
    assert_eq!(app.post_signed(&event("after-start")).await.status(), 200);
    assert_eq!(app.job_count().await, 1);
    app.stop().await;
}
