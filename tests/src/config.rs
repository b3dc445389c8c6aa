//! Building the agent's TOML config in tests.
//!
//! ```toml
//! [[services]]
//! name = "web"
//! vip = "127.100.0.1:80"
//! protocol = "tcp"
//! [[services.backends]]
//! addr = "127.0.0.1:8081"
//! weight = 1
//! ```
//!
//! The builder does not validate: tests use it to write invalid configs too.

use std::fmt::{Display, Write as _};

/// One `[[services]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    /// Further `key = value` lines of the service table, values as raw TOML.
    pub extra: Vec<(String, String)>,
    pub backends: Vec<BackendSpec>,
}

/// One `[[services.backends]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: String,
    pub weight: i64,
    /// Further `key = value` lines of the backend table, values as raw TOML.
    pub extra: Vec<(String, String)>,
}

impl ServiceSpec {
    pub fn tcp(name: &str, vip: impl Display) -> ServiceSpec {
        ServiceSpec::new(name, vip, "tcp")
    }

    pub fn udp(name: &str, vip: impl Display) -> ServiceSpec {
        ServiceSpec::new(name, vip, "udp")
    }

    pub fn new(name: &str, vip: impl Display, protocol: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            vip: vip.to_string(),
            protocol: protocol.to_owned(),
            extra: Vec::new(),
            backends: Vec::new(),
        }
    }

    /// Adds a backend.
    pub fn backend(mut self, addr: impl Display, weight: i64) -> ServiceSpec {
        self.backends.push(BackendSpec {
            addr: addr.to_string(),
            weight,
            extra: Vec::new(),
        });
        self
    }

    /// Adds a backend with weight 1 for each address.
    pub fn backends<A: Display>(mut self, addrs: impl IntoIterator<Item = A>) -> ServiceSpec {
        for addr in addrs {
            self = self.backend(addr, 1);
        }
        self
    }

    /// Sets a further key of the service table; `raw_toml_value` is written as is.
    pub fn set(mut self, key: &str, raw_toml_value: &str) -> ServiceSpec {
        self.extra.push((key.to_owned(), raw_toml_value.to_owned()));
        self
    }

    /// Sets a further key on the most recently added backend.
    pub fn set_on_last_backend(mut self, key: &str, raw_toml_value: &str) -> ServiceSpec {
        self.backends
            .last_mut()
            .expect("add a backend first")
            .extra
            .push((key.to_owned(), raw_toml_value.to_owned()));
        self
    }
}

/// An `[agent]` table that switches SO_ORIGINAL_DST answers on; goes before the services.
pub const ORIGINAL_DST_ON: &str = "[agent]\noriginal_dst = true\n\n";

/// The config file text for `services`.
pub fn render_config(services: &[ServiceSpec]) -> String {
    if services.is_empty() {
        return "services = []\n".to_owned();
    }
    let mut out = String::new();
    for service in services {
        out.push_str("[[services]]\n");
        let _ = writeln!(out, "name = {}", toml_string(&service.name));
        let _ = writeln!(out, "vip = {}", toml_string(&service.vip));
        let _ = writeln!(out, "protocol = {}", toml_string(&service.protocol));
        for (key, value) in &service.extra {
            let _ = writeln!(out, "{key} = {value}");
        }
        for backend in &service.backends {
            out.push_str("[[services.backends]]\n");
            let _ = writeln!(out, "addr = {}", toml_string(&backend.addr));
            let _ = writeln!(out, "weight = {}", backend.weight);
            for (key, value) in &backend.extra {
                let _ = writeln!(out, "{key} = {value}");
            }
        }
        out.push('\n');
    }
    out
}

/// A TOML basic string.
pub fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_shape() {
        let config = render_config(&[ServiceSpec::tcp("web", "127.100.0.1:80")
            .backend("127.0.0.1:8081", 1)
            .backend("127.0.0.1:8082", 3)]);
        assert_eq!(
            config,
            "[[services]]\nname = \"web\"\nvip = \"127.100.0.1:80\"\nprotocol = \"tcp\"\n\
             [[services.backends]]\naddr = \"127.0.0.1:8081\"\nweight = 1\n\
             [[services.backends]]\naddr = \"127.0.0.1:8082\"\nweight = 3\n\n"
        );
    }

    #[test]
    fn renders_extra_keys_and_several_services() {
        let config = render_config(&[
            ServiceSpec::udp("dns", "127.100.9.1:53")
                .set("affinity", "true")
                .backend("127.0.0.1:5353", 2)
                .set_on_last_backend("drain", "false"),
            ServiceSpec::tcp("b", "127.100.9.2:80"),
        ]);
        assert!(config.contains("protocol = \"udp\"\naffinity = true\n"));
        assert!(config.contains("weight = 2\ndrain = false\n"));
        assert_eq!(config.matches("[[services]]").count(), 2);
    }

    #[test]
    fn empty_config_is_an_empty_list() {
        assert_eq!(render_config(&[]), "services = []\n");
    }

    #[test]
    fn escapes_strings() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\u{1}"), "\"x\\u0001\"");
    }
}
