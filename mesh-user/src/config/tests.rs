//! Parsing and validation, problem by problem.

use mesh_common::{MAX_BACKENDS_PER_SERVICE, MAX_SLOTS_PER_SERVICE, MAX_WEIGHT, SERVICE_NAME_LEN};

use super::validate::{Problem, ServiceRef};
use super::*;

const ORIGIN: &str = "test.toml";

/// A valid service to start each test from.
const WEB: &str = r#"
[[services]]
name = "web"
vip = "127.100.0.1:80"
backends = [
  { addr = "127.0.0.1:9001" },
  { addr = "127.0.0.1:9002", weight = 2 },
]
"#;

fn problems(text: &str) -> Vec<Problem> {
    match parse(text, ORIGIN) {
        Ok(c) => panic!("expected validation problems, got {c:#?}"),
        Err(e @ ConfigError::Invalid { .. }) => e.problems().to_vec(),
        Err(e) => panic!("expected validation problems, got {e}"),
    }
}

/// The single problem of `text`, as `(field, reason)`.
fn only_problem(text: &str) -> (String, String) {
    let ps = problems(text);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    (ps[0].field.clone(), ps[0].reason.clone())
}

fn parse_error(text: &str) -> String {
    match parse(text, ORIGIN) {
        Err(e @ ConfigError::Parse { .. }) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

fn ok(text: &str) -> Config {
    parse(text, ORIGIN).unwrap_or_else(|e| panic!("{e}"))
}

/// `WEB` with `extra` appended to its `[[services]]` table (before the backends).
fn web_with(extra: &str) -> String {
    WEB.replacen(
        "vip = \"127.100.0.1:80\"\n",
        &format!("vip = \"127.100.0.1:80\"\n{extra}\n"),
        1,
    )
}

/// A minimal service with the given name/vip/backends, as TOML.
fn service(name: &str, vip: &str, backends: &[&str]) -> String {
    let backends = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nbackends = [{backends}]\n")
}

// ---- defaults and parsing ----

#[test]
fn empty_file_is_valid_and_all_defaults() {
    let c = ok("");
    assert_eq!(c, Config::default());
    assert_eq!(c.agent.bpffs, PathBuf::from("/sys/fs/bpf/mesh"));
    assert_eq!(c.agent.cgroup, None);
    assert_eq!(c.agent.metrics, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.agent.admin, None);
    assert_eq!(
        c.agent.limits,
        Limits {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_service_backends: mesh_common::capacity::DEFAULT_MAX_SERVICE_BACKENDS,
            max_slots: DEFAULT_MAX_SLOTS,
            max_external_flows: mesh_common::nodeport::DEFAULT_MAX_EXTERNAL_FLOWS,
        }
    );
    assert!(c.services.is_empty());
}

#[test]
fn service_defaults_apply() {
    let c = ok(WEB);
    let s = &c.services[0];
    assert_eq!(s.name, "web");
    assert_eq!(s.vip, "127.100.0.1:80".parse().unwrap());
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.on_empty, EmptyPolicy::Reject);
    assert_eq!(s.affinity, None);
    assert_eq!(s.health, None);
    assert_eq!(
        s.backends[0],
        BackendConfig {
            addr: "127.0.0.1:9001".parse().unwrap(),
            weight: 1,
            drain: false,
        }
    );
    assert_eq!(s.backends[1].weight, 2);
}

#[test]
fn full_config_parses() {
    let c = ok(r#"
[agent]
bpffs = "/sys/fs/bpf/mesh-test"
cgroup = "/sys/fs/cgroup/unified/mesh-test"
metrics = "127.0.0.1:19464"
admin = "[::1]:9465"
admin_token_file = "/etc/mesh/admin.token"

[agent.limits]
max_services = 16
max_backends = 64
max_slots = 256

[[services]]
name = "dns"
vip = "[fd00::53]:53"
protocol = "udp"
on_empty = "passthrough"
affinity = { timeout = "10m" }
backends = [{ addr = "[fd00::1]:5353", weight = 3, drain = true }]

[services.health]
type = "http"
path = "/ready"
expect = "200,204,300-399"
interval = "2s"
timeout = "250ms"
rise = 1
fall = 5
"#);
    assert_eq!(c.agent.bpffs, PathBuf::from("/sys/fs/bpf/mesh-test"));
    assert_eq!(
        c.agent.cgroup,
        Some(PathBuf::from("/sys/fs/cgroup/unified/mesh-test"))
    );
    assert_eq!(c.agent.admin, Some("[::1]:9465".parse().unwrap()));
    assert_eq!(c.agent.limits.max_slots, 256);
    let s = &c.services[0];
    assert_eq!(s.protocol, Protocol::Udp);
    assert_eq!(s.on_empty, EmptyPolicy::Passthrough);
    assert_eq!(
        s.affinity.as_ref().unwrap().timeout,
        Duration::from_secs(600)
    );
    assert!(s.backends[0].drain);
    let h = s.health.as_ref().unwrap();
    assert_eq!(
        h,
        &HealthConfig {
            kind: HealthKind::Http,
            path: "/ready".to_owned(),
            expect: vec![(200, 200), (204, 204), (300, 399)],
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(250),
            rise: 1,
            fall: 5,
            ..HealthConfig::default()
        }
    );
}

#[test]
fn health_and_affinity_tables_use_defaults() {
    let c = ok(&format!("{WEB}[services.health]\n[services.affinity]\n"));
    let s = &c.services[0];
    assert_eq!(s.health, Some(HealthConfig::default()));
    assert_eq!(
        s.affinity.as_ref().unwrap().timeout,
        Duration::from_secs(3 * 3600)
    );
    let h = HealthConfig::default();
    assert_eq!(h.kind, HealthKind::Tcp);
    assert_eq!(h.path, "/healthz");
    assert_eq!(h.expect, vec![(200, 399)]);
    assert_eq!(h.interval, Duration::from_secs(1));
    assert_eq!(h.timeout, Duration::from_millis(500));
    assert_eq!((h.rise, h.fall), (2, 3));
}

#[test]
fn services_may_have_no_backends() {
    let c = ok("[[services]]\nname = \"empty\"\nvip = \"127.100.0.1:80\"\n");
    assert!(c.services[0].backends.is_empty());
}

#[test]
fn protocol_display_and_ip_proto() {
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(Protocol::Tcp.ip_proto(), PROTO_TCP);
    assert_eq!(Protocol::Udp.ip_proto(), PROTO_UDP);
}

#[test]
fn config_round_trips_through_toml() {
    let c = ok(r#"
[agent]
admin = "127.0.0.1:9465"
admin_token_file = "/etc/mesh/admin.token"
[[services]]
name = "a"
vip = "127.100.0.1:80"
backends = [{ addr = "127.0.0.1:1", weight = 5, drain = true }]
affinity = { timeout = "1h 30m" }
health = { type = "http", expect = "200,204,300-399", interval = "1500ms" }
[[services]]
name = "b"
vip = "[fd00::1]:53"
protocol = "udp"
on_empty = "passthrough"
"#);
    let text = toml::to_string(&c).unwrap();
    assert_eq!(ok(&text), c, "{text}");
}

#[test]
fn default_config_round_trips_through_toml() {
    let text = toml::to_string(&Config::default()).unwrap();
    assert_eq!(ok(&text), Config::default(), "{text}");
}

#[test]
fn unknown_keys_are_rejected_everywhere() {
    for (text, key) in [
        ("[agent]\nbpfs = \"/x\"\n".to_owned(), "bpfs"),
        (
            "[agent.limits]\nmax_service = 4\n".to_owned(),
            "max_service",
        ),
        ("[agnet]\n".to_owned(), "agnet"),
        (web_with("protocl = \"udp\""), "protocl"),
        (WEB.replace("weight = 2", "wieght = 2"), "wieght"),
        (
            format!("{WEB}[services.health]\nintervall = \"1s\"\n"),
            "intervall",
        ),
        (
            format!("{WEB}[services.affinity]\ntimeuot = \"1s\"\n"),
            "timeuot",
        ),
    ] {
        let msg = parse_error(&text);
        assert!(msg.contains(key), "{key}: {msg}");
        assert!(msg.starts_with("test.toml: "), "{msg}");
    }
}

#[test]
fn type_errors_name_the_key_and_line() {
    let msg = parse_error(&WEB.replace("weight = 2", "weight = \"two\""));
    assert!(msg.starts_with("test.toml: "), "{msg}");
    assert!(msg.contains("line 7"), "{msg}");
    assert!(msg.contains("weight"), "{msg}");
}

#[test]
fn syntax_errors_are_parse_errors() {
    let msg = parse_error("[[services]\nname = \"x\"\n");
    assert!(msg.starts_with("test.toml: "), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");
}

#[test]
fn bad_enum_values_are_rejected() {
    for (text, value) in [
        (web_with("protocol = \"sctp\""), "sctp"),
        (web_with("on_empty = \"drop\""), "drop"),
        (format!("{WEB}[services.health]\ntype = \"grpc\"\n"), "grpc"),
    ] {
        let msg = parse_error(&text);
        assert!(msg.contains(value), "{msg}");
    }
}

#[test]
fn bad_socket_addresses_are_rejected() {
    let msg = parse_error(&WEB.replace("127.100.0.1:80", "127.100.0.1"));
    assert!(msg.contains("vip"), "{msg}");
    let msg = parse_error(&WEB.replace("127.0.0.1:9001", "localhost:9001"));
    assert!(msg.contains("addr"), "{msg}");
}

#[test]
fn bad_durations_are_rejected() {
    let msg = parse_error(&format!(
        "{WEB}[services.health]\ninterval = \"1 fortnight\"\n"
    ));
    assert!(msg.contains("interval"), "{msg}");
}

#[test]
fn load_reads_the_file_and_names_it() {
    let dir = std::env::temp_dir().join(format!("mesh-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.toml");
    std::fs::write(&path, WEB.replace("weight = 2", "weight = 0")).unwrap();
    let err = load(&path, &mut Reparser::default()).unwrap_err();
    let shown = path.display().to_string();
    assert_eq!(
        err.to_string(),
        format!(
            "{shown}: services[0] \"web\": backends[1].weight: must be between 1 and 1000, got 0"
        )
    );
    std::fs::write(&path, WEB).unwrap();
    assert_eq!(
        load(&path, &mut Reparser::default())
            .unwrap()
            .services
            .len(),
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let err = load(&dir.join("missing.toml"), &mut Reparser::default()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string().contains("missing.toml: cannot read"),
        "{err}"
    );
    assert!(err.problems().is_empty());
}

// ---- messages ----

#[test]
fn message_names_file_service_field_and_reason() {
    let text = format!(
        "{}{}",
        service("api", "127.100.0.1:80", &["127.0.0.1:9001"]),
        service("web", "127.100.0.2:80", &["127.0.0.1:9002"])
    )
    .replace(
        "{ addr = \"127.0.0.1:9002\" }",
        "{ addr = \"127.0.0.1:9002\", weight = 0 }",
    );
    let err = parse(&text, "examples/mesh.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "examples/mesh.toml: services[1] \"web\": backends[0].weight: must be between 1 and 1000, got 0"
    );
    let p = &err.problems()[0];
    assert_eq!(
        p.service,
        Some(ServiceRef {
            index: 1,
            name: "web".to_owned()
        })
    );
    assert_eq!(p.field, "backends[0].weight");
}

#[test]
fn all_problems_are_reported_one_per_line() {
    let text = format!(
        "[agent.limits]\nmax_slots = 1\n{}",
        service("bad name", "0.0.0.0:0", &["127.0.0.1:0"])
    );
    let err = parse(&text, ORIGIN).unwrap_err();
    let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "agent.limits.max_slots",
            "name",
            "vip",
            "vip",
            "backends[0].addr",
            "agent.limits.max_slots",
        ],
        "{err}"
    );
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 6, "{shown}");
    assert!(
        shown.lines().all(|l| l.starts_with("test.toml: ")),
        "{shown}"
    );
}

// ---- names ----

#[test]
fn name_must_not_be_empty() {
    let (field, reason) = only_problem(&web_with("").replace("name = \"web\"", "name = \"\""));
    assert_eq!(
        (field.as_str(), reason.as_str()),
        ("name", "must not be empty")
    );
}

#[test]
fn name_must_fit_the_kernel_buffer() {
    let longest = "n".repeat(SERVICE_NAME_LEN - 1);
    ok(&WEB.replace("\"web\"", &format!("\"{longest}\"")));
    let too_long = "n".repeat(SERVICE_NAME_LEN);
    let (field, reason) = only_problem(&WEB.replace("\"web\"", &format!("\"{too_long}\"")));
    assert_eq!(field, "name");
    assert_eq!(reason, "must be at most 63 bytes, got 64");
}

#[test]
fn name_allows_only_a_safe_alphabet() {
    ok(&WEB.replace("\"web\"", "\"ns/web-v1.2_x\""));
    // Kubernetes services are named `namespace/service:port@vip`.
    ok(&WEB.replace("\"web\"", "\"default/web:http@10.0.0.1:80\""));
    for bad in ["web svc", "wéb", "web\\\"", "a[b]", "web\\n", "a?b"] {
        let (field, reason) = only_problem(&WEB.replace("\"web\"", &format!("\"{bad}\"")));
        assert_eq!(field, "name", "{bad}");
        assert!(reason.starts_with("may only contain"), "{bad}: {reason}");
    }
}

#[test]
fn names_must_be_unique() {
    let text = format!(
        "{}{}{}",
        service("web", "127.100.0.1:80", &[]),
        service("api", "127.100.0.2:80", &[]),
        service("web", "127.100.0.3:80", &[])
    );
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].service.as_ref().unwrap().index, 2);
    assert_eq!(ps[0].field, "name");
    assert_eq!(ps[0].reason, "duplicate name, already used by services[0]");
}

// ---- vips ----

#[test]
fn vip_port_must_not_be_zero() {
    let (field, reason) = only_problem(&WEB.replace("127.100.0.1:80", "127.100.0.1:0"));
    assert_eq!(field, "vip");
    assert_eq!(reason, "127.100.0.1:0: port must not be 0");
}

#[test]
fn vip_must_be_a_unicast_address() {
    for (vip, why) in [
        ("0.0.0.0:80", "unspecified"),
        ("[::]:80", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("[ff02::1]:80", "multicast"),
        ("255.255.255.255:80", "broadcast"),
    ] {
        // Keep the backends' family equal to the vip's so only the vip is wrong.
        let backend = if vip.starts_with('[') {
            "[::1]:9001"
        } else {
            "127.0.0.1:9001"
        };
        let (field, reason) = only_problem(&service("web", vip, &[backend]));
        assert_eq!(field, "vip", "{vip}");
        assert!(reason.contains(why), "{vip}: {reason}");
    }
}

#[test]
fn vip_and_protocol_must_be_unique() {
    let text = format!(
        "{}{}",
        service("a", "127.100.0.1:80", &[]),
        service("b", "127.100.0.1:80", &[])
    );
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].field, "vip");
    assert_eq!(
        ps[0].reason,
        "127.100.0.1:80/tcp is already the vip of services[0] \"a\""
    );
}

#[test]
fn tcp_and_udp_services_may_share_a_vip() {
    let text = format!(
        "{}{}protocol = \"udp\"\n",
        service("dns-tcp", "127.100.0.53:53", &[]),
        service("dns-udp", "127.100.0.53:53", &[])
    );
    let c = ok(&text);
    assert_eq!(c.services[1].protocol, Protocol::Udp);
}

// ---- backends ----

#[test]
fn backend_port_must_not_be_zero() {
    let (field, reason) = only_problem(&WEB.replace("127.0.0.1:9002", "127.0.0.1:0"));
    assert_eq!(field, "backends[1].addr");
    assert_eq!(reason, "127.0.0.1:0: port must not be 0");
}

#[test]
fn backend_must_be_a_unicast_address() {
    for (addr, why) in [
        ("0.0.0.0:1", "unspecified"),
        ("239.1.1.1:1", "multicast"),
        ("255.255.255.255:1", "broadcast"),
    ] {
        let (field, reason) = only_problem(&WEB.replace("127.0.0.1:9002", addr));
        assert_eq!(field, "backends[1].addr", "{addr}");
        assert!(reason.contains(why), "{addr}: {reason}");
    }
    for (addr, why) in [("[::]:1", "unspecified"), ("[ff05::2]:1", "multicast")] {
        let (field, reason) = only_problem(&service("v6", "[fd00::1]:80", &[addr]));
        assert_eq!(field, "backends[0].addr", "{addr}");
        assert!(reason.contains(why), "{addr}: {reason}");
    }
}

#[test]
fn backend_must_have_the_vip_family() {
    let (field, reason) = only_problem(&WEB.replace("127.0.0.1:9002", "[::1]:9002"));
    assert_eq!(field, "backends[1].addr");
    assert_eq!(
        reason,
        "[::1]:9002 is IPv6 but the vip 127.100.0.1:80 is IPv4; a backend must have the vip's address family"
    );
    let (field, reason) = only_problem(&service("v6", "[fd00::1]:80", &["127.0.0.1:1"]));
    assert_eq!(field, "backends[0].addr");
    assert!(
        reason.contains("is IPv4 but the vip [fd00::1]:80 is IPv6"),
        "{reason}"
    );
}

#[test]
fn backends_must_be_unique_within_a_service() {
    let (field, reason) = only_problem(&WEB.replace("127.0.0.1:9002", "127.0.0.1:9001"));
    assert_eq!(field, "backends[1].addr");
    assert_eq!(reason, "127.0.0.1:9001 is already backends[0]");
}

#[test]
fn services_may_share_backends() {
    let text = format!(
        "{}{}",
        service("a", "127.100.0.1:80", &["127.0.0.1:9001"]),
        service("b", "127.100.0.2:80", &["127.0.0.1:9001"])
    );
    ok(&text);
}

#[test]
fn weight_must_be_between_1_and_max() {
    ok(&WEB.replace("weight = 2", &format!("weight = {MAX_WEIGHT}")));
    for bad in [0, MAX_WEIGHT + 1] {
        let (field, reason) = only_problem(&WEB.replace("weight = 2", &format!("weight = {bad}")));
        assert_eq!(field, "backends[1].weight");
        assert_eq!(
            reason,
            format!("must be between 1 and {MAX_WEIGHT}, got {bad}")
        );
    }
}

#[test]
fn negative_weight_is_a_parse_error() {
    let msg = parse_error(&WEB.replace("weight = 2", "weight = -1"));
    assert!(msg.contains("weight"), "{msg}");
}

/// A service with `weights.len()` backends on distinct loopback addresses.
fn weighted_service(weights: &[u32]) -> Config {
    let mut c = ok(&service("big", "127.100.0.1:80", &[]));
    c.services[0].backends = weights
        .iter()
        .enumerate()
        .map(|(j, &weight)| BackendConfig {
            addr: SocketAddr::from(([127, 1, (j >> 8) as u8, j as u8], 8080)),
            weight,
            drain: false,
        })
        .collect();
    c
}

fn validation_problems(c: &Config) -> Vec<Problem> {
    c.validate(ORIGIN)
        .map(|()| Vec::new())
        .unwrap_or_else(|e| e.problems().to_vec())
}

#[test]
fn at_most_max_backends_per_service() {
    let n = MAX_BACKENDS_PER_SERVICE as usize;
    assert_eq!(validation_problems(&weighted_service(&vec![1; n])), []);
    let ps = validation_problems(&weighted_service(&vec![1; n + 1]));
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].field, "backends");
    assert_eq!(
        ps[0].reason,
        format!("at most {n} backends per service, got {}", n + 1)
    );
}

#[test]
fn slot_count_per_service_is_limited() {
    // 17 coprime-ish weights of 1000 and one of 999: the gcd is 1, so 17_999 slots.
    let mut weights = vec![MAX_WEIGHT; 17];
    weights.push(MAX_WEIGHT - 1);
    let ps = validation_problems(&weighted_service(&weights));
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].field, "backends");
    assert!(
        ps[0].reason.starts_with("the weights need 17999 slots"),
        "{}",
        ps[0].reason
    );
    assert!(ps[0].reason.contains(&MAX_SLOTS_PER_SERVICE.to_string()));
    // The same weights scaled to a common factor need few slots.
    assert_eq!(
        validation_problems(&weighted_service(&[MAX_WEIGHT; 18])),
        []
    );
    // Exactly the maximum is accepted.
    let mut weights = vec![MAX_WEIGHT; 16];
    weights.extend([MAX_SLOTS_PER_SERVICE - 16 * MAX_WEIGHT - 1, 1]);
    assert_eq!(
        mesh_common::capacity::slot_count(&weights),
        MAX_SLOTS_PER_SERVICE
    );
    assert_eq!(validation_problems(&weighted_service(&weights)), []);
}

#[test]
fn invalid_weights_do_not_cause_slot_problems_too() {
    let ps = validation_problems(&weighted_service(&[0, u32::MAX, 1]));
    let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["backends[0].weight", "backends[1].weight"],
        "{ps:#?}"
    );
}

// ---- limits ----

#[test]
fn limits_must_be_in_range() {
    let text = format!(
        "[agent.limits]\nmax_services = 1\nmax_backends = {}\nmax_slots = 0\n",
        LIMIT_MAX + 1
    );
    let ps = problems(&text);
    let got: Vec<(&str, &str)> = ps
        .iter()
        .map(|p| (p.field.as_str(), p.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "agent.limits.max_services",
                "must be between 2 and 16777216, got 1"
            ),
            (
                "agent.limits.max_backends",
                "must be between 2 and 16777216, got 16777217"
            ),
            (
                "agent.limits.max_slots",
                "must be between 2 and 16777216, got 0"
            ),
        ]
    );
    assert!(ps.iter().all(|p| p.service.is_none()));
    ok(&format!(
        "[agent.limits]\nmax_services = 2\nmax_backends = 2\nmax_slots = {LIMIT_MAX}\n"
    ));
}

#[test]
fn services_need_room_twice_plus_id_0() {
    let two = format!(
        "{}{}",
        service("a", "127.100.0.1:80", &[]),
        service("b", "127.100.0.2:80", &[])
    );
    ok(&format!("[agent.limits]\nmax_services = 5\n{two}"));
    let (field, reason) = only_problem(&format!("[agent.limits]\nmax_services = 4\n{two}"));
    assert_eq!(field, "agent.limits.max_services");
    assert_eq!(
        reason,
        "is 4 but the services have 2 services, which needs at least 5 (old and new entries \
         coexist during an update, plus id 0 which is reserved)"
    );
}

#[test]
fn distinct_backends_need_room_twice_plus_id_0() {
    // Three backend entries but two distinct addresses: shared backends count once.
    let backends = format!(
        "{}{}",
        service("a", "127.100.0.1:80", &["127.0.0.1:1", "127.0.0.1:2"]),
        service("b", "127.100.0.2:80", &["127.0.0.1:1"])
    );
    ok(&format!("[agent.limits]\nmax_backends = 5\n{backends}"));
    let (field, reason) = only_problem(&format!("[agent.limits]\nmax_backends = 4\n{backends}"));
    assert_eq!(field, "agent.limits.max_backends");
    assert_eq!(
        reason,
        "is 4 but the services have 2 distinct backend addresses, which needs at least 5 (old \
         and new entries coexist during an update, plus id 0 which is reserved)"
    );
}

#[test]
fn shared_backends_count_once_per_service_in_the_pair_maps() {
    // Two distinct addresses but three (service, backend) pairs: the counters, active and
    // passive maps hold one entry per pair.
    let backends = format!(
        "{}{}",
        service("a", "127.100.0.1:80", &["127.0.0.1:1", "127.0.0.1:2"]),
        service("b", "127.100.0.2:80", &["127.0.0.1:1"])
    );
    ok(&format!(
        "[agent.limits]\nmax_service_backends = 6\n{backends}"
    ));
    let (field, reason) = only_problem(&format!(
        "[agent.limits]\nmax_service_backends = 5\n{backends}"
    ));
    assert_eq!(field, "agent.limits.max_service_backends");
    assert_eq!(
        reason,
        "is 5 but the services have 3 (service, backend) pairs, which needs at least 6 (old \
         and new entries coexist during an update)"
    );
}

#[test]
fn total_slots_must_fit_twice() {
    // WEB has weights 1:2, so 3 slots; a second service with 2:4 reduces to 1:2, 3 more.
    let text = format!(
        "{WEB}{}",
        service("b", "127.100.0.2:80", &["127.0.0.1:1", "127.0.0.1:2"])
            .replace(
                "{ addr = \"127.0.0.1:1\" }",
                "{ addr = \"127.0.0.1:1\", weight = 2 }"
            )
            .replace(
                "{ addr = \"127.0.0.1:2\" }",
                "{ addr = \"127.0.0.1:2\", weight = 4 }"
            )
    );
    ok(&format!("[agent.limits]\nmax_slots = 12\n{text}"));
    let (field, reason) = only_problem(&format!("[agent.limits]\nmax_slots = 11\n{text}"));
    assert_eq!(field, "agent.limits.max_slots");
    assert_eq!(
        reason,
        "is 11 but the services have 6 round-robin slots, which needs at least 12 (old and \
         new entries coexist during an update)"
    );
}

// ---- affinity ----

#[test]
fn affinity_timeout_must_be_1s_to_24h() {
    for good in ["1s", "3h", "24h"] {
        ok(&format!("{WEB}[services.affinity]\ntimeout = \"{good}\"\n"));
    }
    for (bad, shown) in [("500ms", "500ms"), ("0s", "0s"), ("25h", "1day 1h")] {
        let (field, reason) =
            only_problem(&format!("{WEB}[services.affinity]\ntimeout = \"{bad}\"\n"));
        assert_eq!(field, "affinity.timeout");
        assert_eq!(reason, format!("must be between 1s and 1day, got {shown}"));
    }
}

#[test]
fn affinity_timeout_must_be_whole_seconds() {
    let (field, reason) =
        only_problem(&format!("{WEB}[services.affinity]\ntimeout = \"1500ms\"\n"));
    assert_eq!(field, "affinity.timeout");
    assert_eq!(reason, "must be a whole number of seconds, got 1s 500ms");
}

// ---- health ----

fn health(body: &str) -> String {
    format!("{WEB}[services.health]\n{body}\n")
}

#[test]
fn health_kinds_parse() {
    for (name, kind) in [
        ("tcp", HealthKind::Tcp),
        ("http", HealthKind::Http),
        ("none", HealthKind::None),
    ] {
        let c = ok(&health(&format!("type = \"{name}\"")));
        assert_eq!(c.services[0].health.as_ref().unwrap().kind, kind);
    }
}

#[test]
fn http_path_must_start_with_slash() {
    let (field, reason) = only_problem(&health("type = \"http\"\npath = \"healthz\""));
    assert_eq!(field, "health.path");
    assert_eq!(reason, "must start with '/', got \"healthz\"");
}

#[test]
fn http_path_must_not_break_the_request_line() {
    let (field, reason) = only_problem(&health("type = \"http\"\npath = \"/a b\""));
    assert_eq!(field, "health.path");
    assert!(
        reason.starts_with("must not contain whitespace"),
        "{reason}"
    );
}

#[test]
fn http_only_settings_are_rejected_on_other_types() {
    let ps = problems(&health("type = \"tcp\"\npath = \"/x\"\nexpect = \"200\""));
    let got: Vec<(&str, &str)> = ps
        .iter()
        .map(|p| (p.field.as_str(), p.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "health.path",
                "is only used with type = \"http\", not \"tcp\""
            ),
            (
                "health.expect",
                "is only used with type = \"http\", not \"tcp\""
            ),
        ]
    );
}

#[test]
fn expect_accepts_codes_ranges_and_lists() {
    for (text, ranges) in [
        ("200", vec![(200, 200)]),
        ("200-299", vec![(200, 299)]),
        ("200,204,300-399", vec![(200, 200), (204, 204), (300, 399)]),
        (" 200 , 300 - 399 ", vec![(200, 200), (300, 399)]),
    ] {
        let c = ok(&health(&format!("type = \"http\"\nexpect = \"{text}\"")));
        assert_eq!(
            c.services[0].health.as_ref().unwrap().expect,
            ranges,
            "{text}"
        );
    }
}

#[test]
fn expect_syntax_errors_are_parse_errors() {
    for bad in [
        "abc",
        "200-",
        "200,,204",
        "2xx",
        "99999",
        "-200",
        "200-300-400",
    ] {
        let msg = parse_error(&health(&format!("type = \"http\"\nexpect = \"{bad}\"")));
        assert!(msg.contains("invalid status code list"), "{bad}: {msg}");
    }
}

#[test]
fn expect_codes_must_be_100_to_599_and_ranges_ordered() {
    let (field, reason) = only_problem(&health("type = \"http\"\nexpect = \"200,600\""));
    assert_eq!(field, "health.expect");
    assert_eq!(reason, "status codes must be between 100 and 599, got 600");
    let (_, reason) = only_problem(&health("type = \"http\"\nexpect = \"99-200\""));
    assert_eq!(reason, "status codes must be between 100 and 599, got 99");
    let (_, reason) = only_problem(&health("type = \"http\"\nexpect = \"399-200\""));
    assert_eq!(reason, "range 399-200 is reversed, write 200-399");
    let (_, reason) = only_problem(&health("type = \"http\"\nexpect = \"\""));
    assert_eq!(reason, "must list at least one status code");
}

#[test]
fn accepts_status_checks_every_range() {
    let h = HealthConfig {
        expect: vec![(200, 200), (204, 204), (300, 399)],
        ..HealthConfig::default()
    };
    for (status, want) in [
        (200, true),
        (201, false),
        (204, true),
        (300, true),
        (399, true),
        (400, false),
    ] {
        assert_eq!(h.accepts_status(status), want, "{status}");
    }
}

#[test]
fn interval_must_be_10ms_to_1h() {
    ok(&health("interval = \"10ms\"\ntimeout = \"10ms\""));
    ok(&health("interval = \"1h\""));
    let (field, reason) = only_problem(&health("interval = \"9ms\"\ntimeout = \"1ms\""));
    assert_eq!(field, "health.interval");
    assert_eq!(reason, "must be between 10ms and 1h, got 9ms");
    let (field, reason) = only_problem(&health("interval = \"61m\""));
    assert_eq!(field, "health.interval");
    assert_eq!(reason, "must be between 10ms and 1h, got 1h 1m");
}

#[test]
fn timeout_must_be_positive_and_within_the_interval() {
    ok(&health("interval = \"1s\"\ntimeout = \"1s\""));
    let (field, reason) = only_problem(&health("timeout = \"0s\""));
    assert_eq!(field, "health.timeout");
    assert_eq!(reason, "must be greater than 0");
    let (field, reason) = only_problem(&health("interval = \"1s\"\ntimeout = \"2s\""));
    assert_eq!(field, "health.timeout");
    assert_eq!(reason, "must be at most the interval (1s), got 2s");
}

#[test]
fn rise_and_fall_must_be_1_to_100() {
    ok(&health("rise = 1\nfall = 100"));
    let ps = problems(&health("rise = 0\nfall = 101"));
    let got: Vec<(&str, &str)> = ps
        .iter()
        .map(|p| (p.field.as_str(), p.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("health.rise", "must be between 1 and 100, got 0"),
            ("health.fall", "must be between 1 and 100, got 101"),
        ]
    );
}

#[test]
fn validate_checks_configs_built_in_code() {
    let mut c = Config::default();
    c.services.push(ServiceConfig {
        name: "code".to_owned(),
        vip: "127.100.0.1:80".parse().unwrap(),
        protocol: Protocol::Tcp,
        backends: vec![],
        on_empty: EmptyPolicy::Reject,
        affinity: None,
        health: Some(HealthConfig {
            kind: HealthKind::Http,
            expect: vec![(0, 0)],
            ..HealthConfig::default()
        }),
        terminate_udp_flows: true,
        external: None,
        health_check_node_port: None,
    });
    let err = c.validate("built-in").unwrap_err();
    assert_eq!(
        err.to_string(),
        "built-in: services[0] \"code\": health.expect: status codes must be between 100 and 599, got 0"
    );
}

// ---- registry sources: state_dir and [agent.redis] ----

#[test]
fn sources_default_to_off_with_state_in_var_lib() {
    let c = ok("");
    assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/mesh"));
    assert_eq!(c.agent.redis, None);
}

#[test]
fn redis_table_parses_with_defaults() {
    let c = ok(
        "[agent]\nstate_dir = \"/tmp/mesh-state\"\n[agent.redis]\nurl = \"redis://127.0.0.1:6390/\"\n",
    );
    assert_eq!(c.agent.state_dir, PathBuf::from("/tmp/mesh-state"));
    assert_eq!(
        c.agent.redis,
        Some(RedisConfig {
            url: "redis://127.0.0.1:6390/".to_owned(),
            username: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            key: "mesh:services".to_owned(),
            resync: Duration::from_secs(5),
        })
    );
    let c = ok(
        "[agent.redis]\nurl = \"redis://:secret@127.0.0.1/2\"\nkey = \"lb:a\"\nresync = \"250ms\"\n",
    );
    let redis = c.agent.redis.unwrap();
    assert_eq!(redis.key, "lb:a");
    assert_eq!(redis.resync, Duration::from_millis(250));
}

#[test]
fn redis_url_is_required_and_keys_are_checked() {
    let msg = parse_error("[agent.redis]\nkey = \"k\"\n");
    assert!(msg.contains("missing field `url`"), "{msg}");
    let msg = parse_error("[agent.redis]\nurl = \"redis://127.0.0.1/\"\nchannel = \"x\"\n");
    assert!(msg.contains("unknown field `channel`"), "{msg}");
}

#[test]
fn redis_url_must_be_redis_or_rediss_and_is_never_echoed() {
    for url in ["http://:pw@127.0.0.1/", "127.0.0.1:6379"] {
        let (field, reason) = only_problem(&format!("[agent.redis]\nurl = \"{url}\"\n"));
        assert_eq!(field, "agent.redis.url");
        assert_eq!(
            reason, "must start with redis:// or rediss:// (TLS), like \"redis://127.0.0.1:6379/\"",
            "{url}"
        );
    }
    // TLS is accepted (the agent is built with the redis crate's rustls support).
    ok("[agent.redis]\nurl = \"rediss://:pw@127.0.0.1/\"\n");
    let (field, reason) =
        only_problem("[agent.redis]\nurl = \"redis://:pw@127.0.0.1:notaport/\"\n");
    assert_eq!(field, "agent.redis.url");
    assert!(reason.starts_with("is not a valid Redis URL"), "{reason}");
    assert!(
        !reason.contains("pw"),
        "the reason must not show the password: {reason}"
    );
}

#[test]
fn redis_key_and_resync_are_checked() {
    let ps =
        problems("[agent.redis]\nurl = \"redis://127.0.0.1/\"\nkey = \"\"\nresync = \"50ms\"\n");
    let got: Vec<(&str, &str)> = ps
        .iter()
        .map(|p| (p.field.as_str(), p.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("agent.redis.key", "must not be empty"),
            (
                "agent.redis.resync",
                "must be between 100ms and 1h, got 50ms"
            ),
        ]
    );
    let (field, _) = only_problem("[agent.redis]\nurl = \"redis://127.0.0.1/\"\nresync = \"2h\"\n");
    assert_eq!(field, "agent.redis.resync");
}

#[test]
fn state_dir_must_be_absolute() {
    let (field, reason) = only_problem("[agent]\nstate_dir = \"state\"\n");
    assert_eq!(field, "agent.state_dir");
    assert_eq!(reason, "must be an absolute path, got \"state\"");
}

#[test]
fn vips_outside_vip_ranges_are_rejected_with_the_ranges_named() {
    let ranges = "[agent]\nvip_ranges = [\"127.100.0.0/16\", \"fd00:96::/112\"]\n";
    ok(&format!("{ranges}{WEB}"));
    let hijack = WEB.replace("127.100.0.1:80", "8.8.8.8:53");
    let (field, reason) = only_problem(&format!("{ranges}{hijack}"));
    assert_eq!(field, "vip");
    assert_eq!(
        reason,
        "8.8.8.8 is outside [agent] vip_ranges (127.100.0.0/16, fd00:96::/112)"
    );
    // No ranges: no restriction.
    ok(&hijack);
    let bad = "[agent]\nvip_ranges = [\"10.96.0.0/33\"]\n";
    assert!(parse(&format!("{bad}{WEB}"), "test.toml").is_err());
}

#[test]
fn ipv4_mapped_addresses_are_rejected_in_favour_of_the_ipv4_form() {
    let mapped = WEB.replace("127.100.0.1:80", "[::ffff:127.100.0.1]:80");
    // (Its IPv4 backends are reported as of another family as well.)
    let ps = problems(&mapped);
    assert!(
        ps.iter()
            .any(|p| p.field == "vip" && p.reason.contains("IPv4-mapped")),
        "{ps:#?}"
    );
}
