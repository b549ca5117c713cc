//! Verified deliveries that could not be parsed, kept byte for byte in
//! `recording_relay.webhook_quarantine`.

use super::{Queue, QueueError};

impl Queue {
    /// Keeps a verified delivery that could not be parsed, byte for byte;
    /// a redelivery of the same body only counts up.
    pub(crate) async fn quarantine(
        &self,
        reason: &str,
        signed_at: Option<chrono::DateTime<chrono::Utc>>,
        raw_body: &[u8],
    ) -> Result<i64, QueueError> {
        use sha2::Digest as _;
        let id = sqlx::query_scalar(
            "INSERT INTO recording_relay.webhook_quarantine (reason, signed_at, body_sha256, raw_body)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (body_sha256) DO UPDATE
             SET deliveries = webhook_quarantine.deliveries + 1, last_received_at = now()
             RETURNING id",
        )
        .bind(reason)
        .bind(signed_at)
        .bind(sha2::Sha256::digest(raw_body).to_vec())
        .bind(raw_body)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }
}
