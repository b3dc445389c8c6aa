//! Validation of who may reach the agent's admin API: `[agent] admin_socket`, `admin`,
//! `admin_token_file` and `admin_tls`.
//!
//! Whoever can change the registry can redirect any destination of the node, so the TCP
//! listener is never open without a token, and never off loopback without TLS (a bearer token
//! in clear text on a network is as good as none).

use super::AgentConfig;
use super::validate::Problem;

fn problem(field: &str, reason: String) -> Problem {
    Problem {
        service: None,
        field: field.to_owned(),
        reason,
    }
}

/// The problems of the admin API's access settings.
pub(super) fn check(agent: &AgentConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    let socket = &agent.admin_socket;
    if !socket.as_os_str().is_empty() && !socket.is_absolute() {
        problems.push(problem(
            "agent.admin_socket",
            format!(
                "must be an absolute path (or \"\" to turn the socket off), got {:?}",
                socket.display().to_string()
            ),
        ));
    }
    for (field, path) in [
        ("agent.admin_token_file", agent.admin_token_file.as_ref()),
        (
            "agent.admin_tls.cert",
            agent.admin_tls.as_ref().map(|t| &t.cert),
        ),
        (
            "agent.admin_tls.key",
            agent.admin_tls.as_ref().map(|t| &t.key),
        ),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            problems.push(problem(
                field,
                format!(
                    "must be an absolute path, got {:?}",
                    path.display().to_string()
                ),
            ));
        }
    }
    match agent.admin {
        Some(addr) => {
            if agent.admin_token_file.is_none() {
                problems.push(problem(
                    "agent.admin_token_file",
                    format!(
                        "is required when agent.admin is set ({addr}): a TCP admin listener \
                         accepts only requests with the bearer token from this file"
                    ),
                ));
            }
            if !addr.ip().is_loopback() && agent.admin_tls.is_none() {
                problems.push(problem(
                    "agent.admin",
                    format!(
                        "{addr} is not a loopback address: the token would cross the network in \
                         clear text; set agent.admin_tls = {{ cert = \"...\", key = \"...\" }} \
                         or listen on 127.0.0.1 / [::1]"
                    ),
                ));
            }
        }
        None => {
            for (field, set) in [
                ("agent.admin_token_file", agent.admin_token_file.is_some()),
                ("agent.admin_tls", agent.admin_tls.is_some()),
            ] {
                if set {
                    problems.push(problem(
                        field,
                        "is set but agent.admin (the TCP listener it is for) is not".to_owned(),
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::{TlsFiles, parse};

    fn problems(agent_toml: &str) -> Vec<String> {
        match parse(&format!("[agent]\n{agent_toml}"), "mesh.toml") {
            Ok(_) => Vec::new(),
            Err(err) => err.problems().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_socket_is_on_by_default_and_an_empty_path_turns_it_off() {
        let config = parse("", "mesh.toml").unwrap();
        assert_eq!(
            config.agent.admin_socket,
            std::path::PathBuf::from("/run/mesh/admin.sock")
        );
        let config = parse("[agent]\nadmin_socket = \"\"\n", "mesh.toml").unwrap();
        assert!(config.agent.admin_socket.as_os_str().is_empty());
        let found = problems("admin_socket = \"run/admin.sock\"");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("agent.admin_socket: must be an absolute path"));
    }

    #[test]
    fn a_tcp_listener_needs_a_token_file() {
        let found = problems("admin = \"127.0.0.1:9465\"");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("agent.admin_token_file: is required when agent.admin is set"),
            "{found:?}"
        );
        assert!(
            problems("admin = \"127.0.0.1:9465\"\nadmin_token_file = \"/etc/mesh/token\"")
                .is_empty()
        );
    }

    #[test]
    fn a_non_loopback_listener_needs_tls() {
        let found = problems("admin = \"0.0.0.0:9465\"\nadmin_token_file = \"/etc/mesh/token\"");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("agent.admin: 0.0.0.0:9465 is not a loopback address"),
            "{found:?}"
        );
        let config = parse(
            "[agent]\nadmin = \"[::]:9465\"\nadmin_token_file = \"/etc/mesh/token\"\n\
             admin_tls = { cert = \"/etc/mesh/tls.crt\", key = \"/etc/mesh/tls.key\" }\n",
            "mesh.toml",
        )
        .unwrap();
        assert_eq!(
            config.agent.admin_tls,
            Some(TlsFiles {
                cert: "/etc/mesh/tls.crt".into(),
                key: "/etc/mesh/tls.key".into(),
            })
        );
    }

    #[test]
    fn token_and_tls_without_a_listener_are_mistakes() {
        let found =
            problems("admin_token_file = \"/t\"\nadmin_tls = { cert = \"/c\", key = \"k\" }\n");
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("agent.admin_tls.key: must be an absolute"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("agent.admin_tls: is set but agent.admin"))
        );
    }
}
