//! `cargo xtask run`: setup, build, then replace xtask with `mesh agent`.

use std::os::unix::process::CommandExt as _;

use anyhow::{Result, bail};

use crate::build::{self, Profile};
use crate::util::{cmd, display, workspace_root};
use crate::{setup, signal};

const CONFIG: &str = "examples/mesh.toml";

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    build::build(Profile::Release)?;
    signal::check()?;
    let mut agent = cmd(
        build::bin(Profile::Release, "mesh"),
        ["agent", "--config", CONFIG],
    );
    agent.args(args).current_dir(workspace_root());
    println!("$ {}", display(&agent));
    // exec: the agent receives Ctrl-C/SIGTERM itself and its exit code is ours.
    let error = agent.exec();
    bail!("cannot exec `{}`: {error}", display(&agent))
}
