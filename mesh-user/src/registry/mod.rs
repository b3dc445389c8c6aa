//! The service registry: services from every source (config file, admin API, Redis), merged
//! and validated as one config. A source's update that would make the whole invalid is
//! rejected and that source keeps its previous services.

use std::collections::BTreeMap;

use serde::Serialize;

pub mod api;
pub mod file;
pub mod kubernetes;
pub mod redis;
pub mod sources;
pub mod update;

use crate::config::{Config, ConfigError, ServiceConfig};

/// Where services come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[[services]]` of the config file: the embedded default registry.
    File,
    /// The local admin API.
    Api,
    /// A Redis hash.
    Redis,
    Kubernetes,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Api => "api",
            Source::Redis => "redis",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// A source's complete set of services (sources always send their full set: no deltas to
/// lose or reorder).
#[derive(Debug)]
pub struct SourceUpdate {
    pub source: Source,
    pub services: Vec<ServiceConfig>,
    /// Told whether the update was applied, and why not.
    pub reply: Option<tokio::sync::oneshot::Sender<Outcome>>,
}

/// What became of an update, as the control loop saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The maps hold it: the desired state of this generation is applied.
    Applied { generation: u64 },
    /// Invalid: nothing changed; the reasons name the source, the field and the problem.
    Rejected(String),
    /// Valid and accepted, but writing the maps failed; the control loop retries. The maps do
    /// not hold it yet.
    Failed(String),
    /// The agent is stopping.
    AgentGone,
}

/// Where sources report their state (the metrics, in the agent).
pub trait SourceObserver: Send + Sync {
    fn source_state(&self, source: &str, up: bool, services: usize);
    fn config_rejected(&self);
}

/// The merged registry by source, for the admin API.
pub type Listing = Vec<(Source, ServiceConfig)>;

pub fn listing(registry: &Registry) -> Listing {
    [Source::File, Source::Api, Source::Redis, Source::Kubernetes]
        .into_iter()
        .flat_map(|source| {
            registry
                .services_of(source)
                .iter()
                .map(move |svc| (source, svc.clone()))
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// The config file: `[agent]` and the file's services.
    config: Config,
    others: BTreeMap<Source, Vec<ServiceConfig>>,
}

impl Registry {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            others: BTreeMap::new(),
        }
    }

    /// The config the data path should follow: `[agent]` from the file, services from every
    /// source (file first).
    pub fn merged(&self) -> Config {
        let mut merged = self.config.clone();
        for services in self.others.values() {
            merged.services.extend(services.iter().cloned());
        }
        merged
    }

    pub fn file_config(&self) -> &Config {
        &self.config
    }

    pub fn services_of(&self, source: Source) -> &[ServiceConfig] {
        match source {
            Source::File => &self.config.services,
            other => self.others.get(&other).map_or(&[], Vec::as_slice),
        }
    }

    /// Replaces the file's config, if the result is valid together with the other sources.
    pub fn replace_file(&mut self, config: Config, origin: &str) -> Result<(), ConfigError> {
        let mut next = self.clone();
        next.config = config;
        next.merged().validate(origin)?;
        *self = next;
        Ok(())
    }

    /// Replaces one source's services, if the result is valid.
    pub fn replace(
        &mut self,
        source: Source,
        services: Vec<ServiceConfig>,
    ) -> Result<(), ConfigError> {
        if source == Source::File {
            let config = Config {
                agent: self.config.agent.clone(),
                services,
            };
            return self.replace_file(config, source.name());
        }
        let mut next = self.clone();
        next.others.insert(source, services);
        next.merged().validate(source.name())?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn service(name: &str, vip: &str) -> ServiceConfig {
        let text = format!("[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\n");
        config::parse(&text, "test").unwrap().services.remove(0)
    }

    #[test]
    fn sources_are_merged_after_the_file() {
        let mut registry = Registry::new(Config {
            services: vec![service("a", "127.100.0.1:80")],
            ..Default::default()
        });
        registry
            .replace(Source::Api, vec![service("b", "127.100.0.2:80")])
            .unwrap();
        let names: Vec<String> = registry
            .merged()
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn an_update_clashing_with_another_source_is_rejected_and_changes_nothing() {
        let mut registry = Registry::new(Config {
            services: vec![service("a", "127.100.0.1:80")],
            ..Default::default()
        });
        let err = registry
            .replace(Source::Redis, vec![service("a", "127.100.0.9:80")])
            .unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
        assert!(registry.services_of(Source::Redis).is_empty());
        assert_eq!(registry.merged().services.len(), 1);
    }
}
