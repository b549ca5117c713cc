//! The real storage server for the conformance suite, and a daemon wired to
//! it (with the Telnyx simulator in front).
//!
//! Where the server comes from, in this order:
//! - `STORAGE_TEST_URL` + `STORAGE_TEST_SERVICE_KEY` (+ `STORAGE_TEST_DATABASE_URL`,
//!   the project's database, and optionally `STORAGE_TEST_JWT_SECRET` for the
//!   RLS case): an already running server, e.g. a real Supabase project;
//! - otherwise `scripts/storage-server run`, which builds (cached) and starts
//!   the server from `STORAGE_SERVER_SRC` or the vendored tarball, on a
//!   private PostgreSQL cluster, and stops both when our end of its stdin
//!   closes, i.e. when this test binary exits, however it exits.
//!
//! Without a source, the suite is skipped with a loud message, unless `CI`
//! is set: then it fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::testing;
use recording_relay::app::App;
use recording_relay::config::{Config, Role};
use recording_relay::db;
use recording_relay::jobs::{Job, Queue};
use recording_relay::pipeline::Pipeline;
use recording_relay::providers::storage_api::StorageClient;
use recording_relay_sim::{SimRecording, TelnyxSim, TelnyxSimConfig};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) const TELNYX_KEY: &str = "KEY_conformance";

/// How the script reports that it has nothing to build from (see its
/// `source_key`): the one failure that skips instead of failing.
const NO_SOURCE: i32 = 3;

pub(crate) struct Server {
    pub url: String,
    pub service_key: String,
    /// Signs user JWTs for the RLS case; unknown for a remote project
    /// unless given.
    pub jwt_secret: Option<String>,
    pub database_url: String,
    /// Holding it keeps the script (and so the server) running.
    _stdin: Option<Mutex<ChildStdin>>,
    _child: Option<Mutex<Child>>,
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn skip_or_fail(why: &str) -> Option<&'static Server> {
    assert!(
        !ci(),
        "the storage conformance suite cannot run (CI is set, so this fails): {why}"
    );
    eprintln!(
        "\n!!!!! SKIPPING the storage-server conformance suite: {why}\n\
         !!!!! set STORAGE_SERVER_SRC to a supabase/storage checkout (README, \"Tests\") \
         to run it; with CI=true this fails instead.\n"
    );
    None
}

/// The server, started on first use; `None`: skipped (already said why).
pub(crate) fn server() -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(start) {
        Ok(server) => Some(server),
        Err(why) => skip_or_fail(why),
    }
}

fn start() -> Result<Server, String> {
    if let (Ok(url), Ok(key)) = (
        std::env::var("STORAGE_TEST_URL"),
        std::env::var("STORAGE_TEST_SERVICE_KEY"),
    ) {
        let database_url = std::env::var("STORAGE_TEST_DATABASE_URL").map_err(|_| {
            "STORAGE_TEST_URL is set but STORAGE_TEST_DATABASE_URL is not".to_owned()
        })?;
        return Ok(Server {
            url,
            service_key: key,
            jwt_secret: std::env::var("STORAGE_TEST_JWT_SECRET").ok(),
            database_url,
            _stdin: None,
            _child: None,
        });
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/storage-server");
    let mut child = Command::new(script)
        .arg("run")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut vars = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line == "READY" {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            vars.insert(k.to_owned(), v.to_owned());
        }
    }
    if !vars.contains_key("SUPABASE_URL") {
        let status = child.wait().map_err(|e| e.to_string())?;
        return if status.code() == Some(NO_SOURCE) {
            Err("no storage-server source (STORAGE_SERVER_SRC unset, no vendored tarball)".into())
        } else {
            // Present but broken is a failure everywhere.
            panic!("scripts/storage-server run failed ({status}); see its output above")
        };
    }
    let stdin = child.stdin.take().expect("piped");
    Ok(Server {
        url: vars["SUPABASE_URL"].clone(),
        service_key: vars["SUPABASE_SERVICE_ROLE_KEY"].clone(),
        jwt_secret: vars.get("STORAGE_JWT_SECRET").cloned(),
        database_url: vars["DATABASE_URL"].clone(),
        _stdin: Some(Mutex::new(stdin)),
        _child: Some(Mutex::new(child)),
    })
}

/// Supabase's `auth.jwt()`, which the daemon's storage policy reads. On
/// Supabase the auth service installs it; storage-api alone does not.
const AUTH_JWT: &str = r"
CREATE SCHEMA IF NOT EXISTS auth;
CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;
GRANT USAGE ON SCHEMA auth TO authenticated, anon, service_role;
GRANT EXECUTE ON FUNCTION auth.jwt() TO authenticated, anon, service_role;
";

/// What Supabase's default privileges give the API roles on the host's
/// tables; the storage policy's subquery reads `intakes` as the user.
const HOST_GRANTS: &str = "GRANT SELECT ON patients, intakes TO authenticated;";

/// The suite's tests share one server and one database (the daemon's
/// tables sit beside the storage schema, as on Supabase), so they run one
/// at a time: a worker of one test must not claim another test's job.
pub(crate) struct Suite {
    pub server: &'static Server,
    pub pool: PgPool,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

pub(crate) async fn suite() -> Option<Suite> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    static PREPARED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let server = server()?;
    let turn = TURN.lock().await;
    let pool = PgPool::connect(&server.database_url)
        .await
        .expect("the storage database is reachable");
    PREPARED
        .get_or_init(|| async {
            if server.jwt_secret.is_some() && server._child.is_some() {
                sqlx::raw_sql(AUTH_JWT).execute(&pool).await.unwrap();
            }
            crate::testing::create_host_schema(&pool).await.unwrap();
            if server._child.is_some() {
                sqlx::raw_sql(HOST_GRANTS).execute(&pool).await.unwrap();
            }
            db::migrate(&pool).await.unwrap();
        })
        .await;
    // What an earlier (failed) test left must not be claimed now.
    sqlx::query("DELETE FROM recording_relay.recording_jobs")
        .execute(&pool)
        .await
        .unwrap();
    Some(Suite {
        server,
        pool,
        _turn: turn,
    })
}

impl Suite {
    /// The daemon's configuration for this server and `bucket`.
    pub(crate) fn config(&self, bucket: &str, telnyx: &TelnyxSim) -> Config {
        let key = testing::signing_key();
        let mut config = Config::default();
        config.database.url = Some(self.server.database_url.clone().into());
        config.listener.addr = "127.0.0.1:0".parse().unwrap();
        config.telnyx.public_key = Some(testing::public_key_base64(&key));
        config.telnyx.api_key = Some(TELNYX_KEY.to_owned().into());
        config.telnyx.api_url = telnyx.base_url();
        config.supabase.url = Some(self.server.url.clone());
        config.supabase.service_role_key = Some(self.server.service_key.clone().into());
        config.supabase.bucket = bucket.to_owned();
        config.worker.poll_interval = Duration::from_millis(200);
        config.retry.base = Duration::from_millis(100);
        config.retry.cap = Duration::from_millis(300);
        config.pipeline.match_attempts = 1;
        config
    }

    pub(crate) fn storage(&self, bucket: &str) -> StorageClient {
        StorageClient::from_config(&self.config(bucket, &telnyx())).unwrap()
    }

    /// The daemon (listener + worker) on `config`.
    pub(crate) async fn relay(&self, config: Config, telnyx: TelnyxSim) -> Relay {
        let key = testing::signing_key();
        let mut config = config;
        config.telnyx.public_key = Some(testing::public_key_base64(&key));
        let pipeline = Pipeline::from_config(&config).unwrap();
        let app = App::build(config, Role::Serve).await.expect("app builds");
        let addr = app.local_addr().expect("listener bound");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            app.run(pipeline, token).await.expect("app runs");
        });
        Relay {
            addr,
            key,
            pool: self.pool.clone(),
            _telnyx: telnyx,
            shutdown,
            handle,
        }
    }

    /// A patient and an intake just before `rec` started.
    pub(crate) async fn intake_for(&self, rec: &SimRecording, organization: Option<Uuid>) -> Uuid {
        let patient: Uuid =
            sqlx::query_scalar("INSERT INTO public.patients (phone) VALUES ($1) RETURNING id")
                .bind(&rec.to)
                .fetch_one(&self.pool)
                .await
                .unwrap();
        sqlx::query_scalar(
            "INSERT INTO public.intakes (patient_id, organization_id, room_name, created_at)
             VALUES ($1, $2, 'room', $3 - interval '30 seconds') RETURNING id",
        )
        .bind(patient)
        .bind(organization)
        .bind(rec.recording_started_at)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

pub(crate) fn telnyx() -> TelnyxSim {
    TelnyxSim::start(TelnyxSimConfig {
        api_key: TELNYX_KEY.to_owned(),
        ..TelnyxSimConfig::default()
    })
    .unwrap()
}

/// A bucket name of its own for each test (and each run: a remote project
/// keeps what earlier runs left).
pub(crate) fn bucket_name(tag: &str) -> String {
    format!("rr-{tag}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

pub(crate) struct Relay {
    pub addr: std::net::SocketAddr,
    key: ed25519_dalek::SigningKey,
    pool: PgPool,
    /// Keeps the simulator serving as long as the daemon runs.
    _telnyx: TelnyxSim,
    shutdown: CancellationToken,
    handle: JoinHandle<()>,
}

impl Relay {
    /// Telnyx's webhook for `rec`, signed, posted to the listener.
    pub(crate) async fn post(&self, event_id: &str, rec: &SimRecording) {
        let mut event = testing::recording_saved_event(event_id, &rec.call_session_id);
        let p = &mut event["data"]["payload"];
        p["call_leg_id"] = rec.call_leg_id.clone().into();
        p["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
        let body = event.to_string().into_bytes();
        let mut req = reqwest::Client::new()
            .post(format!("http://{}/webhooks/telnyx", self.addr))
            .header("content-type", "application/json");
        for (name, value) in testing::signature_headers(&self.key, testing::unix_now(), &body) {
            req = req.header(name, value);
        }
        let res = req.body(body).send().await.expect("webhook sent");
        assert_eq!(res.status(), 200);
    }

    pub(crate) async fn job(&self, event_id: &str) -> Option<Job> {
        Queue::new(self.pool.clone())
            .get_by_event_id(event_id)
            .await
            .unwrap()
    }

    /// The job once final, or a failure after `within`.
    pub(crate) async fn finished(&self, event_id: &str, within: Duration) -> Job {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let job = self.job(event_id).await;
            if let Some(job) = job.filter(|j| j.state.is_final()) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {event_id} not final within {within:?}: {:?}",
                self.job(event_id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap();
    }
}

/// SHA-256 of what the bucket holds at `path`, read back with the service key.
pub(crate) async fn stored_sha256(storage: &StorageClient, path: &str) -> String {
    use sha2::Digest as _;
    let res = storage.download(path).await.expect("object downloads");
    let bytes = res.bytes().await.unwrap();
    hex::encode(sha2::Sha256::digest(&bytes))
}
