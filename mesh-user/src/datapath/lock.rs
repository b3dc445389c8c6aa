//! One agent per pins directory: an exclusive `flock` on the directory, held for the agent's
//! life (the kernel drops it when the process dies, even with `kill -9`). A second agent exits
//! at once, naming the one that runs.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Held while the agent owns the pins directory.
#[derive(Debug)]
pub struct PinsLock {
    _dir: File,
}

impl PinsLock {
    pub fn acquire(bpffs: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        let dir = File::open(bpffs).with_context(|| format!("opening {}", bpffs.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let ret = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret == 0 {
            return Ok(Self { _dir: dir });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", bpffs.display()));
        }
        let inode = dir.metadata()?.ino();
        let holder = std::fs::read_to_string("/proc/locks")
            .ok()
            .and_then(|locks| flock_holder(&locks, inode))
            .map(describe)
            .unwrap_or_else(|| "a process this one cannot see".to_owned());
        bail!(
            "another mesh agent already owns {} ({holder}); stop it first, or give this agent \
             another [agent] bpffs directory",
            bpffs.display()
        )
    }
}

/// The pid holding a `FLOCK` on `inode`, from /proc/locks lines such as
/// `3: FLOCK  ADVISORY  WRITE 1234 00:1d:5678 0 EOF`.
fn flock_holder(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, dev_inode) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
        let found_inode: u64 = dev_inode.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && found_inode == inode)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(PathBuf::from(format!("/proc/{pid}/cmdline")))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    if cmdline.is_empty() {
        format!("pid {pid}")
    } else {
        format!("pid {pid}: {cmdline}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_flock_by_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:1d:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1d:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 4321 00:1d:77 0 EOF\n";
        assert_eq!(flock_holder(locks, 5678), Some(1234));
        assert_eq!(flock_holder(locks, 77), Some(4321));
        assert_eq!(flock_holder(locks, 1), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("mesh-lock-test-{}", std::process::id()));
        let first = PinsLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process, as a second agent would.
        let err = PinsLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains("another mesh agent already owns"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        // Another test thread may fork a command in this moment: its child shares the lock
        // until it execs (the descriptor is close-on-exec), so allow a few retries.
        let again = (0..100)
            .find_map(|_| {
                PinsLock::acquire(&dir)
                    .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(10)))
                    .ok()
            })
            .expect("the lock is free again once dropped");
        drop(again);
        let _ = std::fs::remove_dir(&dir);
    }
}
