//! `cargo xtask soak --seconds N [--seed S]`: setup, build, then the chaos run under load of
//! the integration-tests crate's `mesh-soak` binary (see tests/src/bin/mesh-soak.rs for what it
//! does and checks: every registry source churned, backends, the agent, Redis and the
//! Kubernetes test API server killed and restarted, in-place upgrades, clients in a network
//! namespace; at the end every map exactly the desired state, flat memory, a clean log).
//! `cargo xtask test` runs it for [`TEST_SECONDS`] after the end-to-end tests.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::build::{self, Profile};

/// The soak of `cargo xtask test`.
pub const TEST_SECONDS: u64 = 60;

pub fn run(seconds: u64, seed: Option<u64>) -> Result<()> {
    crate::setup::run()?;
    build::build(Profile::Release)?;
    run_built(seconds, seed)
}

/// Runs the built `mesh-soak` (no setup, no build).
pub fn run_built(seconds: u64, seed: Option<u64>) -> Result<()> {
    let soak = build::bin(Profile::Release, "mesh-soak");
    let mut command = Command::new(&soak);
    command
        .args(["--seconds", &seconds.to_string()])
        .env("MESH_BIN", build::bin(Profile::Release, "mesh"))
        .env("MESH_PROBE_BIN", build::bin(Profile::Release, "mesh-probe"));
    if let Some(seed) = seed {
        command.args(["--seed", &seed.to_string()]);
    }
    println!("$ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {}", soak.display()))?;
    if !status.success() {
        bail!("the soak run failed ({status}); its report is above");
    }
    Ok(())
}
