//! BPF time per connection, from the kernel's own accounting: with run-time statistics on
//! (`BPF_ENABLE_STATS`, the same counters as `sysctl kernel.bpf_stats_enabled=1`), every
//! program's `run_time_ns` and `run_cnt` (`bpftool prog show`) grow by exactly what its runs
//! cost. Wall-clock figures on this machine are noisy (steal time); these are not.
//!
//! Cases, each an exact number of sequential `loadgen connects` transactions (connect, 1 byte
//! each way, close with RST) from a client in the case's cgroup, rounds interleaved:
//! - `mesh VIP`: mesh's cgroup, to the bench VIP (every program mesh attaches counts: the
//!   connect4 rewrite, sock_release with its outcome read, ...);
//! - `mesh non-VIP`: mesh's cgroup, to a backend's own address (what every other connection on
//!   a node pays for mesh being attached);
//! - `mesh VIP, original_dst`: a second agent with `[agent] original_dst = true`, whose TCP
//!   translations go to socket storage (allocated per connect) instead of `tcp_peers`;
//! - `minimal VIP` / `minimal non-VIP`: a cgroup with only `mesh-bench-connect4` attached
//!   (mesh-ebpf/src/bin/bench-connect4.rs: VIP hash lookup + round-robin rewrite, nothing else);
//! - `empty connect4 + release`: a cgroup with `mesh-bench-empty`'s two programs that do
//!   nothing (mesh-ebpf/src/bin/bench-empty.rs), to a backend's own address: the floor of any
//!   design that, like mesh, needs both hooks per TCP connection.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::procs::{run_captured, run_cleanup};
use super::proto::ConnectsResult;
use super::system::{BPFFS, Cgroup, scratch_name};
use crate::util::{cmd, target_dir};

/// The minimal program's VIP (in the bench's 127.101/16, apart from mesh's).
pub const MINIMAL_VIP: SocketAddrV4 =
    SocketAddrV4::new(std::net::Ipv4Addr::new(127, 101, 2, 1), 80);

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics stay on while this is alive (the kernel counts only while some such
/// file descriptor, or the sysctl, is open/on).
pub(super) struct StatsOn(libc::c_int);

impl StatsOn {
    pub(super) fn enable() -> Result<StatsOn> {
        let attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: bpf(BPF_ENABLE_STATS) reads a 4-byte attr that we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &raw const attr,
                size_of::<u32>(),
            )
        };
        if fd < 0 {
            bail!(
                "bpf(BPF_ENABLE_STATS) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(StatsOn(fd as libc::c_int))
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// One program attached to a case's cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct Program {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
}

/// What one program cost in one case, per connection.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramCost {
    pub name: String,
    pub attach_type: String,
    pub runs_per_conn: f64,
    pub ns_per_conn: f64,
    pub ns_per_run: f64,
}

/// One case in one round.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRun {
    pub case: &'static str,
    pub round: usize,
    pub conns: u64,
    pub errors: u64,
    pub per_backend: Vec<u64>,
    /// Sum over the case's programs.
    pub ns_per_conn: f64,
    pub programs: Vec<ProgramCost>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelCostResults {
    pub connects_per_run: u64,
    pub runs: Vec<CaseRun>,
    pub warnings: Vec<String>,
}

impl KernelCostResults {
    /// Median of `case`'s per-connection totals over the rounds.
    pub fn median_ns(&self, case: &str) -> Option<f64> {
        median(
            self.runs
                .iter()
                .filter(|r| r.case == case)
                .map(|r| r.ns_per_conn),
        )
    }

    /// Median of one program's ns per connection in `case`.
    pub fn median_program_ns(&self, case: &str, attach_type: &str) -> Option<(f64, f64, f64)> {
        let of = |f: fn(&ProgramCost) -> f64| {
            median(
                self.runs
                    .iter()
                    .filter(|r| r.case == case)
                    .flat_map(|r| r.programs.iter().filter(|p| p.attach_type == attach_type))
                    .map(f),
            )
        };
        Some((
            of(|p| p.ns_per_conn)?,
            of(|p| p.runs_per_conn)?,
            of(|p| p.ns_per_run)?,
        ))
    }

    /// The attach types seen in `case`, in first-seen order.
    pub fn attach_types(&self, case: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in self
            .runs
            .iter()
            .filter(|r| r.case == case)
            .flat_map(|r| &r.programs)
        {
            if !out.contains(&p.attach_type) {
                out.push(p.attach_type.clone());
            }
        }
        out
    }
}

/// How much of mesh's VIP connect is the two hooks' floor (the empty programs) and how much is
/// mesh's own work.
fn above_floor(results: &KernelCostResults) -> Option<String> {
    let mesh = results.median_ns(CASES[0])?;
    let minimal = results.median_ns(CASES[1])?;
    let floor = results.median_ns(CASES[5])?;
    Some(format!(
        "Floor: running an empty connect4 and an empty sock_release costs {floor:.0} ns per \
         connection ({:.2}x the minimal connect4); mesh's own work on a VIP connect is the other \
         {:.0} ns ({:.2}x the minimal).",
        floor / minimal,
        mesh - floor,
        (mesh - floor) / minimal
    ))
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub const CASES: [&str; 6] = [
    "mesh VIP",
    "minimal VIP",
    "mesh non-VIP",
    "minimal non-VIP",
    "mesh VIP, original_dst",
    "empty connect4 + release",
];

/// A baseline's programs, loaded and pinned with bpftool and attached to a cgroup of their
/// own; drop detaches them and removes their pins.
pub struct Baseline {
    cgroup: Cgroup,
    pins: PathBuf,
    /// (attach type, pinned program), in attach order.
    attached: Vec<(&'static str, PathBuf)>,
}

impl Baseline {
    fn create(name: &str) -> Result<Baseline> {
        let cgroup = Cgroup::create(&scratch_name(name))?;
        let pins = Path::new(BPFFS).join(scratch_name(name));
        std::fs::create_dir(&pins).with_context(|| format!("creating {}", pins.display()))?;
        Ok(Baseline {
            cgroup,
            pins,
            attached: Vec::new(),
        })
    }

    fn attach(&mut self, attach_type: &'static str, prog: PathBuf) -> Result<()> {
        let mut command = cmd("bpftool", ["cgroup", "attach"]);
        command
            .arg(self.cgroup.path())
            .arg(attach_type)
            .arg("pinned")
            .arg(&prog);
        run_captured(command, Duration::from_secs(30))?;
        self.attached.push((attach_type, prog));
        Ok(())
    }

    /// The minimal connect4 (`mesh-bench-connect4`), with `MINIMAL_VIP` balanced over
    /// `backends`.
    pub fn minimal_connect4(backends: &[SocketAddr]) -> Result<Baseline> {
        let object = object_path("mesh-bench-connect4")?;
        let mut minimal = Baseline::create("minimal")?;
        let prog = minimal.pins.join("prog");
        let maps = minimal.pins.join("maps");
        bpftool([
            "prog".as_ref(),
            "load".as_ref(),
            object.as_os_str(),
            prog.as_os_str(),
            "type".as_ref(),
            "cgroup/connect4".as_ref(),
            "pinmaps".as_ref(),
            maps.as_os_str(),
        ])?;
        let vips = maps.join("VIPS");
        let backend_map = maps.join("BACKENDS");
        let mut key = sock_addr_bytes(MINIMAL_VIP);
        let mut value = vec![0u8; 8]; // next
        value.extend(0u32.to_ne_bytes()); // first
        value.extend((backends.len() as u32).to_ne_bytes()); // count
        map_update(&vips, &key, &value)?;
        for (i, backend) in backends.iter().enumerate() {
            let SocketAddr::V4(backend) = backend else {
                bail!("the minimal connect4 takes IPv4 backends, got {backend}");
            };
            key = (i as u32).to_ne_bytes().to_vec();
            map_update(&backend_map, &key, &sock_addr_bytes(*backend))?;
        }
        minimal.attach("connect4", prog)?;
        Ok(minimal)
    }

    /// The two programs that do nothing (`mesh-bench-empty`): connect4 and sock_release.
    pub fn empty_hooks() -> Result<Baseline> {
        let object = object_path("mesh-bench-empty")?;
        let mut empty = Baseline::create("empty")?;
        // `loadall` pins each program under the directory by its function name; the section
        // names give the types.
        let progs = empty.pins.join("progs");
        bpftool([
            "prog".as_ref(),
            "loadall".as_ref(),
            object.as_os_str(),
            progs.as_os_str(),
        ])?;
        empty.attach("connect4", progs.join("bench_empty_connect4"))?;
        empty.attach("sock_release", progs.join("bench_empty_release"))?;
        Ok(empty)
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        for (attach_type, prog) in self.attached.iter().rev() {
            let mut detach = cmd("bpftool", ["cgroup", "detach"]);
            detach
                .arg(self.cgroup.path())
                .arg(attach_type)
                .arg("pinned")
                .arg(prog);
            if let Err(e) = run_cleanup(detach, Duration::from_secs(10)) {
                eprintln!(
                    "bench: warning: detaching {} from {}: {e:#}",
                    prog.display(),
                    self.cgroup.path().display()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.pins) {
            eprintln!(
                "bench: warning: removing {}: {e}",
                self.pins.to_string_lossy()
            );
        }
    }
}

/// `connect4`'s view of an address (`user_ip4`, `user_port`: network order, port in the low
/// 2 bytes of a u32), as the map's bytes.
fn sock_addr_bytes(addr: SocketAddrV4) -> Vec<u8> {
    let mut bytes = addr.ip().octets().to_vec();
    bytes.extend(addr.port().to_be_bytes());
    bytes.extend([0, 0]);
    bytes
}

fn map_update(map: &Path, key: &[u8], value: &[u8]) -> Result<()> {
    let mut command = cmd("bpftool", ["map", "update", "pinned"]);
    command.arg(map).arg("key").arg("hex").args(hex(key));
    command.arg("value").arg("hex").args(hex(value));
    run_captured(command, Duration::from_secs(10))
        .with_context(|| format!("filling {}", map.display()))?;
    Ok(())
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bpftool<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_captured(cmd("bpftool", args), Duration::from_secs(30))
}

/// The object `name` that mesh-user's build left next to mesh's own (aya-build builds every
/// binary of mesh-ebpf); the newest one if several builds are around.
fn object_path(name: &str) -> Result<PathBuf> {
    let build = target_dir().join("release").join("build");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&build)
        .with_context(|| format!("reading {}", build.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("mesh-user-"))
        .map(|e| e.path().join("out").join(name))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).with_context(|| {
        format!(
            "no {name} object under {}/mesh-user-*/out (built with mesh)",
            build.display()
        )
    })
}

/// The programs attached directly to `cgroup`.
fn attached(cgroup: &Path) -> Result<Vec<Program>> {
    let mut command = cmd("bpftool", ["-j", "cgroup", "show"]);
    command.arg(cgroup);
    let out = run_captured(command, Duration::from_secs(10))?;
    let list: Vec<serde_json::Value> = serde_json::from_str(out.trim())
        .with_context(|| format!("bpftool cgroup show {}: {out:?}", cgroup.display()))?;
    Ok(list
        .iter()
        .filter_map(|p| {
            Some(Program {
                id: p.get("id")?.as_u64()?,
                name: p.get("name")?.as_str().unwrap_or("").to_owned(),
                attach_type: p.get("attach_type")?.as_str()?.to_owned(),
            })
        })
        .collect())
}

/// (run_time_ns, run_cnt) of each program id.
pub(super) fn stats(ids: &[u64]) -> Result<Vec<(u64, u64)>> {
    let out = bpftool(["-j", "prog", "show"])?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(out.trim()).context("parsing bpftool prog show")?;
    ids.iter()
        .map(|id| {
            let p = list
                .iter()
                .find(|p| p.get("id").and_then(|v| v.as_u64()) == Some(*id))
                .with_context(|| format!("program {id} is gone"))?;
            let get = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            Ok((get("run_time_ns"), get("run_cnt")))
        })
        .collect()
}

/// One case: where the client runs and where it connects.
struct Case {
    name: &'static str,
    cgroup: PathBuf,
    target: SocketAddr,
    /// Round-robin over all backends is expected (a VIP), else one backend.
    balanced: bool,
}

pub struct Inputs<'a> {
    pub loadgen: &'a Path,
    pub mesh_cgroup: &'a Path,
    /// The cgroup of the agent with `original_dst = true` (same service, same VIP).
    pub original_dst_cgroup: &'a Path,
    pub mesh_vip: SocketAddr,
    pub backends: &'a [SocketAddr],
    pub rounds: usize,
    pub connects: u64,
}

/// Measures every case `rounds` times, interleaved, with the baselines installed for the
/// duration.
pub fn measure(inputs: &Inputs) -> Result<KernelCostResults> {
    let minimal = Baseline::minimal_connect4(inputs.backends)?;
    let empty = Baseline::empty_hooks()?;
    let cases = [
        Case {
            name: CASES[0],
            cgroup: inputs.mesh_cgroup.to_path_buf(),
            target: inputs.mesh_vip,
            balanced: true,
        },
        Case {
            name: CASES[1],
            cgroup: minimal.cgroup().to_path_buf(),
            target: SocketAddr::V4(MINIMAL_VIP),
            balanced: true,
        },
        Case {
            name: CASES[2],
            cgroup: inputs.mesh_cgroup.to_path_buf(),
            target: inputs.backends[0],
            balanced: false,
        },
        Case {
            name: CASES[3],
            cgroup: minimal.cgroup().to_path_buf(),
            target: inputs.backends[0],
            balanced: false,
        },
        Case {
            name: CASES[4],
            cgroup: inputs.original_dst_cgroup.to_path_buf(),
            target: inputs.mesh_vip,
            balanced: true,
        },
        Case {
            name: CASES[5],
            cgroup: empty.cgroup().to_path_buf(),
            target: inputs.backends[0],
            balanced: false,
        },
    ];
    let _stats = StatsOn::enable()?;
    let mut results = KernelCostResults {
        connects_per_run: inputs.connects,
        ..Default::default()
    };
    for round in 0..inputs.rounds {
        // Rotate the order so no case always runs first (cache warmth).
        for k in 0..cases.len() {
            let case = &cases[(k + round) % cases.len()];
            crate::signal::check()?;
            let run = measure_case(inputs, case, round)?;
            for warning in check(case, &run, inputs.backends.len()) {
                println!("bench: WARNING: {warning}");
                results.warnings.push(warning);
            }
            println!(
                "  {:<16} {:>7.0} ns of BPF per connection ({} connects, {})",
                case.name,
                run.ns_per_conn,
                run.conns,
                run.programs
                    .iter()
                    .map(|p| format!("{} {:.0}", p.attach_type, p.ns_per_conn))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            results.runs.push(run);
        }
    }
    Ok(results)
}

fn measure_case(inputs: &Inputs, case: &Case, round: usize) -> Result<CaseRun> {
    let programs = attached(&case.cgroup)?;
    if programs.is_empty() {
        bail!("no program attached to {}", case.cgroup.display());
    }
    let ids: Vec<u64> = programs.iter().map(|p| p.id).collect();
    let before = stats(&ids)?;
    let mut command = cmd(inputs.loadgen, ["connects", "--target"]);
    command
        .arg(case.target.to_string())
        .arg("--count")
        .arg(inputs.connects.to_string())
        .arg("--cgroup")
        .arg(&case.cgroup);
    let out = run_captured(command, Duration::from_secs(330))?;
    let after = stats(&ids)?;
    let connects: ConnectsResult = serde_json::from_str(out.trim())
        .with_context(|| format!("parsing loadgen output {out:?}"))?;
    let conns = connects.conns.max(1) as f64;
    let mut total = 0.0;
    let costs = programs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(p, ((t0, n0), (t1, n1)))| {
            let ns = t1.saturating_sub(*t0) as f64;
            let runs = n1.saturating_sub(*n0) as f64;
            total += ns;
            ProgramCost {
                name: p.name.clone(),
                attach_type: p.attach_type.clone(),
                runs_per_conn: runs / conns,
                ns_per_conn: ns / conns,
                ns_per_run: if runs > 0.0 { ns / runs } else { 0.0 },
            }
        })
        .collect();
    Ok(CaseRun {
        case: case.name,
        round,
        conns: connects.conns,
        errors: connects.errors,
        per_backend: connects.per_backend,
        ns_per_conn: total / conns,
        programs: costs,
    })
}

/// A case whose connections failed or did not go where they should measured something else.
fn check(case: &Case, run: &CaseRun, backends: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    if run.errors > 0 {
        warnings.push(format!("{}: {} failed connects", case.name, run.errors));
    }
    let used = run.per_backend.iter().filter(|&&c| c > 0).count();
    let expected = if case.balanced { backends } else { 1 };
    if used != expected {
        warnings.push(format!(
            "{}: connections reached {used} backends ({:?}), expected {expected}",
            case.name, run.per_backend
        ));
    }
    warnings
}

/// The markdown section of the report.
pub fn markdown(results: &KernelCostResults) -> String {
    let mut md = String::new();
    let rounds = results.runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    md.push_str(&format!(
        "### BPF time per connection (kernel accounting, median of {rounds} rounds x {} sequential connects)\n\n",
        results.connects_per_run
    ));
    md.push_str("| case | ns of BPF per connection | vs minimal |\n| --- | ---: | ---: |\n");
    for (case, baseline) in [
        (CASES[0], CASES[1]),
        (CASES[1], CASES[1]),
        (CASES[2], CASES[3]),
        (CASES[3], CASES[3]),
        (CASES[4], CASES[1]),
        (CASES[5], CASES[1]),
    ] {
        let (Some(ns), Some(base)) = (results.median_ns(case), results.median_ns(baseline)) else {
            continue;
        };
        md.push_str(&format!("| {case} | {ns:.0} | {:.2}x |\n", ns / base));
    }
    if let Some(line) = above_floor(results) {
        md.push_str(&format!("\n{line}\n"));
    }
    md.push_str("\n| case | program (attach type) | runs per connection | ns per run | ns per connection |\n| --- | --- | ---: | ---: | ---: |\n");
    for case in CASES {
        for attach_type in results.attach_types(case) {
            // Programs that never ran for this case (UDP, getpeername, ...) are left out.
            if let Some((ns, runs, per_run)) = results.median_program_ns(case, &attach_type)
                && runs > 0.0
            {
                md.push_str(&format!(
                    "| {case} | {attach_type} | {runs:.2} | {per_run:.0} | {ns:.0} |\n"
                ));
            }
        }
    }
    for w in &results.warnings {
        md.push_str(&format!("\nwarning: {w}\n"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect4_sees_the_port_in_network_order_in_the_low_bytes() {
        let bytes = sock_addr_bytes(SocketAddrV4::new([127, 0, 0, 1].into(), 0x1234));
        assert_eq!(bytes, [127, 0, 0, 1, 0x12, 0x34, 0, 0]);
    }

    /// One round of `case` that cost `ns` per connection.
    fn run(case: &'static str, ns: f64) -> CaseRun {
        CaseRun {
            case,
            round: 0,
            conns: 1,
            errors: 0,
            per_backend: vec![1],
            ns_per_conn: ns,
            programs: vec![],
        }
    }

    #[test]
    fn medians_are_per_case() {
        let results = KernelCostResults {
            connects_per_run: 1,
            runs: vec![
                run(CASES[0], 3.0),
                run(CASES[0], 1.0),
                run(CASES[0], 2.0),
                run(CASES[1], 9.0),
            ],
            warnings: vec![],
        };
        assert_eq!(results.median_ns(CASES[0]), Some(2.0));
        assert_eq!(results.median_ns(CASES[1]), Some(9.0));
        assert_eq!(results.median_ns(CASES[2]), None);
    }

    #[test]
    fn the_floor_splits_mesh_vip_cost_into_hooks_and_work() {
        let mut results = KernelCostResults {
            connects_per_run: 1,
            runs: vec![run(CASES[0], 1000.0), run(CASES[1], 200.0)],
            warnings: vec![],
        };
        assert_eq!(above_floor(&results), None);
        results.runs.push(run(CASES[5], 300.0));
        let line = above_floor(&results).unwrap();
        assert!(
            line.contains("costs 300 ns per connection (1.50x"),
            "{line}"
        );
        assert!(line.contains("the other 700 ns (3.50x"), "{line}");
    }
}
