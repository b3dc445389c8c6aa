//! Developer and CI tasks for mesh, run as `cargo xtask <command>` (see `.cargo/config.toml`).

mod bench;
mod build;
mod cleanup;
mod fuzz;
mod image;
mod manifests;
mod run;
mod services;
mod setup;
mod signal;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::build::Profile;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (Debian packages, rust-src, bpf-linker), mount bpffs, check
    /// root and cgroup v2. Idempotent.
    Setup,
    /// Setup, then build `mesh` (with its embedded eBPF object) and the test helper binaries.
    Build {
        /// Build the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Setup, build, then run `mesh agent --config examples/mesh.toml ARGS...`.
    Run {
        /// Extra arguments for `mesh agent` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, fmt, clippy, manifest validation, unit tests, the container image (when
    /// podman is installed), then the privileged end-to-end tests.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy` (local iteration only; CI never does).
        #[arg(long)]
        skip_lint: bool,
        /// Extra arguments for the end-to-end `cargo test` (after `--`), e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build `mesh`, then the container image `localhost/mesh:dev` from the Dockerfile
    /// (target `prebuilt`) with podman; installs podman, debootstrap and runc and makes the
    /// local Debian base image only if missing. Idempotent.
    Image {
        /// Build the Dockerfile's default target instead (mesh compiled inside the builder
        /// stage, FROM a stand-in Rust image made of this machine's toolchains):
        /// `localhost/mesh:from-source`. Several minutes.
        #[arg(long)]
        from_source: bool,
    },
    /// Setup, then validate the Kubernetes manifests (deploy/kubernetes/*.yaml) with
    /// `kubernetes-validate --strict` against Kubernetes 1.33.
    Manifests,
    /// Benchmarks.
    Bench {
        /// Short run.
        #[arg(long)]
        quick: bool,
        /// Only the BPF time per connection (kernel accounting: mesh's programs next to the
        /// minimal connect4 baseline), a minute or two.
        #[arg(long)]
        kernel_cost: bool,
        /// Only the health-check measurements of the control plane (ejection time, agent RSS
        /// and CPU with checks at 10k services), a few minutes.
        #[arg(long, conflicts_with = "kernel_cost")]
        health: bool,
        /// Only traffic from another host through a NodePort: mesh's TC programs, iptables
        /// and nftables DNAT and a direct ceiling, on one topology of network namespaces the
        /// bench makes (connection rate, bulk throughput, TC time per packet).
        #[arg(long, conflicts_with_all = ["kernel_cost", "health"])]
        nodeport: bool,
        /// Only the control plane's programming measurements (cold start, diff, config edit to
        /// data path at 1 and 10k services, agent RSS, /metrics scrape), with 60 edits at 10k
        /// spread over more than a resync period and a variant with a 1 s resync.
        #[arg(long, conflicts_with_all = ["kernel_cost", "health", "nodeport"])]
        control: bool,
    },
    /// Remove leftovers of interrupted test runs (mesh-test-* bpffs dirs and cgroups).
    Cleanup,
    /// Setup, build, then a chaos run under load: clients (some in a network namespace) through
    /// TCP and UDP VIPs while backends are killed, the registry churns through every source
    /// (admin API, config file, Redis, Kubernetes), Redis and the Kubernetes API server stop and
    /// start, and the agent is SIGKILLed / SIGTERMed / upgraded in place; fails on any violation
    /// of its checks (`cargo xtask test` runs it for 60 s).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The random seed (printed by every run) to replay a run's choices.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build the cargo-fuzz targets of fuzz/ (installing cargo-fuzz if missing) and run each
    /// for the given time, one after the other; prints the executions of each. A crash fails.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
        /// Stop a target after this many executions (if that comes before --seconds).
        #[arg(long)]
        runs: Option<u64>,
        /// Only this target (config, admin_api, redis, kubernetes, sockdiag).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = signal::install() {
        eprintln!("xtask: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build { debug } => setup::run().and_then(|()| {
            build::build(if debug {
                Profile::Debug
            } else {
                Profile::Release
            })
        }),
        Command::Run { args } => run::run(&args),
        Command::Test { skip_lint, args } => test::run(skip_lint, &args),
        Command::Image { from_source } => {
            if from_source {
                image::run_from_source()
            } else {
                image::run()
            }
        }
        Command::Manifests => setup::run().and_then(|()| manifests::validate()),
        Command::Bench {
            quick,
            kernel_cost,
            health,
            nodeport,
            control,
        } => {
            if control {
                bench::run_control(quick)
            } else if nodeport {
                bench::run_nodeport(quick)
            } else if kernel_cost {
                bench::run_kernel_cost(quick)
            } else if health {
                bench::run_health(quick)
            } else {
                bench::run(quick)
            }
        }
        Command::Cleanup => cleanup::run(),
        Command::Soak { seconds, seed } => soak::run(seconds, seed),
        Command::Fuzz {
            seconds,
            runs,
            target,
        } => fuzz::run(seconds, runs, target.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(signal::Interrupted(sig)) = e.downcast_ref::<signal::Interrupted>() {
                eprintln!("xtask: interrupted by signal {sig}");
                return ExitCode::from(128u8.saturating_add(u8::try_from(*sig).unwrap_or(0)));
            }
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
