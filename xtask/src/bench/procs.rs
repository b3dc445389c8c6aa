//! Child processes of the bench: long-running ones behind a [`Proc`] guard (stopped by pid on
//! drop, including on errors and after Ctrl-C), and short foreground runs with a time limit
//! ([`run_captured`]).

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::signal;
use crate::util::display;

/// Own process group (a terminal Ctrl-C reaches xtask only, which then stops children in
/// order) and SIGKILL if xtask dies without cleaning up.
fn detach(command: &mut Command) {
    command.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) on one pid of ours.
        unsafe { libc::kill(pid, sig) };
    }
}

/// A long-running child (backend, agent, HAProxy, probe), stopped on drop: SIGTERM, then SIGKILL
/// after 5 s. Only this pid is signalled.
pub struct Proc {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    /// Starts `command` with its stdout and stderr in the file `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Proc> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        detach(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", display(&command)))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: Some(log.to_path_buf()),
        })
    }

    /// Starts `command` with a pipe on its stdout (stderr to `log`).
    pub fn spawn_piped(
        name: &str,
        mut command: Command,
        log: &Path,
    ) -> Result<(Proc, ChildStdout)> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file);
        detach(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", display(&command)))?;
        let stdout = child.stdout.take().context("child has no stdout pipe")?;
        Ok((
            Proc {
                name: name.to_owned(),
                child,
                log: Some(log.to_path_buf()),
            },
            stdout,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGKILL now and reap (used to kill a backend on purpose).
    pub fn kill_now(&mut self) {
        if self.exited().is_none() {
            kill(self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            kill(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.exited().is_none() {
                kill(self.pid(), libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        eprintln!("bench: stopped {} (pid {})", self.name, self.pid());
    }
}

/// Runs `command` to completion in the foreground, capturing stdout, within `limit`. On a
/// signal to xtask or at the limit the child (only its pid) is killed.
pub fn run_captured(command: Command, limit: Duration) -> Result<String> {
    capture(command, limit, true)
}

/// [`run_captured`] for cleanup steps: runs even after a signal (only the limit applies).
pub fn run_cleanup(command: Command, limit: Duration) -> Result<String> {
    capture(command, limit, false)
}

fn capture(mut command: Command, limit: Duration, interruptible: bool) -> Result<String> {
    let shown = display(&command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    detach(&mut command);
    if interruptible {
        signal::check()?;
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .into_iter()
        .map(|pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        })
        .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if (interruptible && signal::received().is_some()) || Instant::now() >= deadline {
            kill(child.id(), libc::SIGKILL);
            let _ = child.wait();
            if interruptible {
                signal::check()?;
            }
            bail!("`{shown}` did not finish within {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut texts = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = texts.next().unwrap_or_default();
    let stderr = texts.next().unwrap_or_default();
    if !status.success() {
        bail!("`{shown}` failed ({status}):\n{}", stderr.trim_end());
    }
    Ok(stdout)
}

/// Lines of a child's stdout, read by a thread.
pub fn line_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
