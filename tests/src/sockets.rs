//! Which processes hold sockets with given cookies. `ss` cannot say: sock_diag lists only
//! sockets in the kernel's lookup tables, and a TCP socket that was reset or failed to connect
//! (state CLOSE) is in none while its owner still holds it. So every socket descriptor of every
//! process is duplicated with `pidfd_getfd` and asked for its `SO_COOKIE`.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// "pid <pid> (<command>) fd <fd>" for each open socket whose cookie is in `cookies`. Processes
/// that exit meanwhile are skipped; bounded by the number of descriptors on the machine.
pub fn holders_of(cookies: &[u64]) -> Vec<String> {
    let mut found = Vec::new();
    if cookies.is_empty() {
        return found;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let socket_fds: Vec<i32> = fds
            .flatten()
            .filter(|fd| {
                fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .filter_map(|fd| fd.file_name().to_str()?.parse().ok())
            .collect();
        if socket_fds.is_empty() {
            continue;
        }
        let Some(pidfd) = pidfd_open(pid) else {
            continue;
        };
        for fd in socket_fds {
            if let Some(cookie) = cookie_of(&pidfd, fd)
                && cookies.contains(&cookie)
            {
                let command = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                found.push(format!("pid {pid} ({}) fd {fd}", command.trim()));
            }
        }
    }
    found
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The cookie of descriptor `fd` of the process behind `pidfd` (None if it is gone).
fn cookie_of(pidfd: &OwnedFd, fd: i32) -> Option<u64> {
    // SAFETY: a plain syscall; a non-negative result is a new descriptor we own (closed when
    // dropped).
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return None;
    }
    socket_cookie(unsafe { OwnedFd::from_raw_fd(dup as i32) }.as_fd())
}

/// `SO_COOKIE` of a socket of this process.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> Option<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket of this very process is found by its cookie, and a cookie nobody has is not.
    #[test]
    fn finds_a_socket_of_this_process_by_cookie() {
        crate::require_root();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let cookie = socket_cookie(listener.as_fd()).expect("SO_COOKIE");
        let holders = holders_of(&[cookie]);
        let me = format!("pid {} ", std::process::id());
        assert!(
            holders.iter().any(|h| h.starts_with(&me)
                && h.ends_with(&format!("fd {}", listener.as_raw_fd()))),
            "{holders:?}"
        );
        assert!(holders_of(&[u64::MAX]).is_empty());
    }
}
