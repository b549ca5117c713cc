//! Property tests: the fuzzing we can run on stable Rust (cargo-fuzz needs a
//! nightly toolchain, which the project does not use). Each property has a
//! fixed case budget so the whole module stays within a few seconds of a
//! debug build; `PROPTEST_CASES=100000 cargo test fuzz::` runs a longer
//! campaign, and `PROPTEST_RNG_SEED` replays one. The inputs are what the
//! outside world controls: webhook headers and bodies, Telnyx's numbers,
//! retry hints.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use recording_relay::jobs::backoff::{Backoff, MAX_HINT};
use recording_relay::telemetry::mask_phone;
use recording_relay::webhook::event::Envelope;
use recording_relay::webhook::verify::Verifier;
use recording_relay_test_kit::sign;
use serde_json::{Value, json};

/// A fixed number of cases, unless `PROPTEST_CASES` asks for more.
fn budget(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

const TOLERANCE: Duration = Duration::from_secs(300);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// Header values: arbitrary bytes, and ones shaped like the real thing so the
/// deeper branches (freshness, base64, the curve) are reached too.
fn header_value(shaped: &'static str) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        proptest::collection::vec(any::<u8>(), 0..120).prop_map(Some),
        proptest::string::string_regex(shaped)
            .expect("valid regex")
            .prop_map(|s| Some(s.into_bytes())),
    ]
}

/// Which part of a signed request a bit flip lands in.
#[derive(Debug, Clone, Copy)]
enum Part {
    Timestamp,
    Signature,
    Body,
}

proptest! {
    #![proptest_config(budget(1024))]

    #[test]
    fn verification_never_panics_on_arbitrary_input(
        timestamp in header_value("[0-9]{0,24}"),
        signature in header_value("[A-Za-z0-9+/= ]{0,100}"),
        body in proptest::collection::vec(any::<u8>(), 0..512),
        now in prop_oneof![Just(1_764_000_000u64), any::<u64>()],
        seed in any::<[u8; 32]>(),
    ) {
        let verifier = Verifier::new(SigningKey::from_bytes(&seed).verifying_key(), TOLERANCE);
        let got = verifier.verify(timestamp.as_deref(), signature.as_deref(), &body, at(now));
        // Whatever it is, it is an answer; and without a real signature it is a refusal.
        prop_assert!(got.is_err());
    }

    #[test]
    fn envelope_parsing_never_panics_on_arbitrary_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        if let Ok(envelope) = Envelope::parse(&body) {
            let _ = envelope.into_job(12);
        }
    }

    #[test]
    fn envelope_parsing_never_panics_on_mangled_events(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut body = crate::testing::recording_saved_event("ev", "sess")
            .to_string()
            .into_bytes();
        for (index, byte) in edits {
            let i = index.index(body.len());
            body[i] = byte;
        }
        if let Ok(envelope) = Envelope::parse(&body) {
            prop_assert!(!envelope.id.trim().is_empty());
            let _ = envelope.into_job(12);
        }
    }

    #[test]
    fn envelope_parsing_never_panics_on_arbitrary_json(value in json_value()) {
        if let Ok(envelope) = Envelope::parse(value.to_string().as_bytes()) {
            let _ = envelope.into_job(12);
        }
    }

    #[test]
    fn any_well_formed_envelope_yields_a_sane_job(
        id in json_value(),
        event_type in prop_oneof![Just(json!("call.recording.saved")), json_value()],
        payload in proptest::collection::btree_map(payload_key(), json_value(), 0..10),
    ) {
        let body = json!({
            "data": {"id": id, "event_type": event_type, "payload": payload},
            "meta": {"attempt": 1},
        });
        let Ok(envelope) = Envelope::parse(body.to_string().as_bytes()) else {
            return Ok(());
        };
        prop_assert!(!envelope.id.trim().is_empty());
        let job = envelope.into_job(12);
        prop_assert!(job.call.duration_millis.is_none_or(|d| d >= 0));
        prop_assert_eq!(job.max_attempts, 12);
    }

    #[test]
    fn a_phone_number_mask_reveals_at_most_its_last_two_digits(
        number in prop_oneof![any::<String>(), "[+0-9 ().-]{0,24}"],
    ) {
        let masked = mask_phone(&number);
        let shown: String = masked.chars().filter(char::is_ascii_digit).collect();
        prop_assert!(shown.len() <= 2, "{masked}");
        prop_assert!(masked.chars().all(|c| c == '*' || c.is_ascii_digit()), "{masked}");
        let digits: String = number.chars().filter(char::is_ascii_digit).collect();
        prop_assert!(digits.ends_with(&shown), "{masked} is not the tail of the number");
        if digits.len() >= 4 {
            prop_assert_eq!(shown.len(), 2);
        } else {
            prop_assert_eq!(masked.as_str(), "***");
        }
    }

    #[test]
    fn backoff_ceilings_grow_to_the_cap_and_delays_stay_inside(
        base_ms in 1u64..=86_400_000,
        cap_factor in prop_oneof![1u64..=1_000, Just(u64::MAX)],
        attempt in prop_oneof![-5i32..=40, any::<i32>()],
        hint in proptest::option::of(prop_oneof![0u64..=7_200, any::<u64>()]),
    ) {
        let base = Duration::from_millis(base_ms);
        // Up to Duration::MAX: the schedule must hold for any cap a config allows.
        let cap = match u32::try_from(cap_factor) {
            Ok(factor) => base * factor,
            Err(_) => Duration::MAX,
        };
        let b = Backoff { base, cap };
        let ceiling = b.ceiling(attempt);
        prop_assert!(ceiling <= cap);
        prop_assert!(ceiling >= base.min(cap));
        if attempt < i32::MAX {
            prop_assert!(ceiling <= b.ceiling(attempt + 1), "not monotone at {}", attempt);
        }
        match hint.map(Duration::from_secs) {
            None => prop_assert!(b.delay(attempt, None) <= ceiling),
            Some(hint) => {
                let floor = hint.min(MAX_HINT);
                let d = b.delay(attempt, Some(hint));
                prop_assert!(d >= floor, "{:?} below the hint floor {:?}", d, floor);
                prop_assert!(d <= ceiling.max(floor), "{:?} above both ceiling and floor", d);
            }
        }
    }
}

proptest! {
    // Ed25519 in a debug build costs milliseconds per signature: fewer cases.
    #![proptest_config(budget(128))]

    #[test]
    fn a_valid_signature_over_any_body_verifies(
        seed in any::<[u8; 32]>(),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        signed_at in 1_000_000_000i64..4_000_000_000,
        skew in -300i64..=300,
    ) {
        let key = SigningKey::from_bytes(&seed);
        let signature = sign(&key, signed_at, &body);
        let now = at(u64::try_from(signed_at + skew).unwrap_or(0));
        let got = Verifier::new(key.verifying_key(), TOLERANCE).verify(
            Some(signed_at.to_string().as_bytes()),
            Some(signature.as_bytes()),
            &body,
            now,
        );
        prop_assert_eq!(got, Ok(signed_at));
    }

    #[test]
    fn any_single_bit_flip_is_refused(
        seed in any::<[u8; 32]>(),
        body in proptest::collection::vec(any::<u8>(), 1..512),
        part in prop_oneof![Just(Part::Timestamp), Just(Part::Signature), Just(Part::Body)],
        at_byte in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = SigningKey::from_bytes(&seed);
        let signed_at = 1_764_000_000i64;
        let mut timestamp = signed_at.to_string().into_bytes();
        let mut signature = sign(&key, signed_at, &body).into_bytes();
        let mut body = body;
        let target = match part {
            Part::Timestamp => &mut timestamp,
            Part::Signature => &mut signature,
            Part::Body => &mut body,
        };
        let i = at_byte.index(target.len());
        target[i] ^= 1 << bit;
        let got = Verifier::new(key.verifying_key(), TOLERANCE).verify(
            Some(&timestamp),
            Some(&signature),
            &body,
            at(1_764_000_000),
        );
        prop_assert!(got.is_err(), "a flip in {:?} byte {} bit {} verified", part, i, bit);
    }
}

/// Keys the envelope reader looks at, plus noise.
fn payload_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "recording_id",
            "call_session_id",
            "call_control_id",
            "call_leg_id",
            "connection_id",
            "client_state",
            "from",
            "to",
            "from_number",
            "to_number",
            "duration_millis",
            "channels",
            "recording_started_at",
            "recording_ended_at",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,10}",
    ]
}

/// Any JSON value, a few levels deep, with the numbers that hurt (huge,
/// negative, fractional) and keys the reader cares about.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop_oneof![
            Just("2025-11-19T10:30:00.000Z".to_owned()),
            Just("+15557650002".to_owned()),
            Just("99999999999999999999999".to_owned()),
            any::<String>(),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec!["data", "id", "event_type", "payload"])
                        .prop_map(str::to_owned),
                    payload_key(),
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
