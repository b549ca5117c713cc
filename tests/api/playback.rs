//! The playback API and player page on the real daemon (pipeline, Telnyx and
//! Storage simulators), the storage RLS migration on a stand-in of
//! Supabase's schema, and the page in headless Chromium.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::testing;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use recording_relay::config::Config;
use recording_relay::jobs::JobState;
use recording_relay::playback::audit;
use recording_relay_sim::{SimAudio, SimRecording};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PipelineApp, intake_for, spawn_pipeline, webhook_for};

const SECRET: &str = "test-jwt-secret-with-at-least-32-characters";
/// 75.5 s of the simulator's 8 kHz 16-bit mono WAV: (len - 44) / 16000.
const AUDIO_LEN: u64 = 44 + 16_000 * 75 + 8_000;
/// The browser test's recording: 10 min 0.5 s (9.6 MB), too long for
/// Chromium to buffer whole, so late seeks fetch with the current URL.
const LONG_AUDIO_LEN: u64 = 44 + 16_000 * 600 + 8_000;

fn seconds_of(len: u64) -> f64 {
    (len - 44) as f64 / 16_000.0
}

fn playback_on(config: &mut Config) {
    config.playback.addr = Some("127.0.0.1:0".parse().unwrap());
    config.playback.jwt_secret = Some(SECRET.to_owned().into());
}

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Claims shaped like a Supabase access token.
fn user_claims(org: &str, expires_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": "http://127.0.0.1/auth/v1", "sub": Uuid::new_v4(), "aud": "authenticated",
        "role": "authenticated", "iat": now, "exp": now + expires_in,
        "app_metadata": {"provider": "email", "organization_id": org},
        "user_metadata": {},
    })
}

fn token(org: Uuid) -> String {
    sign(&user_claims(&org.to_string(), 3600), SECRET)
}

struct Playback {
    p: PipelineApp,
    addr: SocketAddr,
    client: reqwest::Client,
}

impl Playback {
    async fn start(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Self {
        let p = spawn_pipeline(pool, |c| {
            playback_on(c);
            tweak(c);
        })
        .await;
        let addr = p.app.playback_addr.expect("playback server bound");
        Self {
            p,
            addr,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn recording(&self, id: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .client
            .get(self.url(&format!("/v1/intakes/{id}/recording")));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn stop(self) {
        self.p.stop().await;
    }
}

/// One intake per state the player shows, all in `org`.
struct States {
    available: Uuid,
    processing: Uuid,
    claimed: Uuid,
    failed: Uuid,
    none: Uuid,
}

async fn plain_intake(pool: &PgPool, org: Uuid) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO public.intakes (organization_id, room_name) VALUES ($1, 'room') RETURNING id",
    )
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A job row for `intake` in `state` that no worker will pick up.
async fn job_for(pool: &PgPool, intake: Uuid, state: &str) {
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, attempts, last_error,
             finished_at, next_run_at, intake_id, matched_at, match_method)
         VALUES ($1, 'call.recording.saved', '{}', $2::recording_relay.recording_job_state,
             CASE WHEN $2 = 'pending' THEN 0 ELSE 1 END,
             CASE WHEN $2 = 'failed' THEN 'recording not found at Telnyx (404)' END,
             CASE WHEN $2 = 'failed' THEN now() END,
             now() + interval '1 day', $3, now(), 'client_state')",
    )
    .bind(format!("ev-{intake}"))
    .bind(state)
    .bind(intake)
    .execute(pool)
    .await
    .unwrap();
}

/// `audio_len` bytes of WAV for the available one.
async fn prepare_states(p: &PipelineApp, org: Uuid, audio_len: u64) -> States {
    let pool = &p.app.pool;
    // Available: relayed by the real pipeline, as in production.
    let mut rec = SimRecording::sample("rec-playback");
    rec.content = SimAudio::generated(audio_len, 7);
    rec.duration_millis = (audio_len - 44) / 16;
    p.telnyx.add_recording(rec.clone());
    let available = intake_for(pool, &rec, "+1 555 765 0002").await;
    sqlx::query("UPDATE public.intakes SET organization_id = $2 WHERE id = $1")
        .bind(available)
        .bind(org)
        .execute(pool)
        .await
        .unwrap();
    let res = p.app.post_signed(&webhook_for("ev-playback", &rec)).await;
    assert_eq!(res.status(), 200);
    let job = p.finished_job("ev-playback").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);

    let processing = plain_intake(pool, org).await;
    job_for(pool, processing, "pending").await;
    // Matched (the pipeline claims the intake) but not stored yet.
    let claimed = plain_intake(pool, org).await;
    sqlx::query("UPDATE public.intakes SET recording_id = 'rec-on-its-way' WHERE id = $1")
        .bind(claimed)
        .execute(pool)
        .await
        .unwrap();
    let failed = plain_intake(pool, org).await;
    job_for(pool, failed, "failed").await;
    let none = plain_intake(pool, org).await;
    States {
        available,
        processing,
        claimed,
        failed,
        none,
    }
}

#[sqlx::test(migrations = false)]
async fn playback_is_off_unless_configured(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    assert_eq!(p.app.playback_addr, None);
    p.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_api_reports_each_state_and_signs_playable_urls(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let org = Uuid::new_v4();
    let states = prepare_states(&s.p, org, AUDIO_LEN).await;
    let t = token(org);

    let before = chrono::Utc::now();
    let (status, body) = s.recording(&states.available.to_string(), Some(&t)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "available");
    assert_eq!(
        body["duration_seconds"], 76,
        "75.5 s, rounded by the pipeline"
    );
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    let ttl = expires_at - before;
    assert!(
        (590..=601).contains(&ttl.num_seconds()),
        "default ttl is 10 min: {ttl}"
    );
    let url = body["url"].as_str().unwrap();
    assert!(
        url.starts_with(&s.p.storage.base_url()) && url.contains("/object/sign/"),
        "a signed URL, not the authenticated one"
    );
    // What <audio> does to seek: a range request, answered 206.
    let res = s
        .client
        .get(url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(
        res.headers()["content-range"],
        format!("bytes 1000-1999/{AUDIO_LEN}").as_str()
    );

    for (id, expected) in [
        (states.processing, "processing"),
        (states.claimed, "processing"),
        (states.failed, "failed"),
        (states.none, "none"),
    ] {
        let (status, body) = s.recording(&id.to_string(), Some(&t)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], expected, "{id}: {body}");
        assert_eq!(body["url"], Value::Null);
        assert_eq!(body["expires_at"], Value::Null);
    }
    s.stop().await;
}

#[sqlx::test(migrations = false)]
async fn tokens_and_organizations_are_enforced(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let org = Uuid::new_v4();
    let other_org = Uuid::new_v4();
    let intake = plain_intake(&s.p.app.pool, org).await;
    let id = intake.to_string();

    // No token, or not a bearer token.
    let res = s
        .client
        .get(s.url(&format!("/v1/intakes/{id}/recording")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let res = s
        .client
        .get(s.url(&format!("/v1/intakes/{id}/recording")))
        .header("authorization", format!("Basic {}", token(org)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Signed with another secret.
    let forged = sign(
        &user_claims(&org.to_string(), 3600),
        "not-the-project-secret-but-just-as-long",
    );
    assert_eq!(s.recording(&id, Some(&forged)).await.0, 401);
    // Expired an hour ago.
    let expired = sign(&user_claims(&org.to_string(), -3600), SECRET);
    let (status, body) = s.recording(&id, Some(&expired)).await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "the token has expired");
    // The anon key is signed with the same secret, but is no user.
    let mut anon = user_claims(&org.to_string(), 3600);
    anon["aud"] = json!("anon");
    assert_eq!(s.recording(&id, Some(&sign(&anon, SECRET))).await.0, 401);
    // The project's API keys as Supabase mints them: no aud, role anon or
    // service_role (jsonwebtoken alone skips the aud check without one).
    for role in ["anon", "service_role"] {
        let mut key = user_claims(&org.to_string(), 3600);
        let claims = key.as_object_mut().unwrap();
        claims.remove("aud");
        claims.remove("sub");
        claims.insert("role".into(), json!(role));
        assert_eq!(
            s.recording(&id, Some(&sign(&key, SECRET))).await.0,
            401,
            "the {role} key"
        );
    }
    // An organization the user chose for themselves does not count.
    let mut self_made = user_claims(&org.to_string(), 3600);
    self_made["app_metadata"] = json!({});
    self_made["user_metadata"] = json!({"organization_id": org});
    assert_eq!(
        s.recording(&id, Some(&sign(&self_made, SECRET))).await.0,
        403
    );

    // Another organization's intake looks exactly like a missing one.
    let (status, other) = s.recording(&id, Some(&token(other_org))).await;
    assert_eq!(status, 404);
    let (status, missing) = s
        .recording(&Uuid::new_v4().to_string(), Some(&token(org)))
        .await;
    assert_eq!(status, 404);
    assert_eq!(other, missing);
    // Malformed ids: 404 with a token, 401 without (nothing before auth).
    assert_eq!(s.recording("not-a-uuid", Some(&token(org))).await.0, 404);
    assert_eq!(s.recording("not-a-uuid", None).await.0, 401);
    // The owner gets through.
    assert_eq!(s.recording(&id, Some(&token(org))).await.0, 200);
    s.stop().await;
}

/// Sets `intakes.recording_object_path` as a ZScribe user may (the usual
/// host policy lets members update their organization's intakes).
async fn point_intake_at(pool: &PgPool, intake: Uuid, recording_id: &str, path: &str) {
    sqlx::query(
        "UPDATE public.intakes SET recording_id = $2, recording_object_path = $3 WHERE id = $1",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(path)
    .execute(pool)
    .await
    .unwrap();
}

/// The column is the host's: a path in it that the relay did not record
/// for that intake, in exactly the intake's own folder, is never signed
/// (issue #19: org A's token got signed URLs for org B's recording and for
/// a file in another bucket, through dot segments).
#[sqlx::test(migrations = false)]
async fn a_path_the_relay_did_not_record_for_the_intake_is_never_signed(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let states = prepare_states(&s.p, org_b, AUDIO_LEN).await;
    let pool = s.p.app.pool.clone();
    let b_path: String =
        sqlx::query_scalar("SELECT recording_object_path FROM public.intakes WHERE id = $1")
            .bind(states.available)
            .fetch_one(&pool)
            .await
            .unwrap();
    let b_file = b_path.rsplit('/').next().unwrap().to_owned();
    let b = states.available;
    s.p.storage
        .create_bucket("patient-documents", false, None, None);
    let a = plain_intake(&pool, org_a).await;
    let t = token(org_a);
    let signs_before = s.p.storage.request_count("/storage/v1/object/sign/");
    for path in [
        format!("intakes/{a}/../{b}/{b_file}"),
        format!("x/../intakes/{b}/{b_file}"),
        "../patient-documents/scan.pdf".to_owned(),
        format!("intakes/{a}/%2e%2e/{b}/{b_file}"),
        format!("intakes/{a}/..\\{b}\\{b_file}"),
        format!("intakes/{a}//{b_file}"),
        // Another organization's folder as it is (B's own path is taken:
        // the column is unique), and an unmatched object.
        format!("intakes/{b}/rec-other.wav"),
        "unmatched/rec-x.wav".to_owned(),
        // The own folder's form, but nothing the relay stored there.
        format!("intakes/{a}/rec-a.wav"),
    ] {
        point_intake_at(&pool, a, "rec-a", &path).await;
        let (status, body) = s.recording(&a.to_string(), Some(&t)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["status"], "none", "{path}: {body}");
        assert_eq!(body["url"], Value::Null, "{path}: {body}");
    }
    assert_eq!(
        s.p.storage.request_count("/storage/v1/object/sign/"),
        signs_before,
        "no attack path reached storage"
    );
    let audited = audit::list(&pool, &audit::Filter::Intake(a), 10)
        .await
        .unwrap();
    assert_eq!(audited, vec![]);

    // B's own recording still plays for B; and once B's column is changed
    // by hand, even to another file of B's own folder, it no longer does.
    let (status, body) = s.recording(&b.to_string(), Some(&token(org_b))).await;
    assert_eq!(
        (status.as_u16(), body["status"].as_str()),
        (200, Some("available"))
    );
    point_intake_at(&pool, b, "rec-playback", &format!("intakes/{b}/other.wav")).await;
    let (status, body) = s.recording(&b.to_string(), Some(&token(org_b))).await;
    assert_eq!(
        (status.as_u16(), body["status"].as_str()),
        (200, Some("none")),
        "{body}"
    );
    s.stop().await;
}

#[sqlx::test(migrations = false)]
async fn signed_urls_expire_after_the_configured_ttl(pool: PgPool) {
    let s = Playback::start(pool, |c| {
        c.playback.signed_url_ttl = Duration::from_secs(1);
    })
    .await;
    let org = Uuid::new_v4();
    let intake = prepare_states(&s.p, org, AUDIO_LEN).await.available;
    let (status, body) = s.recording(&intake.to_string(), Some(&token(org))).await;
    assert_eq!(status, 200, "{body}");
    let url = body["url"].as_str().unwrap().to_owned();
    let minted = Instant::now();
    // The storage server's token has whole-second timestamps, so it dies
    // within 0-1 s after minting; poll until it does.
    let deadline = minted + Duration::from_secs(5);
    let (status, body) = loop {
        let res = s.client.get(&url).send().await.unwrap();
        let status = res.status();
        if status != 200 {
            break (status, res.json::<Value>().await.unwrap());
        }
        assert!(Instant::now() < deadline, "signed URL never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 400);
    assert_eq!(body["error"], "InvalidJWT", "{body}");
    assert_eq!(body["message"], "jwt expired", "{body}");
    assert!(minted.elapsed() < Duration::from_millis(2500));
    s.stop().await;
}

#[sqlx::test(migrations = false)]
async fn cors_is_granted_to_configured_origins_only(pool: PgPool) {
    let s = Playback::start(pool, |c| {
        c.playback.allowed_origins = vec!["https://app.zscribe.example".to_owned()];
    })
    .await;
    let org = Uuid::new_v4();
    let intake = plain_intake(&s.p.app.pool, org).await;
    let path = format!("/v1/intakes/{intake}/recording");

    let preflight = s
        .client
        .request(reqwest::Method::OPTIONS, s.url(&path))
        .header("origin", "https://app.zscribe.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(
        h["access-control-allow-origin"],
        "https://app.zscribe.example"
    );
    assert_eq!(h["access-control-allow-headers"], "authorization");
    assert_eq!(h["access-control-allow-methods"], "GET");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "origin");
    assert_eq!(h["cache-control"], "no-store");
    // Another origin's preflight is answered, but grants nothing.
    let refused = s
        .client
        .request(reqwest::Method::OPTIONS, s.url(&path))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 204);
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let res = s
        .client
        .get(s.url(&path))
        .bearer_auth(token(org))
        .header("origin", "https://app.zscribe.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.zscribe.example"
    );
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["access-control-expose-headers"], "date");
    // The answer depends on Origin: a shared cache must not serve one
    // origin's answer to another.
    assert_eq!(res.headers()["vary"], "origin");

    let res = s
        .client
        .get(s.url(&path))
        .bearer_auth(token(org))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    assert_eq!(res.headers()["vary"], "origin");

    // The page is not an API answer: no CORS grant.
    let page = s
        .client
        .get(s.url(&format!("/play/{intake}")))
        .header("origin", "https://app.zscribe.example")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers().get("access-control-allow-origin").is_none());
    s.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_player_page_is_served_with_a_strict_policy(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let res = s
        .client
        .get(s.url(&format!("/play/{}", Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(
        csp.contains(&format!("media-src {}", s.p.storage.base_url())),
        "{csp}"
    );
    let html = res.text().await.unwrap();
    assert!(html.contains("../assets/player.js"));
    let js = s
        .client
        .get(s.url("/assets/player.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(
        s.client.get(s.url("/nope")).send().await.unwrap().status(),
        404
    );
    s.stop().await;
}

#[sqlx::test(migrations = false)]
async fn wrong_methods_and_unknown_paths_get_api_answers(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let recording = format!("/v1/intakes/{}/recording", Uuid::new_v4());
    let page = format!("/play/{}", Uuid::new_v4());
    let send = |method: reqwest::Method, path: &str| s.client.request(method, s.url(path)).send();

    for method in [reqwest::Method::POST, reqwest::Method::HEAD] {
        let res = send(method.clone(), &recording).await.unwrap();
        assert_eq!(res.status(), 405, "{method}");
        assert_eq!(res.headers()["allow"], "GET, OPTIONS", "{method}");
        assert_eq!(res.headers()["cache-control"], "no-store", "{method}");
    }
    let res = send(reqwest::Method::DELETE, &recording).await.unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"error": "method_not_allowed", "message": ""})
    );

    // The page's paths answer GET only; anything else is an unknown route.
    let unknown = json!({"error": "not_found", "message": "no such route"});
    for (method, path) in [
        (reqwest::Method::POST, page.as_str()),
        (reqwest::Method::HEAD, page.as_str()),
        (reqwest::Method::PUT, "/assets/player.js"),
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::GET, "/play/"),
        (reqwest::Method::GET, "/healthz/"),
        (reqwest::Method::GET, "/v1/intakes/recording"),
    ] {
        let res = send(method.clone(), path).await.unwrap();
        assert_eq!(res.status(), 404, "{method} {path}");
        assert_eq!(
            res.headers()["cache-control"],
            "no-store",
            "{method} {path}"
        );
        assert_eq!(res.headers()["x-content-type-options"], "nosniff");
        if method != reqwest::Method::HEAD {
            assert_eq!(
                res.json::<Value>().await.unwrap(),
                unknown,
                "{method} {path}"
            );
        }
    }

    let res = send(reqwest::Method::HEAD, "/healthz").await.unwrap();
    assert_eq!(res.status(), 200);
    let res = send(reqwest::Method::GET, "/healthz").await.unwrap();
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    // The page and script may be revalidated, not stored blindly.
    for path in [page.as_str(), "/assets/player.js"] {
        let res = send(reqwest::Method::GET, path).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["cache-control"], "no-cache", "{path}");
        assert_eq!(res.headers()["referrer-policy"], "no-referrer", "{path}");
    }
    s.stop().await;
}

/// The contract (docs/openapi.json) is served as committed, without a
/// token: it is what the UI and scripts/contract-test hold the API to.
#[sqlx::test(migrations = false)]
async fn the_openapi_document_is_served_without_a_token_exactly_as_committed(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let res = s.client.get(s.url("/openapi.json")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["cache-control"], "no-store");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    assert_eq!(res.text().await.unwrap(), committed);
    s.stop().await;
}

// ------------------------------------------------------------------ JWKS

/// A P-256 key for tests only (PKCS#8, base64).
const TEST_EC_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQggvfONAkmGzp075fj1HcHOSiFaRbW/puB5lODa5rIecahRANCAAR7aiJs3kWaZjz9z0wEaEi8tlWPuIMJtMHPbBYJ31T29cjWVPdFUsXekhqksFVqWh3IvNeMe6jbA61rEA9TUsNt";

/// Serves `body` at any path, counting requests.
async fn serve_json(body: Value) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let body = bytes::Bytes::from(body.to_string());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, counter) = (body.clone(), counter.clone());
            let service = hyper::service::service_fn(move |_req| {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(body),
                    ))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (format!("http://{addr}/auth/v1/.well-known/jwks.json"), hits)
}

#[sqlx::test(migrations = false)]
async fn asymmetric_tokens_are_checked_against_the_jwks(pool: PgPool) {
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(TEST_EC_KEY)
        .unwrap();
    let key = EncodingKey::from_ec_der(&der);
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("key-1".to_owned());
    let (jwks_url, hits) = serve_json(json!({ "keys": [jwk] })).await;
    let s = Playback::start(pool, |c| c.playback.jwks_url = Some(jwks_url)).await;
    let org = Uuid::new_v4();
    let id = plain_intake(&s.p.app.pool, org).await.to_string();

    let es256 = |kid: &str, claims: &Value| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    };
    let claims = user_claims(&org.to_string(), 3600);
    let (status, body) = s.recording(&id, Some(&es256("key-1", &claims))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "none");
    // HS256 with the secret keeps working next to it.
    assert_eq!(s.recording(&id, Some(&token(org))).await.0, 200);
    // Unknown kid: one refetch, then refused; a second unknown kid within
    // the cooldown does not fetch again.
    assert_eq!(
        s.recording(&id, Some(&es256("rotated-away", &claims)))
            .await
            .0,
        401
    );
    assert_eq!(
        s.recording(&id, Some(&es256("another", &claims))).await.0,
        401
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut expired = claims.clone();
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
    assert_eq!(
        s.recording(&id, Some(&es256("key-1", &expired))).await.0,
        401
    );
    s.stop().await;
}

// --------------------------------------------------------- storage RLS

/// What `authenticated` sees of `storage.objects` with these JWT claims.
async fn visible_objects(pool: &PgPool, claims: Option<Value>) -> Vec<(String, String)> {
    let mut tx = pool.begin().await.unwrap();
    if let Some(claims) = claims {
        sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
            .bind(claims.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut *tx)
        .await
        .unwrap();
    let rows = sqlx::query_as("SELECT bucket_id, name FROM storage.objects ORDER BY 1, 2")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    rows
}

async fn insert_intake(pool: &PgPool, org: Uuid) -> Uuid {
    sqlx::query_scalar("INSERT INTO public.intakes (organization_id) VALUES ($1) RETURNING id")
        .bind(org)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn insert_object(pool: &PgPool, bucket: &str, name: &str) {
    sqlx::query("INSERT INTO storage.objects (bucket_id, name) VALUES ($1, $2)")
        .bind(bucket)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
}

/// What the link step writes: the intake's column and the relay's record.
async fn link_by_relay(pool: &PgPool, intake: Uuid, recording_id: &str) -> String {
    let path = format!("intakes/{intake}/{recording_id}.wav");
    point_intake_at(pool, intake, recording_id, &path).await;
    sqlx::query(
        "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path)
         VALUES ($1, $2, $3)",
    )
    .bind(intake)
    .bind(recording_id)
    .bind(&path)
    .execute(pool)
    .await
    .unwrap();
    path
}

fn member_of(org: Uuid) -> Value {
    json!({"role": "authenticated", "aud": "authenticated",
           "app_metadata": {"organization_id": org}, "user_metadata": {}})
}

/// Direct reads (a user's own `createSignedUrl` or download) write no
/// audit row, so by default the bucket grants signed-in users nothing: only
/// the playback API, whose audit fails closed, hands out URLs (issue #19).
#[sqlx::test(migrations = false)]
async fn by_default_no_signed_in_user_reads_the_recordings_bucket_directly(pool: PgPool) {
    let pool = crate::supabase::supabase_shaped(pool).await;
    let policies: Vec<String> = sqlx::query_scalar(
        "SELECT policyname::text FROM pg_policies
         WHERE schemaname = 'storage' AND tablename = 'objects'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(policies, Vec::<String>::new());
    sqlx::query("GRANT SELECT ON intakes TO authenticated")
        .execute(&pool)
        .await
        .unwrap();
    let org = Uuid::new_v4();
    let intake = insert_intake(&pool, org).await;
    let path = format!("intakes/{intake}/rec-a.wav");
    point_intake_at(&pool, intake, "rec-a", &path).await;
    insert_object(&pool, "call-recordings", &path).await;
    assert_eq!(visible_objects(&pool, Some(member_of(org))).await, vec![]);
}

/// The opt-in policy (unaudited, README "Playback") grants an object only
/// when the relay recorded it for an intake of the user's organization, in
/// that intake's own folder, and the intake's column still names it: never
/// another organization's object, a dot-segment name or `unmatched/`.
#[sqlx::test(migrations = false)]
async fn the_opt_in_storage_policy_grants_only_what_the_relay_linked_in_the_intakes_own_folder(
    pool: PgPool,
) {
    let pool = crate::supabase::supabase_shaped(pool).await;
    sqlx::query("GRANT SELECT ON intakes TO authenticated")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT recording_relay.direct_storage_reads_allow()")
        .execute(&pool)
        .await
        .unwrap();
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let a = insert_intake(&pool, org_a).await;
    let b = insert_intake(&pool, org_b).await;
    let path_a = link_by_relay(&pool, a, "rec-a").await;
    let path_b = link_by_relay(&pool, b, "rec-b").await;
    // Org A's other intakes, pointed by a member at what is not theirs: a
    // file in B's folder (B's own path is taken: the column is unique).
    let in_b = format!("intakes/{b}/rec-b2.wav");
    let at_b = insert_intake(&pool, org_a).await;
    point_intake_at(&pool, at_b, "rec-b2", &in_b).await;
    let dots = insert_intake(&pool, org_a).await;
    let dotted = format!("intakes/{dots}/../{b}/rec-b.wav");
    point_intake_at(&pool, dots, "rec-b", &dotted).await;
    let unmatched = insert_intake(&pool, org_a).await;
    point_intake_at(&pool, unmatched, "rec-x", "unmatched/rec-x.wav").await;
    // The own folder's form, but not what the relay recorded.
    let unlinked = insert_intake(&pool, org_a).await;
    let unlinked_path = format!("intakes/{unlinked}/rec-u.wav");
    point_intake_at(&pool, unlinked, "rec-u", &unlinked_path).await;
    for (bucket, name) in [
        ("call-recordings", path_a.as_str()),
        ("call-recordings", path_b.as_str()),
        ("call-recordings", in_b.as_str()),
        ("call-recordings", dotted.as_str()),
        ("call-recordings", "unmatched/rec-x.wav"),
        ("call-recordings", unlinked_path.as_str()),
        ("call-recordings", "intakes/"),
        ("avatars", path_a.as_str()),
    ] {
        insert_object(&pool, bucket, name).await;
    }
    let only = |name: &str| vec![("call-recordings".to_owned(), name.to_owned())];

    assert_eq!(
        visible_objects(&pool, Some(member_of(org_a))).await,
        only(&path_a)
    );
    assert_eq!(
        visible_objects(&pool, Some(member_of(org_b))).await,
        only(&path_b)
    );
    assert_eq!(
        visible_objects(&pool, Some(member_of(Uuid::new_v4()))).await,
        vec![]
    );
    // user_metadata is the user's to edit: it grants nothing.
    let mut self_made = member_of(org_a);
    self_made["app_metadata"] = json!({});
    self_made["user_metadata"] = json!({"organization_id": org_a});
    assert_eq!(visible_objects(&pool, Some(self_made)).await, vec![]);
    assert_eq!(visible_objects(&pool, None).await, vec![]);

    // A host that changes its column only loses access.
    point_intake_at(&pool, a, "rec-a", &format!("intakes/{a}/other.wav")).await;
    assert_eq!(visible_objects(&pool, Some(member_of(org_a))).await, vec![]);

    // And the opt-in is undone as plainly.
    sqlx::query("SELECT recording_relay.direct_storage_reads_refuse()")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(visible_objects(&pool, Some(member_of(org_b))).await, vec![]);
}

#[sqlx::test(migrations = false)]
async fn without_supabase_the_storage_migration_changes_nothing(pool: PgPool) {
    let pool = testing::prepare(pool).await;
    let storage: Option<String> = sqlx::query_scalar("SELECT to_regclass('storage.objects')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(storage, None);
    let bucket: String =
        sqlx::query_scalar("SELECT recording_relay.recording_relay_recordings_bucket()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(bucket, "call-recordings");
}

// ------------------------------------------------------------- browser

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// In CI a missing tool fails the test; on a developer machine it is
/// skipped, loudly.
fn missing_tool(what: &str, install: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{what} is needed for the browser test (CI=true): {install}"
    );
    eprintln!(
        "\n!!!!! SKIPPING the browser test: {what} not found (it fails instead when CI=true) !!!!!\n"
    );
    true
}

/// Once per test process: the page and the component tests run at the same
/// time, and one's `npm ci` (which empties node_modules first) would pull
/// the packages from under the other.
async fn ensure_node_modules() {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED.get_or_init(install_node_modules).await;
}

async fn install_node_modules() {
    let dir = browser_dir();
    // An older checkout's node_modules may lack the packages added since.
    let wanted = [
        "playwright-core",
        "esbuild",
        "react",
        "react-dom",
        "typescript",
    ];
    if wanted
        .iter()
        .all(|p| dir.join("node_modules").join(p).is_dir())
    {
        return;
    }
    let out = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .await
        .expect("npm runs");
    assert!(
        out.status.success(),
        "npm ci in tests/browser failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Chromium's path when it and Node are there; otherwise the test is
/// skipped (or fails under CI).
fn browser_tools() -> Option<String> {
    let chromium =
        std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !Path::new(&chromium).exists()
        && missing_tool(
            "chromium",
            "apt-get install -y chromium (or set CHROMIUM_PATH)",
        )
    {
        return None;
    }
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok && missing_tool("node", "install Node.js 20 or later with npm") {
        return None;
    }
    Some(chromium)
}

#[sqlx::test(migrations = false)]
async fn the_player_page_plays_seeks_and_renews_in_chromium(pool: PgPool) {
    let Some(chromium) = browser_tools() else {
        return;
    };
    ensure_node_modules().await;

    // A short ttl makes the page renew its URL while the test watches.
    let ttl = 6;
    let s = Playback::start(pool, |c| {
        c.playback.signed_url_ttl = Duration::from_secs(ttl);
    })
    .await;
    let org = Uuid::new_v4();
    let states = prepare_states(&s.p, org, LONG_AUDIO_LEN).await;
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let spec = json!({
        "token": token(org),
        "chromium": chromium,
        "artifacts": artifacts,
        "ttlSeconds": ttl,
        "expectedDuration": seconds_of(LONG_AUDIO_LEN),
        "expectedLabel": "10:00",
        "intakes": {
            "available": states.available,
            "processing": states.processing,
            "failed": states.failed,
            "none": states.none,
        },
    });

    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new("node")
            .arg(browser_dir().join("player.mjs"))
            .arg(format!("http://{}", s.addr))
            .arg(spec.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser test finishes within 3 minutes")
    .expect("node runs");
    println!(
        "browser test took {:.1}s\n--- stdout\n{}\n--- stderr\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "player.mjs failed ({}); output above",
        out.status
    );
    s.stop().await;
}

// --------------------------------------------------------- access audit

#[sqlx::test(migrations = false)]
async fn every_signed_url_is_audited_and_none_is_handed_out_unaudited(pool: PgPool) {
    let s = Playback::start(pool, |_| {}).await;
    let org = Uuid::new_v4();
    let states = prepare_states(&s.p, org, AUDIO_LEN).await;
    let user = Uuid::new_v4().to_string();
    let mut claims = user_claims(&org.to_string(), 3600);
    claims["sub"] = json!(user);
    let t = sign(&claims, SECRET);
    let pool = s.p.app.pool.clone();

    let res = s
        .client
        .get(s.url(&format!("/v1/intakes/{}/recording", states.available)))
        .bearer_auth(&t)
        .header("user-agent", "ZScribe-Test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    // States without a URL hand out nothing, so they record nothing.
    for intake in [states.processing, states.failed, states.none] {
        assert_eq!(s.recording(&intake.to_string(), Some(&t)).await.0, 200);
    }

    let by_intake = audit::list(&pool, &audit::Filter::Intake(states.available), 10)
        .await
        .unwrap();
    assert_eq!(by_intake.len(), 1, "{by_intake:?}");
    let entry = &by_intake[0];
    assert_eq!(entry.user_id, user);
    assert_eq!(entry.organization, org.to_string());
    assert_eq!(entry.client_addr.as_deref(), Some("127.0.0.1"));
    assert_eq!(entry.user_agent.as_deref(), Some("ZScribe-Test/1.0"));
    assert!(
        entry.object_path.starts_with("intakes/"),
        "{}",
        entry.object_path
    );
    assert_eq!(entry.expires_at.timestamp(), expires_at.timestamp());
    assert_eq!(
        audit::list(&pool, &audit::Filter::User(user.clone()), 10)
            .await
            .unwrap(),
        by_intake
    );

    // The operator's view and the CLI read the same records.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_recording-relay"))
        .args(["audit", "--user", &user, "--json"])
        .env_clear()
        .env("DATABASE_URL", testing::database_url_of(&pool, None))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed[0]["intake_id"], json!(states.available));
    assert_eq!(printed[0]["client_addr"], "127.0.0.1");

    // Fail closed: when the audit cannot be written, no URL leaves.
    sqlx::query(
        "ALTER TABLE recording_relay.playback_audit
         ADD CONSTRAINT refuse_every_row CHECK (false) NOT VALID",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (status, body) = s.recording(&states.available.to_string(), Some(&t)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.get("url").is_none(), "{body}");
    assert!(!body.to_string().contains("/object/sign/"), "{body}");
    s.stop().await;
}

/// Serves the bundled harness (`index.html`, `harness.js`) from `dir`, as
/// the UI's own origin; returns that origin.
async fn serve_bundle(dir: PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let dir = dir.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let (file, kind) = match req.uri().path() {
                    "/index.html" => ("index.html", "text/html; charset=utf-8"),
                    "/harness.js" => ("harness.js", "text/javascript; charset=utf-8"),
                    _ => ("", ""),
                };
                let body = std::fs::read(dir.join(file))
                    .ok()
                    .filter(|_| !file.is_empty());
                async move {
                    let mut res = hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body.clone().unwrap_or_default()),
                    ));
                    if body.is_some() {
                        res.headers_mut()
                            .insert("content-type", kind.parse().unwrap());
                    } else {
                        *res.status_mut() = hyper::StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::convert::Infallible>(res)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    origin
}

async fn node(args: &[&str], timeout: Duration) -> std::process::Output {
    let started = Instant::now();
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new("node")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("node {args:?} did not finish within {timeout:?}"))
    .expect("node runs");
    println!(
        "node {} took {:.1}s\n--- stdout\n{}\n--- stderr\n{}",
        args.first().unwrap_or(&""),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// web/RecordingPlayer.tsx, bundled with esbuild and React from npm,
/// rendered by the UI's origin in Chromium against the real playback API
/// (CORS included): each state, the duration as m:ss, and a renewal of the
/// signed URL that keeps the position.
#[sqlx::test(migrations = false)]
async fn the_react_player_shows_each_state_and_renews_in_chromium(pool: PgPool) {
    let Some(chromium) = browser_tools() else {
        return;
    };
    ensure_node_modules().await;
    let script = browser_dir().join("component.mjs");
    let script = script.to_str().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    let out = node(
        &[script, "build", bundle.path().to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "bundling failed; output above");
    let origin = serve_bundle(bundle.path().to_owned()).await;

    let ttl = 6;
    let s = Playback::start(pool, |c| {
        c.playback.signed_url_ttl = Duration::from_secs(ttl);
        c.playback.allowed_origins = vec![origin.clone()];
    })
    .await;
    let org = Uuid::new_v4();
    let states = prepare_states(&s.p, org, LONG_AUDIO_LEN).await;
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    let spec = json!({
        "api": format!("http://{}", s.addr),
        "token": token(org),
        "chromium": chromium,
        "artifacts": artifacts,
        "ttlSeconds": ttl,
        "expectedDuration": seconds_of(LONG_AUDIO_LEN),
        "expectedLabel": "10:00",
        "intakes": {
            "available": states.available,
            "processing": states.processing,
            "failed": states.failed,
            "none": states.none,
        },
    });
    let out = node(
        &[
            script,
            "run",
            &format!("{origin}/index.html"),
            &spec.to_string(),
        ],
        Duration::from_secs(180),
    )
    .await;
    assert!(
        out.status.success(),
        "component.mjs failed ({}); output above",
        out.status
    );
    s.stop().await;
}

/// Issue #21: Telnyx could not record the call. The intake the call's SIP
/// header named shows `failed` (not "processing" nor "none"), the job says
/// Telnyx's reason, the operator is alerted, and the DBA view lists it;
/// nothing is downloaded.
#[sqlx::test(migrations = false)]
async fn a_recording_error_shows_the_intake_failed_with_telnyxs_reason(pool: PgPool) {
    let alerts = crate::helpers::AlertSink::start().await;
    let alert_url = alerts.url();
    let s = Playback::start(pool, |c| c.pipeline.alert_webhook_url = Some(alert_url)).await;
    let org = Uuid::new_v4();
    let intake = plain_intake(&s.p.app.pool, org).await;
    let session = Uuid::new_v4().to_string();
    let init = testing::call_initiated_event("ev-init", &session, Some(&intake.to_string()));
    s.p.post_event(&init).await;
    let reason = "Failed to authorize with storage using custom credentials";
    s.p.post_event(&testing::recording_error_event("ev-err", &session, reason))
        .await;

    let job = s.p.finished_job("ev-err").await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.intake_id, Some(intake));
    assert_eq!(job.match_method.as_deref(), Some("sip_header"));
    assert_eq!(
        job.last_error.as_deref(),
        Some(format!("Telnyx could not record the call: {reason}").as_str())
    );
    let (status, body) = s.recording(&intake.to_string(), Some(&token(org))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "failed", "{body}");

    let alert = alerts.next().await;
    assert_eq!(alert["job_id"], job.id, "{alert}");
    let listed: Vec<(String, Option<Uuid>)> =
        sqlx::query_as("SELECT reason, intake_id FROM recording_relay.recording_errors")
            .fetch_all(&s.p.app.pool)
            .await
            .unwrap();
    assert_eq!(listed, [(reason.to_owned(), Some(intake))]);
    assert_eq!(
        s.p.telnyx.request_count("/v2/recordings"),
        0,
        "nothing to fetch"
    );
    s.stop().await;
}
