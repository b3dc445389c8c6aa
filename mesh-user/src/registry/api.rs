//! The local admin API (`[agent] admin_socket`, and `[agent] admin` over TCP): lists the merged registry and adds, replaces and
//! removes the API's own services.
//!
//! ```text
//! GET    /v1/services         200 {"services":[{"source":"file|api|redis","service":{...}}]}
//! PUT    /v1/services/{name}  body: a service as JSON (`name` optional; the path's wins)
//! DELETE /v1/services/{name}  404 unless it is an API service
//! ```
//!
//! A change answers once the agent has decided: 200 `{"applied":true,"generation":N}`, 400
//! `{"error":...}` naming the field and reason (nothing changed), 500 `{"applied":false,...}`
//! when the maps could not be written (accepted; the agent retries), 503 when the agent is
//! stopping. Every update sends the API's complete new set; applied sets are saved under
//! `state_dir` and sent again when the agent starts. Changes that arrive while an update is
//! being decided are sent together as the next update (one reconcile for a burst); if that
//! update is rejected, each of its changes is decided alone, so an invalid change never fails
//! another. Who may call it is decided in `listen`: on the Unix socket root and the agent's user,
//! on TCP whoever has the bearer token (401 otherwise), 403 for other Unix users.

mod listen;

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError},
};

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
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tracing::{error, info};

use super::{
    Listing, Outcome, Source, SourceObserver, SourceUpdate,
    update::{self, SavedServices},
};
use crate::config::{AgentConfig, ServiceConfig};

pub use listen::Listeners;

struct Api {
    /// The API's services by name: the set the agent last applied (or the saved set at start).
    /// Held while an update is sent and decided, so updates apply one after the other.
    services: Mutex<BTreeMap<String, ServiceConfig>>,
    /// Changes not yet sent: whoever holds `services` next sends them all as one update.
    queued: std::sync::Mutex<Vec<Change>>,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    saved: SavedServices,
    metrics: Arc<dyn SourceObserver>,
}

/// Binds the listeners `[agent]` asks for.
pub async fn bind(agent: &AgentConfig) -> anyhow::Result<Listeners> {
    Listeners::bind(agent).await
}

/// Queues the saved services as the API's first update and serves on `listeners`.
pub async fn start(
    listeners: Listeners,
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
        queued: std::sync::Mutex::new(Vec::new()),
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
        listeners.serve(app).await;
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
    match update::parse_service(&name, &body) {
        Ok(service) => submit(api, name, Some(service)).await,
        Err(reason) => failure(StatusCode::BAD_REQUEST, reason).into_response(),
    }
}

async fn delete_service(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    submit(api, name, None).await
}

/// One PUT (`service`) or DELETE (`None`) waiting for its update.
struct Change {
    name: String,
    service: Option<ServiceConfig>,
    reply: oneshot::Sender<Answer>,
}

impl Change {
    /// Applies the change to `services`; false for a DELETE of a service that is not there.
    fn apply_to(&self, services: &mut BTreeMap<String, ServiceConfig>) -> bool {
        match &self.service {
            Some(service) => {
                services.insert(self.name.clone(), service.clone());
                true
            }
            None => services.remove(&self.name).is_some(),
        }
    }
}

/// The status and JSON body a change is answered with (cloned for every change of an update).
#[derive(Clone, Debug)]
struct Answer(StatusCode, serde_json::Value);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// Queues the change and waits for its answer. Changes queued while another update is being
/// decided go out together as the next one.
async fn submit(api: Arc<Api>, name: String, service: Option<ServiceConfig>) -> Response {
    let (reply, answer) = oneshot::channel();
    api.queued
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Change {
            name,
            service,
            reply,
        });
    // Sent and decided in a task of its own: a client that hangs up must not cancel the
    // changes of the others queued with it, nor leave the API's set behind the registry's.
    tokio::spawn(async move {
        let mut services = api.services.lock().await;
        let batch = {
            let mut queued = api.queued.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::take(&mut *queued)
        };
        if !batch.is_empty() {
            api.commit(&mut services, batch).await;
        }
    });
    match answer.await {
        Ok(answer) => answer.into_response(),
        Err(_) => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".to_owned(),
        )
        .into_response(),
    }
}

impl Api {
    /// Sends `batch` as one update and answers each change. If the update is rejected and has
    /// more than one change, each change is sent and decided alone, in order.
    async fn commit(&self, current: &mut BTreeMap<String, ServiceConfig>, batch: Vec<Change>) {
        let mut next = current.clone();
        let mut changes = Vec::with_capacity(batch.len());
        for change in batch {
            if change.apply_to(&mut next) {
                changes.push(change);
            } else {
                let _ = change.reply.send(self.not_found(&change.name));
            }
        }
        if changes.is_empty() {
            return;
        }
        let answer = self.apply(current, next).await;
        if answer.0 == StatusCode::BAD_REQUEST && changes.len() > 1 {
            for change in changes {
                let mut next = current.clone();
                let answer = if change.apply_to(&mut next) {
                    self.apply(current, next).await
                } else {
                    self.not_found(&change.name)
                };
                let _ = change.reply.send(answer);
            }
            return;
        }
        for change in changes {
            let _ = change.reply.send(answer.clone());
        }
    }

    /// 404 for a DELETE of a service the API does not have.
    fn not_found(&self, name: &str) -> Answer {
        let elsewhere = self
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
        failure(StatusCode::NOT_FOUND, reason)
    }

    /// Sends `next` as the API's complete set; on success it becomes the API's set and is saved.
    async fn apply(
        &self,
        current: &mut BTreeMap<String, ServiceConfig>,
        next: BTreeMap<String, ServiceConfig>,
    ) -> Answer {
        let services: Vec<ServiceConfig> = next.values().cloned().collect();
        let outcome = update::send(&self.updates, Source::Api, services.clone()).await;
        let generation = match outcome {
            Outcome::Applied { generation } => Some(generation),
            // Accepted into the registry: it is the API's set now, saved like an applied one,
            // but the answer says the maps do not hold it yet.
            Outcome::Failed(_) => None,
            Outcome::Rejected(reason) => return failure(StatusCode::BAD_REQUEST, reason),
            Outcome::AgentGone => {
                return failure(
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
            return Answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({
                    "applied": false,
                    "error": format!(
                        "accepted, but the maps do not hold it yet (the agent retries): {reason}"
                    ),
                }),
            );
        }
        if let Err(err) = save {
            error!("admin API: {err:#}");
            return Answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({
                    "applied": true,
                    "generation": generation,
                    "error": format!("applied, but it will not survive a restart: {err:#}"),
                }),
            );
        }
        Answer(
            StatusCode::OK,
            json!({ "applied": true, "generation": generation }),
        )
    }
}

fn failure(status: StatusCode, reason: String) -> Answer {
    Answer(status, json!({ "error": reason }))
}
