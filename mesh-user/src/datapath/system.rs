//! Facts about the host the agent needs: where cgroup v2 and bpffs are mounted.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Creates `dir` (and missing parents) mode 0700: the pins and the agent's state say where
/// every connection of the node goes, and pinned maps can be opened (and written) by whoever
/// can reach them. An existing `dir` is made 0700 only with `tighten`, and never when it is a
/// mount point (bpffs itself is shared with other tools); otherwise a loose mode is reported.
pub fn create_private_dir(dir: &Path, tighten: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !dir.exists() {
        return fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()));
    }
    let mode = fs::metadata(dir)
        .with_context(|| format!("inspecting {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let mount_point = mounts()?.iter().any(|(target, _)| target == dir);
    if tighten && !mount_point {
        return fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()));
    }
    tracing::warn!(
        "{} has mode {:o}: other users can look inside; chmod 0700 it",
        dir.display(),
        mode & 0o777
    );
    Ok(())
}

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set, from `CapEff:` of /proc/self/status.
fn effective_caps() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_cap_eff(&status).context("no CapEff line in /proc/self/status")
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// What the agent needs from the host, checked before it touches anything, so that one message
/// names everything missing and how to get it (instead of the first EPERM from deep inside).
pub fn check_prerequisites(bpffs: &Path, cgroup: Option<&Path>) -> anyhow::Result<()> {
    let caps = effective_caps()?;
    let mounts = mounts()?;
    let missing = missing_prerequisites(caps, &mounts, bpffs, cgroup, |p| p.exists());
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing
        .iter()
        .map(|m| format!("  - {m}"))
        .collect::<Vec<_>>()
        .join("\n");
    bail!("mesh agent cannot run on this host; missing:\n{list}")
}

fn missing_prerequisites(
    caps: u64,
    mounts: &[(PathBuf, String)],
    bpffs: &Path,
    cgroup: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Vec<String> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    let fix = "run the agent as root, or grant it (systemd: AmbientCapabilities=; Kubernetes:                securityContext.capabilities.add, as deploy/kubernetes/daemonset.yaml does)";
    if !has(CAP_NET_ADMIN) {
        missing.push(format!(
            "capability CAP_NET_ADMIN: attaching programs to a cgroup needs it (the kernel              answers \"Operation not permitted\" without it); {fix}"
        ));
    }
    if !has(CAP_SYS_ADMIN) {
        let lacking: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(cap, _)| !has(*cap))
            .map(|(_, name)| name)
            .collect();
        if !lacking.is_empty() {
            missing.push(format!(
                "capability CAP_SYS_ADMIN, or else {}: loading the eBPF programs and maps needs                  them (the kernel answers \"Operation not permitted\" without them); {fix}",
                lacking.join(" and ")
            ));
        }
    }
    let on_bpffs = mounts
        .iter()
        .any(|(target, fstype)| fstype == "bpf" && bpffs.starts_with(target));
    if !on_bpffs {
        if !bpffs.starts_with("/sys/fs/bpf") {
            missing.push(format!(
                "a bpf filesystem at [agent] bpffs {}: mount one there (mount -t bpf bpf <dir>)                  or use a directory below /sys/fs/bpf",
                bpffs.display()
            ));
        } else if !has(CAP_SYS_ADMIN) {
            missing.push(
                "a bpf filesystem at /sys/fs/bpf: it is not mounted and mounting it needs                  CAP_SYS_ADMIN; mount it (mount -t bpf bpf /sys/fs/bpf) or grant CAP_SYS_ADMIN"
                    .to_owned(),
            );
        }
    }
    let cgroup2: Vec<&PathBuf> = mounts
        .iter()
        .filter(|(_, fstype)| fstype == "cgroup2")
        .map(|(target, _)| target)
        .collect();
    match cgroup {
        _ if cgroup2.is_empty() => missing.push(
            "cgroup v2: no cgroup2 mount in /proc/mounts; boot with systemd.unified_cgroup_hierarchy=1              or mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
                .to_owned(),
        ),
        Some(dir) if !cgroup2.iter().any(|root| dir.starts_with(root)) => {
            missing.push(format!(
                "cgroup v2 at [agent] cgroup {}: it is not below a cgroup2 mount ({}); set it to                  a directory of the cgroup v2 hierarchy",
                dir.display(),
                cgroup2
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Some(dir) if !exists(dir) => missing.push(format!(
            "the cgroup [agent] cgroup {}: it does not exist; create it (mkdir) or set another",
            dir.display()
        )),
        _ => {}
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !exists(btf) {
        missing.push(
            "kernel BTF at /sys/kernel/btf/vmlinux: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
                .to_owned(),
        );
    }
    missing
}

/// (mount point, fstype) pairs from /proc/mounts.
fn mounts() -> anyhow::Result<Vec<(PathBuf, String)>> {
    let text = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(parse_mounts(&text))
}

fn parse_mounts(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            // /proc/mounts escapes spaces in paths as \040.
            Some((
                PathBuf::from(target.replace("\\040", " ")),
                fstype.to_string(),
            ))
        })
        .collect()
}

/// The cgroup v2 mount point (on hybrid hosts it is not /sys/fs/cgroup).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(target, _)| target)
        .context("no cgroup v2 mount found in /proc/mounts; mesh needs cgroup v2")
}

/// Mounts bpffs at /sys/fs/bpf when `bpffs` lies below it and nothing is mounted there yet, as
/// Cilium does: a fresh host often has no bpffs mounted.
pub fn ensure_bpffs(bpffs: &Path) -> anyhow::Result<()> {
    let mounts = mounts()?;
    let covered = mounts
        .iter()
        .any(|(target, fstype)| fstype == "bpf" && bpffs.starts_with(target));
    if covered {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !bpffs.starts_with(default) {
        bail!(
            "{} is not on a bpf filesystem; mount one there or use a path below /sys/fs/bpf",
            bpffs.display()
        );
    }
    tracing::info!("mounting bpffs at {}", default.display());
    let target = CString::new(default.as_os_str().as_bytes())?;
    let fstype = CString::new("bpf")?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("mount -t bpf bpf /sys/fs/bpf");
    }
    Ok(())
}

/// Allocations of 2 MiB and more get mappings of their own, unmapped when freed. glibc
/// otherwise raises that threshold to the largest block freed so far (up to 32 MB) and serves
/// big blocks from the heaps of threads, whose free top `malloc_trim` does not give back: a
/// /metrics scrape at 10k services left about 30 MB there for good. 2 MiB rather than lower:
/// the map reads and renders that matter are larger, and smaller blocks (a Kubernetes event's
/// copies) stay out of mmap/munmap (256 KiB measured the same RSS, BENCHMARKS.md).
pub fn map_large_allocations() {
    // SAFETY: mallopt only sets one of the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 * 1024 * 1024);
    }
}

/// Gives the kernel back the memory the allocator holds but no longer uses: glibc keeps what
/// large transient structures freed (a 3 MB config parse, a 20 MB metrics render) in its
/// heaps, which shows as RSS that never goes down.
pub fn return_free_memory() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_missing_prerequisite() {
        let mounts = parse_mounts(
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n",
        );
        let all = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN);
        let bpffs = Path::new("/sys/fs/bpf/mesh");
        assert!(missing_prerequisites(all, &mounts, bpffs, None, |_| true).is_empty());
        let bpf_only = (1 << CAP_NET_ADMIN) | (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(missing_prerequisites(bpf_only, &mounts, bpffs, None, |_| true).is_empty());
        let none = missing_prerequisites(0, &mounts, bpffs, None, |_| true);
        assert_eq!(none.len(), 2, "{none:?}");
        assert!(none[0].starts_with("capability CAP_NET_ADMIN"));
        assert!(none[1].contains("CAP_BPF and CAP_PERFMON"));
        let no_perfmon = (1 << CAP_NET_ADMIN) | (1 << CAP_BPF);
        let found = missing_prerequisites(no_perfmon, &mounts, bpffs, None, |_| true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("or else CAP_PERFMON:"), "{found:?}");
        let found = missing_prerequisites(all, &[], Path::new("/tmp/pins"), None, |p| {
            p != Path::new("/sys/kernel/btf/vmlinux")
        });
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("bpf filesystem at [agent] bpffs /tmp/pins"));
        assert!(found[1].starts_with("cgroup v2: no cgroup2 mount"));
        assert!(found[2].starts_with("kernel BTF"));
        let found =
            missing_prerequisites(all, &mounts, bpffs, Some(Path::new("/tmp/cg")), |_| true);
        assert!(found[0].contains("not below a cgroup2 mount"), "{found:?}");
    }

    #[test]
    fn reads_the_effective_capabilities() {
        let status = "Name:\tmesh\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let text = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                    cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                    bpf /sys/fs/bpf bpf rw 0 0\n";
        let mounts = parse_mounts(text);
        assert!(mounts.contains(&("/sys/fs/cgroup/unified".into(), "cgroup2".into())));
        assert!(mounts.contains(&("/sys/fs/bpf".into(), "bpf".into())));
    }
}
