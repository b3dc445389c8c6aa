//! `cargo xtask soak --seconds N [--seed S]`: setup, build, then the chaos run under load of
//! the integration-tests crate's `mesh-soak` binary (see tests/src/bin/mesh-soak.rs for what it
//! does and checks). Not part of `cargo xtask test` until it passes reliably.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::build::{self, Profile};

pub fn run(seconds: u64, seed: Option<u64>) -> Result<()> {
    crate::setup::run()?;
    build::build(Profile::Release)?;
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
