//! Load shedding at the listener: past its bounds a webhook is answered 503
//! at once, so Telnyx retries later, and nothing acknowledged is lost. Not
//! timing-based: the database is made busy on purpose (a lock the test
//! holds), and each answer says why it was given.

use std::time::Duration;

use crate::testing;
use recording_relay::config::Config;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

use crate::helpers::{TestApp, eventually, spawn_with};

fn event(id: &str) -> Vec<u8> {
    testing::recording_saved_event(id, &format!("sess-{id}"))
        .to_string()
        .into_bytes()
}

/// Makes every webhook INSERT wait, holding its connection, until the
/// returned transaction ends.
async fn hold_the_job_table(pool: &PgPool) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE recording_relay.recording_jobs IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn inserts_waiting_for_the_lock(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE 'INSERT INTO recording_relay.recording_jobs%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn answer(res: reqwest::Response) -> (u16, Value, Option<String>) {
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap(), retry_after)
}

/// A webhook held in the database, and while it is held, the next one:
/// returns both answers after letting the first one through.
async fn one_held_then_one_more(app: &TestApp, held: &str, next: &str) -> [(u16, Value); 2] {
    let lock = hold_the_job_table(&app.pool).await;
    let held = event(held);
    let first = app.post_signed(&held);
    let second = async {
        assert!(
            eventually(Duration::from_secs(10), || async {
                inserts_waiting_for_the_lock(&app.pool).await == 1
            })
            .await,
            "the first webhook never reached the database"
        );
        let (status, body, retry_after) = answer(app.post_signed(&event(next)).await).await;
        assert_eq!(retry_after.as_deref(), (status == 503).then_some("1"));
        lock.commit().await.unwrap();
        (status, body)
    };
    let (first, second) = tokio::join!(first, second);
    let (status, body, _) = answer(first).await;
    [(status, body), second]
}

/// While one webhook is held in the database, the next is shed; its retry,
/// once there is room, is stored, and nothing acknowledged is lost.
async fn assert_the_next_is_shed_and_its_retry_stored(app: &TestApp) {
    let [(held, held_body), (next, next_body)] =
        one_held_then_one_more(app, "ev-held", "ev-next").await;
    assert_eq!((held, &held_body["status"]), (200, &"stored".into()));
    assert_eq!((next, &next_body["status"]), (503, &"shed".into()));
    // Telnyx's retry of the shed event, once there is room.
    let (status, body, _) = answer(app.post_signed(&event("ev-next")).await).await;
    assert_eq!((status, &body["status"]), (200, &"stored".into()));
    assert_eq!(app.job_count().await, 2, "nothing acknowledged is lost");
}

/// The listener on a fresh database, with the bounds `tweak` sets.
pub(crate) async fn spawn_bounded(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let pool = testing::prepare(pool).await;
    let url = testing::database_url_of(&pool, None);
    spawn_with(pool, url, tweak).await
}

#[sqlx::test(migrations = false)]
async fn a_webhook_beyond_the_in_flight_bound_is_shed_and_lands_on_its_retry(pool: PgPool) {
    let app = spawn_bounded(pool, |c| {
        c.listener.max_in_flight = 1;
        // Generous, so only the bound under test can refuse a request.
        c.listener.request_timeout = Duration::from_secs(60);
        c.listener.connection_wait = Duration::from_secs(30);
        c.database.acquire_timeout = Duration::from_secs(30);
    })
    .await;
    assert_the_next_is_shed_and_its_retry_stored(&app).await;
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_webhook_that_finds_the_only_connection_busy_is_shed_not_queued(pool: PgPool) {
    let app = spawn_bounded(pool, |c| {
        c.database.max_connections = 1;
        // The pool's own patience is long: only the listener's shorter
        // connection wait can answer the second webhook.
        c.database.acquire_timeout = Duration::from_secs(30);
        c.listener.request_timeout = Duration::from_secs(60);
        c.listener.connection_wait = Duration::from_millis(100);
    })
    .await;
    assert_the_next_is_shed_and_its_retry_stored(&app).await;
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("outcome=\"shed\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
    app.stop().await;
}
