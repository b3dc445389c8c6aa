//! Who may program the balancer through the admin API: the Unix socket (mode 0600, root and
//! the agent's user only, checked with SO_PEERCRED), and the opt-in TCP listener (bearer token
//! from a file, TLS required off loopback).

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::admin::{AdminApi, Endpoint, free_loopback_addr, request_on};
use integration_tests::process::{Captured, run_bounded};
use integration_tests::users::TestUser;
use integration_tests::{Agent, BpffsDir, CgroupGuard, TempDir, mesh_bin, serial};

const CURL_TIMEOUT: Duration = Duration::from_secs(15);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// `mesh agent` that must exit on its own (bounded): its captured output.
fn agent_exits(
    config_toml: &str,
    cgroup: &CgroupGuard,
    bpffs: &BpffsDir,
    extra: &[&str],
) -> Captured {
    let dir = TempDir::new("admin-fail");
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
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(extra)
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

#[test]
fn admin_socket_is_private_and_refuses_other_users() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("admin-sock");
    let bpffs = BpffsDir::new("admin-sock");
    let dir = TempDir::new("admin-sock");
    // A directory that does not exist yet: the agent creates it 0700.
    let socket = dir.path().join("run-mesh").join("admin.sock");
    let socket_arg = socket.display().to_string();
    let agent = Agent::start_with_args(
        "services = []\n",
        &cgroup,
        &bpffs,
        &["--admin-socket", &socket_arg],
    );
    assert_eq!(mode(&socket), 0o600, "the admin socket's mode");
    assert_eq!(
        mode(socket.parent().unwrap()),
        0o700,
        "the socket directory's mode"
    );
    assert_eq!(
        std::fs::metadata(&socket).unwrap().uid(),
        0,
        "owned by the agent (root)"
    );
    let api = AdminApi::socket(&socket);
    assert_eq!(api.list().status, 200, "root may use the socket");

    let user = TestUser::create();
    let curl_args = [
        "-sS",
        "-w",
        "\nstatus=%{http_code}\n",
        "--unix-socket",
        &socket_arg,
        "http://localhost/v1/services",
    ];
    // The modes keep the user out before the agent sees the connection.
    let out = user.run("curl", curl_args, CURL_TIMEOUT);
    assert!(
        !out.status.success() && out.stdout.contains("status=000"),
        "another user reached the 0600 socket: {}",
        out.describe()
    );

    // Loosened by mistake: the peer credential check still refuses the user.
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mark = agent.log_mark();
    let out = user.run("curl", curl_args, CURL_TIMEOUT);
    assert!(
        out.stdout.contains("status=403"),
        "expected 403: {}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains(&format!("uid {} may not use the admin API", user.uid)),
        "the answer names the uid: {}",
        out.describe()
    );
    let line = agent
        .wait_for_log_line(mark, Duration::from_secs(5), |l| {
            l.contains("admin API: refused GET /v1/services")
                && l.contains(&format!("uid {}", user.uid))
        })
        .unwrap_or_else(|| {
            panic!(
                "no log line names the refused uid:\n{}",
                agent.log_since(mark)
            )
        });
    assert!(line.contains("(pid "), "the log line names the pid: {line}");
    // A PUT from the user changes nothing either.
    let out = user.run(
        "curl",
        [
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--data",
            r#"{"vip":"127.100.90.1:80","backends":[]}"#,
            "--unix-socket",
            &socket_arg,
            "http://localhost/v1/services/hijack",
        ],
        CURL_TIMEOUT,
    );
    assert_eq!(out.stdout.trim(), "403", "{}", out.describe());
    assert!(api.names().is_empty(), "{:?}", api.names());
    // Root still gets through on the loosened socket.
    assert_eq!(api.list().status, 200);
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("admin-stale");
    let bpffs = BpffsDir::new("admin-stale");
    let mut agent = Agent::start("services = []\n", &cgroup, &bpffs);
    let socket = agent.admin_socket().to_owned();
    let socket_arg = socket.display().to_string();

    // A second agent (its own pins and cgroup) must not take the live agent's socket.
    let other_cgroup = CgroupGuard::new("admin-stale2");
    let other_bpffs = BpffsDir::new("admin-stale2");
    let out = agent_exits(
        "services = []\n",
        &other_cgroup,
        &other_bpffs,
        &["--admin-socket", &socket_arg],
    );
    assert!(
        out.stderr.contains("admin_socket") && out.stderr.contains("another process"),
        "the refusal names the setting and why: {}",
        out.describe()
    );
    assert_eq!(
        agent.admin().list().status,
        200,
        "the first agent still serves its socket"
    );

    // SIGKILL leaves the socket file behind; the restarted agent replaces it.
    agent.kill9();
    assert!(socket.exists(), "a killed agent cannot remove its socket");
    let mark = agent.log_mark();
    agent.restart();
    assert!(
        agent
            .log_since(mark)
            .contains("removing the stale admin socket"),
        "{}",
        agent.log_since(mark)
    );
    assert_eq!(agent.admin().list().status, 200);
    assert_eq!(mode(&socket), 0o600);

    // A clean stop removes it.
    agent.terminate(Duration::from_secs(10));
    assert!(!socket.exists(), "a stopped agent leaves no socket file");
}

#[test]
fn tcp_admin_needs_a_token_file_and_tls_off_loopback() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("admin-cfg");
    let bpffs = BpffsDir::new("admin-cfg");
    let addr = free_loopback_addr();
    let out = agent_exits(
        &format!("[agent]\nadmin = \"{addr}\"\n"),
        &cgroup,
        &bpffs,
        &[],
    );
    assert!(
        out.stderr
            .contains("agent.admin_token_file: is required when agent.admin is set"),
        "{}",
        out.describe()
    );
    let out = agent_exits(
        &format!(
            "[agent]\nadmin = \"0.0.0.0:{}\"\nadmin_token_file = \"/nonexistent/token\"\n",
            addr.port()
        ),
        &cgroup,
        &bpffs,
        &[],
    );
    assert!(
        out.stderr.contains(&format!(
            "agent.admin: 0.0.0.0:{} is not a loopback address",
            addr.port()
        )) && out.stderr.contains("admin_tls"),
        "{}",
        out.describe()
    );
    // A token file that cannot be read is named.
    let out = agent_exits(
        &format!("[agent]\nadmin = \"{addr}\"\nadmin_token_file = \"/nonexistent/token\"\n"),
        &cgroup,
        &bpffs,
        &[],
    );
    assert!(
        out.stderr
            .contains("[agent] admin_token_file /nonexistent/token: cannot read"),
        "{}",
        out.describe()
    );
}

fn write_token(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn tcp_admin_answers_only_the_right_bearer_token() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("admin-token");
    let bpffs = BpffsDir::new("admin-token");
    let dir = TempDir::new("admin-token");
    let token_file = write_token(dir.path(), TOKEN);
    let addr = free_loopback_addr();
    let _agent = Agent::start(
        &format!(
            "[agent]\nadmin = \"{addr}\"\nadmin_token_file = {:?}\n",
            token_file.display().to_string()
        ),
        &cgroup,
        &bpffs,
    );
    let call = |token: Option<&str>| {
        let endpoint = Endpoint::Tcp {
            addr,
            token: token.map(str::to_owned),
        };
        request_on(&endpoint, "GET", "/v1/services", None).expect("the TCP admin API answers")
    };
    assert_eq!(call(None).status, 401, "no token");
    assert_eq!(
        call(Some("0123456789abcdef0123456789abcdeX")).status,
        401,
        "wrong token"
    );
    assert_eq!(call(Some("0123")).status, 401, "a prefix of the token");
    assert_eq!(
        call(Some(&format!("{TOKEN}0"))).status,
        401,
        "the token and more"
    );
    let ok = call(Some(TOKEN));
    assert_eq!(ok.status, 200, "{}", ok.body);
    // A PUT without the token changes nothing.
    let put = request_on(
        &Endpoint::Tcp { addr, token: None },
        "PUT",
        "/v1/services/hijack",
        Some(r#"{"vip":"127.100.90.1:80","backends":[]}"#),
    )
    .unwrap();
    assert_eq!(put.status, 401);
    assert!(!call(Some(TOKEN)).body.contains("hijack"));
}

#[test]
fn tls_admin_serves_https_to_a_client_that_trusts_its_certificate() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("admin-tls");
    let bpffs = BpffsDir::new("admin-tls");
    let dir = TempDir::new("admin-tls");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let out = run_bounded(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=mesh-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(30),
    )
    .expect("openssl req");
    assert!(out.status.success(), "openssl: {}", out.describe());
    let token_file = write_token(dir.path(), TOKEN);
    let addr = free_loopback_addr();
    let _agent = Agent::start(
        &format!(
            "[agent]\nadmin = \"{addr}\"\nadmin_token_file = {:?}\n\
             admin_tls = {{ cert = {:?}, key = {:?} }}\n",
            token_file.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        ),
        &cgroup,
        &bpffs,
    );
    let curl = |extra: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--noproxy",
            "*",
            "-w",
            "\nstatus=%{http_code}\n",
            "--cacert",
        ])
        .arg(&cert)
        .args(extra)
        .arg(format!("https://{addr}/v1/services"));
        run_bounded(&mut cmd, CURL_TIMEOUT).expect("curl")
    };
    let auth = format!("Authorization: Bearer {TOKEN}");
    let ok = curl(&["-H", &auth]);
    assert!(
        ok.stdout.contains("status=200") && ok.stdout.contains("\"services\""),
        "{}",
        ok.describe()
    );
    let no_token = curl(&[]);
    assert!(
        no_token.stdout.contains("status=401"),
        "{}",
        no_token.describe()
    );
    // Plain HTTP to the TLS port gets no answer from the API.
    let plain = request_on(
        &Endpoint::Tcp {
            addr,
            token: Some(TOKEN.to_owned()),
        },
        "GET",
        "/v1/services",
        None,
    );
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 200),
        "{plain:?}"
    );
}

#[test]
fn pins_and_state_are_private_to_the_agent() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("private");
    let bpffs = BpffsDir::new("private");
    // Made readable for all first: the agent tightens its own pins directory.
    std::fs::create_dir_all(bpffs.path()).unwrap();
    std::fs::set_permissions(bpffs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::start("services = []\n", &cgroup, &bpffs);
    assert_eq!(mode(bpffs.path()), 0o700, "the pins directory");
    let mut pins = 0;
    let mut dirs = vec![bpffs.path().to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                dirs.push(path);
            } else {
                assert_eq!(
                    mode(&path) & 0o077,
                    0,
                    "{} is open to others",
                    path.display()
                );
                pins += 1;
            }
        }
    }
    assert!(
        pins > 5,
        "only {pins} pins found under {}",
        bpffs.path().display()
    );

    let api = agent.admin();
    let put = api.put(
        "private",
        r#"{"vip":"127.100.93.1:80","backends":[{"addr":"127.0.0.1:9"}]}"#,
    );
    assert_eq!(put.status, 200, "{}", put.raw);
    let state_dir = agent.dir().join("state");
    let saved = state_dir.join("api-services.json");
    assert_eq!(
        mode(&state_dir),
        0o700,
        "the state directory the agent created"
    );
    assert_eq!(mode(&saved), 0o600, "the saved services");

    let user = TestUser::create();
    let ls = user.run("ls", [bpffs.path()], CURL_TIMEOUT);
    assert!(
        !ls.status.success(),
        "another user lists the pins: {}",
        ls.describe()
    );
    // Even with the directory opened up, the file itself stays closed.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cat = user.run("cat", [&saved], CURL_TIMEOUT);
    assert!(
        !cat.status.success() && cat.stderr.contains("Permission denied"),
        "another user reads the saved services: {}",
        cat.describe()
    );
}
