//! `cargo xtask cleanup`: removes what interrupted test runs left behind: `mesh-test-*`
//! directories in bpffs (pinned maps and links) and `mesh-test-*` cgroups directly under the
//! cgroup v2 mount (after killing the test children still in them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::build::{self, Profile};
use crate::util::{Run as _, cgroup2_mount, cmd};

const PREFIX: &str = "mesh-test-";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    let mut removed = 0;
    removed += clean_bpffs()?;
    removed += clean_cgroups()?;
    if removed == 0 {
        println!("cleanup: nothing to remove");
    } else {
        println!("cleanup: removed {removed} leftover(s)");
    }
    Ok(())
}

/// Directories under `parent` whose name starts with [`PREFIX`] (none if `parent` is missing).
fn test_dirs(parent: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", parent.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(PREFIX) && entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn clean_bpffs() -> Result<usize> {
    let dirs = test_dirs(Path::new(BPFFS))?;
    let mesh = build::bin(Profile::Release, "mesh");
    for dir in &dirs {
        if mesh.is_file() {
            let result = cmd(&mesh, ["cleanup", "--bpffs"]).arg(dir).run();
            if let Err(e) = result {
                eprintln!("cleanup: warning: {e:#}; removing the directory anyway");
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        println!("cleanup: removed bpffs dir {}", dir.display());
    }
    Ok(dirs.len())
}

fn clean_cgroups() -> Result<usize> {
    let root = cgroup2_mount()?;
    let dirs = test_dirs(&root)?;
    for dir in &dirs {
        kill_members(dir)?;
        remove_cgroup(dir)?;
        println!("cleanup: removed cgroup {}", dir.display());
    }
    Ok(dirs.len())
}

/// SIGKILLs every process in the cgroup `dir` and its descendants: only test children live in
/// `mesh-test-*` cgroups.
fn kill_members(dir: &Path) -> Result<()> {
    for child in subdirs(dir)? {
        kill_members(&child)?;
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid <= 1 || u32::try_from(pid) == Ok(std::process::id()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        println!(
            "cleanup: killed pid {pid} ({}) in {}",
            comm.trim(),
            dir.display()
        );
    }
    Ok(())
}

/// Removes the cgroup `dir` bottom-up, retrying while killed processes are still exiting.
fn remove_cgroup(dir: &Path) -> Result<()> {
    for child in subdirs(dir)? {
        remove_cgroup(&child)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}
