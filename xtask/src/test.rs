//! `cargo xtask test`: the README's (and CI's) test command.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::build::{self, Profile};
use crate::util::{Run as _, TestTotals, cargo};
use crate::{cleanup, fuzz, image, manifests, services, setup, signal, soak};

/// The port of the Redis the end-to-end tests share; `MESH_TEST_REDIS_PORT` overrides it (for
/// a machine where another run already uses it).
const REDIS_PORT: u16 = 6390;

/// Clippy for `mesh-ebpf` on its own target, as mesh-user's build.rs (aya-build) builds it:
/// nightly, core built from source. aya-ebpf derives its `bpf_target_arch` cfg from the host
/// when no RUSTFLAGS set it; `-Z build-std` needs rust-src, and this step clippy, for the
/// nightly toolchain (setup installs both).
const KERNEL_CLIPPY: &[&str] = &[
    "+nightly",
    "clippy",
    "--package",
    "mesh-ebpf",
    "--release",
    "--target",
    "bpfel-unknown-none",
    "-Z",
    "build-std=core",
    "--",
    "-D",
    "warnings",
];

fn redis_port() -> Result<u16> {
    match std::env::var("MESH_TEST_REDIS_PORT") {
        Ok(port) => port
            .parse()
            .with_context(|| format!("MESH_TEST_REDIS_PORT={port:?} is not a port")),
        Err(_) => Ok(REDIS_PORT),
    }
}

/// Runs the steps in order, stopping at the first failure, and prints a one-line summary.
pub fn run(skip_lint: bool, extra: &[String]) -> Result<()> {
    let start = Instant::now();
    let mut steps = Steps::default();
    let result = run_steps(&mut steps, skip_lint, extra);
    let elapsed = start.elapsed().as_secs();
    let passed = steps.passed.join(", ");
    let totals = steps.totals;
    match (&result, steps.current) {
        (Ok(()), _) => println!("xtask test: OK in {elapsed}s ({passed})"),
        (Err(e), step) => {
            let reason = match e.downcast_ref::<signal::Interrupted>() {
                Some(interrupted) => interrupted.to_string(),
                None => e.to_string().lines().next().unwrap_or_default().to_owned(),
            };
            println!(
                "xtask test: FAILED at {} after {elapsed}s: {reason} (ok before it: {})",
                step.unwrap_or("?"),
                if passed.is_empty() { "none" } else { &passed },
            );
        }
    }
    // The closing line CI reads (every test of every `cargo test` run above; skipped = ignored
    // + left out by a name filter), after the line that breaks skipped down.
    for line in totals.closing_lines() {
        println!("{line}");
    }
    result
}

#[derive(Default)]
struct Steps {
    passed: Vec<&'static str>,
    current: Option<&'static str>,
    totals: TestTotals,
}

impl Steps {
    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> xtask test: {name}");
        self.current = Some(name);
        let value = f()?;
        self.passed.push(name);
        self.current = None;
        Ok(value)
    }
}

fn run_steps(steps: &mut Steps, skip_lint: bool, extra: &[String]) -> Result<()> {
    steps.run("setup", setup::run)?;
    steps.run("build", || build::build(Profile::Release))?;
    // Leftovers of an interrupted earlier run would confuse the privileged tests.
    steps.run("cleanup", cleanup::run)?;
    if skip_lint {
        println!("xtask test: --skip-lint: skipping fmt and clippy");
    } else {
        steps.run("fmt", || cargo(["fmt", "--all", "--", "--check"]).run())?;
        steps.run("clippy", || {
            cargo([
                "clippy",
                "--workspace",
                // Built for bpfel-unknown-none by mesh-user's build.rs, not for the host.
                "--exclude",
                "mesh-ebpf",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ])
            .run()
        })?;
        steps.run("clippy (kernel programs)", || cargo(KERNEL_CLIPPY).run())?;
    }
    steps.run("manifests", manifests::validate)?;
    let mut totals = TestTotals::default();
    let unit = steps.run("unit tests", || {
        cargo([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "integration-tests",
            "--exclude",
            "mesh-ebpf",
        ])
        .run_tests(&mut totals)
    });
    steps.totals = totals;
    unit?;
    // Each fuzz target briefly, from its seeds: a parser that now panics on one of them, or on
    // what a few seconds of mutation find, fails the run.
    steps.run("fuzz", || fuzz::run(fuzz::TEST_SECONDS, None, None))?;
    let image = steps.run("image", container_image)?;
    // Dropped at the end of this function, whatever happens after this line.
    let redis_port = redis_port()?;
    let _redis = steps.run("start redis", || services::redis(redis_port))?;
    let e2e = steps.run("integration tests", || {
        integration_tests(extra, redis_port, image.as_deref(), &mut totals)
    });
    steps.totals = totals;
    e2e?;
    // The chaos run under load (tests/src/bin/mesh-soak.rs), with a new seed each time (it
    // prints how to rerun it).
    steps.run("soak", || soak::run_built(soak::TEST_SECONDS, None))
}

/// The image for the container test (tests/tests/deploy.rs), built when podman is installed;
/// `None` (the test then skips and says why) when it is not.
fn container_image() -> Result<Option<String>> {
    if !image::podman_available() {
        println!(
            "xtask test: podman is not installed: not building the image; the container test \
             (tests/tests/deploy.rs) will skip. `cargo xtask image` installs podman and builds it."
        );
        return Ok(None);
    }
    // By id: another build on this machine may move the tag meanwhile.
    image::build_image().map(Some)
}

fn integration_tests(
    extra: &[String],
    redis_port: u16,
    image: Option<&str>,
    totals: &mut TestTotals,
) -> Result<()> {
    let mesh = build::bin(Profile::Release, "mesh");
    let probe = build::bin(Profile::Release, "mesh-probe");
    require_file(&mesh)?;
    require_file(&probe)?;
    let mut command = cargo(["test", "--release", "-p", "integration-tests", "--"]);
    if let Some(image) = image {
        command.env("MESH_TEST_IMAGE", image);
    }
    command
        .arg("--test-threads=1")
        .args(extra)
        .env("MESH_BIN", &mesh)
        .env("MESH_PROBE_BIN", &probe)
        .env("MESH_TEST_REDIS", format!("127.0.0.1:{redis_port}"))
        .run_tests(totals)
        .context("end-to-end tests failed")
}

fn require_file(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("{} was not built", path.display());
    }
    Ok(())
}
