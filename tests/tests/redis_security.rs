//! Who may program the balancer through Redis: the Redis source logs in as an ACL user with a
//! password read from a file, and speaks TLS (`rediss://`) to a server whose certificate a
//! private CA signed, presenting a client certificate when the server asks for one.
//!
//! Every test runs its own `redis-server` on free 127.0.0.1 ports with a redis.conf it writes
//! (`requirepass`, ACL users limited to the hash and its channel, `tls-port` with certificates
//! made by `openssl`), and its own agent, cgroup, bpffs directory and VIPs (127.100.6x.*).
//! Privileged: run as root.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::admin::free_loopback_addr;
use integration_tests::agent::is_warn_or_error;
use integration_tests::observe::metric_value;
use integration_tests::process::{Captured, run_bounded};
use integration_tests::redis::{RedisServer, TestCa, Value};
use integration_tests::{
    BpffsDir, CgroupGuard, TcpBackend, TempDir, TestEnv, assert_split, mesh_bin, serial, services,
    wait_for_backends,
};

/// The hash every test's private server holds the services in.
const KEY: &str = "mesh:services";
/// The `default` user's password: the harness's own client, never the agent.
const ADMIN_PASSWORD: &str = "admin-pw-c2f1e07d";
/// The password of the ACL user `mesh` (the agent's).
const MESH_PASSWORD: &str = "mesh-pw-9b4d61a3e8";
/// A password no user has.
const WRONG_PASSWORD: &str = "wrong-pw-5e0a77c21f";
/// The password of users that may not read the hash or the channel.
const OTHER_PASSWORD: &str = "other-pw-3d88b0f4";
/// How long we poll for an outcome.
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// The Redis source's longest retry interval (`MAX_BACKOFF` of the source).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// redis.conf of the tests' servers: the `default` user needs `ADMIN_PASSWORD`; `mesh` may
/// only read the hash and subscribe to its channel; `nokey` lacks the key, `nochannel` the
/// channel.
fn acl_conf() -> String {
    // What the source needs, no more (it sends no CLIENT SETINFO).
    let commands = "+hgetall +subscribe";
    format!(
        "requirepass {ADMIN_PASSWORD}\n\
         user mesh on >{MESH_PASSWORD} resetchannels ~{KEY} &{KEY}:changed {commands}\n\
         user nokey on >{OTHER_PASSWORD} resetchannels ~other:* &{KEY}:changed {commands}\n\
         user nochannel on >{OTHER_PASSWORD} resetchannels ~{KEY} &other:* {commands}\n"
    )
}

/// A test's directory: the server's data, the password files, the certificates.
fn write_password(dir: &Path, name: &str, password: &str) -> PathBuf {
    let path = dir.join(name);
    // As an editor leaves it: with a newline at the end, which is not part of the password.
    std::fs::write(&path, format!("{password}\n"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The agent's config: its state in `dir`, and `[agent.redis]` with `url` and `extra` lines.
fn agent_config(dir: &Path, url: &str, extra: &str) -> String {
    format!(
        "[agent]\nstate_dir = {}\n\n[agent.redis]\nurl = \"{url}\"\nkey = \"{KEY}\"\n\
         resync = \"1s\"\n{extra}",
        quoted(&dir.join("state"))
    )
}

/// A service as Redis holds it: `name` left out.
fn service_json(vip: &str, backends: &[&TcpBackend]) -> String {
    let backends: Vec<serde_json::Value> = backends
        .iter()
        .map(|b| serde_json::json!({ "addr": b.addr().to_string() }))
        .collect();
    serde_json::json!({ "vip": vip, "backends": backends }).to_string()
}

fn addrs(backends: &[&TcpBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr()).collect()
}

fn sock(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

/// `mesh_registry_source_up{source="redis"}`.
fn redis_up(env: &TestEnv) -> Option<f64> {
    metric_value(
        &env.agent.metrics_text(),
        "mesh_registry_source_up",
        &[("source", "redis")],
    )
}

#[track_caller]
fn wait_for_redis_up(env: &TestEnv, value: f64) {
    let mut last = None;
    let reached = integration_tests::wait_until(POLL_LIMIT, || {
        last = redis_up(env);
        last == Some(value)
    });
    assert!(
        reached,
        "mesh_registry_source_up{{source=\"redis\"}} was {last:?}, not {value}; agent log:\n{}",
        env.agent.log_text()
    );
}

/// Waits for an ERROR line after `mark` holding every one of `words`.
#[track_caller]
fn wait_for_error(env: &TestEnv, mark: usize, words: &[&str]) -> String {
    env.agent
        .wait_for_log_line(mark, POLL_LIMIT, |line| {
            is_warn_or_error(line)
                && line.contains("ERROR")
                && words.iter().all(|w| line.contains(w))
        })
        .unwrap_or_else(|| {
            panic!(
                "no ERROR log line with {words:?} within {POLL_LIMIT:?}; log since then:\n{}",
                env.agent.log_since(mark)
            )
        })
}

/// No password of the tests appears anywhere in the agent's log.
#[track_caller]
fn assert_no_password_in_log(env: &TestEnv) {
    let log = env.agent.log_text();
    for password in [
        MESH_PASSWORD,
        WRONG_PASSWORD,
        OTHER_PASSWORD,
        ADMIN_PASSWORD,
    ] {
        assert!(
            !log.contains(password),
            "the agent's log shows the password {password:?}:\n{log}"
        );
    }
}

/// Asserts that `name` is not in the maps and stays out for `wait` (a resync and more).
#[track_caller]
fn assert_not_applied(env: &TestEnv, name: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        assert!(
            services(&env.bpffs).service(name).is_none(),
            "service {name:?} was applied; agent log:\n{}",
            env.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The users of the server's client connections (`CLIENT LIST`) other than `default` (the
/// harness's own clients; the agent never logs in as `default` in these tests).
fn client_users(server: &RedisServer) -> Vec<String> {
    let list = match server.client().cmd(&["CLIENT", "LIST"]) {
        Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::VerbatimString { text, .. } => text,
        other => panic!("CLIENT LIST answered {other:?}"),
    };
    list.lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("user="))
                .map(str::to_owned)
        })
        .filter(|user| user != "default")
        .collect()
}

/// `mesh agent` that must exit on its own (bounded): its captured output.
fn agent_exits(config_toml: &str, cgroup: &CgroupGuard, bpffs: &BpffsDir) -> Captured {
    let dir = TempDir::new("redis-fail");
    let config = dir.path().join("mesh.toml");
    std::fs::write(&config, config_toml).expect("write config");
    let mut cmd = Command::new(mesh_bin());
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--bpffs")
        .arg(bpffs.path())
        .arg("--metrics")
        .arg(free_loopback_addr().to_string())
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the agent did not exit within 20 s: {e}"));
    assert!(
        !out.status.success(),
        "the agent should have refused to run: {}",
        out.describe()
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Passwords and ACL users
// ---------------------------------------------------------------------------------------------

#[test]
fn an_acl_user_with_a_password_file_programs_the_vip_and_a_revoked_password_keeps_the_last_services()
 {
    let a = TcpBackend::start("rsec-a");
    let b = TcpBackend::start("rsec-b");
    let vip = "127.100.60.1:80";
    // Whoever reaches the decoy was not translated.
    let decoy = TcpBackend::start_on("rsec-decoy", sock(vip));
    let dir = TempDir::new("redis-acl");
    let server = RedisServer::start_with(
        free_loopback_addr().port(),
        &dir.path().join("redis"),
        &acl_conf(),
        Some(ADMIN_PASSWORD),
    );
    let password_file = write_password(dir.path(), "mesh.password", MESH_PASSWORD);
    let env = TestEnv::start(
        "redis-acl",
        &agent_config(
            dir.path(),
            &server.url(),
            &format!(
                "username = \"mesh\"\npassword_file = {}\n",
                quoted(&password_file)
            ),
        ),
    );
    let mut admin = server.client();
    admin.hset_and_publish(KEY, "web", &service_json(vip, &[&a, &b]));
    wait_for_backends(&env.bpffs, "web", &addrs(&[&a, &b]), POLL_LIMIT);
    wait_for_redis_up(&env, 1.0);
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    // The agent's connections (pub/sub and commands) are logged in as `mesh`.
    let users = client_users(&server);
    assert!(
        users.len() >= 2 && users.iter().all(|u| u == "mesh"),
        "the agent's connections are not all user mesh: {users:?}"
    );

    // The password is changed behind the agent's back and its connections are dropped: it
    // cannot log in again. The services it had stay in force, a change is not applied.
    let mark = env.agent.log_mark();
    admin.cmd(&[
        "ACL",
        "SETUSER",
        "mesh",
        "resetpass",
        &format!(">{WRONG_PASSWORD}"),
    ]);
    admin.cmd(&["CLIENT", "KILL", "USER", "mesh"]);
    wait_for_redis_up(&env, 0.0);
    let line = wait_for_error(
        &env,
        mark,
        &[
            "redis",
            "refused the login as user \"mesh\"",
            "stay in force",
        ],
    );
    eprintln!("revoked password: {line}");
    admin.hset_and_publish(KEY, "web", &service_json(vip, &[&b]));
    admin.hset_and_publish(KEY, "db", &service_json("127.100.60.2:80", &[&a]));
    assert_not_applied(&env, "db", Duration::from_millis(1500));
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_eq!(redis_up(&env), Some(0.0));

    // The password is right again: the next retry (backoff up to 5 s) logs in and applies.
    admin.cmd(&[
        "ACL",
        "SETUSER",
        "mesh",
        "resetpass",
        &format!(">{MESH_PASSWORD}"),
    ]);
    wait_for_backends(&env.bpffs, "web", &addrs(&[&b]), MAX_BACKOFF + POLL_LIMIT);
    wait_for_backends(&env.bpffs, "db", &addrs(&[&a]), POLL_LIMIT);
    wait_for_redis_up(&env, 1.0);
    assert_split(&env.connect(vip, 20), &[(&b, 20)]);
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP untranslated");
    assert_no_password_in_log(&env);
}

#[test]
fn a_wrong_password_applies_nothing_and_is_logged_without_the_password() {
    let a = TcpBackend::start("rsec-wrong-a");
    let vip = "127.100.61.1:80";
    let dir = TempDir::new("redis-wrong");
    let server = RedisServer::start_with(
        free_loopback_addr().port(),
        &dir.path().join("redis"),
        &acl_conf(),
        Some(ADMIN_PASSWORD),
    );
    server
        .client()
        .hset_and_publish(KEY, "web", &service_json(vip, &[&a]));
    let password_file = write_password(dir.path(), "wrong.password", WRONG_PASSWORD);
    let env = TestEnv::start(
        "redis-wrong",
        &agent_config(
            dir.path(),
            &server.url(),
            &format!(
                "username = \"mesh\"\npassword_file = {}\n",
                quoted(&password_file)
            ),
        ),
    );
    let line = wait_for_error(
        &env,
        0,
        &["redis", "connecting", "refused the login as user \"mesh\""],
    );
    eprintln!("wrong password: {line}");
    wait_for_redis_up(&env, 0.0);
    // The source's resync is 1 s: it would have read the hash by now had it logged in.
    assert_not_applied(&env, "web", Duration::from_millis(1500));
    assert_eq!(redis_up(&env), Some(0.0));
    assert_no_password_in_log(&env);
}

#[test]
fn acl_users_without_the_key_or_the_channel_are_named_with_what_they_lack() {
    let a = TcpBackend::start("rsec-perm-a");
    let vip = "127.100.62.1:80";
    let dir = TempDir::new("redis-perm");
    let server = RedisServer::start_with(
        free_loopback_addr().port(),
        &dir.path().join("redis"),
        &acl_conf(),
        Some(ADMIN_PASSWORD),
    );
    server
        .client()
        .hset_and_publish(KEY, "web", &service_json(vip, &[&a]));
    let password_file = write_password(dir.path(), "other.password", OTHER_PASSWORD);
    let config = |user: &str| {
        agent_config(
            dir.path(),
            &server.url(),
            &format!(
                "username = \"{user}\"\npassword_file = {}\n",
                quoted(&password_file)
            ),
        )
    };
    let mut env = TestEnv::start("redis-perm", &config("nokey"));
    let line = wait_for_error(
        &env,
        0,
        &[
            "HGETALL mesh:services",
            "the ACL user \"nokey\" lacks a permission",
            "no permissions to access one of the keys",
        ],
    );
    eprintln!("no permission on the key: {line}");
    wait_for_redis_up(&env, 0.0);
    assert_not_applied(&env, "web", Duration::from_millis(1500));

    // The same with a user that may read the hash but not subscribe to its channel.
    env.agent.write_config(&config("nochannel"));
    let mark = env.agent.log_mark();
    env.agent.restart();
    let line = wait_for_error(
        &env,
        mark,
        &[
            "subscribing to mesh:services:changed",
            "the ACL user \"nochannel\" lacks a permission",
            "no permissions to access one of the channels",
        ],
    );
    eprintln!("no permission on the channel: {line}");
    wait_for_redis_up(&env, 0.0);
    assert_not_applied(&env, "web", Duration::from_millis(1500));
    assert_no_password_in_log(&env);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A redis-server with a plain port for the harness (`default` user, `ADMIN_PASSWORD`) and a
/// TLS port with a certificate `ca` signed; it requires a client certificate when
/// `client_certs`.
fn tls_server(dir: &Path, ca: &TestCa, client_certs: bool) -> (RedisServer, u16) {
    let (cert, key) = ca.issue("redis-server", false);
    let tls_port = free_loopback_addr().port();
    let conf = format!(
        "{}tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
         tls-auth-clients {}\n",
        acl_conf(),
        cert.display(),
        key.display(),
        ca.cert.display(),
        if client_certs { "yes" } else { "no" }
    );
    let server = RedisServer::start_with(
        free_loopback_addr().port(),
        &dir.join("redis"),
        &conf,
        Some(ADMIN_PASSWORD),
    );
    (server, tls_port)
}

#[test]
fn rediss_with_the_private_ca_and_a_client_certificate_programs_the_vip() {
    let a = TcpBackend::start("rsec-tls-a");
    let b = TcpBackend::start("rsec-tls-b");
    let vip = "127.100.63.1:80";
    let decoy = TcpBackend::start_on("rsec-tls-decoy", sock(vip));
    let dir = TempDir::new("redis-tls");
    let ca = TestCa::new(dir.path(), "mesh-test-ca");
    // The server requires a client certificate signed by its CA: mutual TLS.
    let (server, tls_port) = tls_server(dir.path(), &ca, true);
    let (client_cert, client_key) = ca.issue("mesh-agent", true);
    let password_file = write_password(dir.path(), "mesh.password", MESH_PASSWORD);
    server
        .client()
        .hset_and_publish(KEY, "web", &service_json(vip, &[&a, &b]));
    let env = TestEnv::start(
        "redis-tls",
        &agent_config(
            dir.path(),
            &format!("rediss://127.0.0.1:{tls_port}/"),
            &format!(
                "username = \"mesh\"\npassword_file = {}\nca_file = {}\nclient_cert = {}\n\
                 client_key = {}\n",
                quoted(&password_file),
                quoted(&ca.cert),
                quoted(&client_cert),
                quoted(&client_key)
            ),
        ),
    );
    wait_for_backends(&env.bpffs, "web", &addrs(&[&a, &b]), POLL_LIMIT);
    wait_for_redis_up(&env, 1.0);
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    // A change announced on the channel arrives over TLS too.
    server
        .client()
        .hset_and_publish(KEY, "web", &service_json(vip, &[&b]));
    wait_for_backends(&env.bpffs, "web", &addrs(&[&b]), POLL_LIMIT);
    assert_split(&env.connect(vip, 20), &[(&b, 20)]);
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP untranslated");
    let users = client_users(&server);
    assert!(
        users.len() >= 2 && users.iter().all(|u| u == "mesh"),
        "the agent's connections are not all user mesh: {users:?}"
    );
    assert_no_password_in_log(&env);
}

#[test]
fn rediss_refuses_a_server_certificate_its_ca_did_not_sign() {
    let a = TcpBackend::start("rsec-badca-a");
    let vip = "127.100.64.1:80";
    let dir = TempDir::new("redis-badca");
    let server_ca = TestCa::new(dir.path(), "server-ca");
    let other_ca = TestCa::new(dir.path(), "other-ca");
    let (server, tls_port) = tls_server(dir.path(), &server_ca, false);
    server
        .client()
        .hset_and_publish(KEY, "web", &service_json(vip, &[&a]));
    let password_file = write_password(dir.path(), "mesh.password", MESH_PASSWORD);
    let env = TestEnv::start(
        "redis-badca",
        &agent_config(
            dir.path(),
            &format!("rediss://127.0.0.1:{tls_port}/"),
            &format!(
                "username = \"mesh\"\npassword_file = {}\nca_file = {}\n",
                quoted(&password_file),
                quoted(&other_ca.cert)
            ),
        ),
    );
    let line = wait_for_error(
        &env,
        0,
        &["redis", "connecting", "TLS", "certificate", "UnknownIssuer"],
    );
    eprintln!("untrusted server certificate: {line}");
    wait_for_redis_up(&env, 0.0);
    assert_not_applied(&env, "web", Duration::from_millis(1500));
    // The server saw no login: the handshake failed before the password was sent.
    assert!(
        client_users(&server).is_empty(),
        "the agent is connected: {:?}",
        client_users(&server)
    );
    assert_no_password_in_log(&env);
}

// ---------------------------------------------------------------------------------------------
// Files that cannot be used stop the agent, naming the field
// ---------------------------------------------------------------------------------------------

#[test]
fn unusable_password_and_tls_files_stop_the_agent_naming_the_field() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("redis-files");
    let bpffs = BpffsDir::new("redis-files");
    let dir = TempDir::new("redis-files");
    let empty = dir.path().join("empty.password");
    std::fs::write(&empty, "\n").unwrap();
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let password_file = write_password(dir.path(), "mesh.password", MESH_PASSWORD);
    // Nothing listens there: the agent must stop before it tries.
    let url = format!("redis://{}/", free_loopback_addr());
    let tls_url = format!("rediss://{}/", free_loopback_addr());
    let missing = dir.path().join("missing.password");
    let cases: Vec<(String, String)> = vec![
        (
            agent_config(
                dir.path(),
                &url,
                &format!("password_file = {}\n", quoted(&missing)),
            ),
            format!(
                "[agent.redis] password_file: cannot read {}: No such file or directory",
                missing.display()
            ),
        ),
        (
            agent_config(
                dir.path(),
                &url,
                &format!("password_file = {}\n", quoted(dir.path())),
            ),
            format!(
                "[agent.redis] password_file: cannot read {}: Is a directory",
                dir.path().display()
            ),
        ),
        (
            agent_config(
                dir.path(),
                &url,
                &format!("password_file = {}\n", quoted(&empty)),
            ),
            format!("[agent.redis] password_file: {} is empty", empty.display()),
        ),
        (
            agent_config(
                dir.path(),
                &tls_url,
                &format!("ca_file = {}\n", quoted(&missing)),
            ),
            format!(
                "[agent.redis] ca_file: cannot read {}: No such file or directory",
                missing.display()
            ),
        ),
        (
            agent_config(
                dir.path(),
                &tls_url,
                &format!("ca_file = {}\n", quoted(&not_pem)),
            ),
            format!(
                "[agent.redis] ca_file: {}: no PEM certificate in it",
                not_pem.display()
            ),
        ),
        (
            agent_config(
                &dir.path().join("x"),
                &format!("redis://:{MESH_PASSWORD}@127.0.0.1:6379/"),
                &format!("password_file = {}\n", quoted(&password_file)),
            ),
            "agent.redis.password_file: cannot be used together with a password in \
             agent.redis.url"
                .to_owned(),
        ),
    ];
    for (config, want) in cases {
        let out = agent_exits(&config, &cgroup, &bpffs);
        assert!(
            out.stderr.contains(&want),
            "expected {want:?} in the agent's output: {}",
            out.describe()
        );
        assert!(
            !out.stderr.contains(MESH_PASSWORD) && !out.stdout.contains(MESH_PASSWORD),
            "the agent's output shows the password: {}",
            out.describe()
        );
    }
}
