//! The one form of object path that may be played: `intakes/{intake id}/
//! {recording}.{wav|mp3}`, the folder the daemon writes an intake's
//! recording into and nothing else into (issue #19). The playback API signs
//! only that form, for that intake, and only when the relay recorded it in
//! `recording_relay.recording_links`; the opt-in storage policy and the
//! table's CHECK constraint say the same in SQL.
//!
//! `intakes.recording_object_path` is the host's column, writable by its
//! users, so it is read as a claim to check, never as an address.

use uuid::Uuid;

use crate::providers::urls::check_segment;

/// Whether `path` is exactly a recording in `intake`'s own folder. The file
/// name is the recording id as the pipeline sanitizes it (ASCII letters,
/// digits, `-` and `_`: the id is a provider answer) plus the format's
/// extension.
pub(crate) fn is_intake_recording(path: &str, intake: Uuid) -> bool {
    let Some(rest) = path
        .strip_prefix("intakes/")
        .and_then(|rest| rest.strip_prefix(intake.to_string().as_str()))
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    let Some((name, extension)) = rest.rsplit_once('.') else {
        return false;
    };
    check_segment(rest).is_ok()
        && matches!(extension, "wav" | "mp3")
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AudioFormat;

    #[test]
    fn only_the_intakes_own_folder_in_the_pipelines_form_is_a_recording() {
        let a = Uuid::parse_str("7f1c2a4e-1d2b-4c3d-9e8f-001122334455").unwrap();
        let b = Uuid::parse_str("00000000-0000-0000-0000-000000000000").unwrap();
        let ok = |p: &str| is_intake_recording(p, a);
        assert!(ok(&format!("intakes/{a}/v3-abc_1.wav")));
        assert!(ok(&format!("intakes/{a}/r.mp3")));
        for path in [
            format!("intakes/{b}/r.wav"),
            format!("intakes/{a}/../{b}/r.wav"),
            format!("x/../intakes/{a}/r.wav"),
            format!("intakes/{a}/%2e%2e/r.wav"),
            format!("intakes/{a}/r.wav/"),
            format!("intakes/{a}//r.wav"),
            format!("intakes/{a}/sub/r.wav"),
            format!("intakes/{a}/r\\x.wav"),
            format!("intakes/{a}/r.x.wav"),
            format!("intakes/{a}/.wav"),
            format!("intakes/{a}/r.pdf"),
            format!("intakes/{a}/r"),
            format!("intakes/{}/r.wav", a.to_string().to_uppercase()),
            format!("/intakes/{a}/r.wav"),
            "unmatched/r.wav".to_owned(),
            "../patient-documents/scan.pdf".to_owned(),
        ] {
            assert!(!ok(&path), "{path}");
        }
    }

    /// Whatever a provider calls a recording, the path the pipeline builds
    /// for an intake is one that plays.
    #[test]
    fn every_path_the_pipeline_builds_for_an_intake_is_a_recording() {
        let a = Uuid::new_v4();
        for id in ["v3-abc", "../x", "a/b", "%2e%2e", "..", "r.wav", "ü"] {
            for format in [AudioFormat::Wav, AudioFormat::Mp3] {
                let path = crate::pipeline::object_path(Some(a), id, format);
                assert!(is_intake_recording(&path, a), "{id}: {path}");
            }
        }
    }
}
