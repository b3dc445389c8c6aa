//! The local admin API (`[agent] admin`): lists the merged registry and adds, replaces and
//! removes the API's own services.
//!
//! ```text
//! GET    /v1/services         200 {"services":[{"source":"file|api|redis","service":{...}}]}
//! PUT    /v1/services/{name}  body: a service as JSON (`name` optional; the path's wins)
//! DELETE /v1/services/{name}  404 unless it is an API service
//! ```
//!
//! A change answers once the agent has decided: 200 `{"applied":true}`, 400 `{"error":...}`
//! naming the field and reason (nothing changed), 503 when the agent is stopping. Every
//! change sends the API's complete new set; applied sets are saved under `state_dir` and sent
//! again when the agent starts. There is no authentication: keep it on a loopback address.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde_json::json;
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{error, info, warn};

use super::{
    Listing, Outcome, Source, SourceObserver, SourceUpdate,
    update::{self, SavedServices},
};
use crate::config::ServiceConfig;

struct Api {
    /// The API's services by name: the set the agent last applied (or the saved set at start).
    /// Held across a whole change, so concurrent changes apply one after the other.
    services: Mutex<BTreeMap<String, ServiceConfig>>,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    saved: SavedServices,
    metrics: Arc<dyn SourceObserver>,
}

/// Binds `addr`, queues the saved services as the API's first update and serves.
pub async fn start(
    addr: SocketAddr,
    saved: SavedServices,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let initial = saved.load().with_context(|| {
        format!(
            "the admin API's saved services are unreadable; fix or remove {}",
            saved.path().display()
        )
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin API address {addr}"))?;
    if !addr.ip().is_loopback() {
        warn!(%addr, "the admin API has no authentication and listens on a non-loopback address");
    }
    let services: BTreeMap<String, ServiceConfig> = initial
        .iter()
        .flatten()
        .map(|svc| (svc.name.clone(), svc.clone()))
        .collect();
    let verdict = match initial {
        Some(initial) => Some(update::send_initial(&updates, Source::Api, initial)?),
        None => None,
    };
    let count = services.len();
    let api = Arc::new(Api {
        services: Mutex::new(services),
        updates,
        registry,
        saved,
        metrics,
    });
    let app = Router::new()
        .route("/v1/services", get(list))
        .route(
            "/v1/services/{*name}",
            put(put_service).delete(delete_service),
        )
        .with_state(api.clone());
    Ok(tokio::spawn(async move {
        match verdict {
            Some(verdict) => match verdict.await {
                Ok(Outcome::Applied { .. }) => {
                    info!(services = count, "admin API: saved services applied");
                    api.metrics.source_state(Source::Api.name(), true, count);
                }
                Ok(Outcome::Failed(reason)) => {
                    error!("admin API: the saved services are not yet in the maps: {reason}");
                    api.metrics.source_state(Source::Api.name(), false, count);
                }
                Ok(Outcome::Rejected(reason)) => {
                    // The set stays the API's: changes are rejected until the clash is resolved,
                    // instead of silently forgetting the saved services.
                    error!(
                        "admin API: the saved services of {} were rejected: {}",
                        api.saved.path().display(),
                        reason.replace('\n', "; ")
                    );
                    api.metrics.source_state(Source::Api.name(), false, 0);
                }
                Ok(Outcome::AgentGone) | Err(_) => return,
            },
            None => api.metrics.source_state(Source::Api.name(), true, 0),
        }
        info!(%addr, "admin API listening");
        if let Err(err) = axum::serve(listener, app).await {
            error!("admin API stopped: {err}");
        }
    }))
}

async fn list(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    let listing = api.registry.borrow().clone();
    let services: Vec<serde_json::Value> = listing
        .into_iter()
        .map(|(source, service)| json!({ "source": source, "service": service }))
        .collect();
    Json(json!({ "services": services }))
}

async fn put_service(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let service = match update::parse_service(&name, &body) {
        Ok(service) => service,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let mut services = api.services.lock().await;
    let mut next = services.clone();
    next.insert(name, service);
    api.apply(&mut services, next).await
}

async fn delete_service(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    let mut services = api.services.lock().await;
    if !services.contains_key(&name) {
        let elsewhere = api
            .registry
            .borrow()
            .iter()
            .find(|(_, svc)| svc.name == name)
            .map(|(source, _)| *source);
        let reason = match elsewhere {
            Some(source) => format!(
                "service {name:?} comes from the {} source, not the admin API",
                source.name()
            ),
            None => format!("no service {name:?} in the admin API"),
        };
        return error(StatusCode::NOT_FOUND, reason);
    }
    let mut next = services.clone();
    next.remove(&name);
    api.apply(&mut services, next).await
}

impl Api {
    /// Sends `next` as the API's complete set; on success it becomes the API's set and is saved.
    async fn apply(
        &self,
        current: &mut BTreeMap<String, ServiceConfig>,
        next: BTreeMap<String, ServiceConfig>,
    ) -> Response {
        let services: Vec<ServiceConfig> = next.values().cloned().collect();
        let outcome = update::send(&self.updates, Source::Api, services.clone()).await;
        let generation = match outcome {
            Outcome::Applied { generation } => Some(generation),
            // Accepted into the registry: it is the API's set now, saved like an applied one,
            // but the answer says the maps do not hold it yet.
            Outcome::Failed(_) => None,
            Outcome::Rejected(reason) => return error(StatusCode::BAD_REQUEST, reason),
            Outcome::AgentGone => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the agent is stopping".to_owned(),
                );
            }
        };
        *current = next;
        self.metrics
            .source_state(Source::Api.name(), generation.is_some(), current.len());
        // fsync blocks: off the async workers.
        let saved = self.saved.clone();
        let save = tokio::task::spawn_blocking(move || saved.save(&services))
            .await
            .unwrap_or_else(|err| Err(anyhow::anyhow!("saving task failed: {err}")));
        if let Outcome::Failed(reason) = outcome {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({
                    "applied": false,
                    "error": format!(
                        "accepted, but the maps do not hold it yet (the agent retries): {reason}"
                    ),
                })),
            )
                .into_response();
        }
        if let Err(err) = save {
            error!("admin API: {err:#}");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({
                    "applied": true,
                    "generation": generation,
                    "error": format!("applied, but it will not survive a restart: {err:#}"),
                })),
            )
                .into_response();
        }
        (
            StatusCode::OK,
            Json(json!({ "applied": true, "generation": generation })),
        )
            .into_response()
    }
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}
