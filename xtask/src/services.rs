//! Real services that the end-to-end tests use, owned by xtask: each is a [`Service`] guard
//! that stops its process (and removes its scratch directory) when dropped, including on
//! errors and after Ctrl-C.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::signal;
use crate::util::{cmd, display};

/// A child process owned by xtask, stopped on drop.
pub struct Service {
    name: &'static str,
    child: Child,
    dir: PathBuf,
}

impl Service {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let pid = i32::try_from(self.child.id()).unwrap_or(0);
        if matches!(self.child.try_wait(), Ok(None)) && pid > 0 {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        eprintln!("xtask: stopped {}", self.name);
    }
}

/// Spawns `command` as a service with `dir` as its working directory and its output in
/// `dir/log`. The service gets its own process group (a terminal Ctrl-C reaches xtask, which
/// stops it in order) and is killed by the kernel if xtask dies without cleaning up.
fn spawn(name: &'static str, mut command: std::process::Command, dir: &Path) -> Result<Service> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("log")).context("creating the service log")?;
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    println!(
        "$ {}  (in {}, log in log)",
        display(&command),
        dir.display()
    );
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Service {
        name,
        child,
        dir: dir.to_path_buf(),
    })
}

/// Sends an inline `PING` and expects `+PONG`.
fn redis_ping(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.set_write_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(reply == *b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

/// Starts `redis-server` on 127.0.0.1:`port`, without persistence, and waits until it answers
/// PING (at most 10 s).
pub fn redis(port: u16) -> Result<Service> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if redis_ping(addr) || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        bail!(
            "{addr} is already in use (a leftover redis-server from an interrupted run?): stop it first"
        );
    }
    let dir = std::env::temp_dir().join(format!("mesh-xtask-redis-{}", std::process::id()));
    let port = port.to_string();
    let command = cmd(
        "redis-server",
        [
            "--port",
            port.as_str(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
    );
    let mut service = spawn("redis-server", command, &dir)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        signal::check()?;
        if redis_ping(addr) {
            println!("xtask: redis-server answers PING on {addr}");
            return Ok(service);
        }
        if let Some(status) = service.child.try_wait()? {
            bail!(
                "redis-server exited ({status}) before answering PING:\n{}",
                service.log()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "redis-server did not answer PING on {addr} within 10 s:\n{}",
                service.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
