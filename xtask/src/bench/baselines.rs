//! The baselines mesh is compared with: iptables DNAT (kube-proxy's iptables mode), nftables
//! DNAT (kube-proxy's nftables mode) and HAProxy (mode tcp).
//!
//! Safety: the bench only ever touches its own chains (`MESH-BENCH*` in the nat table) and its
//! own nftables table (`ip mesh_bench`), reached only by traffic to 127.101.0.0/16, and removes
//! them in `Drop` (also on errors and after Ctrl-C). One more thing: iptables-nft creates the
//! `ip nat` table (with hooked base chains) when the first rule goes in. A hooked nat chain
//! turns on connection tracking for all traffic, which would slow every later path. So if
//! `ip nat` did not exist when the bench started and is empty after the bench's rules are
//! gone, the bench deletes it again, leaving the machine as it found it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::mesh::nth_ip;
use super::procs::Proc;
use super::system::{self, run_quiet, run_with_input};
use crate::util::cmd;

/// Traffic to this range (and only this) is sent through the bench's netfilter rules.
pub const BENCH_RANGE: &str = "127.101.0.0/16";
pub const IPTABLES_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 101, 2, 1), 80);
pub const NFT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 101, 3, 1), 80);
const CHAIN: &str = "MESH-BENCH";
const SVC_CHAIN: &str = "MESH-BENCH-SVC";
const NFT_TABLE: &str = "mesh_bench";

/// VIPs of the "other services" of the netfilter paths: 127.101.16.1 upwards, inside the bench
/// range, so even the rules that never match name only bench addresses.
fn other_vip(i: usize) -> Ipv4Addr {
    nth_ip(Ipv4Addr::new(127, 101, 16, 1), i)
}

fn iptables(args: &[&str]) -> std::process::Command {
    let mut c = cmd("iptables", ["-w", "5", "-t", "nat"]);
    c.args(args);
    c
}

fn ip_nat_exists() -> bool {
    run_quiet(&mut cmd("nft", ["list", "table", "ip", "nat"])).is_ok()
}

/// What the machine had before the bench touched netfilter.
#[derive(Debug, Clone, Copy)]
pub struct NatBefore {
    ip_nat_existed: bool,
}

/// Records the state and removes leftovers of an interrupted bench (only its own names).
pub fn prepare_netfilter() -> Result<NatBefore> {
    remove_iptables_rules();
    remove_nft_table();
    let before = NatBefore {
        ip_nat_existed: ip_nat_exists(),
    };
    if before.ip_nat_existed {
        println!(
            "bench: note: the nftables table `ip nat` exists already, so connection tracking may \
             be on for every path"
        );
    }
    Ok(before)
}

fn remove_iptables_rules() {
    // The jump may have been added more than once by an interrupted run; bounded.
    for _ in 0..10 {
        let jump = ["-D", "OUTPUT", "-d", BENCH_RANGE, "-j", CHAIN];
        if run_quiet(&mut iptables(&jump)).is_err() {
            break;
        }
    }
    for chain in [CHAIN, SVC_CHAIN] {
        let _ = run_quiet(&mut iptables(&["-F", chain]));
    }
    for chain in [CHAIN, SVC_CHAIN] {
        let _ = run_quiet(&mut iptables(&["-X", chain]));
    }
}

fn remove_nft_table() {
    let _ = run_quiet(&mut cmd("nft", ["delete", "table", "ip", NFT_TABLE]));
}

/// Deletes `ip nat` if the bench created it and it holds nothing but empty base chains.
fn restore_ip_nat(before: NatBefore) {
    if before.ip_nat_existed || !ip_nat_exists() {
        return;
    }
    let rules = run_quiet(&mut iptables(&["-S"])).unwrap_or_default();
    if rules.lines().all(|l| l.starts_with("-P ")) {
        if let Err(e) = run_quiet(&mut cmd("nft", ["delete", "table", "ip", "nat"])) {
            eprintln!("bench: warning: {e:#}");
        }
    } else {
        eprintln!("bench: warning: `ip nat` has rules the bench did not add; left in place");
    }
}

/// kube-proxy's iptables mode for one ClusterIP: a rule per service in a services chain (the
/// `others` first, as in KUBE-SERVICES), and a per-service chain picking a backend with
/// `statistic --mode nth` (round-robin) and DNAT.
pub struct IptablesDnat {
    before: NatBefore,
}

impl IptablesDnat {
    pub fn install(before: NatBefore, others: usize, backends: &[SocketAddr]) -> Result<Self> {
        let mut rules = String::with_capacity(others * 110 + 1024);
        let _ = writeln!(rules, "*nat\n:{CHAIN} - [0:0]\n:{SVC_CHAIN} - [0:0]");
        for i in 0..others {
            let _ = writeln!(
                rules,
                "-A {CHAIN} -d {}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {}",
                other_vip(i),
                backends[i % backends.len()]
            );
        }
        let _ = writeln!(
            rules,
            "-A {CHAIN} -d {}/32 -p tcp -m tcp --dport {} -j {SVC_CHAIN}",
            IPTABLES_VIP.ip(),
            IPTABLES_VIP.port()
        );
        let n = backends.len();
        for (i, b) in backends.iter().enumerate() {
            if i + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {SVC_CHAIN} -p tcp -m statistic --mode nth --every {} --packet 0 -j DNAT --to-destination {b}",
                    n - i
                );
            } else {
                let _ = writeln!(rules, "-A {SVC_CHAIN} -p tcp -j DNAT --to-destination {b}");
            }
        }
        let _ = writeln!(rules, "-A OUTPUT -d {BENCH_RANGE} -j {CHAIN}\nCOMMIT");
        let guard = IptablesDnat { before };
        run_with_input(
            &mut cmd("iptables-restore", ["-w", "5", "--noflush"]),
            &rules,
        )
        .context("installing the iptables DNAT rules")?;
        Ok(guard)
    }
}

impl Drop for IptablesDnat {
    fn drop(&mut self) {
        remove_iptables_rules();
        restore_ip_nat(self.before);
    }
}

/// kube-proxy's nftables mode: a verdict map `daddr . proto . dport -> goto service chain`
/// (one element per service, so the lookup does not grow with services), and in the service
/// chain `numgen inc mod N` (round-robin; kube-proxy uses `random`) picking an endpoint chain
/// that DNATs.
pub struct NftDnat;

impl NftDnat {
    pub fn install(others: usize, backends: &[SocketAddr]) -> Result<Self> {
        let mut text = String::with_capacity(others * 50 + 2048);
        let _ = writeln!(
            text,
            "table ip {NFT_TABLE} {{\n\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict"
        );
        let _ = write!(
            text,
            "\t\telements = {{ {} . tcp . {} : goto svc-bench",
            NFT_VIP.ip(),
            NFT_VIP.port()
        );
        for i in 0..others {
            let _ = write!(
                text,
                ",\n\t\t\t{} . tcp . 80 : goto svc-other",
                other_vip(i)
            );
        }
        let _ = writeln!(text, " }}\n\t}}");
        let _ = writeln!(
            text,
            "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tip daddr {BENCH_RANGE} ip daddr . meta l4proto . th dport vmap @service-ips\n\t}}"
        );
        let endpoints: Vec<String> = (0..backends.len())
            .map(|i| format!("{i} : goto ep-{i}"))
            .collect();
        let _ = writeln!(
            text,
            "\tchain svc-bench {{\n\t\tnumgen inc mod {} vmap {{ {} }}\n\t}}",
            backends.len(),
            endpoints.join(", ")
        );
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(
                text,
                "\tchain ep-{i} {{\n\t\tmeta l4proto tcp dnat to {b}\n\t}}"
            );
        }
        let _ = writeln!(
            text,
            "\tchain svc-other {{\n\t\tmeta l4proto tcp dnat to {}\n\t}}\n}}",
            backends[0]
        );
        let guard = NftDnat;
        run_with_input(&mut cmd("nft", ["-f", "-"]), &text)
            .context("installing the nftables DNAT table")?;
        Ok(guard)
    }
}

impl Drop for NftDnat {
    fn drop(&mut self) {
        remove_nft_table();
    }
}

/// HAProxy in mode tcp, round-robin over the backends, on 127.0.0.1 with a temporary config.
pub struct Haproxy {
    _proc: Proc,
}

impl Haproxy {
    pub fn start(dir: &Path, bind: SocketAddr, backends: &[SocketAddr]) -> Result<Self> {
        system::require_free(bind)?;
        let mut cfg = String::new();
        // maxconn stays under the fd limit here (20000); 8 clients need far fewer. nolinger
        // on the server side only: its connections close with RST as the client's do, so no
        // TIME_WAIT piles up on HAProxy's ports; the client side keeps graceful closes.
        let _ = writeln!(
            cfg,
            "global\n    maxconn 8000\n    nbthread 2\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             frontend bench\n    bind {bind}\n    default_backend backends\n\
             backend backends\n    balance roundrobin\n    option nolinger"
        );
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(cfg, "    server b{i} {b}");
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let mut check = cmd("haproxy", ["-c", "-f"]);
        check.arg(&path);
        run_quiet(&mut check).context("haproxy rejected the bench config")?;
        let mut command = cmd("haproxy", ["-db", "-f"]);
        command.arg(&path);
        let mut proc = Proc::spawn("haproxy", command, &dir.join("haproxy.log"))?;
        if let Err(e) = system::wait_listening(bind, Duration::from_secs(10)) {
            if let Some(status) = proc.exited() {
                bail!("haproxy exited ({status}):\n{}", proc.log_tail());
            }
            return Err(e);
        }
        Ok(Haproxy { _proc: proc })
    }
}

/// For the report: the VIP of a netfilter path as a socket address.
pub fn vip(addr: SocketAddrV4) -> SocketAddr {
    SocketAddr::V4(addr)
}
