//! Telnyx webhook signatures: Ed25519 over `{telnyx-timestamp}|{raw body}`.
//!
//! Verification runs on the bytes exactly as received, before any JSON
//! parsing, and the timestamp check bounds replays of a captured request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, VerifyingKey};

pub const SIGNATURE_HEADER: &str = "telnyx-signature-ed25519";
pub const TIMESTAMP_HEADER: &str = "telnyx-timestamp";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {SIGNATURE_HEADER} header")]
    MissingSignature,
    #[error("missing {TIMESTAMP_HEADER} header")]
    MissingTimestamp,
    #[error("{SIGNATURE_HEADER} is not base64 of a 64-byte signature")]
    MalformedSignature,
    #[error("{TIMESTAMP_HEADER} is not unix seconds")]
    MalformedTimestamp,
    #[error("timestamp is {skew_secs}s away from now (tolerance {tolerance_secs}s)")]
    StaleTimestamp { skew_secs: i64, tolerance_secs: u64 },
    #[error("signature does not match")]
    BadSignature,
}

#[derive(Debug, Clone)]
pub struct Verifier {
    key: VerifyingKey,
    tolerance: Duration,
}

impl Verifier {
    pub fn new(key: VerifyingKey, tolerance: Duration) -> Self {
        Self { key, tolerance }
    }

    /// Verifies one delivery and returns its signing time (unix seconds).
    pub fn verify(
        &self,
        timestamp: Option<&[u8]>,
        signature: Option<&[u8]>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<i64, VerifyError> {
        let timestamp = timestamp.ok_or(VerifyError::MissingTimestamp)?;
        let signature = signature.ok_or(VerifyError::MissingSignature)?;
        let signed_at = parse_timestamp(timestamp)?;
        self.check_freshness(signed_at, now)?;
        let signature = decode_signature(signature)?;

        let mut message = Vec::with_capacity(timestamp.len() + 1 + body.len());
        message.extend_from_slice(timestamp);
        message.push(b'|');
        message.extend_from_slice(body);
        // verify_strict rejects non-canonical and small-order encodings, as
        // libsodium (used by Telnyx's SDKs) does.
        self.key
            .verify_strict(&message, &signature)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(signed_at)
    }

    fn check_freshness(&self, signed_at: i64, now: SystemTime) -> Result<(), VerifyError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let skew_secs = now.saturating_sub(signed_at);
        let tolerance_secs = self.tolerance.as_secs();
        if skew_secs.unsigned_abs() > tolerance_secs {
            return Err(VerifyError::StaleTimestamp {
                skew_secs,
                tolerance_secs,
            });
        }
        Ok(())
    }
}

fn parse_timestamp(raw: &[u8]) -> Result<i64, VerifyError> {
    let text = std::str::from_utf8(raw).map_err(|_| VerifyError::MalformedTimestamp)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::MalformedTimestamp);
    }
    text.parse().map_err(|_| VerifyError::MalformedTimestamp)
}

fn decode_signature(raw: &[u8]) -> Result<Signature, VerifyError> {
    let bytes = BASE64
        .decode(raw.trim_ascii())
        .map_err(|_| VerifyError::MalformedSignature)?;
    let bytes: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| VerifyError::MalformedSignature)?;
    Ok(Signature::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::testing::sign;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn verifier(k: &SigningKey) -> Verifier {
        Verifier::new(k.verifying_key(), Duration::from_secs(300))
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 1_764_000_000;
    const BODY: &[u8] = br#"{"data":{"id":"e1"}}"#;

    #[test]
    fn accepts_a_valid_signature() {
        let k = key(1);
        let sig = sign(&k, NOW as i64, BODY);
        let ts = NOW.to_string();
        let got = verifier(&k).verify(Some(ts.as_bytes()), Some(sig.as_bytes()), BODY, at(NOW));
        assert_eq!(got, Ok(NOW as i64));
    }

    #[test]
    fn rejects_tampering_and_wrong_keys() {
        let k = key(1);
        let ts = NOW.to_string();
        let sig = sign(&k, NOW as i64, BODY);
        let mut flipped = BODY.to_vec();
        flipped[3] ^= 1;
        let v = verifier(&k);
        let check = |ts: &str, sig: &str, body: &[u8]| {
            v.verify(Some(ts.as_bytes()), Some(sig.as_bytes()), body, at(NOW))
        };
        assert_eq!(check(&ts, &sig, &flipped), Err(VerifyError::BadSignature));
        // The timestamp is part of the signed message.
        let other_ts = (NOW + 1).to_string();
        assert_eq!(check(&other_ts, &sig, BODY), Err(VerifyError::BadSignature));
        let wrong =
            verifier(&key(2)).verify(Some(ts.as_bytes()), Some(sig.as_bytes()), BODY, at(NOW));
        assert_eq!(wrong, Err(VerifyError::BadSignature));
    }

    #[test]
    fn rejects_missing_and_malformed_headers() {
        let k = key(1);
        let v = verifier(&k);
        let ts = NOW.to_string();
        let sig = sign(&k, NOW as i64, BODY);
        let n = at(NOW);
        assert_eq!(
            v.verify(Some(ts.as_bytes()), None, BODY, n),
            Err(VerifyError::MissingSignature)
        );
        assert_eq!(
            v.verify(None, Some(sig.as_bytes()), BODY, n),
            Err(VerifyError::MissingTimestamp)
        );
        for bad in ["%%%", "AAAA", ""] {
            assert_eq!(
                v.verify(Some(ts.as_bytes()), Some(bad.as_bytes()), BODY, n),
                Err(VerifyError::MalformedSignature),
                "{bad:?}"
            );
        }
        for bad in ["", "12a", "-5", "1.5", "99999999999999999999999"] {
            assert_eq!(
                v.verify(Some(bad.as_bytes()), Some(sig.as_bytes()), BODY, n),
                Err(VerifyError::MalformedTimestamp),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tolerance_is_300s_either_way() {
        let k = key(1);
        let v = verifier(&k);
        for (offset, ok) in [
            (0i64, true),
            (300, true),
            (-300, true),
            (301, false),
            (-301, false),
        ] {
            let signed = NOW as i64 - offset;
            let sig = sign(&k, signed, BODY);
            let ts = signed.to_string();
            let got = v.verify(Some(ts.as_bytes()), Some(sig.as_bytes()), BODY, at(NOW));
            assert_eq!(got.is_ok(), ok, "offset {offset}: {got:?}");
            if !ok {
                assert!(matches!(got, Err(VerifyError::StaleTimestamp { .. })));
            }
        }
    }
}
