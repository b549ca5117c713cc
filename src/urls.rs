//! URL helpers the provider clients share: escaping what comes from outside
//! into a path, and cutting credentials off a URL before it is shown.
//!
//! A leaf: it knows nothing of the crate, so both clients can use it
//! without depending on logging or on each other.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Cuts the query string off a URL: presigned and signed URLs carry their
/// credentials there.
pub fn redact_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Escapes one URL path segment (ids and object names come from outside).
pub fn encode_segment(segment: &str) -> String {
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// Escapes each segment of a `/`-separated path, keeping the separators.
pub fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(encode_segment("d8991cb0-c531"), "d8991cb0-c531");
        assert_eq!(encode_segment("../x?y"), "..%2Fx%3Fy");
    }

    #[test]
    fn paths_are_escaped_per_segment() {
        assert_eq!(encode_path("intakes/a b/x.wav"), "intakes/a%20b/x.wav");
    }

    #[test]
    fn urls_lose_their_query() {
        assert_eq!(
            redact_url("https://s3/x.wav?X-Amz-Signature=abc"),
            "https://s3/x.wav"
        );
    }
}
