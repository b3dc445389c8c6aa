//! `cargo xtask setup`: installs what is missing and checks the machine. Idempotent.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, Result, bail};

use crate::util::{Run as _, cgroup2_mount, cmd, is_root, mounts, path_with, target_dir};

/// Debian packages for building (LLVM for bpf-linker, bpftool) and for the tests and
/// benchmarks (network tools, the services they start, load generators). `prometheus` ships
/// `promtool`; the JDK and curl are the dual-stack clients of the dual-stack tests.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "haproxy",
    "redis-server",
    // Certificates of the TLS tests (admin API, Redis).
    "openssl",
    "prometheus",
    "wrk",
    "procps",
    "util-linux",
    "openjdk-17-jdk-headless",
    "curl",
    // The venv for the official Python Kubernetes client (see `python_client`).
    "python3-venv",
];

/// A venv with the official Kubernetes Python client, which tests/kube_api.rs runs against the
/// test API server. Outside the system Python (Debian's is externally managed); the tests find
/// it here (or at `$MESH_TEST_PYTHON`, and install it themselves when it is missing).
const PYTHON_VENV: &str = "/opt/mesh-test/python";
const PYTHON_KUBERNETES: &str = "kubernetes==37.0.2";

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// The manifest validator (PyPI) and its version, installed into a virtualenv under the target
/// directory so that nothing outside the workspace changes.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn run() -> Result<()> {
    println!("setup: checking the machine");
    check_root()?;
    debian_packages(DEBIAN_PACKAGES)?;
    nightly_components()?;
    python_client()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    kubernetes_validate()?;
    let cgroup2 = cgroup2_mount()?;
    println!("setup: cgroup v2 is mounted at {}", cgroup2.display());
    println!("setup: done");
    Ok(())
}

fn check_root() -> Result<()> {
    if !is_root() {
        bail!("setup must run as root (apt-get, mounting bpffs and loading eBPF programs need it)");
    }
    println!("setup: running as root");
    Ok(())
}

fn deb_installed(package: &str) -> bool {
    cmd("dpkg-query", ["-W", "-f=${Status}", package])
        .stdout_if_ok()
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn missing_debian_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect()
}

/// Installs those of `packages` that are missing (`apt-get update` first, only then).
pub fn debian_packages(packages: &[&'static str]) -> Result<()> {
    let missing = missing_debian_packages(packages);
    if missing.is_empty() {
        println!("setup: Debian packages: all {} installed", packages.len());
        return Ok(());
    }
    println!("setup: Debian packages missing: {}", missing.join(" "));
    cmd("apt-get", ["update"])
        .stdin(Stdio::null())
        .run()
        .context("apt-get update failed")?;
    cmd("apt-get", ["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .run()
        .with_context(|| format!("cannot install Debian packages: {}", missing.join(" ")))?;
    let still_missing = missing_debian_packages(packages);
    if !still_missing.is_empty() {
        bail!(
            "Debian packages still not installed after apt-get install: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

fn python_kubernetes_version(python: &Path) -> Option<String> {
    cmd(
        python,
        ["-c", "import kubernetes; print(kubernetes.__version__)"],
    )
    .stdout_if_ok()
    .map(|v| v.trim().to_owned())
}

fn python_client() -> Result<()> {
    let python = Path::new(PYTHON_VENV).join("bin/python");
    let wanted = PYTHON_KUBERNETES
        .split_once("==")
        .map_or(PYTHON_KUBERNETES, |(_, v)| v);
    if python_kubernetes_version(&python).as_deref() == Some(wanted) {
        println!("setup: Python Kubernetes client {wanted}: installed in {PYTHON_VENV}");
        return Ok(());
    }
    if !python.exists() {
        cmd("/usr/bin/python3", ["-m", "venv", PYTHON_VENV])
            .stdin(Stdio::null())
            .run()
            .with_context(|| format!("cannot create the Python venv {PYTHON_VENV}"))?;
    }
    cmd(
        &python,
        [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYTHON_KUBERNETES,
        ],
    )
    .stdin(Stdio::null())
    .run()
    .with_context(|| format!("cannot pip install {PYTHON_KUBERNETES} into {PYTHON_VENV}"))?;
    match python_kubernetes_version(&python) {
        Some(v) if v == wanted => {
            println!("setup: Python Kubernetes client {v}: installed in {PYTHON_VENV}");
            Ok(())
        }
        other => bail!("{PYTHON_KUBERNETES} was installed but the venv reports {other:?}"),
    }
}

/// Components of the nightly toolchain: rust-src for `-Z build-std=core` (building the kernel
/// programs), clippy for linting them (`xtask test`).
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

fn nightly_components() -> Result<()> {
    let installed = cmd(
        "rustup",
        ["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .stdout_if_ok()
    .context(
        "`rustup component list --toolchain nightly --installed` failed: \
         is rustup installed and the nightly toolchain present (`rustup toolchain list`)?",
    )?;
    for component in NIGHTLY_COMPONENTS {
        if installed.lines().any(|l| l.starts_with(component)) {
            println!("setup: {component} (nightly): installed");
            continue;
        }
        cmd(
            "rustup",
            ["component", "add", component, "--toolchain", "nightly"],
        )
        .run()
        .with_context(|| format!("cannot add {component} to the nightly toolchain"))?;
    }
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    cmd("bpf-linker", ["--version"])
        .stdout_if_ok()
        .map(|v| v.trim().to_owned())
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version() {
        println!("setup: bpf-linker: {version}");
        return Ok(());
    }
    println!("setup: bpf-linker not found: installing it against LLVM 22 (takes a minute or two)");
    cmd(
        "cargo",
        [
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ],
    )
    .env("PATH", path_with(&[&Path::new(LLVM_PREFIX).join("bin")]))
    .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
    .run()
    .context("cannot install bpf-linker")?;
    let version = bpf_linker_version()
        .context("bpf-linker was installed but `bpf-linker --version` still fails")?;
    println!("setup: bpf-linker: {version}");
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (pinned: 0.13.2 builds with the installed nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz_version() -> Option<String> {
    cmd("cargo", ["fuzz", "--version"])
        .stdout_if_ok()
        .map(|v| v.trim().to_owned())
}

/// Installs cargo-fuzz from crates.io unless a `cargo fuzz` is there already.
pub fn cargo_fuzz() -> Result<()> {
    if let Some(version) = cargo_fuzz_version() {
        println!("setup: {version}");
        return Ok(());
    }
    println!(
        "setup: cargo-fuzz not found: installing {CARGO_FUZZ_VERSION} (takes a minute or two)"
    );
    cmd(
        "cargo",
        [
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ],
    )
    .run()
    .context("cannot install cargo-fuzz")?;
    let version = cargo_fuzz_version()
        .context("cargo-fuzz was installed but `cargo fuzz --version` still fails")?;
    println!("setup: {version}");
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|m| m.fstype == "bpf" && m.target == Path::new(BPFFS)))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        println!("setup: bpffs: mounted at {BPFFS}");
        return Ok(());
    }
    cmd("mount", ["-t", "bpf", "bpf", BPFFS])
        .run()
        .with_context(|| format!("cannot mount bpffs at {BPFFS}"))?;
    if !bpffs_mounted()? {
        bail!("mount reported success but {BPFFS} is not a bpf mount in /proc/mounts");
    }
    Ok(())
}

/// The virtualenv that holds `kubernetes-validate`.
fn tools_venv() -> std::path::PathBuf {
    target_dir().join("tools").join("venv")
}

/// Path of the `kubernetes-validate` script that [`kubernetes_validate`] installs.
pub fn kubernetes_validate_bin() -> std::path::PathBuf {
    tools_venv().join("bin").join(KUBERNETES_VALIDATE)
}

fn kubernetes_validate_version() -> Option<String> {
    cmd(kubernetes_validate_bin(), ["--version"])
        .stdout_if_ok()
        .map(|v| v.trim().to_owned())
}

/// `kubernetes-validate` (PyPI), pinned, in a virtualenv under the target directory.
fn kubernetes_validate() -> Result<()> {
    if kubernetes_validate_version().as_deref() == Some(KUBERNETES_VALIDATE_VERSION) {
        println!("setup: {KUBERNETES_VALIDATE}: {KUBERNETES_VALIDATE_VERSION}");
        return Ok(());
    }
    let venv = tools_venv();
    println!(
        "setup: installing {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} into {}",
        venv.display()
    );
    if !venv.join("bin").join("pip").is_file() {
        cmd("python3", ["-m", "venv"])
            .arg(&venv)
            .stdin(Stdio::null())
            .run()
            .context(
                "cannot create a Python virtualenv (python3 with its venv module is needed; \
                 on Debian: apt-get install python3-venv)",
            )?;
    }
    cmd(venv.join("bin").join("pip"), ["install", "--quiet"])
        .arg(format!(
            "{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}"
        ))
        .stdin(Stdio::null())
        .run()
        .with_context(|| format!("cannot install {KUBERNETES_VALIDATE} from PyPI"))?;
    match kubernetes_validate_version() {
        Some(v) if v == KUBERNETES_VALIDATE_VERSION => {
            println!("setup: {KUBERNETES_VALIDATE}: {v}");
            Ok(())
        }
        other => bail!(
            "{KUBERNETES_VALIDATE} was installed but `{} --version` says {other:?}",
            kubernetes_validate_bin().display()
        ),
    }
}
