//! A bpffs directory owned by one test: where its agent pins maps, programs and links.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where bpffs is mounted (the agent mounts it if it is missing).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A unique path `/sys/fs/bpf/mesh-test-<tag>-<pid>-<n>`. The agent creates it.
///
/// Drop runs `$MESH_BIN cleanup --bpffs <path>` (removes links, programs and pins), then removes
/// whatever is left of the directory. Drop the agent first (see [`crate::TestEnv`]).
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    pub fn new(tag: &str) -> BpffsDir {
        BpffsDir {
            path: Path::new(BPFFS_ROOT).join(crate::unique_name(tag)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `mesh cleanup --bpffs <path>` and returns its output (for tests of cleanup itself).
    pub fn run_cleanup(&self) -> crate::process::Captured {
        let mut cmd = Command::new(crate::mesh_bin());
        cmd.arg("cleanup").arg("--bpffs").arg(&self.path);
        crate::process::run_bounded(&mut cmd, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("`mesh cleanup --bpffs {}`: {e}", self.path.display()))
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let mut cmd = Command::new(crate::mesh_bin());
        cmd.arg("cleanup").arg("--bpffs").arg(&self.path);
        match crate::process::run_bounded(&mut cmd, Duration::from_secs(30)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "harness: `mesh cleanup --bpffs {}` failed: {}",
                self.path.display(),
                out.describe()
            ),
            Err(e) => eprintln!(
                "harness: `mesh cleanup --bpffs {}`: {e}",
                self.path.display()
            ),
        }
        // Only ever our own unique directory under /sys/fs/bpf.
        debug_assert!(
            self.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mesh-test-"))
        );
        if self.path.exists() {
            // Unlinking pins drops the last reference to links and maps the agent left behind.
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!(
                    "harness: could not remove {} after cleanup: {e}",
                    self.path.display()
                );
            }
        }
    }
}
