//! The daemon's migrations on a Supabase-shaped database
//! (`tests/fixtures/supabase.sql`): nothing of the relay's is reachable by
//! the API roles, ZScribe's own use of its tables keeps working, and DBAs
//! reach the jobs through the operator role.

use crate::testing;
use sqlx::PgPool;

/// The fixture, the stand-in host tables and the daemon's migrations, in the
/// order a real project gets them.
pub(crate) async fn supabase_shaped(pool: PgPool) -> PgPool {
    sqlx::raw_sql(SUPABASE).execute(&pool).await.unwrap();
    testing::prepare(pool).await
}

pub(crate) const SUPABASE: &str = include_str!("../fixtures/supabase.sql");

const API_ROLES: [&str; 3] = ["anon", "authenticated", "service_role"];

/// Functions of the relay that roles other than the owner may execute, and
/// why: the index on `patients` calls the phone key whenever anyone writes a
/// patient, and the storage policy calls the bucket name for signed-in users.
const EXECUTABLE: [(&str, &str); 2] = [
    ("recording_relay_phone_key", "PUBLIC"),
    ("recording_relay_recordings_bucket", "authenticated"),
];

/// Runs `sql` as `role` and returns the SQLSTATE it failed with (None: it
/// succeeded). Rolled back either way.
async fn as_role(pool: &PgPool, role: &str, sql: &str) -> Option<String> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let outcome = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await;
    tx.rollback().await.ok();
    match outcome {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => Some(e.code().unwrap_or_default().into_owned()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn seed_one_job(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, from_number)
         VALUES ('ev-1', 'call.recording.saved', '{}', '+15551234567') RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn the_api_roles_can_neither_read_nor_change_nor_call_anything_of_the_relay(pool: PgPool) {
    let pool = supabase_shaped(pool).await;
    let job = seed_one_job(&pool).await;
    let attempts = [
        "SELECT * FROM recording_relay.recording_jobs".to_owned(),
        "UPDATE recording_relay.recording_jobs SET state = 'cancelled'".to_owned(),
        "DELETE FROM recording_relay.recording_jobs".to_owned(),
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event) VALUES ('x', 'x', '{}')"
            .to_owned(),
        "SELECT * FROM recording_relay.webhook_quarantine".to_owned(),
        "SELECT * FROM recording_relay._sqlx_migrations".to_owned(),
        "SELECT * FROM recording_relay.recording_jobs_failed".to_owned(),
        "SELECT * FROM recording_relay.recording_jobs_unmatched".to_owned(),
        "SELECT * FROM recording_relay.recording_jobs_stuck".to_owned(),
        "SELECT * FROM recording_relay.recording_jobs_queue".to_owned(),
        "SELECT * FROM recording_relay.recording_errors".to_owned(),
        "SELECT * FROM recording_relay.calls".to_owned(),
        format!("SELECT recording_relay.recording_jobs_cancel({job})"),
        format!("SELECT recording_relay.recording_jobs_requeue({job})"),
        "SELECT recording_relay.recording_jobs_requeue_failed()".to_owned(),
        format!("SELECT recording_relay.recording_jobs_attach({job}, gen_random_uuid())"),
        "SELECT recording_relay.recording_relay_phone_key('+1 555 123 4567')".to_owned(),
        "SELECT 'pending'::recording_relay.recording_job_state".to_owned(),
        "SELECT * FROM recording_relay.recording_links".to_owned(),
        "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path)
         VALUES (gen_random_uuid(), 'r', 'unmatched/r.wav')"
            .to_owned(),
        "SELECT recording_relay.direct_storage_reads_allow()".to_owned(),
        "SELECT recording_relay.recording_relay_linked_for_my_organization('x')".to_owned(),
    ];
    for role in ["anon", "authenticated"] {
        for sql in &attempts {
            assert_eq!(
                as_role(&pool, role, sql).await.as_deref(),
                Some("42501"),
                "{role} was not refused: {sql}"
            );
        }
    }
    let state: String =
        sqlx::query_scalar("SELECT state::text FROM recording_relay.recording_jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "pending");
}

/// A catalog-wide check, so that an object added by a later migration that
/// forgets its REVOKE fails here too.
#[sqlx::test(migrations = false)]
async fn no_object_in_the_relay_schema_is_granted_to_an_api_role(pool: PgPool) {
    let pool = supabase_shaped(pool).await;
    for role in API_ROLES {
        let usage: bool =
            sqlx::query_scalar("SELECT has_schema_privilege($1, 'recording_relay', 'USAGE')")
                .bind(role)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(!usage, "{role} has USAGE on the relay schema");
        let relations: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c
             WHERE c.relnamespace = 'recording_relay'::regnamespace
               AND CASE WHEN c.relkind IN ('r', 'v', 'm', 'p', 'f') THEN has_table_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
                        ELSE false END
             UNION ALL
             SELECT c.relname::text FROM pg_class c
             WHERE c.relnamespace = 'recording_relay'::regnamespace
               -- CASE: the planner may test a condition before relkind.
               AND CASE WHEN c.relkind = 'S'
                        THEN has_sequence_privilege($1, c.oid, 'USAGE, SELECT, UPDATE')
                        ELSE false END",
        )
        .bind(role)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(relations.is_empty(), "{role} may use {relations:?}");
        let functions: Vec<String> = sqlx::query_scalar(
            "SELECT p.proname::text FROM pg_proc p
             WHERE p.pronamespace = 'recording_relay'::regnamespace
               AND has_function_privilege($1, p.oid, 'EXECUTE')
             ORDER BY 1",
        )
        .bind(role)
        .fetch_all(&pool)
        .await
        .unwrap();
        let allowed: Vec<String> = EXECUTABLE
            .iter()
            .filter(|(_, grantee)| *grantee == "PUBLIC" || *grantee == role)
            .map(|(f, _)| (*f).to_owned())
            .collect();
        assert_eq!(functions, allowed, "functions {role} may execute");
        let types: Vec<String> = sqlx::query_scalar(
            "SELECT t.typname::text FROM pg_type t
             WHERE t.typnamespace = 'recording_relay'::regnamespace AND t.typtype = 'e'
               AND has_type_privilege($1, t.oid, 'USAGE')",
        )
        .bind(role)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(types.is_empty(), "{role} may use types {types:?}");
    }
    // RLS is the second wall on every table of the relay (the migration
    // history is sqlx's own, closed by the schema and its grants).
    let without_rls: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
         WHERE relnamespace = 'recording_relay'::regnamespace AND relkind = 'r'
           AND NOT relrowsecurity AND relname <> '_sqlx_migrations'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        without_rls.is_empty(),
        "tables without RLS: {without_rls:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn nothing_of_the_relay_is_left_in_public(pool: PgPool) {
    let pool = supabase_shaped(pool).await;
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
         WHERE relnamespace = 'public'::regnamespace
           AND (relname LIKE 'recording%' OR relname LIKE 'webhook%' OR relname LIKE '_sqlx%')
         UNION ALL
         SELECT proname::text FROM pg_proc
         WHERE pronamespace = 'public'::regnamespace AND proname LIKE 'recording%'
         UNION ALL
         SELECT typname::text FROM pg_type
         WHERE typnamespace = 'public'::regnamespace AND typname LIKE 'recording%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(left.is_empty(), "still in public: {left:?}");
}

/// ZScribe's users write patients through the API; the index on the phone
/// key calls the relay's function for each row, with their privileges.
#[sqlx::test(migrations = false)]
async fn zscribe_users_still_write_patients_and_intakes(pool: PgPool) {
    let pool = supabase_shaped(pool).await;
    for role in API_ROLES {
        assert_eq!(
            as_role(
                &pool,
                role,
                "WITH p AS (INSERT INTO public.patients (phone) VALUES ('(555) 123-4567') RETURNING id)
                 INSERT INTO public.intakes (patient_id) SELECT id FROM p",
            )
            .await,
            None,
            "{role} could not write a patient and an intake"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn the_operator_role_reads_jobs_and_changes_them_only_through_the_functions(pool: PgPool) {
    let pool = supabase_shaped(pool).await;
    let job = seed_one_job(&pool).await;
    let operator = "recording_relay_operator";
    for sql in [
        "SELECT * FROM recording_relay.recording_jobs_queue".to_owned(),
        "SELECT * FROM recording_relay.recording_jobs_failed".to_owned(),
        "SELECT * FROM recording_relay.recording_errors".to_owned(),
        "SELECT * FROM recording_relay.webhook_quarantine".to_owned(),
        format!("SELECT recording_relay.recording_jobs_cancel({job})"),
    ] {
        assert_eq!(as_role(&pool, operator, &sql).await, None, "{sql}");
    }
    assert_eq!(
        as_role(
            &pool,
            operator,
            "UPDATE recording_relay.recording_jobs SET attempts = 0"
        )
        .await
        .as_deref(),
        Some("42501")
    );
    // The rows are visible to the operator (RLS lets it read), and its
    // function calls are attributed to the session's user.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE recording_relay_operator")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM recording_relay.recording_jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 1);
    sqlx::query("SELECT recording_relay.recording_jobs_cancel($1)")
        .bind(job)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (state, reason): (String, String) = sqlx::query_as(
        "SELECT state::text, last_error FROM recording_relay.recording_jobs WHERE id = $1",
    )
    .bind(job)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(state, "cancelled");
    assert_eq!(reason, "cancelled by postgres");
}

/// A `migrate` that stops before the move into the relay schema (an
/// INVALID index, a lock that stayed busy) leaves nothing open either: each
/// landed migration closes what it created in `public` in its own
/// transaction.
#[sqlx::test(migrations = false)]
async fn a_migrate_stopped_before_the_move_leaves_nothing_open(pool: PgPool) {
    use sqlx::migrate::Migrator;
    sqlx::raw_sql(SUPABASE).execute(&pool).await.unwrap();
    crate::testing::create_host_schema(&pool).await.unwrap();
    let up_to_public = Migrator {
        migrations: recording_relay::db::MIGRATOR
            .iter()
            .filter(|m| m.version <= 20261125000008)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..Migrator::DEFAULT
    };
    up_to_public.run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO public.recording_jobs (event_id, event_type, event, from_number)
         VALUES ('ev-1', 'call.recording.saved', '{}', '+15551234567')",
    )
    .execute(&pool)
    .await
    .unwrap();
    for role in ["anon", "authenticated", "service_role"] {
        for sql in [
            "SELECT * FROM public.recording_jobs",
            "UPDATE public.recording_jobs SET state = 'cancelled'",
            "SELECT * FROM public.webhook_quarantine",
            "SELECT * FROM public.recording_jobs_failed",
            "SELECT public.recording_jobs_cancel(1)",
            "SELECT public.recording_jobs_requeue_failed()",
        ] {
            assert_eq!(
                as_role(&pool, role, sql).await.as_deref(),
                Some("42501"),
                "{role} was not refused: {sql}"
            );
        }
        // ZScribe keeps writing patients (the index calls the phone key).
        assert_eq!(
            as_role(
                &pool,
                role,
                "INSERT INTO public.patients (phone) VALUES ('555 123 4567')"
            )
            .await,
            None
        );
    }
    // And the rest of the migrations then run as usual.
    recording_relay::db::migrate(&pool).await.unwrap();
    recording_relay::db::ensure_migrated(&pool).await.unwrap();
}

/// Migration 20261207000001 fills the relay's link record from what it
/// linked before: linked jobs, and for intakes whose jobs retention pruned,
/// only columns with exactly the own-folder form and the intake's own
/// recording id. A column a user pointed elsewhere gets no record.
#[sqlx::test(migrations = false)]
async fn the_link_record_is_filled_from_linked_jobs_and_only_from_own_folder_columns(pool: PgPool) {
    use sqlx::migrate::Migrator;
    use uuid::Uuid;
    sqlx::raw_sql(SUPABASE).execute(&pool).await.unwrap();
    testing::create_host_schema(&pool).await.unwrap();
    let before_links = Migrator {
        migrations: recording_relay::db::MIGRATOR
            .iter()
            .filter(|m| m.version < 20261207000001)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..Migrator::DEFAULT
    };
    before_links.run(&pool).await.unwrap();
    let intake = async |recording: &str, path: &str| -> Uuid {
        let id: Uuid = sqlx::query_scalar("INSERT INTO public.intakes DEFAULT VALUES RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE public.intakes SET recording_id = $2, recording_object_path = replace($3, '{id}', $1::text)
             WHERE id = $1",
        )
        .bind(id)
        .bind(recording)
        .bind(path)
        .execute(&pool)
        .await
        .unwrap();
        id
    };
    // Linked by a job that is still there.
    let by_job = intake("v3-job", "intakes/{id}/v3-job.wav").await;
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, recording_id,
             intake_id, matched_at, match_method, object_path, content_type, object_sha256,
             object_size, stored_at, state, finished_at, linked_at)
         VALUES ('ev-1', 'call.recording.saved', '{}', 'v3-job', $1, now(), 'client_state', $2,
             'audio/wav', repeat('0', 64), 1, now(), 'succeeded', now(), now())",
    )
    .bind(by_job)
    .bind(format!("intakes/{by_job}/v3-job.wav"))
    .execute(&pool)
    .await
    .unwrap();
    // Jobs pruned: the column alone, in the pipeline's form of the id.
    let pruned = intake("v3:odd/id", "intakes/{id}/v3_odd_id.mp3").await;
    // Pointed elsewhere by a user, or at a file the id does not name.
    let elsewhere = intake("v3-x", "x/../intakes/{id}/v3-x.wav").await;
    let unmatched = intake("v3-u", "unmatched/v3-u.wav").await;
    let other_file = intake("v3-y", "intakes/{id}/something-else.wav").await;

    recording_relay::db::migrate(&pool).await.unwrap();
    let links: Vec<(Uuid, String, String, Option<i64>)> = sqlx::query_as(
        "SELECT intake_id, recording_id, object_path, job_id
         FROM recording_relay.recording_links ORDER BY job_id NULLS LAST",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let got: Vec<(Uuid, &str, bool)> = links
        .iter()
        .map(|(i, r, _, job)| (*i, r.as_str(), job.is_some()))
        .collect();
    assert_eq!(
        got,
        vec![(by_job, "v3-job", true), (pruned, "v3:odd/id", false)],
        "{links:?}"
    );
    for id in [elsewhere, unmatched, other_file] {
        assert!(links.iter().all(|(i, ..)| *i != id), "{id}");
    }
}
