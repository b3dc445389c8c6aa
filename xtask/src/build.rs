//! `cargo xtask build`: `mesh` (mesh-user's build.rs builds and embeds the eBPF object) and the
//! binaries of the integration-tests crate (the `mesh-probe` helper).

use std::path::PathBuf;

use anyhow::Result;

use crate::util::{Run as _, cargo, target_dir};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn flag(self) -> Option<&'static str> {
        match self {
            Profile::Debug => None,
            Profile::Release => Some("--release"),
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

pub fn build(profile: Profile) -> Result<()> {
    cargo(["build"])
        .args(profile.flag())
        .args(["-p", "mesh-user"])
        .run()?;
    cargo(["build"])
        .args(profile.flag())
        .args(["-p", "integration-tests", "--bins"])
        .run()
}

/// Absolute path of a binary built with `profile`.
pub fn bin(profile: Profile, name: &str) -> PathBuf {
    target_dir().join(profile.dir()).join(name)
}
