//! Validation of `[agent.redis]`: the URL, who the agent authenticates as, and TLS.
//!
//! Whoever can write the Redis hash can redirect any destination of the node, so the source can
//! log in (an ACL user, a password from a file) and use TLS. Certificate verification cannot be
//! turned off (`rediss://...#insecure` is refused): a private CA is trusted with `ca_file`. The
//! URL is never echoed in a problem, since it may hold a password.

use std::path::Path;
use std::time::Duration;

use super::RedisConfig;
use super::validate::Problem;

fn problem(field: &str, reason: impl Into<String>) -> Problem {
    Problem {
        service: None,
        field: format!("agent.redis.{field}"),
        reason: reason.into(),
    }
}

/// The URL's scheme when it is one the source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `redis://`: plain TCP.
    Plain,
    /// `rediss://`: TLS.
    Tls,
}

impl RedisConfig {
    /// `redis://` or `rediss://`; `None` for anything else (validation reports it).
    pub fn scheme(&self) -> Option<Scheme> {
        match self.url.split_once("://") {
            Some(("redis", _)) => Some(Scheme::Plain),
            Some(("rediss", _)) => Some(Scheme::Tls),
            _ => None,
        }
    }

    /// Whether the URL holds a password (`redis://:secret@host/`).
    pub fn url_has_password(&self) -> bool {
        redis::parse_redis_url(&self.url).is_some_and(|url| url.password().is_some())
    }

    /// Whether the URL names a user (`redis://mesh:secret@host/`).
    fn url_has_username(&self) -> bool {
        redis::parse_redis_url(&self.url).is_some_and(|url| !url.username().is_empty())
    }
}

/// The problems of `[agent.redis]`.
pub(super) fn check(config: &RedisConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    // Never echo the URL: it may hold a password.
    let scheme = config.scheme();
    match scheme {
        Some(_) => {
            if let Err(err) = redis::Client::open(config.url.as_str()) {
                problems.push(problem("url", format!("is not a valid Redis URL: {err}")));
            } else if redis::parse_redis_url(&config.url)
                .is_some_and(|url| url.fragment().is_some())
            {
                // `#insecure` is the redis crate's switch that turns certificate checks off.
                problems.push(problem(
                    "url",
                    "has a #fragment: mesh never turns TLS certificate verification off \
                     (#insecure); to trust a private CA set agent.redis.ca_file",
                ));
            }
        }
        None => problems.push(problem(
            "url",
            "must start with redis:// or rediss:// (TLS), like \"redis://127.0.0.1:6379/\"",
        )),
    }
    for (field, path) in [
        ("password_file", &config.password_file),
        ("ca_file", &config.ca_file),
        ("client_cert", &config.client_cert),
        ("client_key", &config.client_key),
    ] {
        if let Some(path) = path {
            check_path(field, path, &mut problems);
        }
    }
    if config.password_file.is_some() && config.url_has_password() {
        problems.push(problem(
            "password_file",
            "cannot be used together with a password in agent.redis.url: remove the one from \
             the URL (the file keeps it out of the config)",
        ));
    }
    if let Some(username) = &config.username {
        if username.is_empty() {
            problems.push(problem(
                "username",
                "must not be empty (leave it out for Redis's default user)",
            ));
        } else if username
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            problems.push(problem(
                "username",
                "must not contain spaces or control characters",
            ));
        }
        if config.url_has_username() {
            problems.push(problem(
                "username",
                "cannot be used together with a user in agent.redis.url: keep one of them",
            ));
        }
        if config.password_file.is_none() && !config.url_has_password() {
            // Without a password the client sends no AUTH at all: the user would be ignored.
            problems.push(problem(
                "username",
                "needs a password: set agent.redis.password_file",
            ));
        }
    }
    if scheme == Some(Scheme::Plain) {
        for (field, set) in [
            ("ca_file", config.ca_file.is_some()),
            ("client_cert", config.client_cert.is_some()),
            ("client_key", config.client_key.is_some()),
        ] {
            if set {
                problems.push(problem(
                    field,
                    "is a TLS setting, but agent.redis.url is redis:// (plain TCP): use rediss://",
                ));
            }
        }
    }
    match (&config.client_cert, &config.client_key) {
        (Some(_), None) => problems.push(problem(
            "client_key",
            "is required with agent.redis.client_cert (its private key)",
        )),
        (None, Some(_)) => problems.push(problem(
            "client_cert",
            "is required with agent.redis.client_key (the certificate of that key)",
        )),
        _ => {}
    }
    if config.key.is_empty() {
        problems.push(problem("key", "must not be empty"));
    }
    let (lo, hi) = (Duration::from_millis(100), Duration::from_secs(3600));
    if !(lo..=hi).contains(&config.resync) {
        let fmt = humantime_serde::re::humantime::format_duration;
        problems.push(problem(
            "resync",
            format!(
                "must be between {} and {}, got {}",
                fmt(lo),
                fmt(hi),
                fmt(config.resync)
            ),
        ));
    }
    problems
}

fn check_path(field: &str, path: &Path, problems: &mut Vec<Problem>) {
    if !path.is_absolute() {
        problems.push(problem(
            field,
            format!(
                "must be an absolute path, got {:?}",
                path.display().to_string()
            ),
        ));
    }
}

/// `url` with the password replaced by `***`, for messages and `Debug`. Conservative: whatever
/// lies between `://` and the last `@` is user information, and everything after its first `:`
/// is hidden, even in a URL that does not parse.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') {
            "***".to_owned()
        } else {
            url.to_owned()
        };
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::parse;
    use super::*;

    /// The problems of a config with `[agent.redis]` = `table`, as `field: reason`.
    fn problems(table: &str) -> Vec<String> {
        match parse(&format!("[agent.redis]\n{table}"), "mesh.toml") {
            Ok(_) => Vec::new(),
            Err(err) => err.problems().iter().map(ToString::to_string).collect(),
        }
    }

    fn redis(table: &str) -> RedisConfig {
        parse(&format!("[agent.redis]\n{table}"), "mesh.toml")
            .unwrap_or_else(|e| panic!("{e}"))
            .agent
            .redis
            .expect("[agent.redis]")
    }

    #[test]
    fn user_password_file_and_tls_files_parse() {
        let config = redis(
            "url = \"rediss://redis.example:6380/1\"\nusername = \"mesh\"\n\
             password_file = \"/etc/mesh/redis.password\"\nca_file = \"/etc/mesh/redis-ca.pem\"\n\
             client_cert = \"/etc/mesh/c.pem\"\nclient_key = \"/etc/mesh/k.pem\"\n",
        );
        assert_eq!(config.scheme(), Some(Scheme::Tls));
        assert_eq!(config.username.as_deref(), Some("mesh"));
        assert_eq!(
            config.password_file,
            Some(PathBuf::from("/etc/mesh/redis.password"))
        );
        assert_eq!(
            config.ca_file,
            Some(PathBuf::from("/etc/mesh/redis-ca.pem"))
        );
        assert_eq!(config.client_cert, Some(PathBuf::from("/etc/mesh/c.pem")));
        assert_eq!(config.client_key, Some(PathBuf::from("/etc/mesh/k.pem")));
        assert!(!config.url_has_password());
        // A plain URL with only a password file: the default user.
        let config = redis("url = \"redis://127.0.0.1/\"\npassword_file = \"/p\"\n");
        assert_eq!(config.scheme(), Some(Scheme::Plain));
        assert_eq!(config.username, None);
        // The password in the URL is still accepted (the agent warns at start).
        let config = redis("url = \"redis://mesh:secret@127.0.0.1/\"\n");
        assert!(config.url_has_password());
        // A TLS URL without a CA: the system's roots.
        assert_eq!(redis("url = \"rediss://127.0.0.1/\"\n").ca_file, None);
    }

    #[test]
    fn a_password_in_the_url_and_a_password_file_are_refused_together() {
        let found = problems("url = \"redis://:secret@127.0.0.1/\"\npassword_file = \"/p\"\n");
        assert_eq!(
            found,
            [
                "agent.redis.password_file: cannot be used together with a password in \
              agent.redis.url: remove the one from the URL (the file keeps it out of the config)"
            ]
        );
        assert!(!found[0].contains("secret"));
    }

    #[test]
    fn a_username_needs_a_password_and_only_one_place() {
        assert_eq!(
            problems("url = \"redis://127.0.0.1/\"\nusername = \"mesh\"\n"),
            ["agent.redis.username: needs a password: set agent.redis.password_file"]
        );
        assert_eq!(
            problems("url = \"redis://other:pw@127.0.0.1/\"\nusername = \"mesh\"\n"),
            [
                "agent.redis.username: cannot be used together with a user in agent.redis.url: \
              keep one of them"
            ]
        );
        assert_eq!(
            problems("url = \"redis://127.0.0.1/\"\nusername = \"\"\npassword_file = \"/p\"\n"),
            ["agent.redis.username: must not be empty (leave it out for Redis's default user)"]
        );
        assert_eq!(
            problems("url = \"redis://127.0.0.1/\"\nusername = \"a b\"\npassword_file = \"/p\"\n"),
            ["agent.redis.username: must not contain spaces or control characters"]
        );
    }

    #[test]
    fn files_must_be_absolute_paths() {
        let found = problems(
            "url = \"rediss://127.0.0.1/\"\npassword_file = \"pw\"\nca_file = \"ca.pem\"\n\
             client_cert = \"c.pem\"\nclient_key = \"k.pem\"\n",
        );
        assert_eq!(
            found,
            [
                "agent.redis.password_file: must be an absolute path, got \"pw\"",
                "agent.redis.ca_file: must be an absolute path, got \"ca.pem\"",
                "agent.redis.client_cert: must be an absolute path, got \"c.pem\"",
                "agent.redis.client_key: must be an absolute path, got \"k.pem\"",
            ]
        );
    }

    #[test]
    fn tls_files_need_a_tls_url_and_come_in_pairs() {
        let found = problems(
            "url = \"redis://127.0.0.1/\"\nca_file = \"/ca.pem\"\nclient_cert = \"/c.pem\"\n",
        );
        assert_eq!(
            found,
            [
                "agent.redis.ca_file: is a TLS setting, but agent.redis.url is redis:// (plain \
                 TCP): use rediss://",
                "agent.redis.client_cert: is a TLS setting, but agent.redis.url is redis:// \
                 (plain TCP): use rediss://",
                "agent.redis.client_key: is required with agent.redis.client_cert (its private key)",
            ]
        );
        assert_eq!(
            problems("url = \"rediss://127.0.0.1/\"\nclient_key = \"/k.pem\"\n"),
            [
                "agent.redis.client_cert: is required with agent.redis.client_key (the certificate \
              of that key)"
            ]
        );
    }

    #[test]
    fn certificate_verification_cannot_be_turned_off() {
        for url in [
            "rediss://127.0.0.1/#insecure",
            "rediss://:pw@127.0.0.1/#insecure",
        ] {
            let found = problems(&format!("url = \"{url}\"\n"));
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].starts_with(
                    "agent.redis.url: has a #fragment: mesh never turns TLS certificate \
                     verification off (#insecure)"
                ),
                "{found:?}"
            );
            assert!(!found[0].contains("pw"), "{found:?}");
        }
    }

    #[test]
    fn other_schemes_are_refused_without_echoing_the_url() {
        for url in [
            "http://:pw@127.0.0.1/",
            "127.0.0.1:6379",
            "unix:///run/redis.sock",
        ] {
            assert_eq!(
                problems(&format!("url = \"{url}\"\n")),
                [
                    "agent.redis.url: must start with redis:// or rediss:// (TLS), like \
                  \"redis://127.0.0.1:6379/\""
                ],
                "{url}"
            );
        }
        let found = problems("url = \"rediss://:pw@127.0.0.1:notaport/\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("agent.redis.url: is not a valid Redis URL"),
            "{found:?}"
        );
        assert!(!found[0].contains("pw"), "{found:?}");
    }

    #[test]
    fn debug_output_never_shows_the_url_password() {
        let config = redis("url = \"redis://mesh:s3cr3t-pw@127.0.0.1:6379/2\"\n");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr3t-pw"), "{debug}");
        assert!(
            debug.contains("redis://mesh:***@127.0.0.1:6379/2"),
            "{debug}"
        );
        let full = format!(
            "{:?}",
            parse(
                "[agent.redis]\nurl = \"redis://:s3cr3t-pw@127.0.0.1/\"\n",
                "mesh.toml"
            )
            .unwrap()
        );
        assert!(!full.contains("s3cr3t-pw"), "{full}");
    }

    #[test]
    fn redact_url_hides_everything_after_the_user() {
        for (url, want) in [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            ("redis://:pw@127.0.0.1/", "redis://:***@127.0.0.1/"),
            ("rediss://mesh:pw@h:1/0", "rediss://mesh:***@h:1/0"),
            ("redis://mesh@h/", "redis://mesh@h/"),
            // An unencoded '@' or '/' in the password: still hidden.
            ("redis://u:p@ss/w@h/", "redis://u:***@h/"),
            ("nonsense:pw@h", "***"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
