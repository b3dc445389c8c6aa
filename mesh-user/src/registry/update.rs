//! How a source hands its services to the agent: parsing a service from JSON, sending a
//! complete set and waiting for the outcome, and keeping the last applied set on disk.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Outcome, Source, SourceUpdate};
use crate::config::ServiceConfig;

/// Sends `services` as `source`'s complete set and waits for what became of it.
pub async fn send(
    updates: &mpsc::Sender<SourceUpdate>,
    source: Source,
    services: Vec<ServiceConfig>,
) -> Outcome {
    let (reply, verdict) = oneshot::channel();
    let update = SourceUpdate {
        source,
        services,
        reply: Some(reply),
    };
    if updates.send(update).await.is_err() {
        return Outcome::AgentGone;
    }
    verdict.await.unwrap_or(Outcome::AgentGone)
}

/// The agent's verdict on an update: applied, or why not.
pub type Verdict = oneshot::Receiver<Outcome>;

/// Queues `services` as `source`'s first update without waiting (the agent is not reading
/// yet); the returned receiver gets the verdict.
pub fn send_initial(
    updates: &mpsc::Sender<SourceUpdate>,
    source: Source,
    services: Vec<ServiceConfig>,
) -> anyhow::Result<Verdict> {
    let (reply, verdict) = oneshot::channel();
    updates
        .try_send(SourceUpdate {
            source,
            services,
            reply: Some(reply),
        })
        .map_err(|err| anyhow::anyhow!("queueing the saved {} services: {err}", source.name()))?;
    Ok(verdict)
}

/// Parses one service from JSON. `name` (the admin API's path segment or the Redis hash field)
/// is the service's name: the JSON may leave `name` out, or must repeat it. Errors name the
/// field (`backends[0].weight: invalid type: ...`), as serde reports it.
pub fn parse_service(name: &str, json: &[u8]) -> Result<ServiceConfig, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(json).map_err(|err| format!("invalid JSON: {err}"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("expected a JSON object (a service)".to_owned());
    };
    match object.get("name") {
        None => {
            object.insert("name".to_owned(), name.into());
        }
        Some(serde_json::Value::String(given)) if given == name => {}
        Some(given) => {
            return Err(format!(
                "name: is {given} but the service is named {name:?} by its key; leave `name` out \
                 or make them equal"
            ));
        }
    }
    serde_path_to_error::deserialize(&value).map_err(|err| {
        let path = err.path().to_string();
        if path == "." {
            err.inner().to_string()
        } else {
            format!("{path}: {}", err.inner())
        }
    })
}

/// The JSON file under `state_dir` that holds a source's last applied services.
#[derive(Debug, Clone)]
pub struct SavedServices {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFile {
    services: Vec<ServiceConfig>,
}

/// `SavedFile` as written: borrowed, so saving a large set does not copy it first.
#[derive(Serialize)]
struct SavedFileRef<'a> {
    services: &'a [ServiceConfig],
}

impl SavedServices {
    pub fn new(state_dir: &Path, file_name: &str) -> Self {
        Self {
            path: state_dir.join(file_name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved services; `None` when nothing was saved yet.
    pub fn load(&self) -> anyhow::Result<Option<Vec<ServiceConfig>>> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let saved: SavedFile = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", self.path.display()))?;
        Ok(Some(saved.services))
    }

    /// Replaces the file atomically: a temp file in the same directory, synced, renamed over it.
    /// Written synchronously, streamed through a buffer: at 10,000 services the text is
    /// megabytes, which as one transient allocation would stay in the allocator's heap (RSS)
    /// after every save.
    pub fn save(&self, services: &[ServiceConfig]) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            // 0600: the saved services are the node's routing, not for other users to read.
            let file = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true),
                0o600,
            )
            .open(&tmp)?;
            let mut out = std::io::BufWriter::new(file);
            serde_json::to_writer_pretty(&mut out, &SavedFileRef { services })?;
            out.write_all(b"\n")?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // The rename itself is durable once the directory is synced.
            std::fs::File::open(dir)?.sync_all()?;
            anyhow::Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.with_context(|| format!("saving {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Protocol};
    use crate::registry::{Registry, listing};

    const WEB: &str = r#"{"vip": "127.100.0.1:80", "backends": [{"addr": "127.0.0.1:9001"}]}"#;

    #[test]
    fn the_key_names_the_service() {
        let svc = parse_service("web", WEB.as_bytes()).unwrap();
        assert_eq!(svc.name, "web");
        assert_eq!(svc.vip, "127.100.0.1:80".parse().unwrap());
        assert_eq!(svc.protocol, Protocol::Tcp);
        assert_eq!(svc.backends[0].weight, 1);
        let same = WEB.replacen('{', r#"{"name": "web", "#, 1);
        assert_eq!(parse_service("web", same.as_bytes()).unwrap(), svc);
    }

    #[test]
    fn a_different_name_in_the_json_is_an_error() {
        let other = WEB.replacen('{', r#"{"name": "api", "#, 1);
        let err = parse_service("web", other.as_bytes()).unwrap_err();
        assert!(err.starts_with("name: is \"api\""), "{err}");
        let err = parse_service("web", br#"{"name": 1, "vip": "127.100.0.1:80"}"#).unwrap_err();
        assert!(err.starts_with("name: is 1"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse_service(
            "web",
            br#"{"vip": "127.100.0.1:80", "backends": [{"addr": "127.0.0.1:1", "weight": -1}]}"#,
        )
        .unwrap_err();
        assert!(
            err.starts_with("backends[0].weight: invalid value"),
            "{err}"
        );
        let err = parse_service(
            "web",
            br#"{"vip": "127.100.0.1:80", "backends": [{"adr": "127.0.0.1:1"}]}"#,
        )
        .unwrap_err();
        assert!(
            err.starts_with("backends[0].adr: unknown field `adr`, expected one of"),
            "{err}"
        );
        let err = parse_service("web", br#"{"backends": []}"#).unwrap_err();
        assert_eq!(err, "missing field `vip`");
        let err = parse_service("web", br#"{"vip": "nowhere"}"#).unwrap_err();
        assert!(err.starts_with("vip: invalid socket address"), "{err}");
        let err = parse_service(
            "web",
            br#"{"vip": "127.100.0.1:80", "health": {"expect": "2xx"}}"#,
        )
        .unwrap_err();
        assert!(
            err.starts_with("health.expect: invalid status code list"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_is_reported_with_its_position() {
        let err = parse_service("web", br#"{"vip": "127.100.0.1:80""#).unwrap_err();
        assert!(err.starts_with("invalid JSON: EOF"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let err = parse_service("web", b"[]").unwrap_err();
        assert_eq!(err, "expected a JSON object (a service)");
    }

    #[test]
    fn services_round_trip_through_json() {
        let text = r#"
[[services]]
name = "full"
vip = "127.100.0.1:80"
protocol = "udp"
on_empty = "passthrough"
terminate_udp_flows = false
affinity = { timeout = "10m" }
backends = [{ addr = "127.0.0.1:1", weight = 3, drain = true }]
[services.health]
type = "http"
path = "/ready"
expect = "200,204,300-399"
interval = "2s"
timeout = "250ms"
"#;
        let svc = crate::config::parse(text, "test")
            .unwrap()
            .services
            .remove(0);
        let json = serde_json::to_vec(&svc).unwrap();
        assert_eq!(parse_service("full", &json).unwrap(), svc);
    }

    #[test]
    fn saved_services_survive_a_reload_and_replace_atomically() {
        let dir = std::env::temp_dir().join(format!("mesh-saved-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let saved = SavedServices::new(&dir, "api-services.json");
        let _ = std::fs::remove_file(saved.path());
        assert_eq!(saved.load().unwrap(), None);
        let web = parse_service("web", WEB.as_bytes()).unwrap();
        saved.save(std::slice::from_ref(&web)).unwrap();
        assert_eq!(saved.load().unwrap(), Some(vec![web]));
        saved.save(&[]).unwrap();
        assert_eq!(saved.load().unwrap(), Some(vec![]));
        // Only the file itself is left: no temp files.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["api-services.json"]);
        std::fs::write(saved.path(), "{\"services\": 3}").unwrap();
        let err = format!("{:#}", saved.load().unwrap_err());
        assert!(err.contains("api-services.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_listing_is_file_then_api_then_redis() {
        let web = parse_service("web", WEB.as_bytes()).unwrap();
        let mut registry = Registry::new(Config {
            services: vec![web.clone()],
            ..Default::default()
        });
        let mut redis = web.clone();
        redis.name = "cache".to_owned();
        redis.vip = "127.100.0.3:80".parse().unwrap();
        let mut api = web.clone();
        api.name = "api".to_owned();
        api.vip = "127.100.0.2:80".parse().unwrap();
        registry.replace(Source::Redis, vec![redis]).unwrap();
        registry.replace(Source::Api, vec![api]).unwrap();
        let got: Vec<(Source, String)> = listing(&registry)
            .into_iter()
            .map(|(source, svc)| (source, svc.name))
            .collect();
        assert_eq!(
            got,
            [
                (Source::File, "web".to_owned()),
                (Source::Api, "api".to_owned()),
                (Source::Redis, "cache".to_owned()),
            ]
        );
    }
}
