//! Validation of the Kubernetes manifests in `deploy/kubernetes/` against the API schemas of
//! the Kubernetes version the project targets (`kubernetes-validate --strict`, which also
//! rejects unknown fields).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::setup;
use crate::util::{Run as _, cmd, workspace_root};

/// The Kubernetes version whose schemas the manifests must satisfy (k8s-openapi's `v1_33`).
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// `deploy/kubernetes/*.yaml`, sorted. Errors if there are none.
pub fn files() -> Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy").join("kubernetes");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("no manifests (*.yaml) in {}", dir.display());
    }
    files.sort();
    Ok(files)
}

/// Runs `kubernetes-validate --strict -k KUBERNETES_VERSION` on every manifest; fails on the
/// first invalid one (the tool reports each file and resource).
pub fn validate() -> Result<()> {
    let files = files()?;
    let root = workspace_root();
    let relative = files.iter().map(|f| f.strip_prefix(root).unwrap_or(f));
    cmd(
        setup::kubernetes_validate_bin(),
        ["--strict", "-k", KUBERNETES_VERSION],
    )
    .args(relative)
    .current_dir(root)
    .run()
    .context("a Kubernetes manifest in deploy/kubernetes/ is invalid")?;
    println!(
        "manifests: {} file(s) valid for Kubernetes {KUBERNETES_VERSION}",
        files.len()
    );
    Ok(())
}
