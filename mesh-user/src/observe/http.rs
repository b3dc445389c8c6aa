//! The agent's HTTP endpoint: /metrics (Prometheus), /readyz and /healthz.
//!
//! A scrape never runs on the async workers: a dedicated thread renders the exposition text
//! (it reads every map), one scrape at a time, and the text goes to the client in chunks as
//! it is written. At 10k services the text is 23 MB: holding a finished render between
//! scrapes, or the whole text of one, was a quarter of the agent's memory. Scrapes that
//! arrive during a render wait for their own (at most `QUEUE` of them; more get 503).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use super::{heartbeat::Heartbeat, metrics::AgentMetrics};

/// Scrapes that may wait for the renderer; beyond that a scrape is answered 503 at once.
const QUEUE: usize = 8;
/// Chunks the renderer may write ahead of the client (about 1 MB): fewer hand-overs that
/// wait.
const IN_FLIGHT: usize = 8;
/// `/healthz` fails when the control loop has not finished a turn for this long.
pub const HEALTHZ_STALE: Duration = Duration::from_secs(10);

/// A piece of the text, or why there is none (only ever the first message).
type Chunk = Result<Bytes, String>;

struct Endpoint {
    heartbeat: Arc<Heartbeat>,
    /// One per scrape: where its text goes.
    scrapes: std::sync::mpsc::SyncSender<mpsc::Sender<Chunk>>,
}

pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    heartbeat: Arc<Heartbeat>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (scrapes, queued) = std::sync::mpsc::sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("mesh-metrics".into())
        .spawn(move || render_loop(&metrics, &queued))
        .context("starting the metrics renderer")?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .with_state(Arc::new(Endpoint { heartbeat, scrapes }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {err}");
        }
    }))
}

/// Renders one scrape after the other, each straight into its client's channel.
fn render_loop(metrics: &AgentMetrics, queued: &std::sync::mpsc::Receiver<mpsc::Sender<Chunk>>) {
    while let Ok(reply) = queued.recv() {
        if reply.is_closed() {
            // The client gave up while waiting.
            continue;
        }
        let sent =
            metrics.render_to(&mut |chunk| reply.blocking_send(Ok(Bytes::from(chunk))).is_ok());
        if let Err(err) = sent {
            let _ = reply.blocking_send(Err(format!("{err:#}\n")));
        }
        drop(reply);
        // A render's map reads take a few times the memory of the chunks: give it back.
        crate::datapath::system::return_free_memory();
    }
}

async fn render_metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let (reply, mut chunks) = mpsc::channel(IN_FLIGHT);
    if endpoint.scrapes.try_send(reply).is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many scrapes waiting\n",
        )
            .into_response();
    }
    match chunks.recv().await {
        Some(Ok(first)) => {
            let rest = futures_util::stream::unfold(chunks, |mut chunks| async move {
                let chunk = chunks.recv().await?;
                Some((chunk.map_err(std::io::Error::other), chunks))
            });
            let body = futures_util::stream::once(async move { Ok(first) }).chain(rest);
            (
                StatusCode::OK,
                [("content-type", "text/plain; version=0.0.4")],
                Body::from_stream(body),
            )
                .into_response()
        }
        Some(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, err).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response(),
    }
}

async fn readyz(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    if endpoint.heartbeat.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// The control loop counts as alive while its last turn is younger than `HEALTHZ_STALE`.
fn is_live(age: Duration) -> bool {
    age < HEALTHZ_STALE
}

async fn healthz(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let age = endpoint.heartbeat.age();
    if is_live(age) {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the control loop has not finished a turn for {:.1}s\n",
                age.as_secs_f64()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_after_10s_without_a_control_loop_turn() {
        assert!(is_live(Duration::from_millis(9_999)));
        assert!(!is_live(Duration::from_secs(10)));
    }
}
