//! `mesh`: the node agent and the operator CLI. The binary (`main.rs`) only calls [`main`]; it
//! is a library so that the fuzz targets (`fuzz/`) reach the parsers, through the module
//! `fuzzing` (feature `fuzzing`). Modules stay private: what neither `main` nor, with the
//! feature, the fuzz targets reach is still reported as dead code.

// Lowest layer first: each module imports only the ones above it.
mod agent;
mod cli;
mod config;
mod datapath;
mod desired;
mod health;
mod model;
mod observe;
mod reconcile;
mod registry;

/// The parsers of bad input as the agent calls them, for the fuzz targets (`fuzz/`). Only with
/// the `fuzzing` feature, so that no other build counts them as used.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::config::{Config, ConfigError, Reparser, ServiceConfig, parse};
    pub use crate::datapath::sockdiag::parse_replies;
    pub use crate::registry::kubernetes::{
        objects::{ServiceView, SliceView},
        translate::{Filter, NodeView},
        translated::Translated,
        valid_alone,
    };
    pub use crate::registry::{
        Registry, Source, SourceObserver, redis::parse_hash, update::parse_service,
    };
}

use std::path::PathBuf;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mesh", version, about = "eBPF socket-level L4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: load and attach the programs, keep the maps in line with the registry.
    Agent(agent::AgentArgs),
    /// Show services, backends and per-backend connection counts from the pinned maps.
    Services {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(long, short, value_enum, default_value_t)]
        output: cli::Output,
    },
    /// Show every (service, backend) pair: state, slots, connections, failures, bytes and mean RTT.
    Backends {
        /// Only the backends of this service (by name).
        service: Option<String>,
        #[command(flatten)]
        pins: PinArgs,
        #[arg(long, short, value_enum, default_value_t)]
        output: cli::Output,
    },
    /// Sample the counters twice, an interval apart: per-backend rates, per-service no-backend
    /// connects and node-wide datapath counters.
    Stats {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(long, short, value_enum, default_value_t)]
        output: cli::Output,
        /// Time between the two samples (humantime: 1s, 500ms, 1m).
        #[arg(long, short, default_value = "1s", value_parser = cli::parse_interval)]
        interval: std::time::Duration,
    },
    /// Live view of services and backends with connection rates, refreshed every interval
    /// (Ctrl-C to quit).
    Top {
        #[command(flatten)]
        pins: PinArgs,
        /// Refresh interval (humantime: 1s, 500ms, 1m).
        #[arg(long, short, default_value = "1s", value_parser = cli::parse_interval)]
        interval: std::time::Duration,
        /// Exit after this many refreshes; 0 runs until Ctrl-C.
        #[arg(long, short = 'n', default_value_t = 0)]
        iterations: u64,
    },
    /// Add or replace a service of the admin API on the running agent (through its socket).
    Register {
        #[command(flatten)]
        service: cli::admin::RegisterArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a service of the admin API from the running agent.
    Deregister {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop sending new connections to a service's backends (all, or those given with
    /// --backend); existing connections are left alone. --undo ends the drain.
    Drain {
        name: String,
        /// Only this backend (repeat for more); default: every backend of the service.
        #[arg(long = "backend")]
        backends: Vec<std::net::SocketAddr>,
        /// Take the backends out of draining again.
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Detach the programs and remove every pinned map and link.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args, Debug)]
struct PinArgs {
    /// Directory under bpffs holding mesh's pins (the agent's `[agent] bpffs`).
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
}

#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The running agent's admin socket (its `[agent] admin_socket`).
    #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = config::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

/// The `mesh` command line: parses the arguments and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            init_tracing();
            agent::run(args)
        }
        Command::Services { pins, output } => cli::services(&pins.bpffs, output),
        Command::Backends {
            service,
            pins,
            output,
        } => cli::backends(&pins.bpffs, service.as_deref(), output),
        Command::Stats {
            pins,
            output,
            interval,
        } => cli::stats(&pins.bpffs, output, interval),
        Command::Top {
            pins,
            interval,
            iterations,
        } => cli::top::run(&pins.bpffs, interval, iterations),
        Command::Register { service, admin } => {
            cli::admin::Admin::new(&admin.admin_socket).register(&service)
        }
        Command::Deregister { name, admin } => {
            cli::admin::Admin::new(&admin.admin_socket).deregister(&name)
        }
        Command::Drain {
            name,
            backends,
            undo,
            admin,
        } => cli::admin::Admin::new(&admin.admin_socket).drain(&name, &backends, undo),
        Command::Cleanup { pins } => {
            for path in datapath::cleanup(&pins.bpffs)? {
                println!("removed {}", path.display());
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Colour codes only for a person at a terminal, never in files or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
