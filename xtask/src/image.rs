//! `cargo xtask image`: the container image `localhost/mesh:dev`, built with podman from the
//! repository's Dockerfile (target `prebuilt`: the host-built `target/release/mesh`) on a
//! Debian base image made here with debootstrap. Idempotent: installs podman, debootstrap and
//! runc only if missing, makes the base image only if it is missing, and podman's layer cache
//! makes a rebuild of an unchanged binary cheap.
//!
//! `cargo xtask image --from-source` builds the Dockerfile's default target instead (mesh built
//! inside the `builder` stage) as `localhost/mesh:from-source`, FROM a stand-in for the public
//! Rust image made of this machine's own toolchains (none can be downloaded here).
//!
//! Why the odd flags (see also the README's "Install on a cluster"): no image registry is
//! reachable, so the base image is made locally and passed as `--build-arg BASE=...`; this
//! machine mounts cgroup v1 at /sys/fs/cgroup (hybrid), which podman's default runtime
//! refuses, hence `--isolation=chroot` for the build and `--runtime runc
//! --cgroup-manager=cgroupfs` for runs.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, Result, bail};

use crate::build::{self, Profile};
use crate::setup;
use crate::util::{Run as _, cmd, mounts, target_dir, workspace_root};

/// The image `cargo xtask image` builds and the container test runs.
pub const IMAGE: &str = "localhost/mesh:dev";
/// The local base image (Debian 12 minbase) the Dockerfile's `BASE` argument points at.
pub const BASE_IMAGE: &str = "localhost/debian:bookworm";
/// The stand-in for the Dockerfile's `RUST_IMAGE`: the base image plus this machine's stable
/// and nightly toolchains, gcc and libc headers.
pub const RUST_IMAGE: &str = "localhost/mesh-rust:host";
/// What `--from-source` builds.
pub const FROM_SOURCE_IMAGE: &str = "localhost/mesh:from-source";
/// This machine's trust store, lent to builds that download crates: its TLS connections to the
/// package registries are checked against a CA that only this store holds.
const HOST_CERTS: &str = "/etc/ssl/certs:/etc/ssl/certs:ro";
const SUITE: &str = "bookworm";
const PACKAGES: &[&str] = &["podman", "debootstrap", "runc"];

/// Setup, build `mesh`, then the image.
pub fn run() -> Result<()> {
    setup::run()?;
    build::build(Profile::Release)?;
    build_image().map(|_| ())
}

/// `--from-source`: the Dockerfile's default target, mesh built inside the `builder` stage.
/// Takes several minutes (bpf-linker and mesh are compiled in the container).
pub fn run_from_source() -> Result<()> {
    setup::run()?;
    setup::debian_packages(PACKAGES)?;
    base_image()?;
    rust_image()?;
    cmd("podman", ["build", "--isolation=chroot", "--build-arg"])
        .arg(format!("BASE={BASE_IMAGE}"))
        .arg("--build-arg")
        .arg(format!("RUST_IMAGE={RUST_IMAGE}"))
        // The stand-in has the machine's floating nightly, not the Dockerfile's dated one.
        .args(["--build-arg", "RUST_NIGHTLY=nightly", "-v", HOST_CERTS])
        .args(["-t", FROM_SOURCE_IMAGE, "-f", "Dockerfile", "."])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .run()
        .context("podman build (from source) failed")?;
    println!("image: {FROM_SOURCE_IMAGE} built from source");
    Ok(())
}

/// [`RUST_IMAGE`], made only if missing: this machine's `stable` and `nightly` toolchains
/// (hard links into a build context when possible) and the rustup proxies.
fn rust_image() -> Result<()> {
    if image_exists(RUST_IMAGE) {
        println!("image: {RUST_IMAGE} present");
        return Ok(());
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let from_env = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
            .with_context(|| format!("neither ${var} nor $HOME is set"))
    };
    let rustup_home = from_env("RUSTUP_HOME", ".rustup")?;
    let cargo_home = from_env("CARGO_HOME", ".cargo")?;
    let host = cmd("rustc", ["-vV"])
        .stdout_if_ok()
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .context("`rustc -vV` names no host")?;
    let ctx = target_dir().join("image").join("rust-context");
    remove_dir_if_present(&ctx)?;
    let toolchains = ctx.join("rustup").join("toolchains");
    let bin = ctx.join("cargo").join("bin");
    for dir in [&toolchains, &bin] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for channel in ["stable", "nightly"] {
        let src = rustup_home
            .join("toolchains")
            .join(format!("{channel}-{host}"));
        if !src.is_dir() {
            bail!("toolchain {} not found", src.display());
        }
        let linked = cmd("cp", ["-al"]).arg(&src).arg(&toolchains).status();
        if !linked.is_ok_and(|s| s.success()) {
            cmd("cp", ["-a"])
                .arg(&src)
                .arg(&toolchains)
                .run()
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    std::fs::write(
        ctx.join("rustup").join("settings.toml"),
        format!("version = \"12\"\ndefault_toolchain = \"stable-{host}\"\nprofile = \"default\"\n"),
    )?;
    std::fs::copy(cargo_home.join("bin").join("rustup"), bin.join("rustup"))
        .context("copying rustup")?;
    for proxy in [
        "cargo",
        "rustc",
        "rustdoc",
        "rustfmt",
        "cargo-fmt",
        "cargo-clippy",
        "clippy-driver",
    ] {
        std::os::unix::fs::symlink("rustup", bin.join(proxy))?;
    }
    std::fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM {BASE_IMAGE}\n\
             RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\\n\
             \x20   --no-install-recommends gcc libc6-dev pkg-config ca-certificates \\\n\
             \x20&& rm -rf /var/lib/apt/lists/*\n\
             COPY rustup /usr/local/rustup\n\
             COPY cargo /usr/local/cargo\n\
             ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\\n\
             \x20   PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        ),
    )?;
    println!("image: making {RUST_IMAGE} from this machine's toolchains (a few minutes, 3 GB)");
    cmd(
        "podman",
        ["build", "--isolation=chroot", "-t", RUST_IMAGE, "-f"],
    )
    .arg(ctx.join("Containerfile"))
    .arg(&ctx)
    .stdin(Stdio::null())
    .run()
    .context("podman build of the Rust image failed")?;
    remove_dir_if_present(&ctx)
}

/// Whether `podman` can be run (the container test runs only then).
pub fn podman_available() -> bool {
    cmd("podman", ["--version"]).stdout_if_ok().is_some()
}

/// Installs what is missing, makes the base image if it is missing and builds [`IMAGE`] from
/// the already built `target/release/mesh`. Returns the image's id: the tag can be moved by
/// any other build on this machine meanwhile (podman's image store is shared), the id cannot.
pub fn build_image() -> Result<String> {
    setup::debian_packages(PACKAGES)?;
    base_image()?;
    let binary = build::bin(Profile::Release, "mesh");
    let root = workspace_root();
    let relative = binary
        .strip_prefix(root)
        .ok()
        .filter(|p| *p == Path::new("target/release/mesh"))
        .with_context(|| {
            format!(
                "the image takes the binary from <workspace>/target/release/mesh (the only file of \
                 target/ that .dockerignore lets into the build context), but it was built at {}; \
                 unset CARGO_TARGET_DIR for `cargo xtask image`",
                binary.display()
            )
        })?;
    if !binary.is_file() {
        bail!("{} was not built", binary.display());
    }
    let iidfile = target_dir().join("image").join("mesh.iid");
    std::fs::create_dir_all(iidfile.parent().expect("has a parent"))
        .context("creating target/image")?;
    let _ = std::fs::remove_file(&iidfile);
    cmd(
        "podman",
        [
            "build",
            "--isolation=chroot",
            "--target",
            "prebuilt",
            "--build-arg",
        ],
    )
    .arg(format!("BASE={BASE_IMAGE}"))
    .arg("--build-arg")
    .arg(format!("MESH_BINARY={}", relative.display()))
    .arg("--iidfile")
    .arg(&iidfile)
    .args(["-t", IMAGE, "-f", "Dockerfile", "."])
    .current_dir(root)
    .stdin(Stdio::null())
    .run()
    .context("podman build failed")?;
    let id = std::fs::read_to_string(&iidfile)
        .with_context(|| format!("reading {}", iidfile.display()))?
        .trim()
        .to_owned();
    // The image's own smoke test: the binary starts in the runtime image.
    let version = cmd(
        "podman",
        [
            "--runtime",
            "runc",
            "run",
            "--rm",
            "--cgroup-manager=cgroupfs",
        ],
    )
    .args(ulimit_args())
    .args(["--network", "none", &id, "--version"])
    .stdout_if_ok()
    .with_context(|| format!("`podman run --rm {id} --version` failed"))?;
    println!("image: {IMAGE} built, id {id} ({})", version.trim());
    Ok(id)
}

/// `--ulimit` arguments that need no CAP_SYS_RESOURCE: podman's defaults (nofile 1048576)
/// are above this machine's hard limits, and runc cannot raise them. nofile: this process's
/// limits; nproc: podman's default 32768 or lower (higher values failed here even at the
/// hard limit).
pub fn ulimit_args() -> Vec<String> {
    let limit = |resource| {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass; no other memory is touched.
        let ok = unsafe { libc::getrlimit(resource, &mut rlim) } == 0;
        ok.then_some((rlim.rlim_cur, rlim.rlim_max))
    };
    let mut args = Vec::new();
    if let Some((soft, hard)) = limit(libc::RLIMIT_NOFILE) {
        args.extend(["--ulimit".to_owned(), format!("nofile={soft}:{hard}")]);
    }
    if let Some((soft, hard)) = limit(libc::RLIMIT_NPROC) {
        let (soft, hard) = (soft.min(32_768), hard.min(32_768));
        args.extend(["--ulimit".to_owned(), format!("nproc={soft}:{hard}")]);
    }
    args
}

fn image_exists(name: &str) -> bool {
    cmd("podman", ["image", "exists", name])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// [`BASE_IMAGE`]: `debootstrap --variant=minbase bookworm` imported into podman, made only if
/// podman does not have it yet (about 1-2 minutes and 150 MB).
fn base_image() -> Result<()> {
    if image_exists(BASE_IMAGE) {
        println!("image: base image {BASE_IMAGE} present");
        return Ok(());
    }
    let work = target_dir().join("image");
    let rootfs = work.join(SUITE);
    let tarball = work.join(format!("{SUITE}.tar"));
    // Leftovers of an interrupted earlier attempt.
    remove_dir_if_present(&rootfs)?;
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!("image: making the base image {BASE_IMAGE} with debootstrap (1-2 minutes)");
    cmd("debootstrap", ["--variant=minbase", SUITE])
        .arg(&rootfs)
        .stdin(Stdio::null())
        .run()
        .context("debootstrap failed")?;
    apt_sources(&rootfs)?;
    cmd("tar", ["-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .run()
        .context("packing the base image")?;
    cmd("podman", ["import"])
        .arg(&tarball)
        .arg(BASE_IMAGE)
        .stdin(Stdio::null())
        .run()
        .context("podman import failed")?;
    remove_dir_if_present(&rootfs)?;
    std::fs::remove_file(&tarball).with_context(|| format!("removing {}", tarball.display()))?;
    Ok(())
}

/// Gives the base image this machine's Debian suites (the deb822 `debian.sources`, which on
/// Debian 12 lists bookworm, bookworm-updates and bookworm-security, as Debian's own images
/// do) instead of debootstrap's single `bookworm main` line: packages the build needs, such as
/// current security updates, come from the other suites.
fn apt_sources(rootfs: &Path) -> Result<()> {
    let host = Path::new("/etc/apt/sources.list.d/debian.sources");
    if !host.is_file() {
        println!(
            "image: {} not found: the base image keeps debootstrap's sources.list",
            host.display()
        );
        return Ok(());
    }
    let target = rootfs.join("etc/apt/sources.list.d/debian.sources");
    std::fs::copy(host, &target).with_context(|| format!("copying {}", host.display()))?;
    let list = rootfs.join("etc/apt/sources.list");
    if list.exists() {
        std::fs::remove_file(&list).with_context(|| format!("removing {}", list.display()))?;
    }
    Ok(())
}

/// Removes `dir`, after unmounting whatever an interrupted debootstrap left mounted inside it
/// (its /proc, /sys), so the removal never descends into a kernel filesystem.
fn remove_dir_if_present(dir: &Path) -> Result<()> {
    let mut inside: Vec<_> = mounts()?
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(dir))
        .collect();
    // Deepest first.
    inside.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    for target in inside {
        cmd("umount", ["--lazy"])
            .arg(&target)
            .run()
            .with_context(|| format!("unmounting {}", target.display()))?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
