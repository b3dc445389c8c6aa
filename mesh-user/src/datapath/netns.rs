//! The node's network namespaces, for work that must happen inside each of them: a netlink
//! `sock_diag` socket only sees (and can only destroy) the sockets of the namespace it was
//! created in, and every pod is a client in a namespace of its own.
//!
//! Namespaces are found where they can be named from outside: the bind mounts under
//! `/run/netns` (`ip netns`; CNI runtimes keep pod namespaces there) and `/proc/<pid>/ns/net` of
//! every process (containers, pods through their processes). They are told apart by inode, a
//! namespace's identity in nsfs. A namespace that only a thread other than a process's main
//! thread, or only an open file descriptor, keeps alive is not found.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    vec,
};

/// Where `ip netns` and CNI runtimes bind-mount named namespaces.
const RUN_NETNS: &str = "/run/netns";

/// One network namespace, held open (the descriptor keeps it alive while it is used).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    inode: u64,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace file at `path` (`/proc/<pid>/ns/net`, a bind mount of one).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(Self {
            file,
            inode,
            path: path.to_path_buf(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Its inode in nsfs: equal for every name of the same namespace.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The name it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread into this namespace (`setns(2)`; needs `CAP_SYS_ADMIN`). The
    /// thread stays there: call it only on a thread that exists for this purpose and ends with
    /// it. Sockets created afterwards on the thread belong to this namespace.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: setns(2) on a descriptor this value owns; it changes only the calling
        // thread's network namespace and touches no memory of this process.
        let ret = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Why a namespace was passed over.
#[derive(Debug)]
pub enum Skipped {
    /// Gone before it could be opened (its process exited): not an error.
    Vanished,
    /// Not a namespace file (a stale file under /run/netns), or one already listed.
    NotNew,
    /// It could not be opened (EACCES, ...).
    Failed(PathBuf, io::Error),
}

/// The node's network namespaces other than those in `seen`, each once: first the bind mounts
/// under /run/netns, then the namespaces of the processes, in pid order. The list of names is
/// read at the start; each namespace is opened only when the iteration reaches it, so one
/// descriptor is open at a time.
pub struct Namespaces {
    paths: vec::IntoIter<PathBuf>,
    seen: HashSet<u64>,
    nsfs_dev: u64,
}

impl Namespaces {
    /// Lists the names. `current` is the caller's namespace: it is not listed again, and tells
    /// which device nsfs files live on.
    pub fn list(current: &NetNs) -> io::Result<Self> {
        let nsfs_dev = current.file.metadata()?.dev();
        Ok(Self::from_paths(node_paths()?, current, nsfs_dev))
    }

    fn from_paths(paths: Vec<PathBuf>, current: &NetNs, nsfs_dev: u64) -> Self {
        Self {
            paths: paths.into_iter(),
            seen: HashSet::from([current.inode()]),
            nsfs_dev,
        }
    }
}

impl Iterator for Namespaces {
    type Item = Result<NetNs, Skipped>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = self.paths.next()?;
        let ns = match File::open(&path).and_then(|file| Ok((file.metadata()?, file))) {
            Ok((meta, file)) => {
                if meta.dev() != self.nsfs_dev || !self.seen.insert(meta.ino()) {
                    return Some(Err(Skipped::NotNew));
                }
                NetNs {
                    file,
                    inode: meta.ino(),
                    path,
                }
            }
            Err(err) if vanished(&err) => return Some(Err(Skipped::Vanished)),
            Err(err) => return Some(Err(Skipped::Failed(path, err))),
        };
        Some(Ok(ns))
    }
}

/// Whether opening a namespace failed because its process (or mount) is gone.
fn vanished(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH)
}

/// `/run/netns/*` (if the directory exists), then `/proc/<pid>/ns/net` for every pid.
fn node_paths() -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    match fs::read_dir(RUN_NETNS) {
        Ok(entries) => {
            let mut named: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
            named.sort();
            paths.extend(named);
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    paths.extend(
        pids.into_iter()
            .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net"))),
    );
    Ok(paths)
}

/// Moves the calling thread into a new, empty network namespace (`unshare(CLONE_NEWNET)`), for
/// tests that need sockets in a namespace other than the test process's.
#[cfg(test)]
pub fn unshare_for_test() -> io::Result<()> {
    // SAFETY: unshare(2) changes only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A `sleep` child in a namespace of its own (forked from a thread that unshared one).
    fn child_in_new_netns() -> std::process::Child {
        std::thread::spawn(|| {
            unshare_for_test().expect("unshare(CLONE_NEWNET)");
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep")
        })
        .join()
        .expect("thread")
    }

    #[test]
    fn lists_a_process_namespace_once_and_not_the_callers() {
        let mut child = child_in_new_netns();
        let child_ns = NetNs::open(Path::new(&format!("/proc/{}/ns/net", child.id())))
            .expect("open the child's namespace");
        let current = NetNs::current().expect("own namespace");
        assert_ne!(child_ns.inode(), current.inode());

        let found: Vec<u64> = Namespaces::list(&current)
            .expect("list")
            .filter_map(|ns| ns.ok().map(|ns| ns.inode()))
            .collect();
        let _ = child.kill();
        let _ = child.wait();

        assert_eq!(
            found.iter().filter(|&&i| i == child_ns.inode()).count(),
            1,
            "the child's namespace is listed exactly once"
        );
        assert!(!found.contains(&current.inode()), "the caller's is not");
        let unique: HashSet<&u64> = found.iter().collect();
        assert_eq!(unique.len(), found.len(), "no namespace twice");
    }

    #[test]
    fn vanished_and_foreign_files_are_skipped() {
        let current = NetNs::current().expect("own namespace");
        let nsfs_dev = current.file.metadata().unwrap().dev();
        let paths = vec![
            PathBuf::from("/proc/0/ns/net"),
            PathBuf::from("/proc/self/exe"),
            PathBuf::from("/proc/self/ns/net"),
        ];
        let mut namespaces = Namespaces::from_paths(paths, &current, nsfs_dev);
        assert!(matches!(namespaces.next(), Some(Err(Skipped::Vanished))));
        // Not on nsfs.
        assert!(matches!(namespaces.next(), Some(Err(Skipped::NotNew))));
        // The test's own namespace: already seen (the test thread is in the process's).
        assert!(matches!(namespaces.next(), Some(Err(Skipped::NotNew))));
        assert!(namespaces.next().is_none());
    }

    #[test]
    fn entering_a_namespace_moves_only_the_calling_thread() {
        let mut child = child_in_new_netns();
        let target = NetNs::open(Path::new(&format!("/proc/{}/ns/net", child.id())))
            .expect("open the child's namespace");
        let before = NetNs::current().expect("own namespace").inode();
        let inside = std::thread::scope(|s| {
            s.spawn(|| {
                target.enter().expect("setns");
                NetNs::current().expect("namespace after setns").inode()
            })
            .join()
            .expect("thread")
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(inside, target.inode());
        assert_eq!(NetNs::current().unwrap().inode(), before);
    }
}
