//! Signed URLs: HS256 tokens `{url, iat, exp}` and the downloads they allow.

use super::*;

pub(super) fn make_token(state: &State, url: &str, expires_in: i64) -> String {
    let iat = Utc::now().timestamp();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({ "url": url, "iat": iat, "exp": iat.saturating_add(expires_in) }).to_string(),
    );
    let sig = URL_SAFE_NO_PAD.encode(hmac_sha256(
        &state.signing_key,
        format!("{header}.{payload}").as_bytes(),
    ));
    format!("{header}.{payload}.{sig}")
}

/// The token's `url` claim, or jsonwebtoken's message for why it fails.
pub(super) fn verify_token(state: &State, token: &str) -> Result<String, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("jwt malformed");
    };
    let expected = URL_SAFE_NO_PAD.encode(hmac_sha256(
        &state.signing_key,
        format!("{h}.{p}").as_bytes(),
    ));
    if expected != s {
        return Err("invalid signature");
    }
    let claims: Value = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("jwt malformed")?;
    if claims
        .get("exp")
        .and_then(Value::as_i64)
        .is_some_and(|exp| Utc::now().timestamp() >= exp)
    {
        return Err("jwt expired");
    }
    claims
        .get("url")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or("jwt malformed")
}

pub(super) async fn sign(
    state: &State,
    body: Incoming,
    bucket: &str,
    name: &str,
) -> Result<Resp, Abort> {
    let bytes = read_small_body(body, 64 * 1024).await?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let expires_in = match v.get("expiresIn") {
        None => return Ok(validation("body must have required property 'expiresIn'")),
        Some(x) => match x.as_i64() {
            Some(n) if n >= 1 => n,
            Some(_) => return Ok(validation("body/expiresIn must be >= 1")),
            None => return Ok(validation("body/expiresIn must be integer")),
        },
    };
    if let Err(e) = find_object(state, bucket, name, false) {
        return Ok(e.json());
    }
    let token = make_token(state, &format!("{bucket}/{name}"), expires_in);
    Ok(json_response(
        200,
        &json!({
            "signedURL": format!("/object/sign/{}/{}?token={token}", percent_encode(bucket, false), percent_encode(name, true)),
        }),
    ))
}

pub(super) async fn signed_download(
    state: &State,
    uri: &Uri,
    headers: &HeaderMap,
    bucket: &str,
    name: &str,
) -> Resp {
    let q = parse_query(uri.query());
    let Some(token) = query_value(&q, "token") else {
        return validation("querystring must have required property 'token'");
    };
    let url = match verify_token(state, token) {
        Ok(url) => url,
        Err(msg) => return storage_error(400, "InvalidJWT", "InvalidJWT", msg),
    };
    if url != format!("{bucket}/{name}") {
        return storage_error(
            400,
            "InvalidSignature",
            "InvalidSignature",
            "Invalid signature",
        );
    }
    match find_object(state, bucket, name, false) {
        Ok(obj) => serve_object(obj, header_str(headers, "range")).await,
        Err(e) => e.json(),
    }
}
