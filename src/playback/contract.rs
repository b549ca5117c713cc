//! The playback API's contract: an OpenAPI 3.1 document derived from the
//! handlers' `#[utoipa::path]` annotations and from the very types they
//! serialize ([`RecordingResponse`](super::handlers::RecordingResponse),
//! [`ErrorBody`](super::reply::ErrorBody)), so the document cannot describe
//! a field the code does not send.
//!
//! It is served at `GET /openapi.json` on the playback address and
//! committed as `docs/openapi.json`; a test fails when the two differ
//! (`UPDATE_OPENAPI=1 cargo test --lib openapi` rewrites the file).
//! `scripts/contract-test` fuzzes the real binary against the committed
//! copy, and the React player's types are checked against it
//! (`tests/browser/component/contract.ts`).

use std::sync::LazyLock;

use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::handlers::{self, Health, RecordingResponse};
use super::recording::RecordingStatus;
use super::reply::ErrorBody;

/// The security scheme's name in the document.
/// Written out in `handlers::recording`'s `security(...)` too (utoipa takes a literal there).
pub(super) const BEARER: &str = "supabase_user";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "recording-relay playback API",
        description = "Short-lived signed URLs for the call recordings of a signed-in \
                       ZScribe user's organization. Unknown intakes and other \
                       organizations' intakes both answer 404.",
        license(name = "UNLICENSED", identifier = "LicenseRef-UNLICENSED"),
    ),
    paths(handlers::recording, handlers::healthz, handlers::openapi),
    components(schemas(RecordingResponse, RecordingStatus, ErrorBody, Health)),
    modifiers(&BearerScheme),
)]
struct PlaybackApi;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut Document) {
        openapi
            .components
            .get_or_insert_default()
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "A signed-in Supabase user's access token (role `authenticated`, \
                         `aud` and `exp` required), carrying the organization claim \
                         `playback.organization_claim` names.",
                        ))
                        .build(),
                ),
            );
    }
}

/// The document, built once.
pub(super) static DOCUMENT: LazyLock<Document> = LazyLock::new(PlaybackApi::openapi);

/// The document as committed in `docs/openapi.json`: pretty, with a final newline.
pub fn document_json() -> String {
    let mut text = DOCUMENT
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

    #[test]
    fn the_committed_openapi_document_is_the_one_the_code_generates() {
        let generated = document_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &generated).expect("writing docs/openapi.json");
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the document the code generates: \
             rewrite it with `UPDATE_OPENAPI=1 cargo test --lib openapi`, \
             review the diff (the React player and the UI depend on it) and commit it"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_and_the_recording_api_requires_a_bearer_token() {
        let doc: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let get = &doc["paths"]["/v1/intakes/{id}/recording"]["get"];
        assert_eq!(get["security"], serde_json::json!([{ BEARER: [] }]));
        for status in ["200", "401", "403", "404", "502", "503", "504"] {
            assert!(
                get["responses"][status].is_object(),
                "{status} undocumented"
            );
        }
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        // Every field is always sent, null or not.
        let response = &doc["components"]["schemas"]["RecordingResponse"];
        assert_eq!(
            response["required"],
            serde_json::json!(["status", "duration_seconds", "url", "expires_at"])
        );
    }
}
