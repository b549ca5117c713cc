//! Who is asking: verifies a Supabase user's access token and reads the
//! organization it belongs to.
//!
//! Supabase signs user tokens either with the project's JWT secret (HS256)
//! or, on projects that moved to signing keys, with an asymmetric key
//! published as a JWKS. Each token's `alg` picks the path, and only
//! algorithms that were configured are accepted: a token cannot choose to be
//! checked with a weaker or different kind of key.

use std::sync::Arc;

use hyper::header::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::jwks::{Jwks, JwksError};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("token carries no organization at {0}")]
    NoOrganization(String),
    /// The JWKS could not be fetched and no key is cached: our problem, not
    /// the caller's.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// The verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The token's `sub`: the Supabase user, for the access audit.
    pub user_id: String,
    /// The organization claim as text (uuid, or a number written as text).
    pub organization: String,
}

pub(crate) struct Authenticator {
    secret: Option<DecodingKey>,
    jwks: Option<Jwks>,
    audience: String,
    organization_claim: Vec<String>,
}

impl Authenticator {
    pub(crate) fn from_config(config: &Config) -> Result<Self, String> {
        let p = &config.playback;
        let jwks = match p.jwks_url.as_deref() {
            Some(url) => Some(
                Jwks::new(url, config.http.connect_timeout)
                    .map_err(|e| format!("playback.jwks_url: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            // Supabase uses the secret's text as the HMAC key, not its base64 decoding.
            secret: p
                .jwt_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes())),
            jwks,
            audience: p.audience.clone(),
            organization_claim: p.organization_claim.split('.').map(str::to_owned).collect(),
        })
    }

    /// Checks the `Authorization: Bearer …` header.
    pub(crate) async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Caller, AuthError> {
        let token = bearer(authorization).ok_or(AuthError::Missing)?;
        let header = jsonwebtoken::decode_header(token).map_err(rejected)?;
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self.secret.as_ref().ok_or_else(|| {
                    AuthError::Rejected("HS256 tokens are not accepted here".to_owned())
                })?;
                self.decode(token, key, Algorithm::HS256)?
            }
            alg => {
                let jwks = self.jwks.as_ref().ok_or_else(|| {
                    AuthError::Rejected(format!("{alg:?} tokens are not accepted here"))
                })?;
                let key: Arc<DecodingKey> =
                    jwks.key(header.kid.as_deref(), alg)
                        .await
                        .map_err(|e| match e {
                            JwksError::Unavailable(e) => AuthError::KeysUnavailable(e),
                            e => AuthError::Rejected(e.to_string()),
                        })?;
                self.decode(token, &key, alg)?
            }
        };
        let user_id = claim_at(&claims, &["sub".to_owned()])
            .ok_or_else(|| AuthError::Rejected("token has no sub".to_owned()))?;
        let organization = claim_at(&claims, &self.organization_claim)
            .ok_or_else(|| AuthError::NoOrganization(self.organization_claim.join(".")))?;
        Ok(Caller {
            user_id,
            organization,
        })
    }

    /// Only a signed-in user's token passes. jsonwebtoken checks `aud` only
    /// when a token carries one, and the project's anon and service-role keys
    /// are JWTs signed with the same secret that carry none (and `role` anon
    /// or service_role): so `exp` and `aud` are required, and `role` must be
    /// `authenticated`.
    fn decode(&self, token: &str, key: &DecodingKey, alg: Algorithm) -> Result<Value, AuthError> {
        let mut validation = Validation::new(alg);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Value>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(rejected)?;
        match claims.get("role").and_then(Value::as_str) {
            Some(USER_ROLE) => Ok(claims),
            Some(other) => Err(AuthError::Rejected(format!(
                "role {other:?} is not a signed-in user's"
            ))),
            None => Err(AuthError::Rejected("token has no role".to_owned())),
        }
    }
}

/// The `role` claim of a Supabase user's access token.
const USER_ROLE: &str = "authenticated";

fn rejected(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        _ => AuthError::Rejected(e.to_string()),
    }
}

fn bearer(value: Option<&HeaderValue>) -> Option<&str> {
    let value = value?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The claim at a dotted path, as text. Numbers are accepted because some
/// hosts use integer organization ids; anything else is no organization.
fn claim_at(claims: &Value, path: &[String]) -> Option<String> {
    let value = path.iter().try_fold(claims, |v, key| v.get(key))?;
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";

    fn authenticator() -> Authenticator {
        let mut config = Config::default();
        config.playback.jwt_secret = Some(SECRET.to_owned().into());
        Authenticator::from_config(&config).unwrap()
    }

    fn token(claims: &Value, secret: &str) -> HeaderValue {
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        HeaderValue::from_str(&format!("Bearer {jwt}")).unwrap()
    }

    fn claims(org: Value) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "sub": "user-1", "aud": "authenticated", "role": "authenticated",
            "exp": now + 3600, "iat": now,
            "app_metadata": {"organization_id": org},
            "user_metadata": {"organization_id": "chosen-by-the-user"},
        })
    }

    #[tokio::test]
    async fn a_valid_token_yields_its_app_metadata_organization() {
        let auth = authenticator();
        let caller = auth
            .authenticate(Some(&token(&claims(json!("org-a")), SECRET)))
            .await
            .unwrap();
        assert_eq!(caller.organization, "org-a");
        let caller = auth
            .authenticate(Some(&token(&claims(json!(42)), SECRET)))
            .await
            .unwrap();
        assert_eq!(caller.organization, "42");
    }

    #[tokio::test]
    async fn bad_tokens_are_rejected_for_the_right_reason() {
        let auth = authenticator();
        let check = async |header: Option<HeaderValue>| auth.authenticate(header.as_ref()).await;
        assert!(matches!(check(None).await, Err(AuthError::Missing)));
        assert!(matches!(
            check(Some(HeaderValue::from_static("Basic abc"))).await,
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            check(Some(HeaderValue::from_static("Bearer not.a.jwt"))).await,
            Err(AuthError::Rejected(_))
        ));
        let forged = token(
            &claims(json!("org-a")),
            "another-secret-of-sufficient-length!!",
        );
        assert!(matches!(
            check(Some(forged)).await,
            Err(AuthError::Rejected(_))
        ));
        let mut expired = claims(json!("org-a"));
        expired["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
        assert!(matches!(
            check(Some(token(&expired, SECRET))).await,
            Err(AuthError::Expired)
        ));
        // The anon and service keys are signed with the same secret but are
        // not user tokens.
        let mut anon = claims(json!("org-a"));
        anon["aud"] = json!("anon");
        assert!(matches!(
            check(Some(token(&anon, SECRET))).await,
            Err(AuthError::Rejected(_))
        ));
        let mut no_org = claims(json!("org-a"));
        no_org["app_metadata"] = json!({});
        assert!(matches!(
            check(Some(token(&no_org, SECRET))).await,
            Err(AuthError::NoOrganization(_))
        ));
    }

    /// The project's anon and service-role keys, as Supabase mints them:
    /// signed with the project secret, `role` anon or service_role, no
    /// `aud`, an `exp` years away.
    fn api_key_claims(role: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"iss": "supabase", "ref": "abcdefghijklmnop", "role": role,
               "iat": now, "exp": now + 10 * 365 * 86400,
               "app_metadata": {"organization_id": "org-a"}})
    }

    #[tokio::test]
    async fn only_a_signed_in_users_token_with_exp_and_aud_passes() {
        let auth = authenticator();
        let verdict = async |claims: &Value| auth.authenticate(Some(&token(claims, SECRET))).await;
        for role in ["anon", "service_role"] {
            let key = api_key_claims(role);
            assert!(
                matches!(verdict(&key).await, Err(AuthError::Rejected(_))),
                "the {role} key must not pass"
            );
            // Even with the user audience added, the role gives it away.
            let mut with_aud = key.clone();
            with_aud["aud"] = json!("authenticated");
            assert!(
                matches!(verdict(&with_aud).await, Err(AuthError::Rejected(_))),
                "the {role} key with an aud must not pass"
            );
        }
        for claim in ["aud", "exp", "role", "sub"] {
            let mut partial = claims(json!("org-a"));
            partial.as_object_mut().unwrap().remove(claim);
            assert!(
                matches!(verdict(&partial).await, Err(AuthError::Rejected(_))),
                "a token without {claim} must not pass"
            );
        }
        let mut other_role = claims(json!("org-a"));
        other_role["role"] = json!("supabase_admin");
        assert!(matches!(
            verdict(&other_role).await,
            Err(AuthError::Rejected(_))
        ));
        assert!(verdict(&claims(json!("org-a"))).await.is_ok());
    }

    #[tokio::test]
    async fn the_algorithm_cannot_be_chosen_by_the_token() {
        let auth = authenticator();
        // alg "none": the classic bypass.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims(json!("org-a")).to_string());
        let unsigned = HeaderValue::from_str(&format!("Bearer {header}.{body}.")).unwrap();
        assert!(matches!(
            auth.authenticate(Some(&unsigned)).await,
            Err(AuthError::Rejected(_))
        ));
        // HS384 with the right secret is still not what Supabase issues.
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims(json!("org-a")),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let other = HeaderValue::from_str(&format!("Bearer {jwt}")).unwrap();
        assert!(matches!(
            auth.authenticate(Some(&other)).await,
            Err(AuthError::Rejected(_))
        ));
    }

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn claims_are_read_at_dotted_paths() {
        let c = json!({"a": {"b": "x", "n": 7, "o": {}}, "top": "t"});
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(claim_at(&c, &path("a.b")).as_deref(), Some("x"));
        assert_eq!(claim_at(&c, &path("a.n")).as_deref(), Some("7"));
        assert_eq!(claim_at(&c, &path("top")).as_deref(), Some("t"));
        assert_eq!(claim_at(&c, &path("a.o")), None);
        assert_eq!(claim_at(&c, &path("a.missing")), None);
    }
}
