//! A cgroup v2 directory owned by one test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::send_signal;

/// A cgroup `<cgroup2 mount>/mesh-test-<tag>-<pid>-<n>` created for one test. Only the test's
/// own child processes are ever moved into it (see [`crate::run_probe_in`]).
///
/// Drop SIGKILLs whatever is still listed in its `cgroup.procs` (only our children can be), waits
/// (bounded) for it to empty, and removes the directory. It never touches any other cgroup.
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
    name: String,
}

impl CgroupGuard {
    /// Creates the cgroup. Panics with the reason if not root or no cgroup v2 is mounted.
    pub fn new(tag: &str) -> CgroupGuard {
        crate::require_root();
        let mount = cgroup2_mount();
        let name = crate::unique_name(tag);
        let path = mount.join(&name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        CgroupGuard { path, name }
    }

    /// Creates a child cgroup `<this cgroup>/mesh-test-<tag>-<pid>-<n>`: programs attached to
    /// this cgroup apply to processes in the child too (a pod's cgroup below the node's, say).
    /// Drop it before its parent (declare it after the parent: locals drop in reverse order).
    pub fn child(&self, tag: &str) -> CgroupGuard {
        let name = crate::unique_name(tag);
        let path = self.path.join(&name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        CgroupGuard { path, name }
    }

    /// Absolute path of the cgroup directory (what `mesh agent --cgroup` takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's name, `mesh-test-<tag>-<pid>-<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        match std::fs::read_to_string(self.path.join("cgroup.procs")) {
            Ok(text) => parse_pids(&text),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // Processes can only be here because a test moved its own child here.
        let emptied = crate::wait_until(Duration::from_secs(5), || {
            let pids = self.pids();
            for pid in &pids {
                send_signal(*pid, libc::SIGKILL);
            }
            pids.is_empty()
        });
        if !emptied {
            eprintln!(
                "harness: cgroup {} still has processes {:?} after SIGKILL",
                self.path.display(),
                self.pids()
            );
        }
        // rmdir can briefly fail with EBUSY while killed processes are still being reaped.
        let mut last_err = None;
        let removed = crate::wait_until(Duration::from_secs(5), || {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => {
                    last_err = Some(e);
                    false
                }
            }
        });
        if !removed {
            eprintln!(
                "harness: could not remove cgroup {}: {last_err:?}",
                self.path.display()
            );
        }
    }
}

/// The cgroup v2 mount point from /proc/mounts. Panics with the reason if there is none.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_else(|e| panic!("cannot read /proc/mounts: {e}"));
    parse_cgroup2_mount(&mounts).unwrap_or_else(|| {
        panic!(
            "no cgroup v2 (fstype cgroup2) mount in /proc/mounts: mesh attaches its programs to \
             a cgroup v2 directory, so these tests cannot run here (mount one with \
             `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with unified cgroups)"
        )
    })
}

/// The mount point of the first `cgroup2` entry of a /proc/mounts text.
pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        let fstype = fields.next()?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids of a `cgroup.procs` text (one per line).
pub fn parse_pids(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_mount_on_a_pure_v2_host() {
        let mounts = "proc /proc proc rw 0 0\n\
                      cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn matches_on_fstype_not_on_source_or_path() {
        // Source named "cgroup2" but a v1 fstype, and a v1 mount at a path containing "cgroup2".
        let mounts = "cgroup2 /mnt/a cgroup rw 0 0\n\
                      cgroup /mnt/cgroup2 cgroup rw 0 0\n\
                      none /mnt/real cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/real"))
        );
    }

    #[test]
    fn no_cgroup2_mount_gives_none() {
        assert_eq!(
            parse_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(parse_cgroup2_mount(""), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let mounts = "none /mnt/my\\040cgroups\\134x cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups\\x"))
        );
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape_mount_field("a\\9b\\04"), "a\\9b\\04");
    }

    #[test]
    fn parses_cgroup_procs() {
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
        assert_eq!(parse_pids(""), Vec::<u32>::new());
    }
}
