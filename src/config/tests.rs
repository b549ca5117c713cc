//! The configuration as an operator meets it: the example file, the
//! environment, and the messages each mistake gets.
use std::collections::HashMap;

use std::time::Duration;

use super::overrides::read_credential;
use super::providers::check_provider_url;
use super::*;

struct MapEnv(HashMap<&'static str, &'static str>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| (*v).to_owned())
    }
}

fn env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
    MapEnv(pairs.iter().copied().collect())
}

const KEY: &str = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";

#[test]
fn the_example_config_parses_and_matches_the_defaults() {
    let text = include_str!("../../config.toml.example");
    let parsed = Config::from_toml(text).expect("example parses");
    let defaults = Config::default();
    assert_eq!(parsed.worker.lease, defaults.worker.lease);
    assert_eq!(parsed.retry.cap, defaults.retry.cap);
    assert_eq!(parsed.listener.addr, defaults.listener.addr);
    assert_eq!(parsed.playback.addr, defaults.playback.addr);
    assert_eq!(
        parsed.playback.signed_url_ttl,
        defaults.playback.signed_url_ttl
    );
    assert_eq!(
        parsed.playback.organization_claim,
        defaults.playback.organization_claim
    );
    let (r, d) = (&parsed.retention, &defaults.retention);
    assert_eq!(
        (r.succeeded_for, r.failed_for, r.unresolved_for, r.interval),
        (d.succeeded_for, d.failed_for, d.unresolved_for, d.interval)
    );
    assert_eq!(r.unresolved_alert_before, d.unresolved_alert_before);
    assert_eq!(r.playback_audit_for, d.playback_audit_for);
    let (p, d) = (&parsed.pipeline, &defaults.pipeline);
    assert_eq!(
        (&p.intake_header, p.link_wait),
        (&d.intake_header, d.link_wait)
    );
    assert_eq!(p.caller_id_organizations, d.caller_id_organizations);
}

#[test]
fn an_intake_header_that_is_no_sip_header_name_is_refused() {
    for bad in ["", "X Intake", "X-Intake:Id", "X-Intäke"] {
        let mut c = Config::from_toml("").unwrap();
        c.pipeline.intake_header = bad.to_owned();
        let mut problems = Vec::new();
        c.validate_worker(&mut problems);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("pipeline.intake_header")),
            "{bad:?}: {problems:?}"
        );
    }
}

#[test]
fn caller_id_organization_names_are_plain_identifiers() {
    let line = include_str!("../../config.toml.example")
        .lines()
        .find_map(|l| l.strip_prefix("# caller_id_organizations = "))
        .expect("the example shows the setting");
    let c = Config::from_toml(&format!("[pipeline]\ncaller_id_organizations = {line}\n")).unwrap();
    let caller_id = c.pipeline.caller_id_organizations.clone().unwrap();
    assert_eq!(caller_id.table, "public.organizations");
    let sql = caller_id.lookup_sql();
    assert!(
        sql.contains(r#"FROM "public"."organizations""#) && sql.contains(r#""phone""#),
        "{sql}"
    );
    for (table, id, phone, wrong) in [
        ("organizations", "id", "phone", "table"),
        ("public.organizations; drop table x", "id", "phone", "table"),
        ("public.Organizations", "id", "phone", "table"),
        ("public.organizations", "id\"", "phone", "id_column"),
        ("public.organizations", "id", "1phone", "phone_column"),
        ("public.organizations", "id", "", "phone_column"),
    ] {
        let mut c = c.clone();
        c.pipeline.caller_id_organizations = Some(crate::config::CallerIdOrganizations {
            table: table.into(),
            id_column: id.into(),
            phone_column: phone.into(),
        });
        let mut problems = Vec::new();
        c.validate_worker(&mut problems);
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("caller_id_organizations.{wrong}"))),
            "{table} {id} {phone}: {problems:?}"
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    let mut c = Config::from_toml("[supabase]\nbucket = \"from-file\"\n").unwrap();
    c.apply_overrides(&env(&[
        ("STORAGE_BUCKET", "from-env"),
        ("LISTEN_ADDR", "0.0.0.0:9000"),
    ]))
    .unwrap();
    assert_eq!(c.supabase.bucket, "from-env");
    assert_eq!(c.listener.addr.port(), 9000);
}

#[test]
fn every_problem_is_reported_at_once() {
    let c = Config::from_toml("[worker]\nconcurrency = 0\n").unwrap();
    let Err(ConfigError::Invalid(problems)) = c.validate(Role::Serve) else {
        panic!("expected invalid");
    };
    let all = problems.join("\n");
    assert!(all.contains("database.url"), "{all}");
    assert!(all.contains("telnyx.public_key is not set"), "{all}");
    assert!(all.contains("worker.concurrency"), "{all}");
}

#[test]
fn malformed_public_keys_are_explained() {
    for (key, expected) in [
        ("not base64!!", "not valid base64"),
        ("AAAA", "must decode to 32 bytes"),
    ] {
        let mut c = Config::default();
        c.telnyx.public_key = Some(key.to_owned());
        let err = c.telnyx_public_key().unwrap_err();
        assert!(err.contains(expected), "{key}: {err}");
        assert!(!err.contains(key), "the key must not be echoed: {err}");
    }
    let mut c = Config::default();
    c.telnyx.public_key = Some(KEY.to_owned());
    assert!(c.telnyx_public_key().is_ok());
}

#[test]
fn bad_durations_and_unknown_keys_name_the_setting() {
    let err = Config::from_toml("[worker]\nlease = \"sixty\"\n").unwrap_err();
    assert!(err.contains("lease"), "{err}");
    let err = Config::from_toml("[worker]\nleese = \"60s\"\n").unwrap_err();
    assert!(err.contains("leese"), "{err}");
}

#[test]
fn migrate_needs_only_the_database() {
    let mut c = Config::default();
    c.database.url = Some("postgres://localhost/x".to_owned().into());
    assert!(c.validate(Role::Admin).is_ok());
    assert!(c.validate(Role::Listen).is_err());
}

#[test]
fn secrets_do_not_appear_in_debug_output() {
    let mut c = Config::default();
    c.telnyx.api_key = Some("KEYsecret123".to_owned().into());
    assert!(!format!("{c:?}").contains("KEYsecret123"));
}

#[test]
fn provider_urls_need_tls_outside_loopback() {
    let check = |url: &str| {
        let mut p = Vec::new();
        check_provider_url("x", url, &mut p);
        p.is_empty()
    };
    assert!(check("https://abc.supabase.co"));
    assert!(check("http://127.0.0.1:5000/v2"));
    assert!(check("http://localhost:9"));
    assert!(check("http://[::1]:9/v2"));
    assert!(!check("http://abc.supabase.co"));
    assert!(!check("http://127.0.0.1.evil.com/"));
    assert!(!check("ftp://x"));
    assert!(!check("abc.supabase.co"));
}

#[test]
fn the_worker_needs_provider_credentials() {
    let mut c = Config::default();
    c.database.url = Some("postgres://localhost/x".to_owned().into());
    let Err(ConfigError::Invalid(problems)) = c.validate(Role::Work) else {
        panic!("expected invalid");
    };
    let all = problems.join("\n");
    for needed in [
        "telnyx.api_key",
        "supabase.url",
        "supabase.service_role_key",
    ] {
        assert!(all.contains(needed), "{all}");
    }
    assert!(
        !all.contains("public_key"),
        "the worker does not verify webhooks"
    );
}

#[test]
fn deleting_unresolved_jobs_needs_an_alert_and_a_notice_period() {
    let mut c = Config::default();
    c.database.url = Some("postgres://localhost/x".to_owned().into());
    c.retention.unresolved_for = Some(Duration::from_secs(3 * 86_400));
    c.retention.unresolved_alert_before = Duration::from_secs(7 * 86_400);
    let Err(ConfigError::Invalid(problems)) = c.validate(Role::Work) else {
        panic!("expected invalid");
    };
    let all = problems.join("\n");
    assert!(
        all.contains("retention.unresolved_for needs pipeline.alert_webhook_url"),
        "{all}"
    );
    assert!(
        all.contains("retention.unresolved_alert_before must be"),
        "{all}"
    );
    let parsed: Config = toml::from_str(
        "[retention]\nunresolved_for = \"365d\"\nunresolved_alert_before = \"14d\"\n",
    )
    .unwrap();
    assert_eq!(
        parsed.retention.unresolved_for,
        Some(Duration::from_secs(365 * 86_400))
    );
    assert_eq!(
        Config::default().retention.unresolved_for,
        None,
        "kept by default"
    );
}

fn playback_problems(tweak: impl FnOnce(&mut Config)) -> String {
    let mut c = Config::default();
    c.database.url = Some("postgres://localhost/x".to_owned().into());
    c.telnyx.public_key = Some(KEY.to_owned());
    c.supabase.url = Some("https://abc.supabase.co".to_owned());
    c.supabase.service_role_key = Some("service".to_owned().into());
    c.playback.addr = Some("127.0.0.1:8081".parse().unwrap());
    c.playback.jwt_secret = Some("s".repeat(40).into());
    tweak(&mut c);
    match c.validate(Role::Listen) {
        Ok(()) => String::new(),
        Err(ConfigError::Invalid(problems)) => problems.join("\n"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn playback_is_off_by_default_and_checked_when_on() {
    assert!(Config::default().playback.addr.is_none());
    assert_eq!(playback_problems(|_| {}), "");
    let all = playback_problems(|c| {
        c.playback.jwt_secret = None;
        c.supabase.service_role_key = None;
    });
    assert!(all.contains("SUPABASE_JWT_SECRET"), "{all}");
    assert!(all.contains("service_role_key"), "{all}");
    let all = playback_problems(|c| c.playback.jwt_secret = Some("short".to_owned().into()));
    assert!(all.contains("at least 32"), "{all}");
    assert!(
        !all.contains("short"),
        "the secret must not be echoed: {all}"
    );
    let all = playback_problems(|c| c.playback.signed_url_ttl = Duration::ZERO);
    assert!(all.contains("signed_url_ttl"), "{all}");
}

#[test]
fn the_organization_claim_cannot_come_from_user_metadata() {
    for bad in ["user_metadata.organization_id", "app_metadata..org", ""] {
        let all = playback_problems(|c| c.playback.organization_claim = bad.to_owned());
        assert!(all.contains("organization_claim"), "{bad}: {all}");
    }
    let all = playback_problems(|c| c.playback.organization_claim = "org_id".to_owned());
    assert_eq!(all, "");
}

#[test]
fn allowed_origins_are_bare_origins() {
    assert_eq!(
        playback_problems(|c| c.playback.allowed_origins = vec![
            "https://app.example.com".into(),
            "http://localhost:5173".into()
        ]),
        ""
    );
    for bad in [
        "*",
        "https://app.example.com/",
        "app.example.com",
        "https://*.x.com",
    ] {
        let all = playback_problems(|c| c.playback.allowed_origins = vec![bad.to_owned()]);
        assert!(all.contains("allowed_origins"), "{bad}: {all}");
    }
}

#[test]
fn playback_settings_come_from_the_environment() {
    let mut c = Config::default();
    c.apply_overrides(&env(&[
        ("PLAYBACK_ADDR", "127.0.0.1:9001"),
        ("SUPABASE_JWT_SECRET", "jwt-secret-from-env"),
    ]))
    .unwrap();
    assert_eq!(c.playback.addr.map(|a| a.port()), Some(9001));
    assert!(c.playback.jwt_secret.is_some());
    assert!(!format!("{c:?}").contains("jwt-secret-from-env"));
    let err = Config::default()
        .apply_overrides(&env(&[("PLAYBACK_ADDR", "on")]))
        .unwrap_err();
    assert!(err.to_string().contains("PLAYBACK_ADDR"), "{err}");
}

#[test]
fn credentials_are_read_without_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("TELNYX_API_KEY"), "KEYabc\n").unwrap();
    assert_eq!(
        read_credential(dir.path(), "TELNYX_API_KEY").as_deref(),
        Some("KEYabc")
    );
    assert_eq!(read_credential(dir.path(), "MISSING"), None);
}

#[cfg(unix)]
#[test]
fn a_readable_config_file_with_secrets_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let chmod =
        |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    let warning = |text: &str, mode| {
        std::fs::write(&path, text).unwrap();
        chmod(mode);
        let config = Config::from_toml(text).unwrap();
        permission_warning(&path, &config)
    };
    let with_key = "[telnyx]\napi_key = \"KEYsecret123\"\n";
    for mode in [0o644, 0o640, 0o604, 0o666] {
        let w = warning(with_key, mode).expect("warned");
        assert!(w.contains("telnyx.api_key"), "{w}");
        assert!(w.contains(&format!("{:03o}", mode)), "{w}");
        assert!(!w.contains("KEYsecret123"), "never the secret itself: {w}");
    }
    assert!(
        warning(with_key, 0o640)
            .unwrap()
            .contains("readable by its group")
    );
    assert_eq!(warning(with_key, 0o600), None);
    assert_eq!(warning(with_key, 0o400), None);

    // A database URL counts only with a password in it.
    let db = |url: &str| format!("[database]\nurl = \"{url}\"\n");
    assert!(warning(&db("postgres://relay:pw@db/zscribe"), 0o644).is_some());
    assert!(warning(&db("postgres://relay@db/zscribe?password=pw"), 0o644).is_some());
    assert_eq!(warning(&db("postgres://relay@db/zscribe"), 0o644), None);
    assert_eq!(warning(&db("postgres://db:5432/zscribe"), 0o644), None);
    // No secrets: nothing to say, whatever the mode.
    assert_eq!(warning("[worker]\nconcurrency = 2\n", 0o666), None);
    let w = warning(
        "[supabase]\nservice_role_key = \"sk\"\n[database]\nurl = \"postgres://u:p@h/d\"\n",
        0o644,
    )
    .unwrap();
    assert!(
        w.contains("supabase.service_role_key") && w.contains("database.url"),
        "{w}"
    );
}

/// The fields serde knows in `section` (the top level when `None`), read
/// from its own refusal of an unknown one ("expected one of `a`, `b`").
fn fields_of(section: Option<&str>) -> Vec<String> {
    let probe = match section {
        None => "zz_probe = 1".to_owned(),
        Some(s) => format!("[{s}]\nzz_probe = 1"),
    };
    let err = toml::from_str::<Config>(&probe).unwrap_err().to_string();
    let list = err
        .split_once("expected one of ")
        .or_else(|| err.split_once("expected "))
        .unwrap_or_else(|| panic!("no field list in {err:?}"))
        .1;
    let list = list.lines().next().unwrap_or_default();
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The example with every commented-out setting (`# key = value`, `#
/// [section]`) switched on.
fn example_with_every_setting() -> String {
    let text = include_str!("../../config.toml.example");
    text.lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let key = rest.split(" = ").next().unwrap_or_default();
            let is_setting = rest.contains(" = ")
                && (key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    || (key.starts_with('"') && key.ends_with('"')));
            let is_section = rest.starts_with('[') && rest.ends_with(']');
            if is_setting || is_section {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_config_documents_every_setting_and_every_environment_variable() {
    let text = example_with_every_setting();
    Config::from_toml(&text).expect("the example, every setting on, parses");
    let documented: toml::Table = text.parse().unwrap();
    let mut missing = Vec::new();
    for section in fields_of(None) {
        let Some(keys) = documented.get(&section).and_then(|v| v.as_table()) else {
            missing.push(format!("[{section}]"));
            continue;
        };
        for field in fields_of(Some(&section)) {
            if !keys.contains_key(&field) {
                missing.push(format!("{section}.{field}"));
            }
        }
    }
    let example = include_str!("../../config.toml.example");
    for o in super::overrides::OVERRIDES {
        if !example.contains(o.name) {
            missing.push(o.name.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "config.toml.example does not document {missing:?}"
    );
    // The probe itself works: it finds fields that are there.
    assert!(fields_of(Some("worker")).contains(&"shutdown_timeout".to_owned()));
}

#[test]
fn every_setting_of_the_wrong_type_is_listed_at_once() {
    let err = Config::from_toml(
        "[database]\nmax_connections = \"ten\"\n\n[worker]\nlease = 60\nconcurency = 4\n\n[pipeline]\nformat = \"ogg\"\n",
    )
    .unwrap_err();
    for expected in [
        "database.max_connections: ",
        "worker.lease: ",
        "worker.concurency: unknown field",
        "pipeline.format: ",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert_eq!(err.matches("\n  - ").count(), 4, "{err}");
    assert_eq!(err.matches("max_connections").count(), 1, "{err}");
    // One problem keeps toml's own message, with its line and column.
    let err = Config::from_toml("[worker]\nlease = 60\n").unwrap_err();
    assert!(err.contains("line 2"), "{err}");
    // A syntax error stops at the first.
    assert!(Config::from_toml("[worker\n").is_err());
}

#[test]
fn a_problem_found_twice_is_listed_once() {
    // The storage settings are checked for the worker and for playback.
    let c = Config::from_toml("[playback]\naddr = \"127.0.0.1:8081\"\n").unwrap();
    let Err(ConfigError::Invalid(problems)) = c.validate(Role::Serve) else {
        panic!("a config without any setting is invalid");
    };
    let url = problems
        .iter()
        .filter(|p| p.starts_with("supabase.url is not set"))
        .count();
    assert_eq!(url, 1, "{problems:?}");
}

#[test]
fn the_unit_stop_timeout_is_the_one_in_the_unit_file() {
    let unit = include_str!("../../systemd/recording-relay.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("the unit sets TimeoutStopSec");
    assert_eq!(
        humantime::parse_duration(line.trim()).unwrap(),
        worker::UNIT_TIMEOUT_STOP
    );
}

#[test]
fn a_shutdown_timeout_systemd_would_cut_short_is_warned_about() {
    let mut c = Config::from_toml("").unwrap();
    assert!(c.warnings(Role::Serve).is_empty(), "the default is fine");
    c.worker.shutdown_timeout = Duration::from_secs(90);
    let warnings = c.warnings(Role::Work);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("worker.shutdown_timeout (1m 30s)")
            && warnings[0].contains("TimeoutStopSec (1m)"),
        "{warnings:?}"
    );
    assert_eq!(c.warnings(Role::Serve), warnings);
    // A listener has no jobs to drain.
    assert!(c.warnings(Role::Listen).is_empty());
    // Accepted all the same: a warning, not a refusal.
    assert!(
        c.validate(Role::Work)
            .unwrap_err()
            .to_string()
            .contains("telnyx.api_key")
    );
    assert!(
        !c.validate(Role::Work)
            .unwrap_err()
            .to_string()
            .contains("shutdown_timeout")
    );
}
