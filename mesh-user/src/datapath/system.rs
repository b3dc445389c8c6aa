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

#[cfg(test)]
mod tests {
    use super::*;

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
