//! The container image, run as deploy/kubernetes/daemonset.yaml runs it: podman with the host's
//! network, every capability dropped but the DaemonSet's `capabilities.add` list (read from the
//! manifest itself), podman's default seccomp profile (as Kubernetes' `RuntimeDefault`), a
//! read-only root, the host's bpffs and cgroup v2 mount, and the ConfigMap's own mesh.toml
//! (read from deploy/kubernetes/configmap.yaml; its Kubernetes source points at the tests' own
//! API server on loopback, holding an empty cluster, since no kube-apiserver runs here) with
//! test services appended. A pod turns ready only once that cluster's first (empty) set is in.
//!
//! To obey the rules for privileged tests, the agent attaches to a cgroup this test creates,
//! pins into this test's bpffs directories and serves metrics on loopback; clients run inside
//! that cgroup and backends listen on 127.0.0.1.
//!
//! What one pod has to do, checked for every run: start (a node's first pod on an empty
//! bpffs, every later pod over the pins its predecessor left), balance TCP connects through a
//! VIP, and terminate the connected UDP sockets of a backend that leaves. With the DaemonSet's
//! capabilities all of it works; without any single one of them something fails at once with
//! a message naming the operation and the missing permission (never a hang, never success).
//!
//! Runs only when `$MESH_TEST_IMAGE` is set (`cargo xtask test` sets it when podman is
//! installed and the image built); otherwise it says why and returns.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::container::{
    ContainerAgent, ContainerSpec, manifest, run_init_script, test_image, yaml_block,
    yaml_capabilities_add, yaml_shell_script,
};
use integration_tests::kube_api::KubeApi;
use integration_tests::maps::LAYOUT_DIR;
use integration_tests::probe::move_into_cgroup_at_spawn;
use integration_tests::{
    BpffsDir, CgroupGuard, ServiceSpec, TcpBackend, UdpBackend, assert_split, probe_bin,
    probe_connect_in, render_config, serial, wait_for_backends, wait_until,
};

/// podman's start plus the agent's load, on a busy 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const TCP_VIP: &str = "127.100.90.1:80";
const UDP_VIP: &str = "127.100.90.2:53";
/// Connected UDP sockets through the VIP per run: 2 per backend.
const UDP_SOCKETS: usize = 4;

struct Backends {
    a: TcpBackend,
    b: TcpBackend,
    u1: UdpBackend,
    u2: UdpBackend,
}

/// The ConfigMap's mesh.toml with the test services appended (the file source; the
/// Kubernetes source stays on but has no API server to reach). `with_u2: false` is the edit
/// that removes a UDP backend.
fn pod_config(backends: &Backends, with_u2: bool) -> String {
    let configmap = manifest("configmap.yaml");
    let base = yaml_block(&configmap, "mesh.toml")
        .expect("deploy/kubernetes/configmap.yaml has a `mesh.toml: |` block");
    assert!(
        base.contains("[agent.kubernetes]"),
        "the ConfigMap's mesh.toml turns the Kubernetes source on:\n{base}"
    );
    let tcp = ServiceSpec::tcp("web", TCP_VIP).backends([backends.a.addr(), backends.b.addr()]);
    let mut udp = ServiceSpec::udp("dns", UDP_VIP).backend(backends.u1.addr(), 1);
    if with_u2 {
        udp = udp.backend(backends.u2.addr(), 1);
    }
    format!("{base}\n{}", render_config(&[tcp, udp]))
}

/// The tests' API server (an empty cluster) and a kubeconfig for it: the pod shares the host's
/// network, so it reaches the loopback address. A fresh pod is ready only once its watchers
/// listed this cluster.
fn empty_cluster() -> (KubeApi, String) {
    let api = KubeApi::start();
    let kubeconfig = integration_tests::kube_api::kubeconfig_yaml(&api.url());
    (api, kubeconfig)
}

/// The agent's exit reason: `main`'s `Error: ...` and its `Caused by:` chain on one line, or
/// the log's last line.
fn exit_reason(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    match lines.iter().rposition(|l| l.starts_with("Error: ")) {
        Some(start) => lines[start..]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && *l != "Caused by:")
            .collect::<Vec<_>>()
            .join(" / "),
        None => lines
            .last()
            .map(|l| l.trim().to_owned())
            .unwrap_or_default(),
    }
}

/// `text` cut to its start and end (a verifier log runs to pages).
fn shortened(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 600 {
        return text.to_owned();
    }
    let head: String = chars[..300].iter().collect();
    let tail: String = chars[chars.len() - 250..].iter().collect();
    format!("{head} [...] {tail}")
}

fn says_permission_missing(text: &str) -> bool {
    text.contains("Operation not permitted") || text.contains("Permission denied")
}

/// Six TCP connects through the VIP from the test's cgroup: three per backend.
#[track_caller]
fn assert_balanced(cgroup: &CgroupGuard, backends: &Backends, when: &str) {
    let result = probe_connect_in(cgroup, TCP_VIP, 6);
    eprintln!("deploy: {when}: TCP replies {:?}", result.counts());
    assert_split(&result, &[(&backends.a, 3), (&backends.b, 3)]);
}

/// How the connected UDP sockets on a backend that left fared.
enum UdpTermination {
    /// All of them saw ECONNABORTED.
    Done,
    /// The agent could not terminate them; its ERROR line.
    Failed(String),
}

/// Holds connected UDP sockets through the VIP (in the test's cgroup), removes `u2` from the
/// config, and reports whether the sockets that were on `u2` were terminated.
fn udp_termination(
    agent: &ContainerAgent,
    cgroup: &CgroupGuard,
    bpffs: &BpffsDir,
    backends: &Backends,
) -> UdpTermination {
    let dir = std::env::temp_dir().join(format!("{}-udp-hold", cgroup.name()));
    std::fs::create_dir_all(&dir).expect("create the udp-hold directory");
    let ready = dir.join("ready");
    let stop = dir.join("stop");
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&stop);
    let mut cmd = Command::new(probe_bin().with_file_name("mesh-udp-hold"));
    cmd.args([
        "--vip",
        UDP_VIP,
        "--direct",
        &backends.u1.addr().to_string(),
    ])
    .args(["--count", &UDP_SOCKETS.to_string(), "--max-ms", "30000"])
    .arg("--ready-file")
    .arg(&ready)
    .arg("--stop-file")
    .arg(&stop)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    move_into_cgroup_at_spawn(&mut cmd, cgroup);
    let child = cmd.spawn().expect("spawn mesh-udp-hold");
    assert!(
        wait_until(Duration::from_secs(10), || ready.exists()),
        "mesh-udp-hold never got ready"
    );
    let mark = agent.log_text().len();
    agent.write_config(&pod_config(backends, false));
    wait_for_backends(bpffs, "dns", &[backends.u1.addr()], Duration::from_secs(10));
    // The termination follows the map writes in the same reconcile step.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop, "").expect("write the stop file");
    let out = child.wait_with_output().expect("wait for mesh-udp-hold");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mesh-udp-hold failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `<kind> <index> <first reply> <ok <reply> | err <ERRNO>>`; backends answer their name.
    let mut on_u2: BTreeMap<String, usize> = BTreeMap::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"vip") && fields.get(2) == Some(&backends.u2.name()) {
            *on_u2.entry(fields[3..].join(" ")).or_default() += 1;
        }
    }
    let log = agent.log_text();
    let since = log.get(mark..).unwrap_or_default();
    let error_line = since
        .lines()
        .find(|l| {
            (l.contains("ERROR") || l.contains("WARN"))
                && l.contains("terminating connected UDP sockets")
        })
        .map(str::to_owned);
    eprintln!("deploy: UDP sockets that were on the removed backend: {on_u2:?}");
    let aborted = on_u2.get("err ECONNABORTED").copied().unwrap_or(0);
    match error_line {
        None if aborted == UDP_SOCKETS / 2 && on_u2.len() == 1 => UdpTermination::Done,
        Some(line) if aborted == 0 => UdpTermination::Failed(line),
        other => panic!(
            "unexpected UDP termination: sockets on the removed backend {on_u2:?}, error line \
             {other:?}; mesh-udp-hold printed:\n{stdout}\nagent log since the edit:\n{since}"
        ),
    }
}

/// What every pod of the test shares.
struct Pods<'a> {
    image: &'a str,
    config: &'a str,
    kubeconfig: &'a str,
    seccomp_unconfined: bool,
}

impl Pods<'_> {
    /// A pod with `caps` attaching to `cgroup` (the test's stand-in for a node's root cgroup)
    /// and pinning into `bpffs`.
    fn spec<'s>(
        &'s self,
        caps: &'s [String],
        cgroup: &'s CgroupGuard,
        bpffs: &'s BpffsDir,
    ) -> ContainerSpec<'s> {
        ContainerSpec {
            image: self.image,
            caps,
            config_toml: self.config,
            kubeconfig: Some(self.kubeconfig),
            cgroup,
            bpffs,
            seccomp_unconfined: self.seccomp_unconfined,
        }
    }
}

/// How one pod fared.
enum PodRun {
    /// It did all of its work.
    Worked,
    /// It failed: where, and the message.
    Failed(String),
}

/// Runs one pod with `caps` on `bpffs`: start, balance, terminate UDP flows, stop.
fn run_pod(spec: &ContainerSpec<'_>, backends: &Backends, fresh: bool, when: &str) -> PodRun {
    let cgroup = spec.cgroup;
    let bpffs = spec.bpffs;
    if fresh {
        assert!(
            !bpffs.path().exists(),
            "{when}: {} exists",
            bpffs.path().display()
        );
    } else {
        assert!(
            bpffs
                .path()
                .join(LAYOUT_DIR)
                .join("links/connect4")
                .exists(),
            "{when}: no pins to adopt"
        );
    }
    let mut agent = ContainerAgent::spawn(spec);
    match agent.wait_ready(READY_TIMEOUT) {
        Ok(took) => eprintln!("deploy: {when}: ready after {took:?}"),
        Err(why) => {
            let Some(status) = agent.exited() else {
                panic!("{when}: the agent hangs: {why}");
            };
            assert!(!status.success(), "{when}: exit {status} before ready");
            let reason = shortened(&exit_reason(&agent.log_text()));
            eprintln!(
                "deploy: {when}: failed to start ({status}) after {:?}: {reason}",
                agent.elapsed()
            );
            return PodRun::Failed(format!("start: {reason}"));
        }
    }
    let health =
        integration_tests::http::get(agent.metrics_addr(), "/healthz", Duration::from_secs(5))
            .expect("GET /healthz");
    assert_eq!(health.status, 200, "{when}: /healthz: {}", health.body);
    assert_balanced(cgroup, backends, when);
    let outcome = match udp_termination(&agent, cgroup, bpffs, backends) {
        UdpTermination::Done => PodRun::Worked,
        UdpTermination::Failed(line) => {
            eprintln!("deploy: {when}: UDP flow termination failed: {line}");
            PodRun::Failed(format!("UDP flow termination: {line}"))
        }
    };
    let status = agent
        .terminate(STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("{when}: the agent did not stop on SIGTERM"));
    assert!(
        status.success(),
        "{when}: exit {status}; log:\n{}",
        agent.log_text()
    );
    outcome
}

#[test]
fn image_runs_the_agent_with_exactly_the_daemonset_capabilities() {
    let Some(image) = test_image() else {
        return;
    };
    let _serial = serial();
    let daemonset = manifest("daemonset.yaml");
    let caps = yaml_capabilities_add(&daemonset);
    assert!(
        !caps.is_empty(),
        "no `capabilities: add:` list found in deploy/kubernetes/daemonset.yaml"
    );
    assert!(
        daemonset.contains("drop: [\"ALL\"]") && daemonset.contains("privileged: false"),
        "the DaemonSet's mesh container must drop ALL capabilities and not be privileged"
    );
    eprintln!("deploy: the DaemonSet adds {caps:?}");

    let backends = Backends {
        a: TcpBackend::start("deploy-a"),
        b: TcpBackend::start("deploy-b"),
        u1: UdpBackend::start("deploy-u1"),
        u2: UdpBackend::start("deploy-u2"),
    };
    let config = pod_config(&backends, true);
    let (_cluster, kubeconfig) = empty_cluster();
    // The test's node: its root cgroup and its pins, kept by every pod but the first-pod
    // runs without a capability, which get a node of their own each (a second set of
    // programs attached to the same cgroup would answer for them).
    let cgroup = CgroupGuard::new("deploy");
    let node_pins = BpffsDir::new("deploy");
    let pods = Pods {
        image: &image,
        config: &config,
        kubeconfig: &kubeconfig,
        seccomp_unconfined: false,
    };
    let caps_ref: &[String] = &caps;

    // A node's first pod, then (after a gap with no agent) the pod that replaces it.
    let first = run_pod(
        &pods.spec(caps_ref, &cgroup, &node_pins),
        &backends,
        true,
        "first pod",
    );
    assert!(
        matches!(first, PodRun::Worked),
        "the first pod with {caps:?} failed: {}",
        match first {
            PodRun::Failed(why) => why,
            PodRun::Worked => String::new(),
        }
    );
    assert_balanced(&cgroup, &backends, "no agent running");
    let next = run_pod(
        &pods.spec(caps_ref, &cgroup, &node_pins),
        &backends,
        false,
        "next pod",
    );
    assert!(
        matches!(next, PodRun::Worked),
        "the next pod with {caps:?} failed: {}",
        match next {
            PodRun::Failed(why) => why,
            PodRun::Worked => String::new(),
        }
    );

    // Without each capability, as a node's first pod and as a replacement.
    let mut failures = Vec::new();
    for cap in &caps {
        let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        for fresh in [true, false] {
            let when = format!(
                "without CAP_{cap}, {}",
                if fresh { "first pod" } else { "next pod" }
            );
            let fresh_cgroup = fresh.then(|| CgroupGuard::new("deploy-fresh"));
            let fresh_pins = BpffsDir::new("deploy-fresh");
            let (cgroup, pins) = match &fresh_cgroup {
                Some(fresh_cgroup) => (fresh_cgroup, &fresh_pins),
                None => (&cgroup, &node_pins),
            };
            let outcome = run_pod(&pods.spec(&without, cgroup, pins), &backends, fresh, &when);
            // The fresh node goes before the next run: its pins first, then its cgroup.
            drop(fresh_pins);
            drop(fresh_cgroup);
            match outcome {
                PodRun::Worked => panic!(
                    "{when}: the pod did all its work, so CAP_{cap} is not needed there; the \
                     DaemonSet should not add it"
                ),
                PodRun::Failed(why) => {
                    assert!(
                        says_permission_missing(&why),
                        "{when}: it failed, but the message does not say that a permission is \
                         missing: {why}"
                    );
                    failures.push(format!("{when}: {why}"));
                }
            }
        }
    }
    // The failed pods left the node's data path balancing.
    assert_balanced(&cgroup, &backends, "after the failed pods");
    eprintln!(
        "deploy: each of {caps:?} is needed:\n{}",
        failures.join("\n")
    );
}

/// Why CAP_SYS_ADMIN stays even where the seccomp profile would let bpf(2) through with
/// CAP_BPF: without seccomp, CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN start a node's first pod,
/// but the next pod cannot adopt the pinned links (BPF_PROG_GET_FD_BY_ID, to replace a link's
/// program with BPF_F_REPLACE, needs CAP_SYS_ADMIN). Each of the three is needed for the
/// first pod too.
#[test]
fn without_seccomp_adopting_pins_still_needs_sys_admin() {
    let Some(image) = test_image() else {
        return;
    };
    let _serial = serial();
    let backends = Backends {
        a: TcpBackend::start("deploy-sc-a"),
        b: TcpBackend::start("deploy-sc-b"),
        u1: UdpBackend::start("deploy-sc-u1"),
        u2: UdpBackend::start("deploy-sc-u2"),
    };
    let config = pod_config(&backends, true);
    let (_cluster, kubeconfig) = empty_cluster();
    let pods = Pods {
        image: &image,
        config: &config,
        kubeconfig: &kubeconfig,
        seccomp_unconfined: true,
    };
    let kernel_caps: Vec<String> = ["BPF", "PERFMON", "NET_ADMIN"].map(String::from).into();

    let cgroup = CgroupGuard::new("deploy-sc");
    let pins = BpffsDir::new("deploy-sc");
    let first = run_pod(
        &pods.spec(&kernel_caps, &cgroup, &pins),
        &backends,
        true,
        "unconfined first pod",
    );
    assert!(
        matches!(first, PodRun::Worked),
        "without seccomp, {kernel_caps:?} run a node's first pod"
    );
    match run_pod(
        &pods.spec(&kernel_caps, &cgroup, &pins),
        &backends,
        false,
        "unconfined next pod",
    ) {
        PodRun::Worked => panic!("the next pod adopted the pins without CAP_SYS_ADMIN"),
        PodRun::Failed(why) => assert!(
            why.contains("replacing the program of pinned link") && says_permission_missing(&why),
            "the next pod fails replacing a link's program: {why}"
        ),
    }
    for cap in &kernel_caps {
        let without: Vec<String> = kernel_caps.iter().filter(|c| *c != cap).cloned().collect();
        let when = format!("unconfined, without CAP_{cap}, first pod");
        let fresh_cgroup = CgroupGuard::new("deploy-sc-fresh");
        let fresh_pins = BpffsDir::new("deploy-sc-fresh");
        match run_pod(
            &pods.spec(&without, &fresh_cgroup, &fresh_pins),
            &backends,
            true,
            &when,
        ) {
            PodRun::Worked => panic!("{when}: worked, so CAP_{cap} is not needed"),
            PodRun::Failed(why) => assert!(says_permission_missing(&why), "{when}: {why}"),
        }
    }
}

/// A directory of the test's, bind-mounted onto itself and made a shared mount, so that a
/// mount made on it inside a container (`rshared`) shows on the host, as through the
/// DaemonSet's `Bidirectional` bpffs volume. Drop unmounts what is mounted on it and removes it.
struct SharedDir {
    path: std::path::PathBuf,
}

impl SharedDir {
    fn new(tag: &str) -> SharedDir {
        let path = std::env::temp_dir().join(format!("mesh-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the shared directory");
        let dir = SharedDir { path };
        let at = dir.path.display().to_string();
        dir.mount(&["--bind", &at, &at]);
        dir.mount(&["--make-shared", &at]);
        dir
    }

    fn mount(&self, args: &[&str]) {
        let status = Command::new("mount")
            .args(args)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount {args:?}: {status}");
    }

    /// Filesystem types mounted exactly here, in mount order.
    fn fstypes(&self) -> Vec<String> {
        let at = self.path.display().to_string();
        std::fs::read_to_string("/proc/mounts")
            .expect("read /proc/mounts")
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [_, target, fstype, ..] if *target == at => Some((*fstype).to_owned()),
                    _ => None,
                }
            })
            .collect()
    }

    fn bpffs_mounts(&self) -> usize {
        self.fstypes().iter().filter(|t| *t == "bpf").count()
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        for _ in 0..self.fstypes().len() {
            let _ = Command::new("umount").arg(&self.path).status();
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("harness: could not remove {}: {e}", self.path.display());
        }
    }
}

/// The DaemonSet's init container mounts bpffs on the host where none is mounted, and leaves
/// a host that has one alone.
#[test]
fn init_container_mounts_bpffs_on_the_host_only_where_missing() {
    let Some(image) = test_image() else {
        return;
    };
    let _serial = serial();
    let script = yaml_shell_script(&manifest("daemonset.yaml"))
        .expect("the DaemonSet's init container runs `/bin/sh -c SCRIPT`");
    eprintln!("deploy: init container script: {script}");
    let host = SharedDir::new("initbpffs");
    assert_eq!(
        host.bpffs_mounts(),
        0,
        "no bpffs before: {:?}",
        host.fstypes()
    );

    let first = run_init_script(&image, &script, &host.path);
    assert!(first.status.success(), "first run: {}", first.describe());
    assert_eq!(
        host.bpffs_mounts(),
        1,
        "the host has bpffs after the first run: {:?}",
        host.fstypes()
    );
    let second = run_init_script(&image, &script, &host.path);
    assert!(second.status.success(), "second run: {}", second.describe());
    assert_eq!(
        host.bpffs_mounts(),
        1,
        "a host that has bpffs gets no second mount: {:?}",
        host.fstypes()
    );
}
