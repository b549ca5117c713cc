//! URL helpers the provider clients share: escaping what comes from outside
//! into a path, and cutting credentials off a URL before it is shown.
//!
//! A leaf: it knows nothing of the crate, so both clients can use it
//! without depending on logging or on each other.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Cuts the query string off a URL: presigned and signed URLs carry their
/// credentials there.
pub(crate) fn redact_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// A path or segment that could name something other than what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsafe path segment {segment:?}: {why}")]
pub struct UnsafePath {
    /// The offending segment, at most 64 characters of it (object paths
    /// hold ids, never patient data; this is for the log).
    pub segment: String,
    pub why: &'static str,
}

/// Refuses a segment that a URL parser or a storage server would not take
/// literally: `.` and `..` (removed with the segment before them, by
/// reqwest's parser as by browsers), empty ones (`a//b`), backslashes
/// (a separator to some servers), and any `%`: `%2e%2e` is a dot segment
/// to the WHATWG parser too, and a server that decodes once more would see
/// `%2F` as a separator. Escaping is no defence against the first two.
pub(crate) fn check_segment(segment: &str) -> Result<(), UnsafePath> {
    let why = if segment.is_empty() {
        "empty"
    } else if segment == "." || segment == ".." {
        "a dot segment"
    } else if segment.contains('\\') {
        "a backslash"
    } else if segment.contains('%') {
        "a percent sign"
    } else {
        return Ok(());
    };
    Err(UnsafePath {
        segment: segment.chars().take(64).collect(),
        why,
    })
}

/// Escapes one URL path segment (ids and object names come from outside),
/// refusing those that no escaping keeps in place ([`check_segment`]).
pub(crate) fn encode_segment(segment: &str) -> Result<String, UnsafePath> {
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    check_segment(segment)?;
    Ok(utf8_percent_encode(segment, SEGMENT).to_string())
}

/// Escapes each segment of a `/`-separated path, keeping the separators;
/// refuses the whole path when any segment is unsafe.
pub(crate) fn encode_path(path: &str) -> Result<String, UnsafePath> {
    let segments = path
        .split('/')
        .map(encode_segment)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(encode_segment("d8991cb0-c531").unwrap(), "d8991cb0-c531");
        assert_eq!(encode_segment("../x?y").unwrap(), "..%2Fx%3Fy");
        assert_eq!(encode_segment("...").unwrap(), "...");
    }

    #[test]
    fn paths_are_escaped_per_segment() {
        assert_eq!(
            encode_path("intakes/a b/x.wav").unwrap(),
            "intakes/a%20b/x.wav"
        );
    }

    /// Every way issue #19 reached another tenant's object or bucket.
    #[test]
    fn paths_that_would_not_stay_where_they_say_are_refused() {
        for (path, why) in [
            ("intakes/a/../b/r.wav", "a dot segment"),
            ("x/../intakes/b/r.wav", "a dot segment"),
            ("../patient-documents/scan.pdf", "a dot segment"),
            ("intakes/./r.wav", "a dot segment"),
            ("..", "a dot segment"),
            ("intakes/a/%2e%2e/b/r.wav", "a percent sign"),
            ("intakes/a/.%2E/r.wav", "a percent sign"),
            ("intakes/a/r%2Fx.wav", "a percent sign"),
            ("intakes/a\\..\\b/r.wav", "a backslash"),
            ("intakes//r.wav", "empty"),
            ("/intakes/a/r.wav", "empty"),
            ("intakes/a/", "empty"),
            ("", "empty"),
        ] {
            let err = encode_path(path).unwrap_err();
            assert_eq!(err.why, why, "{path}");
        }
    }

    #[test]
    fn urls_lose_their_query() {
        assert_eq!(
            redact_url("https://s3/x.wav?X-Amz-Signature=abc"),
            "https://s3/x.wav"
        );
    }
}
