//! Running short-lived helper commands (`mesh services`, `mesh cleanup`, `mesh-probe`) with a
//! time bound and captured output.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// A one-paragraph description for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Why a command did not produce a [`Captured`].
#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    /// Killed after the time bound; what it printed until then.
    TimedOut {
        after: Duration,
        stdout: String,
        stderr: String,
    },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Spawn(e) => write!(f, "could not start: {e}"),
            RunError::TimedOut {
                after,
                stdout,
                stderr,
            } => write!(
                f,
                "killed after {after:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ),
        }
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it (SIGKILL) if it has not
/// exited after `timeout`. Pipes are drained concurrently, so a chatty command cannot block.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Captured, RunError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RunError::Spawn)?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    match wait_bounded(&mut child, timeout) {
        Some(status) => Ok(Captured {
            status,
            stdout: join(stdout),
            stderr: join(stderr),
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(RunError::TimedOut {
                after: timeout,
                stdout: join(stdout),
                stderr: join(stderr),
            })
        }
    }
}

/// Waits for `child` to exit, at most `timeout`. Polls with a short, growing interval so a
/// quick command costs about a millisecond of latency.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // ECHILD and friends: the child is gone or cannot be waited for; nothing to wait on.
            Err(e) => panic!("waiting for pid {} failed: {e}", child.id()),
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(Duration::from_millis(20));
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

fn join(handle: Option<JoinHandle<String>>) -> String {
    handle
        .map(|h| h.join().unwrap_or_else(|_| "<reader panicked>".into()))
        .unwrap_or_default()
}

/// Sends `signal` to `pid` (a child we started). Returns false if it no longer exists.
pub fn send_signal(pid: u32, signal: libc::c_int) -> bool {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill has no memory-safety preconditions; pid > 0 targets exactly one process.
    unsafe { libc::kill(pid, signal) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .expect("sh runs");
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn kills_a_command_that_overruns() {
        let start = Instant::now();
        let err = run_bounded(
            Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
            Duration::from_millis(200),
        )
        .expect_err("must time out");
        assert!(start.elapsed() < Duration::from_secs(10));
        match err {
            RunError::TimedOut { stdout, .. } => assert_eq!(stdout, "started\n"),
            other => panic!("unexpected {other}"),
        }
    }
}
