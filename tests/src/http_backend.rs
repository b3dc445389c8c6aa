//! A small real HTTP/1.1 backend whose health endpoint can be switched at run time (200, 503,
//! 302, or "accept and never answer"), for the health-check tests.
//!
//! A tokio runtime of its own (one worker thread in the test process, outside any test cgroup,
//! so its own sockets are never rewritten) accepts on 127.0.0.1. Per connection it looks at the
//! first line (without consuming it) and then speaks one of two protocols:
//!
//! - **HTTP** (the first line is `<METHOD> <path> HTTP/1.x`), served by hyper: `GET <health
//!   path>` (default `/healthz`) is answered as [`HealthReply`] says; any other path gets
//!   `200 OK` with the body `<name>\n` (what `mesh-probe http` and `http-until` print).
//!   `Connection: close`.
//! - **Echo** (any other first line, e.g. `ping 3`): each line is answered with
//!   `<name> <line>\n` until the client closes (what `mesh-probe hold` does), so a test can keep
//!   one connection established and see that it still works.
//!
//! It counts health checks, data requests and echo sessions separately, so a test can tell the
//! agent's health checks (which connect directly) from client traffic through a VIP.
//! [`HttpBackend::stop`] closes the listener (connects are then refused, like a killed process);
//! [`HttpBackend::restart`] listens again on the same address. Every connection is bounded in
//! time, and dropping the backend ends them all.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, LOCATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A connection that sends no complete request line (or HTTP head) within this long is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`HealthReply::Hang`] keeps a health check waiting (far past any check timeout).
const HANG_FOR: Duration = Duration::from_secs(5);
/// An echo session ends after this long without a line (the client is bounded anyway).
const ECHO_IDLE: Duration = Duration::from_secs(10);
/// The longest first line looked at to tell HTTP from echo.
const MAX_FIRST_LINE: usize = 8192;

/// How the health endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthReply {
    /// An HTTP response with this status code (a 3xx carries a `Location` header).
    Status(u16),
    /// Accept the connection, read the request, and answer nothing for [`HANG_FOR`] (then
    /// close without a response).
    Hang,
}

/// Counters and switches shared with the server tasks.
#[derive(Debug)]
struct Shared {
    name: String,
    health_path: String,
    health: Mutex<HealthReply>,
    /// When the first request for the health path arrived.
    first_health_check: Mutex<Option<Instant>>,
    accepted: AtomicUsize,
    health_checks: AtomicUsize,
    data_requests: AtomicUsize,
    echo_sessions: AtomicUsize,
    echo_open: AtomicUsize,
    echo_lines: AtomicUsize,
}

impl Shared {
    fn health(&self) -> HealthReply {
        *self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A real HTTP backend on 127.0.0.1 (see the module docs).
pub struct HttpBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Always `Some` until dropped; dropping it ends every connection.
    runtime: Option<tokio::runtime::Runtime>,
    /// The accept loop and what stops it, while listening.
    listener: Option<(JoinHandle<()>, oneshot::Sender<()>)>,
}

impl HttpBackend {
    /// Starts on 127.0.0.1 with an ephemeral port; the health endpoint is `/healthz` and
    /// answers 200.
    pub fn start(name: &str) -> HttpBackend {
        HttpBackend::start_with(name, "/healthz", HealthReply::Status(200))
    }

    /// Starts on 127.0.0.1 with an ephemeral port, health endpoint `health_path` answering as
    /// `health` says.
    pub fn start_with(name: &str, health_path: &str, health: HealthReply) -> HttpBackend {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        HttpBackend::start_on(name, any_port, health_path, health)
    }

    /// Starts on `addr` (a 127.0.0.0/8 address, e.g. a VIP to catch connects that were not
    /// translated; port 0 picks an ephemeral port).
    pub fn start_on(
        name: &str,
        addr: SocketAddr,
        health_path: &str,
        health: HealthReply,
    ) -> HttpBackend {
        assert!(
            addr.ip().is_loopback(),
            "test backends listen only on loopback addresses, not {addr}"
        );
        assert!(
            !name.is_empty()
                && !name.contains(char::is_whitespace)
                && !name.starts_with("ERR")
                && !name.starts_with("HTTP"),
            "backend name {name:?} would be ambiguous in mesh-probe output"
        );
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("cannot bind an HTTP test backend on {addr}: {e}"));
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("http-backend-{name}"))
            .enable_all()
            .build()
            .expect("start the HTTP backend's runtime");
        let mut backend = HttpBackend {
            addr,
            shared: Arc::new(Shared {
                name: name.to_owned(),
                health_path: health_path.to_owned(),
                health: Mutex::new(health),
                first_health_check: Mutex::new(None),
                accepted: AtomicUsize::new(0),
                health_checks: AtomicUsize::new(0),
                data_requests: AtomicUsize::new(0),
                echo_sessions: AtomicUsize::new(0),
                echo_open: AtomicUsize::new(0),
                echo_lines: AtomicUsize::new(0),
            }),
            runtime: Some(runtime),
            listener: None,
        };
        backend.run(listener);
        backend
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn run(&mut self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let shared = Arc::clone(&self.shared);
        let runtime = self.runtime();
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener).expect("register the listener with tokio")
        };
        let (stop, stopped) = oneshot::channel();
        let accept = runtime.spawn(accept_loop(listener, shared, stopped));
        self.listener = Some((accept, stop));
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address it listens on (also while stopped: it restarts there).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches how the health endpoint answers from the next request on.
    pub fn set_health(&self, reply: HealthReply) {
        *self
            .shared
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reply;
    }

    /// Connections accepted (health checks, data requests and echo sessions).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Requests for the health path.
    pub fn health_checks(&self) -> usize {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// When the first request for the health path arrived (None before it).
    pub fn first_health_check_at(&self) -> Option<Instant> {
        *self
            .shared
            .first_health_check
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// HTTP requests for any other path (client traffic).
    pub fn data_requests(&self) -> usize {
        self.shared.data_requests.load(Ordering::SeqCst)
    }

    /// Echo sessions started, and currently open.
    pub fn echo_sessions(&self) -> usize {
        self.shared.echo_sessions.load(Ordering::SeqCst)
    }

    pub fn echo_open(&self) -> usize {
        self.shared.echo_open.load(Ordering::SeqCst)
    }

    /// Lines answered in echo sessions.
    pub fn echo_lines(&self) -> usize {
        self.shared.echo_lines.load(Ordering::SeqCst)
    }

    pub fn is_running(&self) -> bool {
        self.listener.is_some()
    }

    /// Closes the listener: from when this returns, connects to its address are refused.
    /// Established connections (also those the kernel had queued for accept) are served on.
    /// Idempotent.
    pub fn stop(&mut self) {
        if let Some((accept, stop)) = self.listener.take() {
            let _ = stop.send(());
            // The accept loop drops the listener before it ends.
            if let Err(e) = self.runtime().block_on(accept) {
                eprintln!("harness: an HTTP backend's accept loop failed: {e}");
            }
        }
    }

    /// Listens again on the same address (retrying EADDRINUSE for up to 5 s). No-op if running.
    pub fn restart(&mut self) {
        if self.listener.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!(
                    "cannot bind the HTTP test backend again on {}: {e}",
                    self.addr
                ),
            }
        };
        self.run(listener);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            // Drops every connection task: open echo sessions and hanging checks end here.
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl std::fmt::Debug for HttpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpBackend")
            .field("name", &self.shared.name)
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .field("accepted", &self.accepted())
            .field("health_checks", &self.health_checks())
            .field("data_requests", &self.data_requests())
            .field("echo_sessions", &self.echo_sessions())
            .finish_non_exhaustive()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => accepted_one(stream, &shared),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: say so, and go on after a pause instead of spinning.
                    eprintln!("harness: HTTP backend accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Closing a listener resets the connections still queued in it. A client connecting in a
    // loop would see that as ECONNRESET, where a test expects only refused connects from when
    // the listener is gone: serve what is queued first, then close.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, _peer)) = listener.accept() {
        if stream.set_nonblocking(true).is_ok()
            && let Ok(stream) = TcpStream::from_std(stream)
        {
            accepted_one(stream, &shared);
        }
    }
}

fn accepted_one(stream: TcpStream, shared: &Arc<Shared>) {
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(serve(stream, Arc::clone(shared)));
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let Some(first) = peek_first_line(&stream).await else {
        return;
    };
    let mut parts = first.split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let is_http = matches!(
        method,
        Some("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "OPTIONS")
    ) && path.is_some()
        && version.is_some_and(|v| v.starts_with("HTTP/1."));
    if is_http {
        serve_http(stream, shared).await;
    } else {
        serve_echo(stream, &shared).await;
    }
}

/// The first line the client sent, without its line ending and without consuming it; None if
/// the client closes, sends more than [`MAX_FIRST_LINE`] bytes without a newline, or nothing
/// within [`REQUEST_TIMEOUT`].
async fn peek_first_line(stream: &TcpStream) -> Option<String> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut buf = vec![0u8; MAX_FIRST_LINE];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]);
            return Some(line.trim_end_matches('\r').to_owned());
        }
        if n == buf.len() {
            return None;
        }
        // Part of a line: peek returns at once while those bytes are unread, so wait a little
        // for the rest instead of spinning.
        if n == seen {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen = n;
    }
}

/// The client went away or the check hangs: hyper closes the connection without a response.
#[derive(Debug)]
struct NoAnswer;

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer (HealthReply::Hang)")
    }
}

impl std::error::Error for NoAnswer {}

async fn serve_http(stream: TcpStream, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        async move { respond(&request, &shared).await }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    // Errors are the client's business (it gave up, or sent garbage); a hanging check ends in
    // one by design.
    let _ = served;
}

async fn respond(
    request: &Request<Incoming>,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, NoAnswer> {
    let (status, body) = if request.uri().path() == shared.health_path {
        shared
            .first_health_check
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(Instant::now);
        shared.health_checks.fetch_add(1, Ordering::SeqCst);
        match shared.health() {
            HealthReply::Status(code) => (code, format!("{} health {code}\n", shared.name)),
            HealthReply::Hang => {
                tokio::time::sleep(HANG_FOR).await;
                return Err(NoAnswer);
            }
        }
    } else {
        shared.data_requests.fetch_add(1, Ordering::SeqCst);
        (200, format!("{}\n", shared.name))
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain");
    if status.is_redirection() {
        response = response.header(LOCATION, "/elsewhere");
    }
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}

/// Counts an echo session as open for as long as it lives (also when its task is dropped).
struct OpenSession<'a>(&'a Shared);

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.echo_open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_echo(stream: TcpStream, shared: &Shared) {
    shared.echo_sessions.fetch_add(1, Ordering::SeqCst);
    shared.echo_open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenSession(shared);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(ECHO_IDLE, lines.next_line()).await {
        let reply = format!("{} {}\n", shared.name, line.trim_end_matches('\r'));
        if write.write_all(reply.as_bytes()).await.is_err() {
            break;
        }
        shared.echo_lines.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    fn get(addr: SocketAddr, path: &str) -> std::io::Result<crate::http::Response> {
        crate::http::get(addr, path, Duration::from_secs(2))
    }

    #[test]
    fn health_endpoint_switches_and_data_path_names_the_backend() {
        let backend = HttpBackend::start("web-1");
        let health = get(backend.addr(), "/healthz").expect("health");
        assert_eq!(health.status, 200);
        backend.set_health(HealthReply::Status(503));
        assert_eq!(get(backend.addr(), "/healthz").expect("health").status, 503);
        backend.set_health(HealthReply::Status(302));
        assert_eq!(get(backend.addr(), "/healthz").expect("health").status, 302);
        let data = get(backend.addr(), "/").expect("data");
        assert_eq!((data.status, data.body.as_str()), (200, "web-1\n"));
        assert_eq!(backend.health_checks(), 3);
        assert_eq!(backend.data_requests(), 1);
        assert_eq!(backend.accepted(), 4);
    }

    #[test]
    fn hang_answers_nothing_until_the_client_gives_up() {
        let backend = HttpBackend::start_with("slow", "/healthz", HealthReply::Hang);
        let started = Instant::now();
        let err =
            get_with_timeout(backend.addr(), Duration::from_millis(200)).expect_err("no answer");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(backend.health_checks(), 1);
    }

    fn get_with_timeout(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn echo_sessions_answer_every_line() {
        let backend = HttpBackend::start("echo");
        let mut stream = TcpStream::connect(backend.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        for i in 0..3 {
            stream
                .write_all(format!("ping {i}\n").as_bytes())
                .expect("write");
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            assert_eq!(line, format!("echo ping {i}\n"));
        }
        assert_eq!(backend.echo_open(), 1);
        drop((stream, reader));
        assert!(crate::wait_until(Duration::from_secs(2), || backend
            .echo_open()
            == 0));
        assert_eq!((backend.echo_sessions(), backend.echo_lines()), (1, 3));
    }

    #[test]
    fn stop_refuses_and_restart_serves_again() {
        let mut backend = HttpBackend::start("sr");
        backend.stop();
        let err = TcpStream::connect(backend.addr()).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        backend.restart();
        assert_eq!(get(backend.addr(), "/").expect("data").body, "sr\n");
    }
}
