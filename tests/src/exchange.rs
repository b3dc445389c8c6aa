//! Connections that carry data both ways, for the bytes and RTT telemetry: a TCP backend that
//! reads one request line and answers with its name and a body, and a client (a `bash` loop
//! over `/dev/tcp`, so it needs nothing but bash) that runs inside a test cgroup.
//!
//! Per connection the client sends `<payload>\n`, reads the reply until EOF and closes; the
//! backend reads the request line, writes `<name>\n<body>\n` and closes first. Both sides count
//! what they moved, so a test can compare the kernel's telemetry with what really went over
//! the connections.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::CgroupGuard;
use crate::probe::{ProbeResult, move_into_cgroup_at_spawn};

/// How often the backend thread looks at its stop flag while idle.
const STOP_POLL: Duration = Duration::from_millis(50);
/// A connection that sends no complete request line within this long is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP backend on 127.0.0.1: reads one line, answers `<name>\n` and `body_len` bytes of body
/// and a newline, closes. Serves one connection at a time in one thread; stops on Drop.
pub struct ExchangeBackend {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    request_bytes: Arc<AtomicUsize>,
    reply_bytes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ExchangeBackend {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub fn start(name: &str, body_len: usize) -> ExchangeBackend {
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace) && !name.starts_with("ERR"),
            "backend name {name:?} would be ambiguous in the client's output"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an exchange backend");
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let request_bytes = Arc::new(AtomicUsize::new(0));
        let reply_bytes = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reply = format!("{name}\n{}\n", "y".repeat(body_len)).into_bytes();
        let thread = {
            let (accepted, answered, request_bytes, reply_bytes, stop) = (
                Arc::clone(&accepted),
                Arc::clone(&answered),
                Arc::clone(&request_bytes),
                Arc::clone(&reply_bytes),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name(format!("exchange-backend-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if !wait_readable(listener.as_raw_fd(), STOP_POLL) {
                            continue;
                        }
                        while let Ok((stream, _)) = listener.accept() {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            if let Some(read) = serve(stream, &reply) {
                                answered.fetch_add(1, Ordering::SeqCst);
                                request_bytes.fetch_add(read, Ordering::SeqCst);
                                reply_bytes.fetch_add(reply.len(), Ordering::SeqCst);
                            }
                        }
                    }
                })
                .expect("spawn exchange backend thread")
        };
        ExchangeBackend {
            name: name.to_owned(),
            addr,
            accepted,
            answered,
            request_bytes,
            reply_bytes,
            stop,
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that sent a request line and were answered (data exchanges).
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Request bytes read (newlines included) from connections that were answered.
    pub fn request_bytes(&self) -> usize {
        self.request_bytes.load(Ordering::SeqCst)
    }

    /// Reply bytes written to connections that were answered.
    pub fn reply_bytes(&self) -> usize {
        self.reply_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for ExchangeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("harness: exchange backend thread panicked");
        }
    }
}

impl std::fmt::Debug for ExchangeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeBackend")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("accepted", &self.accepted())
            .field("answered", &self.answered())
            .finish()
    }
}

/// Reads one request line and answers; the request's length, or None if the client went away.
fn serve(stream: TcpStream, reply: &[u8]) -> Option<usize> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    let mut line = Vec::new();
    let read = BufReader::new(&stream).read_until(b'\n', &mut line).ok()?;
    if read == 0 || line.last() != Some(&b'\n') {
        return None;
    }
    (&stream).write_all(reply).ok()?;
    // The backend closes first; the client reads until EOF and then closes its side.
    stream.shutdown(std::net::Shutdown::Write).ok()?;
    Some(read)
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

/// The client loop: `count` connections to `$HOST:$PORT`, each sending `$PAYLOAD\n`, printing
/// the reply's first line (or `ERR ...`), draining the reply to EOF and closing.
const CLIENT_SCRIPT: &str = r#"
set -u
echo "mesh-probe: cgroup $(grep '^0::' /proc/self/cgroup)" >&2
for _ in $(seq "$COUNT"); do
    if ! exec 3<>"/dev/tcp/$HOST/$PORT"; then
        echo "ERR connect"
        continue
    fi
    printf '%s\n' "$PAYLOAD" >&3
    if IFS= read -r line <&3; then
        echo "$line"
    else
        echo "ERR no reply"
    fi
    cat <&3 >/dev/null
    exec 3>&-
done
"#;

/// Runs `count` data exchanges with `addr` (each sends `payload_len` bytes and a newline) from a
/// `bash` process inside `cgroup`, bounded by `timeout`. Output as `mesh-probe connect`: one
/// reply name or `ERR ...` per connection. Panics if the client fails or runs elsewhere.
pub fn exchange_in(
    cgroup: &CgroupGuard,
    addr: SocketAddr,
    count: usize,
    payload_len: usize,
    timeout: Duration,
) -> ProbeResult {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", CLIENT_SCRIPT])
        .env("HOST", addr.ip().to_string())
        .env("PORT", addr.port().to_string())
        .env("COUNT", count.to_string())
        .env("PAYLOAD", "x".repeat(payload_len));
    move_into_cgroup_at_spawn(&mut cmd, cgroup);
    let out = crate::process::run_bounded(&mut cmd, timeout)
        .unwrap_or_else(|e| panic!("exchange client for {addr}: {e}"));
    assert!(
        out.status.success(),
        "exchange client for {addr} failed: {}",
        out.describe()
    );
    let result = ProbeResult::from_output(out.stdout, out.stderr);
    let expected = format!("/{}", cgroup.name());
    assert!(
        result.cgroup().is_some_and(|c| c.ends_with(&expected)),
        "the exchange client should run in cgroup {expected} but reported {:?}",
        result.cgroup()
    );
    assert_eq!(
        result.total(),
        count,
        "the exchange client printed {} lines for {count} connections:\n{}\n{}",
        result.total(),
        result.stdout,
        result.stderr
    );
    result
}
