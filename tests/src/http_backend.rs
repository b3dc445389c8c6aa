//! A small real HTTP/1.1 backend whose health endpoint can be switched at run time (200, 503,
//! 302, or "accept and never answer"), for the health-check tests.
//!
//! One listener thread in the test process (outside any test cgroup, so its own sockets are
//! never rewritten) on 127.0.0.1, one short-lived thread per connection. Per connection it reads
//! the first line and then speaks one of two protocols:
//!
//! - **HTTP** (the first line is `<METHOD> <path> HTTP/1.x`): `GET <health path>` (default
//!   `/healthz`) is answered as [`HealthReply`] says; any other path gets `200 OK` with the body
//!   `<name>\n` (what `mesh-probe http` and `http-until` print). `Connection: close`.
//! - **Echo** (any other first line, e.g. `ping 3`): each line is answered with
//!   `<name> <line>\n` until the client closes (what `mesh-probe hold` does), so a test can keep
//!   one connection established and see that it still works.
//!
//! It counts health checks, data requests and echo sessions separately, so a test can tell the
//! agent's health checks (which connect directly) from client traffic through a VIP.
//! [`HttpBackend::stop`] closes the listener (connects are then refused, like a killed process);
//! [`HttpBackend::restart`] listens again on the same address. Every thread is bounded in time.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often threads look at the stop flag while idle.
const POLL: Duration = Duration::from_millis(50);
/// A connection that sends no complete request line within this long is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`HealthReply::Hang`] keeps a health check waiting (far past any check timeout).
const HANG_FOR: Duration = Duration::from_secs(5);
/// An echo session ends after this long without a line (the client is bounded anyway).
const ECHO_IDLE: Duration = Duration::from_secs(10);

/// How the health endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthReply {
    /// An HTTP response with this status code (a 3xx carries a `Location` header).
    Status(u16),
    /// Accept the connection, read the request, and answer nothing for [`HANG_FOR`] (or until
    /// the checker gives up and closes).
    Hang,
}

/// Counters and switches shared with the server threads.
#[derive(Debug)]
struct Shared {
    name: String,
    health_path: String,
    health: Mutex<HealthReply>,
    accepted: AtomicUsize,
    health_checks: AtomicUsize,
    data_requests: AtomicUsize,
    echo_sessions: AtomicUsize,
    echo_open: AtomicUsize,
    echo_lines: AtomicUsize,
    /// Ends connection threads (set on Drop, not on stop: a stopped backend's established
    /// connections live on, as a killed listener's accepted sockets would not, but a test only
    /// stops listeners to make new connects fail).
    shutdown: AtomicBool,
}

struct Listener {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A real HTTP backend on 127.0.0.1 (see the module docs).
pub struct HttpBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<Listener>,
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
        let listener = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("cannot bind an HTTP test backend on {addr}: {e}"));
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let mut backend = HttpBackend {
            addr,
            shared: Arc::new(Shared {
                name: name.to_owned(),
                health_path: health_path.to_owned(),
                health: Mutex::new(health),
                accepted: AtomicUsize::new(0),
                health_checks: AtomicUsize::new(0),
                data_requests: AtomicUsize::new(0),
                echo_sessions: AtomicUsize::new(0),
                echo_open: AtomicUsize::new(0),
                echo_lines: AtomicUsize::new(0),
                shutdown: AtomicBool::new(false),
            }),
            listener: None,
        };
        backend.run(listener);
        backend
    }

    fn run(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::Builder::new()
            .name(format!("http-backend-{}", self.shared.name))
            .spawn(move || accept_loop(&listener, &shared, &thread_stop))
            .expect("spawn HTTP backend thread");
        self.listener = Some(Listener { stop, thread });
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
    /// Established connections are not touched. Idempotent.
    pub fn stop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.stop.store(true, Ordering::Relaxed);
            if listener.thread.join().is_err() {
                eprintln!("harness: an HTTP backend thread panicked");
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
            match TcpListener::bind(self.addr) {
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
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.stop();
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

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener.as_raw_fd(), POLL) {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _peer)) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let shared = Arc::clone(shared);
                    let spawned = std::thread::Builder::new()
                        .name(format!("http-conn-{}", shared.name))
                        .spawn(move || serve(stream, &shared));
                    if let Err(e) = spawned {
                        eprintln!("harness: cannot spawn an HTTP connection thread: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("harness: HTTP backend accept: {e}");
                    break;
                }
            }
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let Some(first) = read_line(&mut reader, &stream, shared, REQUEST_TIMEOUT) else {
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
        serve_http(&mut reader, stream, shared, path.unwrap_or("/"));
    } else {
        serve_echo(&mut reader, stream, shared, first);
    }
}

fn serve_http(
    reader: &mut BufReader<TcpStream>,
    mut stream: TcpStream,
    shared: &Shared,
    path: &str,
) {
    // The rest of the head, up to the empty line; the request has no body.
    loop {
        match read_line(reader, &stream, shared, REQUEST_TIMEOUT) {
            Some(line) if line.is_empty() => break,
            Some(_) => {}
            None => return,
        }
    }
    let path = path.split('?').next().unwrap_or(path);
    let (status, body) = if path == shared.health_path {
        shared.health_checks.fetch_add(1, Ordering::SeqCst);
        let reply = *shared
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match reply {
            HealthReply::Status(code) => (code, format!("{} health {code}\n", shared.name)),
            HealthReply::Hang => {
                hang(&stream, shared);
                return;
            }
        }
    } else {
        shared.data_requests.fetch_add(1, Ordering::SeqCst);
        (200, format!("{}\n", shared.name))
    };
    let location = if (300..400).contains(&status) {
        "Location: /elsewhere\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{location}\
         Connection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Waits without answering until the peer closes, the backend is dropped, or [`HANG_FOR`].
fn hang(stream: &TcpStream, shared: &Shared) {
    let deadline = Instant::now() + HANG_FOR;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline && !shared.shutdown.load(Ordering::Relaxed) {
        if wait_readable(stream.as_raw_fd(), POLL) {
            // SAFETY: `buf` is valid for writes of its length; the fd is an open socket.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0
                || (n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
            {
                return; // The checker gave up and closed.
            }
        }
    }
}

fn serve_echo(
    reader: &mut BufReader<TcpStream>,
    mut stream: TcpStream,
    shared: &Shared,
    first: String,
) {
    shared.echo_sessions.fetch_add(1, Ordering::SeqCst);
    shared.echo_open.fetch_add(1, Ordering::SeqCst);
    let mut line = Some(first);
    while let Some(text) = line {
        if stream
            .write_all(format!("{} {text}\n", shared.name).as_bytes())
            .is_err()
        {
            break;
        }
        shared.echo_lines.fetch_add(1, Ordering::SeqCst);
        line = read_line(reader, &stream, shared, ECHO_IDLE);
    }
    shared.echo_open.fetch_sub(1, Ordering::SeqCst);
}

/// One line without its line ending; None on EOF, error, timeout or backend shutdown.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    stream: &TcpStream,
    shared: &Shared,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let _ = stream.set_read_timeout(Some(POLL));
    let mut bytes = Vec::new();
    loop {
        if shared.shutdown.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return None;
        }
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) => return None,
            Ok(_) if bytes.ends_with(b"\n") => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return None,
        }
        if bytes.len() > 8192 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    Some(text.trim_end_matches(['\r', '\n']).to_owned())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// poll(2) for readability, bounded by `timeout`. False on timeout (or EINTR).
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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
