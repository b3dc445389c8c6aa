//! Registry sources besides the config file: the local admin API (`api`) and a Redis hash
//! (`redis`). Each sends its complete set of services to the agent as a `SourceUpdate`; the
//! agent validates the merged registry and applies it, or rejects the update whole.
//!
//! What a source last had applied is saved under `[agent] state_dir` and sent again at start,
//! before the agent's first reconcile: a restarted agent keeps those VIPs in the maps instead of
//! deleting them until the source has spoken again.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use super::{Listing, SourceObserver, SourceUpdate, update::SavedServices};
use crate::config::AgentConfig;

pub struct Sources {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Sources {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the sources the `[agent]` config turns on. Their saved services are in `updates`
/// when this returns, so the caller can apply them before its first reconcile.
pub async fn start(
    agent: &AgentConfig,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
) -> anyhow::Result<Sources> {
    let mut tasks = Vec::new();
    // Bound first: a socket or port that cannot be had stops the agent before anything else.
    let admin = super::api::bind(agent).await?;
    if !admin.any() && agent.redis.is_none() && agent.kubernetes.is_none() {
        return Ok(Sources { tasks });
    }
    crate::datapath::system::create_private_dir(&agent.state_dir, false)
        .with_context(|| format!("[agent] state_dir {}", agent.state_dir.display()))?;
    if let Some(kubernetes) = &agent.kubernetes {
        let saved = SavedServices::new(&agent.state_dir, "kubernetes-services.json");
        tasks.push(
            super::kubernetes::start(
                agent,
                kubernetes,
                saved,
                updates.clone(),
                registry.clone(),
                metrics.clone(),
            )
            .await?,
        );
    }
    if admin.any() {
        let saved = SavedServices::new(&agent.state_dir, "api-services.json");
        tasks.push(
            super::api::start(
                admin,
                saved,
                updates.clone(),
                registry.clone(),
                metrics.clone(),
            )
            .await?,
        );
    }
    if let Some(redis) = &agent.redis {
        let saved = SavedServices::new(&agent.state_dir, "redis-services.json");
        tasks.push(super::redis::start(redis, saved, updates, registry, metrics).await?);
    }
    Ok(Sources { tasks })
}
