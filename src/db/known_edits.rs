//! Landed migrations edited after they landed (`migrations/known-edits.txt`):
//! a database that ran a compatible edit's first version gets the current
//! checksum recorded; one that ran an incompatible first version is refused
//! with what to do.

use tracing::info;

use super::DbError;

/// Landed migrations edited after they landed (see
/// `migrations/known-edits.txt`, which `scripts/check-migration-history`
/// reads too): a database that ran the first version holds its checksum.
const KNOWN_EDITS: &str = include_str!("../../migrations/known-edits.txt");

/// One line of [`KNOWN_EDITS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KnownEdit {
    pub(super) version: i64,
    first: Vec<u8>,
    current: Vec<u8>,
    /// The edit leaves every fully migrated database with the same objects,
    /// so the history may record the current checksum over the first.
    pub(super) compatible: bool,
}

fn known_edits() -> Vec<KnownEdit> {
    KNOWN_EDITS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some(KnownEdit {
                version: words.next()?.parse().ok()?,
                first: hex::decode(words.next()?).ok()?,
                current: hex::decode(words.next()?).ok()?,
                compatible: words.next()? == "carry",
            })
        })
        .collect()
}

/// Why the first version of a `refuse` edit cannot be carried forward.
pub(super) fn incompatible_because(version: i64) -> &'static str {
    match version {
        20261125000001 => {
            "the job table has no 'duplicate' state, no unique index on recording_id and no \
             deduplicated quarantine"
        }
        _ => "its objects differ from the current file's",
    }
}

/// The known edit whose first version `checksum` is, if any.
pub(super) fn ran_first_version(version: i64, checksum: &[u8]) -> Option<KnownEdit> {
    known_edits()
        .into_iter()
        .find(|e| e.version == version && e.first == checksum)
}

/// Before sqlx validates the history: a database that ran the first
/// version of a compatibly edited migration gets the current checksum
/// recorded (only over that exact first checksum, and logged); one that
/// ran an incompatible first version is refused with what to do. Any other
/// mismatch is left to sqlx, which refuses it.
pub(super) async fn carry_known_edits(conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('recording_relay._sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Ok(());
    }
    for edit in known_edits() {
        if !edit.compatible {
            let ran_first: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM recording_relay._sqlx_migrations
                                WHERE version = $1 AND checksum = $2)",
            )
            .bind(edit.version)
            .bind(&edit.first)
            .fetch_one(&mut *conn)
            .await?;
            if ran_first {
                return Err(DbError::IncompatibleEdit(
                    edit.version,
                    incompatible_because(edit.version),
                ));
            }
            continue;
        }
        let carried = sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $3
             WHERE version = $1 AND checksum = $2",
        )
        .bind(edit.version)
        .bind(&edit.first)
        .bind(&edit.current)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if carried > 0 {
            info!(
                version = edit.version,
                first = %hex::encode(&edit.first),
                current = %hex::encode(&edit.current),
                "recorded the current checksum of a migration edited compatibly after this \
                 database ran it (migrations/known-edits.txt)"
            );
        }
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use sqlx::PgPool;

    use super::*;
    use crate::db::migrate::tests::landed;
    use crate::db::{MIGRATOR, ensure_migrated, migrate};

    #[test]
    fn the_known_edits_end_at_the_pinned_checksums() {
        let edits = known_edits();
        let versions: Vec<i64> = edits.iter().map(|e| e.version).collect();
        assert_eq!(versions, [20261125000001, 20261125000006, 20261202000002]);
        for edit in edits {
            let pinned = landed()
                .into_iter()
                .find(|(v, _)| *v == edit.version)
                .map(|(_, sum)| sum);
            assert_eq!(Some(hex::encode(&edit.current).as_str()), pinned);
            assert_ne!(edit.first, edit.current);
            assert_eq!(edit.first.len(), 48, "SHA-384");
        }
    }

    /// A database migrated before `2a4bfbe` holds the first checksum of
    /// 20261202000002 (an edit of comments): the daemon refuses with the
    /// fix, and `migrate` records the current checksum and nothing else.
    #[sqlx::test(migrations = false)]
    async fn a_database_that_ran_a_compatibly_edited_migration_is_carried_forward_by_migrate(
        pool: PgPool,
    ) {
        let pool = crate::testing::prepare(pool).await;
        let first = known_edits()
            .into_iter()
            .find(|e| e.version == 20261202000002)
            .unwrap()
            .first;
        sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $1 WHERE version = 20261202000002",
        )
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
        let err = ensure_migrated(&pool).await.unwrap_err();
        assert!(
            matches!(&err, DbError::BeforeKnownEdit(v) if v == "20261202000002"),
            "{err}"
        );
        assert!(
            err.to_string().contains("run `recording-relay migrate`"),
            "{err}"
        );

        migrate(&pool).await.unwrap();
        ensure_migrated(&pool).await.unwrap();
        let recorded: Vec<u8> = sqlx::query_scalar(
            "SELECT checksum FROM recording_relay._sqlx_migrations WHERE version = 20261202000002",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let current = MIGRATOR
            .iter()
            .find(|m| m.version == 20261202000002)
            .unwrap();
        assert_eq!(recorded, *current.checksum);
    }

    /// The first job table made a different schema: no checksum is
    /// rewritten over it, and both the daemon and `migrate` say what to do.
    #[sqlx::test(migrations = false)]
    async fn a_database_that_ran_the_first_job_table_is_refused_with_a_way_forward(pool: PgPool) {
        let pool = crate::testing::prepare(pool).await;
        let first = known_edits()
            .into_iter()
            .find(|e| e.version == 20261125000001)
            .unwrap()
            .first;
        sqlx::query(
            "UPDATE recording_relay._sqlx_migrations SET checksum = $1 WHERE version = 20261125000001",
        )
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
        for err in [
            ensure_migrated(&pool).await.unwrap_err(),
            migrate(&pool).await.unwrap_err(),
        ] {
            assert!(
                matches!(err, DbError::IncompatibleEdit(20261125000001, _)),
                "{err}"
            );
            assert!(
                err.to_string().contains("drop the schema recording_relay"),
                "{err}"
            );
        }
        let still: Vec<u8> = sqlx::query_scalar(
            "SELECT checksum FROM recording_relay._sqlx_migrations WHERE version = 20261125000001",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(still, first);
    }
}
