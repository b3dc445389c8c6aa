//! `cargo xtask bench --nodeport [--quick]`: traffic from another host through a NodePort,
//! mesh's TC programs next to kube-proxy-style iptables and nftables DNAT, on one topology in
//! one run.
//!
//! ```text
//!   client netns 10.78.0.1 --eth0/eth0-- node netns 10.78.0.2 --p0/p1/p2-- pod netns x3
//!                                                                 10.245.1.2, .3, .4 :8080
//! ```
//!
//! Every namespace is made by the bench (`mesh-bench-<pid>-np-*`) and deleted at the end, on
//! errors and after Ctrl-C (with every veth, rule and table inside). Pods sit behind the node
//! on veths, routed with proxy ARP on the node side; the client routes the pod range via the
//! node. No traffic leaves these namespaces.
//!
//! Paths (one translator present at a time: netfilter tables exist only while their path
//! runs, the agent and its TC programs only while `mesh` and `direct+mesh` run, so no path
//! pays for another's hooks or connection tracking):
//! - `direct`: the client rotates over the pods' own addresses, forwarded by the node without
//!   NAT (the ceiling);
//! - `direct+mesh`: the same with the agent running: what traffic the TC programs pass (to
//!   no external service) pays for them being on the device;
//! - `mesh`: an agent inside the node namespace (its socket programs on an empty cgroup of the
//!   bench), `[agent.nodeport]` on the node's eth0, an `external = "cluster"` service on
//!   10.78.0.2:30080 over the three pods (pods on this node see the client's address: no SNAT);
//! - `iptables`: kube-proxy's iptables mode for a NodePort (PREROUTING -> services chain ->
//!   `addrtype LOCAL` -> nodeports chain -> service chain with `statistic --mode nth` -> DNAT),
//!   on port 30081;
//! - `nftables`: kube-proxy's nftables mode (`fib daddr type local`, a verdict map on protocol
//!   and port, `numgen inc mod 3` -> DNAT), on port 30082.
//!
//! Neither netfilter path masquerades: like mesh towards pods on its own node, the pods see the
//! client's address (kube-proxy's `externalTrafficPolicy: Local`; with Cluster it also SNATs).
//!
//! Per path and round: connection rate (`loadgen crr`: connect, 1 byte each way, close with
//! RST), bulk upload over 1 and 4 connections, and the node namespace's connection tracking
//! entries before and after (growing only where netfilter translates). For `mesh` and
//! `direct+mesh`, after the timed runs, the TC programs' own time from the kernel's accounting
//! (run-time statistics on only for that part): an exact number of sequential connections,
//! then a bulk upload. Rounds are interleaved with a rotating order; a warm-up pass is not
//! counted. Nothing asserts a timing.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::kernel_cost::{StatsOn, stats};
use super::procs::{Proc, run_captured, run_cleanup};
use super::proto::{BulkResult, ConnectsResult, CrrResult};
use super::report::{Spread, rate_cell, ratio_cell, spread};
use super::system::{self, BPFFS, Cgroup, PREFIX, run_with_input, scratch_name};
use super::{ScratchDir, Settings, build_binaries};
use crate::util::{cmd, target_dir};
use crate::{setup, signal};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const POD_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 245, 1, 2),
    Ipv4Addr::new(10, 245, 1, 3),
    Ipv4Addr::new(10, 245, 1, 4),
];
const POD_RANGE: &str = "10.245.1.0/24";
const BACKEND_PORT: u16 = 8080;
const MESH_PORT: u16 = 30080;
const IPTABLES_PORT: u16 = 30081;
const NFT_PORT: u16 = 30082;
/// The agent's metrics listener, on the node namespace's own loopback.
const AGENT_METRICS: &str = "127.0.0.1:21930";
const NFT_TABLE: &str = "mesh_np_bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NpPath {
    Direct,
    #[serde(rename = "direct+mesh")]
    DirectMesh,
    Mesh,
    Iptables,
    Nftables,
}

impl NpPath {
    fn name(self) -> &'static str {
        match self {
            NpPath::Direct => "direct",
            NpPath::DirectMesh => "direct+mesh",
            NpPath::Mesh => "mesh",
            NpPath::Iptables => "iptables",
            NpPath::Nftables => "nftables",
        }
    }

    fn description(self) -> &'static str {
        match self {
            NpPath::Direct => "client rotates over the 3 pod addresses, routed by the node, no NAT",
            NpPath::DirectMesh => {
                "as direct, with mesh's TC programs attached to the node's eth0 (traffic they pass)"
            }
            NpPath::Mesh => {
                "NodePort 10.78.0.2:30080, mesh TC programs on the node's eth0 (external = cluster)"
            }
            NpPath::Iptables => {
                "NodePort 10.78.0.2:30081, nat PREROUTING -> addrtype LOCAL -> statistic nth DNAT"
            }
            NpPath::Nftables => {
                "NodePort 10.78.0.2:30082, nat prerouting fib local -> vmap -> numgen inc mod 3 DNAT"
            }
        }
    }

    /// Where the client connects (several: it rotates over them).
    fn targets(self) -> Vec<SocketAddr> {
        let node = |port| vec![SocketAddr::V4(SocketAddrV4::new(NODE_IP, port))];
        match self {
            NpPath::Direct | NpPath::DirectMesh => pod_addrs(),
            NpPath::Mesh => node(MESH_PORT),
            NpPath::Iptables => node(IPTABLES_PORT),
            NpPath::Nftables => node(NFT_PORT),
        }
    }
}

const PATHS: [NpPath; 5] = [
    NpPath::Direct,
    NpPath::DirectMesh,
    NpPath::Mesh,
    NpPath::Iptables,
    NpPath::Nftables,
];

fn pod_addrs() -> Vec<SocketAddr> {
    POD_IPS
        .iter()
        .map(|&ip| SocketAddr::V4(SocketAddrV4::new(ip, BACKEND_PORT)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// A network namespace `mesh-bench-<pid>-np-<tag>` with `lo` up. Drop SIGKILLs what still runs
/// in it (only the bench's children can) and deletes it, with its veths, rules and tables.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(tag: &str) -> Result<NetNs> {
        let name = scratch_name(&format!("np-{tag}"));
        quiet(cmd("ip", ["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut command = cmd("ip", ["-n", &self.name]);
        command.args(args);
        quiet(command).map(drop)
    }

    fn sysctl(&self, setting: &str) -> Result<()> {
        quiet(self.command("sysctl", ["-qw", setting])).map(drop)
    }

    /// `program args` inside the namespace. `nsenter --net` enters only the network namespace
    /// (`ip netns exec` would also remount /sys, hiding bpffs and cgroup2 from the agent) and
    /// execs the program, so a [`Proc`]'s pid is the program's own.
    fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = cmd("nsenter", [format!("--net=/run/netns/{}", self.name)]);
        command.arg("--").arg(program).args(args);
        command
    }

    fn pids(&self) -> Vec<i32> {
        run_cleanup(
            cmd("ip", ["netns", "pids", &self.name]),
            Duration::from_secs(10),
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&pid| pid > 1 && u32::try_from(pid) != Ok(std::process::id()))
        .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a pid inside a namespace only the bench's children enter.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match run_cleanup(
            cmd("ip", ["netns", "del", &self.name]),
            Duration::from_secs(10),
        ) {
            Ok(_) => eprintln!("bench: removed netns {}", self.name),
            Err(e) => eprintln!("bench: warning: {e:#}"),
        }
    }
}

fn quiet(command: Command) -> Result<String> {
    run_captured(command, Duration::from_secs(30))
}

/// Deletes namespaces of an interrupted bench whose xtask is gone (only the bench's names).
fn remove_leftover_netns() -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists() {
            // PR_SET_PDEATHSIG stopped its processes with their xtask (see procs.rs).
            quiet(cmd("ip", ["netns", "del", &name]))?;
            println!("bench: removed leftover netns {name}");
        } else {
            bail!("netns {name} belongs to a bench that is still running (pid {pid})");
        }
    }
    Ok(())
}

/// The namespaces; fields drop in order, the pods last.
struct Topology {
    client: NetNs,
    node: NetNs,
    pods: Vec<NetNs>,
}

impl Topology {
    fn build() -> Result<Topology> {
        let client = NetNs::create("client")?;
        let node = NetNs::create("node")?;
        let mut topo = Topology {
            client,
            node,
            pods: Vec::new(),
        };
        let (client, node) = (&topo.client, &topo.node);
        client.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &node.name,
        ])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&["route", "add", POD_RANGE, "via", &NODE_IP.to_string()])?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        node.sysctl("net.ipv4.ip_forward=1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter=0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter=0")?;
        for (i, ip) in POD_IPS.iter().enumerate() {
            let pod = NetNs::create(&format!("pod{i}"))?;
            let dev = format!("p{i}");
            node.ip(&[
                "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ])?;
            node.ip(&["link", "set", &dev, "up"])?;
            node.sysctl(&format!("net.ipv4.conf.{dev}.proxy_arp=1"))?;
            node.ip(&["route", "add", &format!("{ip}/32"), "dev", &dev])?;
            pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&["route", "add", "default", "dev", "eth0"])?;
            topo.pods.push(pod);
        }
        Ok(topo)
    }

    /// Connection tracking entries of the node namespace (None: conntrack not loaded).
    fn node_conntrack(&self) -> Option<u64> {
        let command = self
            .node
            .command("cat", ["/proc/sys/net/netfilter/nf_conntrack_count"]);
        run_cleanup(command, Duration::from_secs(10))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Translators

/// kube-proxy's iptables mode for one NodePort, in the node namespace. The nat table the
/// iptables-nft front end creates there is deleted whole on drop (the namespace is the bench's),
/// so connection tracking is off again for the next path.
struct IptablesNodePort<'a> {
    node: &'a NetNs,
}

impl<'a> IptablesNodePort<'a> {
    fn install(node: &'a NetNs) -> Result<Self> {
        let guard = IptablesNodePort { node };
        let mut rules = String::from(
            "*nat\n:MESH-SERVICES - [0:0]\n:MESH-NODEPORTS - [0:0]\n:MESH-SVC-NP - [0:0]\n\
             -A PREROUTING -j MESH-SERVICES\n\
             -A MESH-SERVICES -m addrtype --dst-type LOCAL -j MESH-NODEPORTS\n",
        );
        let _ = writeln!(
            rules,
            "-A MESH-NODEPORTS -p tcp -m tcp --dport {IPTABLES_PORT} -j MESH-SVC-NP"
        );
        let pods = pod_addrs();
        for (i, pod) in pods.iter().enumerate() {
            if i + 1 < pods.len() {
                let _ = writeln!(
                    rules,
                    "-A MESH-SVC-NP -p tcp -m tcp -m statistic --mode nth --every {} --packet 0 -j DNAT --to-destination {pod}",
                    pods.len() - i
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A MESH-SVC-NP -p tcp -m tcp -j DNAT --to-destination {pod}"
                );
            }
        }
        rules.push_str("COMMIT\n");
        run_with_input(&mut node.command("iptables-restore", ["-w", "5"]), &rules)
            .context("installing the iptables NodePort rules in the node namespace")?;
        Ok(guard)
    }
}

impl Drop for IptablesNodePort<'_> {
    fn drop(&mut self) {
        let delete = self.node.command("nft", ["delete", "table", "ip", "nat"]);
        if let Err(e) = run_cleanup(delete, Duration::from_secs(10)) {
            eprintln!("bench: warning: removing the node's iptables nat table: {e:#}");
        }
    }
}

/// kube-proxy's nftables mode for one NodePort, in the node namespace; drop deletes the table.
struct NftNodePort<'a> {
    node: &'a NetNs,
}

impl<'a> NftNodePort<'a> {
    fn install(node: &'a NetNs) -> Result<Self> {
        let guard = NftNodePort { node };
        let pods = pod_addrs();
        let endpoints: Vec<String> = (0..pods.len())
            .map(|i| format!("{i} : goto ep-{i}"))
            .collect();
        let mut text = format!(
            "table ip {NFT_TABLE} {{\n\
             \tmap nodeports {{\n\t\ttype inet_proto . inet_service : verdict\n\
             \t\telements = {{ tcp . {NFT_PORT} : goto svc-np }}\n\t}}\n\
             \tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\tfib daddr type local meta l4proto . th dport vmap @nodeports\n\t}}\n\
             \tchain svc-np {{\n\t\tnumgen inc mod {} vmap {{ {} }}\n\t}}\n",
            pods.len(),
            endpoints.join(", ")
        );
        for (i, pod) in pods.iter().enumerate() {
            let _ = writeln!(
                text,
                "\tchain ep-{i} {{\n\t\tmeta l4proto tcp dnat to {pod}\n\t}}"
            );
        }
        text.push_str("}\n");
        run_with_input(&mut node.command("nft", ["-f", "-"]), &text)
            .context("installing the nftables NodePort table in the node namespace")?;
        Ok(guard)
    }
}

impl Drop for NftNodePort<'_> {
    fn drop(&mut self) {
        let delete = self
            .node
            .command("nft", ["delete", "table", "ip", NFT_TABLE]);
        if let Err(e) = run_cleanup(delete, Duration::from_secs(10)) {
            eprintln!("bench: warning: removing the node's nftables table: {e:#}");
        }
    }
}

/// A `mesh agent` inside the node namespace. Drop stops it (by pid), then `mesh cleanup`
/// detaches its cgroup programs, unpins its TC links and removes its pins.
struct NodeAgent {
    proc: Option<Proc>,
    mesh: PathBuf,
    bpffs: PathBuf,
    /// From the start to ready (see [`NodeAgent::start`]).
    ready_secs: f64,
}

impl NodeAgent {
    fn config() -> String {
        let mut text = String::from(
            "# Generated by `cargo xtask bench --nodeport`.\n\
             [agent.nodeport]\nenabled = true\ndevices = [\"eth0\"]\n\n\
             [[services]]\nname = \"np-bench\"\n",
        );
        let _ = writeln!(
            text,
            "vip = \"{NODE_IP}:{MESH_PORT}\"\nprotocol = \"tcp\"\nexternal = \"cluster\""
        );
        for pod in pod_addrs() {
            let _ = writeln!(text, "[[services.backends]]\naddr = \"{pod}\"");
        }
        text
    }

    fn start(bench: &Bench, cgroup: &Path, path: NpPath) -> Result<NodeAgent> {
        let started = Instant::now();
        let dir = &bench.scratch.0;
        let config = dir.join("np-agent.toml");
        std::fs::write(&config, Self::config())?;
        let bpffs = Path::new(BPFFS).join(scratch_name("np"));
        if bpffs.exists() {
            bail!("{} already exists", bpffs.display());
        }
        let mut command = bench.topo.node.command(&bench.mesh, ["agent", "--config"]);
        command
            .arg(&config)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(&bpffs)
            .args(["--metrics", AGENT_METRICS, "--admin-socket"])
            .arg(dir.join("np-agent.sock"))
            .arg("--state-dir")
            .arg(dir.join("np-agent.state"))
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LOG", "info");
        let mut agent = NodeAgent {
            proc: None,
            mesh: bench.mesh.clone(),
            bpffs,
            ready_secs: 0.0,
        };
        agent.proc = Some(Proc::spawn(
            "mesh agent (node netns)",
            command,
            &dir.join("np-agent.log"),
        )?);
        // Ready: /readyz (the first reconcile wrote the service) answers 200 in the node's
        // namespace and the TC links are pinned. Then, for `mesh` only, the NodePort must answer
        // from every pod. `direct+mesh` sends no NodePort traffic at all: a NodePort flow's reply
        // entry would take over a later direct connection from the same client port to the same
        // pod until it expires (a finding of this bench, see BENCHMARKS.md).
        let deadline = started + Duration::from_secs(60);
        let readyz = format!("http://{AGENT_METRICS}/readyz");
        loop {
            signal::check()?;
            if let Some(proc) = agent.proc.as_mut()
                && let Some(status) = proc.exited()
            {
                bail!(
                    "mesh agent exited ({status}):
{}",
                    proc.log_tail()
                );
            }
            let curl = bench
                .topo
                .node
                .command("curl", ["-sf", "-o", "/dev/null", "-m", "2", &readyz]);
            if run_captured(curl, Duration::from_secs(5)).is_ok()
                && agent.tc_programs().is_ok_and(|p| p.len() == 2)
            {
                break;
            }
            if Instant::now() >= deadline {
                let tail = agent.proc.as_ref().map(Proc::log_tail).unwrap_or_default();
                bail!("mesh agent not ready with 2 TC links after 60 s:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if path == NpPath::Mesh {
            loop {
                signal::check()?;
                match bench.connects(&NpPath::Mesh.targets(), 6) {
                    Ok(r)
                        if r.errors == 0
                            && r.per_backend.len() == POD_IPS.len()
                            && r.per_backend.iter().all(|&c| c > 0) =>
                    {
                        break;
                    }
                    other if Instant::now() >= deadline => {
                        bail!("the mesh NodePort does not answer from every pod: {other:?}");
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        agent.ready_secs = started.elapsed().as_secs_f64();
        Ok(agent)
    }

    /// (link pin name, program id) of the TC programs the agent attached.
    fn tc_programs(&self) -> Result<Vec<(String, u64)>> {
        let mut pins = Vec::new();
        let mut dirs = vec![self.bpffs.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    dirs.push(path);
                } else if entry.file_name().to_string_lossy().starts_with("tc-") {
                    pins.push(path);
                }
            }
        }
        pins.sort();
        let mut out = Vec::new();
        for pin in pins {
            let mut command = cmd("bpftool", ["-j", "link", "show", "pinned"]);
            command.arg(&pin);
            let text = run_captured(command, Duration::from_secs(10))?;
            let link: serde_json::Value = serde_json::from_str(text.trim())
                .with_context(|| format!("bpftool link show {}: {text:?}", pin.display()))?;
            let id = link["prog_id"]
                .as_u64()
                .with_context(|| format!("no prog_id for {}", pin.display()))?;
            let name = pin.file_name().unwrap_or_default().to_string_lossy();
            out.push((name.into_owned(), id));
        }
        if out.is_empty() {
            bail!("no pinned TC link under {}", self.bpffs.display());
        }
        Ok(out)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        drop(self.proc.take());
        super::mesh::remove_pins(&self.mesh, &self.bpffs);
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One TC program's share of a kernel-accounting measurement.
#[derive(Debug, Clone, Serialize)]
pub struct TcCost {
    pub program: String,
    pub runs: u64,
    pub ns: u64,
    pub ns_per_run: f64,
    /// Runs and ns per connection (the sequential-connections part only).
    pub runs_per_conn: Option<f64>,
    pub ns_per_conn: Option<f64>,
}

/// The TC programs' own time in one mesh slot (run-time statistics on only for this).
#[derive(Debug, Clone, Serialize)]
pub struct TcKernel {
    pub connects: ConnectsResult,
    pub connects_programs: Vec<TcCost>,
    pub bulk: BulkResult,
    pub bulk_programs: Vec<TcCost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NpRun {
    pub round: usize,
    pub position: usize,
    pub path: NpPath,
    /// Installing the path's rules, or starting the agent until its NodePort answered.
    pub setup_secs: f64,
    pub loadavg_1m: f64,
    /// Connection tracking entries in the node namespace before and after the connection-rate
    /// run. Entries of a netfilter path that ran earlier live on for their timeout (10 s after
    /// an RST), so `before` is not always 0; a path without netfilter never adds any.
    pub conntrack_before: Option<u64>,
    pub conntrack_after: Option<u64>,
    pub crr: CrrResult,
    pub bulk_1conn: Option<BulkResult>,
    pub bulk_4conn: Option<BulkResult>,
    pub tc_kernel: Option<TcKernel>,
}

#[derive(Serialize)]
struct Summary {
    path: NpPath,
    conns_per_sec: Option<Spread>,
    crr_p50_us: Option<Spread>,
    crr_p99_us: Option<Spread>,
    bulk_1conn_gbytes_per_sec: Option<Spread>,
    bulk_4conn_gbytes_per_sec: Option<Spread>,
    /// Per round, this path over `direct` of the same round.
    conns_per_sec_vs_direct: Option<Spread>,
    bulk_1conn_vs_direct: Option<Spread>,
    bulk_4conn_vs_direct: Option<Spread>,
    conntrack_before: Option<Spread>,
    conntrack_after: Option<Spread>,
}

#[derive(Serialize)]
struct Results<'a> {
    schema: u32,
    command: String,
    settings: &'a Settings,
    machine: &'a system::Machine,
    topology: &'static str,
    paths: Vec<(&'static str, &'static str)>,
    loadavg_1m_start: f64,
    loadavg_1m_end: f64,
    elapsed_secs: f64,
    summaries: Vec<Summary>,
    warnings: &'a [String],
    runs: &'a [NpRun],
    warmup_runs: &'a [NpRun],
}

struct Bench {
    settings: Settings,
    mesh: PathBuf,
    loadgen: PathBuf,
    scratch: ScratchDir,
    topo: Topology,
    warnings: Vec<String>,
}

impl Bench {
    fn client_loadgen<T: serde::de::DeserializeOwned>(
        &self,
        args: &[String],
        limit: Duration,
    ) -> Result<T> {
        let mut command = self.topo.client.command(&self.loadgen, args);
        command.env("RUST_BACKTRACE", "0");
        let out = run_captured(command, limit)?;
        serde_json::from_str(out.trim()).with_context(|| format!("parsing loadgen output {out:?}"))
    }

    fn with_targets(first: &str, targets: &[SocketAddr]) -> Vec<String> {
        let mut args = vec![first.to_owned()];
        for t in targets {
            args.extend(["--target".to_owned(), t.to_string()]);
        }
        args
    }

    fn connects(&self, targets: &[SocketAddr], count: u64) -> Result<ConnectsResult> {
        let mut args = Self::with_targets("connects", targets);
        args.extend(["--count".to_owned(), count.to_string()]);
        self.client_loadgen(&args, Duration::from_secs(330))
    }

    fn crr(&self, path: NpPath, secs: f64, warmup: f64) -> Result<CrrResult> {
        let mut args = Self::with_targets("crr", &path.targets());
        args.extend([
            "--threads".to_owned(),
            self.settings.threads.to_string(),
            "--duration".to_owned(),
            secs.to_string(),
            "--warmup".to_owned(),
            warmup.to_string(),
        ]);
        self.client_loadgen(&args, Duration::from_secs_f64(secs + warmup + 30.0))
    }

    fn bulk(&self, path: NpPath, conns: usize, bytes: u64) -> Result<BulkResult> {
        let mut args = Self::with_targets("bulk", &path.targets());
        args.extend([
            "--conns".to_owned(),
            conns.to_string(),
            "--bytes".to_owned(),
            bytes.to_string(),
        ]);
        self.client_loadgen(&args, Duration::from_secs(180))
    }

    fn warn(&mut self, message: String) {
        println!("bench: WARNING: {message}");
        self.warnings.push(message);
    }

    /// Installs the path, measures, removes what it installed.
    fn run_path(
        &mut self,
        path: NpPath,
        round: usize,
        position: usize,
        measured: bool,
        cgroup: &Path,
    ) -> Result<NpRun> {
        signal::check()?;
        let s = &self.settings;
        let (secs, warmup) = if measured {
            (s.crr_secs, s.crr_warmup)
        } else {
            (s.warmup_pass_secs, 0.2)
        };
        let started = Instant::now();
        let mut agent = None;
        let mut iptables = None;
        let mut nft = None;
        match path {
            NpPath::Direct => {}
            NpPath::Mesh | NpPath::DirectMesh => {
                agent = Some(NodeAgent::start(self, cgroup, path)?)
            }
            NpPath::Iptables => iptables = Some(IptablesNodePort::install(&self.topo.node)?),
            NpPath::Nftables => nft = Some(NftNodePort::install(&self.topo.node)?),
        }
        let setup_secs = agent
            .as_ref()
            .map_or_else(|| started.elapsed().as_secs_f64(), |a| a.ready_secs);
        let loadavg_1m = super::dataplane::loadavg_1m();
        let conntrack_before = self.topo.node_conntrack();
        let crr = self.crr(path, secs, warmup)?;
        let conntrack_after = self.topo.node_conntrack();
        let (bulk_1conn, bulk_4conn) = if measured {
            let bytes = self.settings.bulk_bytes;
            (
                Some(self.bulk(path, 1, bytes)?),
                Some(self.bulk(path, 4, bytes)?),
            )
        } else {
            (None, None)
        };
        let tc_kernel = match (&agent, measured) {
            (Some(agent), true) => Some(self.tc_kernel(agent, path)?),
            _ => None,
        };
        drop(agent);
        drop(iptables);
        drop(nft);
        let run = NpRun {
            round,
            position,
            path,
            setup_secs,
            loadavg_1m,
            conntrack_before,
            conntrack_after,
            crr,
            bulk_1conn,
            bulk_4conn,
            tc_kernel,
        };
        self.check_run(&run);
        Ok(run)
    }

    /// The TC programs' time from the kernel's accounting: sequential connections (an exact
    /// count), then one bulk upload, both the way `path` goes.
    fn tc_kernel(&self, agent: &NodeAgent, path: NpPath) -> Result<TcKernel> {
        let programs = agent.tc_programs()?;
        let ids: Vec<u64> = programs.iter().map(|p| p.1).collect();
        let costs = |before: &[(u64, u64)], after: &[(u64, u64)], conns: Option<u64>| {
            programs
                .iter()
                .zip(before.iter().zip(after))
                .map(|((name, _), ((t0, n0), (t1, n1)))| {
                    let ns = t1.saturating_sub(*t0);
                    let runs = n1.saturating_sub(*n0);
                    let per_conn = |x: u64| conns.map(|c| x as f64 / c.max(1) as f64);
                    TcCost {
                        program: name.clone(),
                        runs,
                        ns,
                        ns_per_run: if runs > 0 {
                            ns as f64 / runs as f64
                        } else {
                            0.0
                        },
                        runs_per_conn: per_conn(runs),
                        ns_per_conn: per_conn(ns),
                    }
                })
                .collect::<Vec<_>>()
        };
        let _stats = StatsOn::enable()?;
        let count = self.settings.kernel_connects.min(10_000);
        let before = stats(&ids)?;
        let connects = self.connects(&path.targets(), count)?;
        let after = stats(&ids)?;
        let connects_programs = costs(&before, &after, Some(connects.conns));
        let before = stats(&ids)?;
        let bulk = self.bulk(path, 1, self.settings.bulk_bytes / 4)?;
        let after = stats(&ids)?;
        let bulk_programs = costs(&before, &after, None);
        Ok(TcKernel {
            connects,
            connects_programs,
            bulk,
            bulk_programs,
        })
    }

    /// Sanity: no failed connections, every pod used about equally, connection tracking only
    /// where netfilter translates.
    fn check_run(&mut self, run: &NpRun) {
        let name = run.path.name();
        if run.crr.errors > 0 {
            self.warn(format!(
                "{name}: {} failed connections in the window",
                run.crr.errors
            ));
        }
        let counts: Vec<u64> = (0..POD_IPS.len())
            .map(|i| run.crr.per_backend.get(i).copied().unwrap_or(0))
            .collect();
        let min = counts.iter().copied().min().unwrap_or(0) as f64;
        let max = counts.iter().copied().max().unwrap_or(0) as f64;
        if min < max * 0.8 {
            self.warn(format!("{name}: uneven split over the pods: {counts:?}"));
        }
        let tracked = matches!(run.path, NpPath::Iptables | NpPath::Nftables);
        // Tracked: thousands of entries right after a run at thousands of connections per
        // second (the count saturates below the run's connections: a reused client port
        // replaces its closed entry). Not tracked: no entry added.
        let (before, after) = (
            run.conntrack_before.unwrap_or(0),
            run.conntrack_after.unwrap_or(0),
        );
        let looks_tracked = if tracked {
            after >= 1_000
        } else {
            after > before
        };
        if looks_tracked != tracked {
            self.warn(format!(
                "{name}: node conntrack entries {before} -> {after} (expected {})",
                if tracked {
                    "thousands after"
                } else {
                    "no growth"
                }
            ));
        }
        if let Some(k) = &run.tc_kernel
            && k.connects.errors > 0
        {
            self.warn(format!(
                "{name}: {} failed sequential connects",
                k.connects.errors
            ));
        }
    }

    fn rounds(&mut self, cgroup: &Path) -> Result<(Vec<NpRun>, Vec<NpRun>)> {
        println!(
            "\n==> bench: NodePort warm-up pass ({} paths, {:.1} s each, not counted)",
            PATHS.len(),
            self.settings.warmup_pass_secs
        );
        let mut warmups = Vec::new();
        for (i, &path) in PATHS.iter().enumerate() {
            match self.run_path(path, 0, i, false, cgroup) {
                Ok(run) => {
                    print_run(&run);
                    warmups.push(run);
                }
                Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                Err(e) => self.warn(format!("warm-up: {} failed: {e:#}", path.name())),
            }
        }
        let rounds = self.settings.rounds;
        let mut runs = Vec::new();
        for round in 0..rounds {
            let order = order(round);
            println!(
                "\n==> bench: NodePort round {}/{rounds} (order: {})",
                round + 1,
                order
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (position, &path) in order.iter().enumerate() {
                match self.run_path(path, round, position, true, cgroup) {
                    Ok(run) => {
                        print_run(&run);
                        runs.push(run);
                    }
                    Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                    // One failed path must not lose the whole run: reported and skipped.
                    Err(e) => self.warn(format!(
                        "round {}: {} skipped: {e:#}",
                        round + 1,
                        path.name()
                    )),
                }
            }
        }
        Ok((warmups, runs))
    }
}

/// Round `r` starts at path `r mod 4`; the others follow forwards in even rounds and
/// backwards in odd ones, so no path always runs first or after the same neighbour.
fn order(round: usize) -> Vec<NpPath> {
    let n = PATHS.len();
    let first = round % n;
    let mut rest: Vec<NpPath> = (1..n).map(|i| PATHS[(first + i) % n]).collect();
    if round % 2 == 1 {
        rest.reverse();
    }
    std::iter::once(PATHS[first]).chain(rest).collect()
}

fn print_run(run: &NpRun) {
    let mut line = format!(
        "  {:<11} {:>6.0} conn/s  p50 {:>4.0} us  p99 {:>5.0} us  setup {:.2} s  conntrack {} -> {}",
        run.path.name(),
        run.crr.conns_per_sec,
        run.crr.latency_us.p50,
        run.crr.latency_us.p99,
        run.setup_secs,
        run.conntrack_before
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        run.conntrack_after
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
    );
    if let (Some(b1), Some(b4)) = (&run.bulk_1conn, &run.bulk_4conn) {
        let _ = write!(
            line,
            "  bulk {:.2}/{:.2} GB/s",
            b1.gbytes_per_sec, b4.gbytes_per_sec
        );
    }
    println!("{line}");
    if let Some(k) = &run.tc_kernel {
        for p in &k.connects_programs {
            println!(
                "    {:<22} {:>5.1} ns/run  {:.2} runs/conn  {:>6.0} ns/conn  (bulk: {:.1} ns/run)",
                p.program,
                p.ns_per_run,
                p.runs_per_conn.unwrap_or(0.0),
                p.ns_per_conn.unwrap_or(0.0),
                k.bulk_programs
                    .iter()
                    .find(|b| b.program == p.program)
                    .map_or(0.0, |b| b.ns_per_run)
            );
        }
    }
}

fn metric_of(runs: &[NpRun], path: NpPath, get: fn(&NpRun) -> Option<f64>) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.path == path)
        .filter_map(get)
        .collect()
}

/// Per round, `path` over `direct` of the same round.
fn ratio_of(runs: &[NpRun], path: NpPath, get: fn(&NpRun) -> Option<f64>) -> Option<Spread> {
    let ratios: Vec<f64> = runs
        .iter()
        .filter(|r| r.path == path)
        .filter_map(|r| {
            let direct = runs
                .iter()
                .find(|d| d.path == NpPath::Direct && d.round == r.round)?;
            Some(get(r)? / get(direct)?)
        })
        .collect();
    spread(&ratios)
}

const RATE: fn(&NpRun) -> Option<f64> = |r| Some(r.crr.conns_per_sec);
const BULK1: fn(&NpRun) -> Option<f64> = |r| r.bulk_1conn.as_ref().map(|b| b.gbytes_per_sec);
const BULK4: fn(&NpRun) -> Option<f64> = |r| r.bulk_4conn.as_ref().map(|b| b.gbytes_per_sec);

fn summarize(runs: &[NpRun]) -> Vec<Summary> {
    PATHS
        .iter()
        .map(|&path| Summary {
            path,
            conns_per_sec: spread(&metric_of(runs, path, RATE)),
            crr_p50_us: spread(&metric_of(runs, path, |r| Some(r.crr.latency_us.p50))),
            crr_p99_us: spread(&metric_of(runs, path, |r| Some(r.crr.latency_us.p99))),
            bulk_1conn_gbytes_per_sec: spread(&metric_of(runs, path, BULK1)),
            bulk_4conn_gbytes_per_sec: spread(&metric_of(runs, path, BULK4)),
            conns_per_sec_vs_direct: ratio_of(runs, path, RATE),
            bulk_1conn_vs_direct: ratio_of(runs, path, BULK1),
            bulk_4conn_vs_direct: ratio_of(runs, path, BULK4),
            conntrack_before: spread(&metric_of(runs, path, |r| Some(r.conntrack_before? as f64))),
            conntrack_after: spread(&metric_of(runs, path, |r| Some(r.conntrack_after? as f64))),
        })
        .collect()
}

fn gb_cell(s: Option<&Spread>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| {
            if s.n > 1 {
                format!("{:.2} [{:.2}-{:.2}]", s.median, s.min, s.max)
            } else {
                format!("{:.2}", s.median)
            }
        },
    )
}

/// The TC programs' kernel accounting of `path`'s runs, medians over the rounds.
fn tc_markdown(md: &mut String, runs: &[NpRun], path: NpPath) {
    let kernel: Vec<&TcKernel> = runs
        .iter()
        .filter(|r| r.path == path)
        .filter_map(|r| r.tc_kernel.as_ref())
        .collect();
    let Some(first) = kernel.first() else {
        return;
    };
    let _ = write!(
        md,
        "\n{}: mesh's TC programs, kernel accounting (median of {} runs; {} sequential \
         connections, then a {} MB upload over 1 connection):\n\n\
         | program | runs per connection | ns per run | ns per connection | ns per run, bulk | bytes per run, bulk |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
        path.name(),
        kernel.len(),
        first.connects.conns + first.connects.errors,
        first.bulk.bytes / 1_000_000
    );
    for p in &first.connects_programs {
        let of = |f: &dyn Fn(&TcKernel) -> Option<f64>, digits: usize| {
            spread(&kernel.iter().filter_map(|k| f(k)).collect::<Vec<_>>())
                .map_or("-".to_owned(), |s| format!("{:.digits$}", s.median))
        };
        let find = |list: &[TcCost]| list.iter().find(|c| c.program == p.program).cloned();
        let runs = of(&|k| find(&k.connects_programs)?.runs_per_conn, 2);
        let per_run = of(&|k| Some(find(&k.connects_programs)?.ns_per_run), 0);
        let per_conn = of(&|k| find(&k.connects_programs)?.ns_per_conn, 0);
        let bulk = of(&|k| Some(find(&k.bulk_programs)?.ns_per_run), 0);
        let bytes = of(
            &|k| {
                let runs = find(&k.bulk_programs)?.runs;
                (runs > 0).then(|| k.bulk.bytes as f64 / runs as f64)
            },
            0,
        );
        let _ = writeln!(
            md,
            "| {} | {runs} | {per_run} | {per_conn} | {bulk} | {bytes} |",
            p.program
        );
    }
}

fn markdown(summaries: &[Summary], runs: &[NpRun], rounds: usize) -> String {
    let mut md = format!(
        "### NodePort from another host (median [min-max] of {rounds} rounds; ratios per round against direct)\n\n\
         | path | conn/s | vs direct | CRR p50 / p99 µs | bulk 1 conn GB/s | vs direct | bulk 4 conns GB/s | vs direct |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for s in summaries {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} / {} | {} | {} | {} | {} |",
            s.path.name(),
            rate_cell(s.conns_per_sec.as_ref()),
            ratio_cell(s.conns_per_sec_vs_direct.as_ref()),
            s.crr_p50_us
                .map_or("-".into(), |v| format!("{:.0}", v.median)),
            s.crr_p99_us
                .map_or("-".into(), |v| format!("{:.0}", v.median)),
            gb_cell(s.bulk_1conn_gbytes_per_sec.as_ref()),
            ratio_cell(s.bulk_1conn_vs_direct.as_ref()),
            gb_cell(s.bulk_4conn_gbytes_per_sec.as_ref()),
            ratio_cell(s.bulk_4conn_vs_direct.as_ref()),
        );
    }
    let netfilter = |r: &&NpRun| matches!(r.path, NpPath::Iptables | NpPath::Nftables);
    let (nf, other): (Vec<&NpRun>, Vec<&NpRun>) = runs.iter().partition(netfilter);
    let _ = writeln!(
        md,
        "\nConnection tracking in the node namespace (entries after the connection-rate run): \
         thousands in {}/{} iptables and nftables runs; grew in {}/{} runs of the other paths.",
        nf.iter()
            .filter(|r| r.conntrack_after.unwrap_or(0) >= 1_000)
            .count(),
        nf.len(),
        other
            .iter()
            .filter(|r| r.conntrack_after.unwrap_or(0) > r.conntrack_before.unwrap_or(0))
            .count(),
        other.len(),
    );
    for path in [NpPath::Mesh, NpPath::DirectMesh] {
        tc_markdown(&mut md, runs, path);
    }
    md
}

/// `cargo xtask bench --nodeport`.
pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let settings = Settings::of_run(quick);
    setup::run()?;
    let (mesh, loadgen) = build_binaries()?;
    signal::check()?;
    println!("\n==> bench: NodePort: preparing the namespaces");
    system::clean_leftovers(&mesh)?;
    remove_leftover_netns()?;
    let machine = system::machine(&mesh);
    let loadavg_start = super::dataplane::loadavg_1m();
    if loadavg_start > 1.0 {
        println!(
            "bench: note: 1-minute load average is {loadavg_start:.2} before the bench: other work \
             on this machine will show up as noise"
        );
    }
    let scratch = ScratchDir(std::env::temp_dir().join(scratch_name("np")));
    std::fs::create_dir_all(&scratch.0)?;
    let topo = Topology::build()?;
    let mut bench = Bench {
        settings,
        mesh,
        loadgen,
        scratch,
        topo,
        warnings: Vec::new(),
    };
    let servers = bench
        .topo
        .pods
        .iter()
        .zip(pod_addrs())
        .enumerate()
        .map(|(i, (pod, addr))| {
            let mut command = pod.command(&bench.loadgen, ["serve", "--id"]);
            command
                .arg(i.to_string())
                .arg("--addr")
                .arg(addr.to_string());
            Proc::spawn(
                &format!("pod backend {i} ({addr})"),
                command,
                &bench.scratch.0.join(format!("pod-{i}.log")),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    // The direct path works before anything is measured (bounded wait for the listeners).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        signal::check()?;
        match bench.connects(&pod_addrs(), 3) {
            Ok(r) if r.errors == 0 && r.per_backend == [1, 1, 1] => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => bail!("the pods do not answer the client directly: {other:?}"),
        }
    }
    // The agent's socket programs go on this empty cgroup: only TC matters here.
    let cgroup = Cgroup::create(&scratch_name("np"))?;
    let result = bench.rounds(cgroup.path());
    drop(cgroup);
    drop(servers);
    let (warmups, runs) = result?;

    println!("\n==> bench: NodePort report");
    let summaries = summarize(&runs);
    let md = markdown(&summaries, &runs, bench.settings.rounds);
    println!("\n{md}");
    for w in &bench.warnings {
        println!("warning: {w}");
    }
    let results = Results {
        schema: 1,
        command: format!(
            "cargo xtask bench --nodeport{}",
            if quick { " --quick" } else { "" }
        ),
        settings: &bench.settings,
        machine: &machine,
        topology: "client netns 10.78.0.1/24 -- veth -- node netns 10.78.0.2/24 (ip_forward) -- \
                   veth p0..p2 (proxy ARP) -- pod netns 10.245.1.2-4/32, loadgen serve :8080",
        paths: PATHS.iter().map(|p| (p.name(), p.description())).collect(),
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: super::dataplane::loadavg_1m(),
        elapsed_secs: started.elapsed().as_secs_f64(),
        summaries,
        warnings: &bench.warnings,
        runs: &runs,
        warmup_runs: &warmups,
    };
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let json = out_dir.join("nodeport.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(out_dir.join("nodeport.md"), &md)?;
    println!(
        "bench: wrote {} and nodeport.md in {:.0} s",
        json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_runs_every_path_once_and_starts_elsewhere() {
        // The full run's 5 rounds: each path runs first once.
        let firsts: Vec<NpPath> = (0..Settings::full().rounds)
            .map(|round| {
                let o = order(round);
                for p in PATHS {
                    assert_eq!(o.iter().filter(|&&q| q == p).count(), 1, "{o:?}");
                }
                o[0]
            })
            .collect();
        for p in PATHS {
            assert!(firsts.contains(&p), "first paths: {firsts:?}");
        }
    }

    #[test]
    fn agent_config_names_the_node_port_and_every_pod() {
        let text = NodeAgent::config();
        assert!(text.contains("vip = \"10.78.0.2:30080\""), "{text}");
        assert!(text.contains("external = \"cluster\""));
        assert_eq!(text.matches("[[services.backends]]").count(), POD_IPS.len());
    }
}
