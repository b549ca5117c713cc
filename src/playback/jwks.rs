//! The project's public signing keys (JWKS), for Supabase projects that sign
//! user tokens with asymmetric keys (ES256, RS256) instead of the JWT secret.
//!
//! Keys are cached. A token naming an unknown `kid` (a key rotated in since
//! the last fetch) triggers a refetch, at most once per `REFETCH_COOLDOWN`
//! (30 s), so a stream of forged kids cannot make us hammer the auth server.
//! When a refetch fails, the keys already known keep working.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Why no key could be had for a token; [`super::auth`] decides what each
/// means to the caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    #[error("token names no key (kid)")]
    NoKid,
    #[error("unknown signing key {0}")]
    UnknownKey(String),
    #[error("key {kid} is for {key:?}, not {token:?}")]
    WrongAlgorithm {
        kid: String,
        key: Algorithm,
        token: Algorithm,
    },
    /// The JWKS could not be fetched and no key is cached.
    #[error("{0}")]
    Unavailable(String),
}

/// Keys are refetched this often even when every kid is known, so a revoked
/// key stops working within this time.
const MAX_AGE: Duration = Duration::from_secs(600);
const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Jwks {
    url: String,
    http: reqwest::Client,
    /// An async mutex: concurrent requests with a new kid wait for one
    /// fetch instead of each starting their own.
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, (Algorithm, Arc<DecodingKey>)>,
    /// The last fetch attempt, successful or not.
    attempted_at: Option<Instant>,
}

impl Jwks {
    pub(crate) fn new(url: &str, connect_timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("recording-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.to_owned(),
            http,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// The key `kid` names, provided it is a key for `alg`.
    pub(crate) async fn key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<DecodingKey>, JwksError> {
        let kid = kid.ok_or(JwksError::NoKid)?;
        let mut cache = self.cache.lock().await;
        let since = cache.attempted_at.map(|t| t.elapsed());
        let stale = since.is_none_or(|s| s > MAX_AGE);
        let unknown = !cache.keys.contains_key(kid);
        if stale || (unknown && since.is_none_or(|s| s > REFETCH_COOLDOWN)) {
            cache.attempted_at = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    info!(keys = keys.len(), "signing keys fetched");
                    cache.keys = keys;
                }
                Err(e) if cache.keys.is_empty() => return Err(JwksError::Unavailable(e)),
                Err(e) => {
                    warn!(error = %e, "signing keys could not be refreshed; keeping the known ones")
                }
            }
        }
        match cache.keys.get(kid) {
            Some((key_alg, key)) if *key_alg == alg => Ok(key.clone()),
            Some((key_alg, _)) => Err(JwksError::WrongAlgorithm {
                kid: kid.to_owned(),
                key: *key_alg,
                token: alg,
            }),
            None => Err(JwksError::UnknownKey(kid.to_owned())),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, (Algorithm, Arc<DecodingKey>)>, String> {
        let res = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !res.status().is_success() {
            return Err(format!("JWKS answered {}", res.status()));
        }
        let body: Value = res.json().await.map_err(|e| e.without_url().to_string())?;
        Ok(parse(&body))
    }
}

/// The usable keys of a JWKS document. Entries that are malformed, have no
/// kid, or are symmetric are skipped one by one rather than failing the set.
fn parse(body: &Value) -> HashMap<String, (Algorithm, Arc<DecodingKey>)> {
    let entries = body.get("keys").and_then(Value::as_array);
    entries
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
            let kid = jwk.common.key_id.clone()?;
            let alg = algorithm_of(&jwk)?;
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((kid, (alg, Arc::new(key))))
        })
        .collect()
}

/// The algorithm a public key is for: its `alg`, or else what its type
/// implies. HMAC keys never come from a URL.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let declared = match jwk.common.key_algorithm {
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
        Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
        Some(KeyAlgorithm::PS256) => Some(Algorithm::PS256),
        Some(KeyAlgorithm::PS384) => Some(Algorithm::PS384),
        Some(KeyAlgorithm::PS512) => Some(Algorithm::PS512),
        Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
        Some(_) => return None,
        None => None,
    };
    let implied = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match declared {
        // An `alg` that contradicts the key type is a broken entry.
        Some(alg) if alg.family() != implied.family() => None,
        Some(alg) => Some(alg),
        None => Some(implied),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_usable_public_keys_are_kept() {
        let body = json!({"keys": [
            {"kid": "ec", "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kid": "ec-no-alg", "kty": "EC", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kid": "secret", "kty": "oct", "k": "c2VjcmV0"},
            {"kid": "liar", "kty": "EC", "crv": "P-256", "alg": "RS256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kid": "garbage", "kty": "EC"},
        ]});
        let keys = parse(&body);
        let mut kids: Vec<_> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["ec", "ec-no-alg"]);
        assert!(keys.values().all(|(alg, _)| *alg == Algorithm::ES256));
    }
}
