//! Which secrets a config file holds, and a warning when others may read it.

use std::path::Path;

use super::Config;

/// The secret settings a config holds, by name (never their values): what a
/// reader of the file would learn.
pub(crate) fn secret_settings(config: &Config) -> Vec<&'static str> {
    let mut found = Vec::new();
    if config.database_url().is_some_and(database_url_has_password) {
        found.push("database.url (with a password)");
    }
    if config.telnyx.api_key.is_some() {
        found.push("telnyx.api_key");
    }
    if config.supabase.service_role_key.is_some() {
        found.push("supabase.service_role_key");
    }
    found
}

/// `postgres://user:password@host/db`, or a `password=` parameter.
fn database_url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let userinfo_has_password = authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    userinfo_has_password || url.to_ascii_lowercase().contains("password=")
}

/// A warning when the config file at `path` holds secrets (as parsed into
/// `file_config`, before the environment) and group or others may read it.
/// Logged once at start-up rather than refused: an operator may have good
/// reasons (a dedicated group), but should know. The fix is `chmod 600`, or
/// moving the secrets to the environment or systemd credentials.
pub(crate) fn permission_warning(path: &Path, file_config: &Config) -> Option<String> {
    let secrets = secret_settings(file_config);
    if secrets.is_empty() {
        return None;
    }
    let mode = file_mode(path)?;
    if mode & 0o044 == 0 {
        return None;
    }
    Some(format!(
        "config file {} holds secrets ({}) but is readable by {} (mode {:03o}): \
         chmod 600 it, or move the secrets to the environment or systemd credentials",
        path.display(),
        secrets.join(", "),
        match (mode & 0o040 != 0, mode & 0o004 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        },
        mode & 0o777,
    ))
}

#[cfg(unix)]
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> Option<u32> {
    None
}
