//! SIGINT/SIGTERM/SIGHUP handling: the signal is recorded and forwarded to the process group of
//! the foreground child (see [`wait_foreground`]), so `cargo test` and whatever it started stop,
//! and xtask itself unwinds normally, running the `Drop` guards of the services it owns.

use std::fmt;
use std::io;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Result, bail};

/// The last signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Process group id of the foreground child (0: none).
static FOREGROUND: AtomicI32 = AtomicI32::new(0);

/// The error returned when a signal interrupted xtask; `main` exits with 128 + signal.
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted by signal {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe operations here: atomics and kill(2).
    RECEIVED.store(sig, Ordering::SeqCst);
    let pgid = FOREGROUND.load(Ordering::SeqCst);
    if pgid > 0 {
        // SAFETY: kill(2) is async-signal-safe; a negative pid addresses a process group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Installs the handlers. Handled signals are reset to their default on exec.
pub fn install() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches atomics and calls kill.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({sig}): {}", io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Errors with [`Interrupted`] if a signal was received.
pub fn check() -> Result<()> {
    match received() {
        Some(sig) => Err(Interrupted(sig).into()),
        None => Ok(()),
    }
}

/// Waits for `child`, which must lead its own process group (`process_group(0)`), forwarding
/// any signal xtask receives meanwhile to that group.
pub fn wait_foreground(child: &mut Child) -> io::Result<ExitStatus> {
    let pgid = i32::try_from(child.id()).unwrap_or(0);
    FOREGROUND.store(pgid, Ordering::SeqCst);
    if let Some(sig) = received() {
        // The signal came before the child was registered: forward it now.
        // SAFETY: plain kill(2) on the child's process group.
        unsafe { libc::kill(-pgid, sig) };
    }
    let status = child.wait();
    FOREGROUND.store(0, Ordering::SeqCst);
    status
}
