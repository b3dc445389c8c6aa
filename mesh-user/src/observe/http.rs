//! The agent's HTTP endpoint: /metrics (Prometheus), /readyz and /healthz.
//!
//! A scrape never runs on the async workers: a dedicated thread renders the exposition text
//! (it reads every map). A scrape asks for a render that starts after it arrived and waits for
//! it up to `FRESH_WAIT`; when rendering takes longer (tens of thousands of backends) it gets
//! the latest finished render instead, so /metrics always answers quickly. Once renders are
//! known to take longer than `FRESH_WAIT` (the last one did, or the one running has already),
//! a scrape does not wait at all: a render asked for now would not arrive in time either, and
//! waiting would only add `FRESH_WAIT` to every scrape.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Router, body::Bytes, extract::State, http::StatusCode, response::IntoResponse, routing::get,
};
use tokio::sync::watch;

use super::{heartbeat::Heartbeat, metrics::AgentMetrics};

/// How long a scrape waits for a render that started after it arrived.
const FRESH_WAIT: Duration = Duration::from_millis(60);
/// `/healthz` fails when the control loop has not finished a turn for this long.
pub const HEALTHZ_STALE: Duration = Duration::from_secs(10);

/// A finished render: for which request ticket, and the text (or the error). The text is
/// `Bytes` so each scrape shares it instead of copying it (megabytes on a big node).
#[derive(Clone)]
struct Rendered {
    ticket: u64,
    text: Arc<Result<Bytes, String>>,
}

struct Endpoint {
    heartbeat: Arc<Heartbeat>,
    tickets: AtomicU64,
    times: RenderTimes,
    wake: mpsc::SyncSender<()>,
    rendered: watch::Receiver<Option<Rendered>>,
}

pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    heartbeat: Arc<Heartbeat>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let (publish, rendered) = watch::channel(None);
    let endpoint = Arc::new(Endpoint {
        heartbeat,
        tickets: AtomicU64::new(0),
        times: RenderTimes::new(),
        wake,
        rendered,
    });
    let requested = endpoint.clone();
    std::thread::Builder::new()
        .name("mesh-metrics".into())
        .spawn(move || render_loop(&metrics, &requested, &woken, &publish))
        .context("starting the metrics renderer")?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .with_state(endpoint);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {err}");
        }
    }))
}

/// Renders whenever asked, covering every ticket handed out before the render started.
fn render_loop(
    metrics: &AgentMetrics,
    endpoint: &Endpoint,
    woken: &mpsc::Receiver<()>,
    publish: &watch::Sender<Option<Rendered>>,
) {
    while woken.recv().is_ok() {
        let ticket = endpoint.tickets.load(Ordering::SeqCst);
        endpoint.times.started();
        let text = metrics
            .render()
            .map(Bytes::from)
            .map_err(|err| format!("{err:#}\n"));
        endpoint.times.finished();
        publish.send_replace(Some(Rendered {
            ticket,
            text: Arc::new(text),
        }));
        // The render's intermediate families are several times the text: give them back.
        crate::datapath::system::return_free_memory();
    }
}

async fn render_metrics(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let ticket = endpoint.tickets.fetch_add(1, Ordering::SeqCst) + 1;
    // A full channel means a render is already asked for; it will see this ticket.
    let _ = endpoint.wake.try_send(());
    let mut rendered = endpoint.rendered.clone();
    let wait = if endpoint.times.slower_than(FRESH_WAIT) {
        Duration::ZERO
    } else {
        FRESH_WAIT
    };
    let fresh = tokio::time::timeout(wait, async move {
        rendered
            .wait_for(|r| r.as_ref().is_some_and(|r| r.ticket >= ticket))
            .await
            .map(|r| r.clone())
    })
    .await;
    let latest = match fresh {
        Ok(Ok(r)) => r,
        // Slow render: the latest finished one, or the first one however long it takes.
        _ => {
            let mut rendered = endpoint.rendered.clone();
            rendered
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone())
                .ok()
                .flatten()
        }
    };
    match latest.as_ref().map(|r| r.text.as_ref()) {
        Some(Ok(text)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            text.clone(),
        )
            .into_response(),
        Some(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, err.clone()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response(),
    }
}

/// How long renders take, as far as a scrape can know when it arrives.
struct RenderTimes {
    epoch: Instant,
    /// When the render in progress started (microseconds since `epoch`, plus one); 0 if none.
    running_since: AtomicU64,
    /// How long the last finished render took, in microseconds.
    last: AtomicU64,
}

impl RenderTimes {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            running_since: AtomicU64::new(0),
            last: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn started(&self) {
        self.running_since
            .store(self.now_us().saturating_add(1), Ordering::Relaxed);
    }

    fn finished(&self) {
        let since = self.running_since.swap(0, Ordering::Relaxed);
        let took = self.now_us().saturating_sub(since.saturating_sub(1));
        self.last.store(took, Ordering::Relaxed);
    }

    /// The last render, or the one running now, has taken at least `limit`.
    fn slower_than(&self, limit: Duration) -> bool {
        let limit = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
        let since = self.running_since.load(Ordering::Relaxed);
        let running = if since == 0 {
            0
        } else {
            self.now_us().saturating_sub(since - 1)
        };
        self.last.load(Ordering::Relaxed) >= limit || running >= limit
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

    #[test]
    fn a_slow_render_finished_or_running_means_no_waiting() {
        let times = RenderTimes::new();
        let limit = Duration::from_millis(20);
        assert!(!times.slower_than(limit), "nothing rendered yet");
        times.started();
        times.finished();
        assert!(!times.slower_than(limit), "a quick render");
        times.started();
        std::thread::sleep(limit);
        assert!(
            times.slower_than(limit),
            "the running render is slow already"
        );
        times.finished();
        assert!(times.slower_than(limit), "the last render was slow");
        times.started();
        times.finished();
        assert!(!times.slower_than(limit), "quick again");
    }
}
