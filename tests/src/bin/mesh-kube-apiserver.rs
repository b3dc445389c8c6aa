//! `mesh-kube-apiserver`: the tests' Kubernetes API server as a process, for clients in other
//! processes (kubectl, scripts, an agent under test).
//!
//! Serves on 127.0.0.1:PORT, loads fixture objects, logs every request on stderr, and runs
//! until SIGINT or SIGTERM. Prints `listening on http://127.0.0.1:PORT` on stdout once ready.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use clap::Parser;
use integration_tests::kube_api::{DEFAULT_MAX_HISTORY, KubeApi, Options};

#[derive(Parser)]
#[command(about = "A test Kubernetes API server (services, endpointslices, nodes, ...)")]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// A fixture JSON file (an object or a list) or a directory of them; repeatable.
    #[arg(long)]
    fixtures: Vec<PathBuf>,
    /// Interval of BOOKMARK events in milliseconds (0: none).
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// Changes kept for watches and continue tokens.
    #[arg(long, default_value_t = DEFAULT_MAX_HISTORY)]
    history: usize,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Do not log requests.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let api = KubeApi::start_with(Options {
        port: args.port,
        bookmark_interval: (args.bookmark_interval_ms > 0)
            .then(|| Duration::from_millis(args.bookmark_interval_ms)),
        max_history: args.history,
        log_requests: !args.quiet,
    })
    .with_context(|| format!("cannot serve on 127.0.0.1:{}", args.port))?;
    for path in &args.fixtures {
        let count = api
            .load_fixtures(path)
            .map_err(|e| anyhow!("fixtures {}: {e}", path.display()))?;
        eprintln!("loaded {count} objects from {}", path.display());
    }
    if let Some(path) = &args.kubeconfig {
        api.kubeconfig(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("listening on {}", api.url());
    wait_for_signal()?;
    eprintln!("stopping");
    Ok(())
}

fn wait_for_signal() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    Ok(())
}
