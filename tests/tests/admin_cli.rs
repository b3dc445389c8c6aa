//! `mesh register`, `mesh deregister` and `mesh drain` against a real agent, through its admin
//! socket, checked in the data path.

use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::process::{Captured, run_bounded};
use integration_tests::{ServiceSpec, TcpBackend, TestEnv, assert_split, render_config};

/// `mesh <args> --admin-socket <the agent's>`, bounded.
fn cli(env: &TestEnv, args: &[&str]) -> Captured {
    let mut cmd = std::process::Command::new(integration_tests::mesh_bin());
    cmd.args(args)
        .arg("--admin-socket")
        .arg(env.agent.admin_socket())
        .env("NO_COLOR", "1");
    run_bounded(&mut cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

#[track_caller]
fn ok(out: &Captured) {
    assert!(out.status.success(), "{}", out.describe());
}

#[track_caller]
fn fails_with(out: &Captured, words: &[&str]) {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        out.describe()
    );
    for word in words {
        assert!(
            out.stderr.contains(word),
            "no {word:?} in: {}",
            out.describe()
        );
    }
}

#[test]
fn register_drain_and_deregister_change_the_data_path() {
    let a = TcpBackend::start("cli-a");
    let b = TcpBackend::start("cli-b");
    let vip = "127.100.91.1:80";
    // Whoever reaches the decoy was not translated.
    let decoy = TcpBackend::start_on("cli-decoy", vip.parse::<SocketAddr>().unwrap());
    let env = TestEnv::start("cli", "services = []\n");
    assert_split(&env.connect(vip, 4), &[(&decoy, 4)]);

    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let out = cli(
        &env,
        &[
            "register",
            "cli-web",
            "--vip",
            vip,
            "--backend",
            &a_addr,
            "--backend",
            &b_addr,
        ],
    );
    ok(&out);
    assert!(
        out.stdout.contains("registered cli-web (generation "),
        "{}",
        out.describe()
    );
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);

    // Draining one backend: new connections go to the other only.
    let out = cli(&env, &["drain", "cli-web", "--backend", &a_addr]);
    ok(&out);
    assert!(
        out.stdout.contains(&format!("draining {a_addr}")),
        "{}",
        out.describe()
    );
    assert_split(&env.connect(vip, 6), &[(&b, 6)]);
    // And back.
    ok(&cli(&env, &["drain", "cli-web", "--undo"]));
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);
    // The whole service: no backend gets new connections; connects are refused (on_empty).
    ok(&cli(&env, &["drain", "cli-web"]));
    let drained = env.connect(vip, 4);
    assert_eq!(
        drained.count(a.name()) + drained.count(b.name()) + drained.count(decoy.name()),
        0,
        "{drained:?}"
    );
    ok(&cli(&env, &["drain", "cli-web", "--undo"]));

    // A bad request prints the agent's reason; nothing changes.
    let out = cli(
        &env,
        &[
            "register",
            "cli-web",
            "--vip",
            "127.100.91.1:0",
            "--backend",
            &a_addr,
        ],
    );
    fails_with(&out, &["rejected by the agent (HTTP 400", "vip"]);
    let out = cli(&env, &["drain", "cli-web", "--backend", "127.0.0.1:1"]);
    fails_with(&out, &["has no backend 127.0.0.1:1"]);
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);

    let out = cli(&env, &["deregister", "cli-web"]);
    ok(&out);
    assert_split(&env.connect(vip, 4), &[(&decoy, 4)]);
    let out = cli(&env, &["deregister", "cli-web"]);
    fails_with(
        &out,
        &["HTTP 404", "no service \"cli-web\" in the admin API"],
    );
}

#[test]
fn the_cli_names_services_of_other_sources_and_a_missing_agent() {
    let a = TcpBackend::start("cli-file-a");
    let vip = "127.100.92.1:80";
    let env = TestEnv::start(
        "cli-file",
        &render_config(&[ServiceSpec::tcp("from-file", vip).backends([a.addr()])]),
    );
    let out = cli(&env, &["drain", "from-file"]);
    fails_with(&out, &["comes from the file source"]);
    let out = cli(&env, &["deregister", "from-file"]);
    fails_with(&out, &["comes from the file source, not the admin API"]);
    assert_split(&env.connect(vip, 3), &[(&a, 3)]);

    let mut cmd = std::process::Command::new(integration_tests::mesh_bin());
    cmd.args([
        "register",
        "x",
        "--vip",
        "127.100.92.2:80",
        "--admin-socket",
    ])
    .arg(env.agent.dir().join("nothing-here.sock"));
    let out = run_bounded(&mut cmd, Duration::from_secs(30)).unwrap();
    fails_with(
        &out,
        &["the mesh agent is not running", "nothing-here.sock"],
    );
}
