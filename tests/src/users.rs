//! Unprivileged users that a test creates (useradd) and removes again (userdel), to run
//! commands as someone who is not root: `setpriv --reuid --regid --clear-groups`.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use crate::process::{Captured, run_bounded};

/// A system user without home directory or login shell; removed on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Creates `mesh-t<pid><n>` (user names are at most 32 characters).
    pub fn create() -> TestUser {
        crate::require_root();
        let name = format!("mesh-t{}{}", std::process::id(), crate::next_unique());
        let out = run_bounded(
            Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(&name),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("useradd {name}: {e}"));
        assert!(out.status.success(), "useradd {name}: {}", out.describe());
        let id = |flag: &str| -> u32 {
            let out = run_bounded(
                Command::new("id").arg(flag).arg(&name),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("id {flag} {name}: {e}"));
            out.stdout
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("id {flag} {name}: {}", out.describe()))
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// `program args` run as this user (all capabilities gone with root's uid), bounded.
    pub fn run<I, S>(&self, program: &str, args: I, timeout: Duration) -> Captured
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program)
            .args(args);
        run_bounded(&mut cmd, timeout).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("userdel").arg(&self.name),
            Duration::from_secs(30),
        );
    }
}
