//! Backends that say who they are: a TCP server that writes `<name>\n` to each connection and
//! closes it, and a UDP server that answers each datagram with `<name>`.
//!
//! Both run one thread inside the test process (which is outside the test cgroup, so their own
//! sockets are never rewritten), listen only on 127.0.0.0/8, count what they served, can be
//! stopped (connects are then refused) and restarted on the same address, and end their thread
//! on Drop.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a backend thread looks at its stop flag while idle.
const STOP_POLL: Duration = Duration::from_millis(50);

fn check_loopback(addr: SocketAddr) {
    assert!(
        addr.ip().is_loopback(),
        "test backends listen only on loopback addresses, not {addr}"
    );
}

struct Worker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Worker {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            eprintln!("harness: a backend thread panicked");
        }
    }
}

/// Binds, retrying briefly on EADDRINUSE (a restart right after a stop).
fn bind_retrying<T>(addr: SocketAddr, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> T {
    let mut last = None;
    let bound = crate::wait_until(Duration::from_secs(5), || match bind(addr) {
        Ok(socket) => {
            last = Some(Ok(socket));
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            last = Some(Err(e));
            false
        }
        Err(e) => panic!("cannot bind a test backend on {addr}: {e}"),
    });
    match last {
        Some(Ok(socket)) if bound => socket,
        other => panic!(
            "cannot bind a test backend on {addr}: {:?}",
            other.map(|r| r.err())
        ),
    }
}

/// A TCP backend: per connection it writes `<name>\n` and closes.
pub struct TcpBackend {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    worker: Option<Worker>,
}

impl TcpBackend {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub fn start(name: &str) -> TcpBackend {
        TcpBackend::start_on(name, "127.0.0.1:0".parse().expect("valid address"))
    }

    /// Starts on `addr` (a 127.0.0.0/8 address; port 0 picks an ephemeral port).
    pub fn start_on(name: &str, addr: SocketAddr) -> TcpBackend {
        check_loopback(addr);
        assert!(
            !name.contains('\n') && !name.starts_with("ERR") && !name.contains(" from "),
            "backend name {name:?} would be ambiguous in mesh-probe output"
        );
        let listener = bind_retrying(addr, TcpListener::bind);
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let mut backend = TcpBackend {
            name: name.to_owned(),
            addr,
            accepted: Arc::new(AtomicUsize::new(0)),
            worker: None,
        };
        backend.run(listener);
        backend
    }

    fn run(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let reply = format!("{}\n", self.name).into_bytes();
        let accepted = Arc::clone(&self.accepted);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("tcp-backend-{}", self.name))
            .spawn(move || tcp_accept_loop(&listener, &reply, &accepted, &thread_stop))
            .expect("spawn backend thread");
        self.worker = Some(Worker { stop, thread });
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on (also while stopped: it restarts there).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since it was created (across restarts).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Closes the listener: new connects to its address are refused. Idempotent.
    pub fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Listens again on the same address. No-op if running.
    pub fn restart(&mut self) {
        if self.worker.is_none() {
            let listener = bind_retrying(self.addr, TcpListener::bind);
            self.run(listener);
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for TcpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpBackend")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("accepted", &self.accepted())
            .field("running", &self.is_running())
            .finish()
    }
}

fn tcp_accept_loop(
    listener: &TcpListener,
    reply: &[u8],
    accepted: &AtomicUsize,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener.as_raw_fd(), STOP_POLL) {
            continue;
        }
        // Take everything that is pending, then poll again.
        loop {
            match listener.accept() {
                Ok((stream, _peer)) => {
                    // Count before replying: the client sees EOF only after this.
                    accepted.fetch_add(1, Ordering::SeqCst);
                    serve(stream, reply);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // ECONNABORTED and the like: that connection is gone, keep serving.
                Err(e) => {
                    eprintln!("harness: backend accept: {e}");
                    break;
                }
            }
        }
    }
}

fn serve(stream: TcpStream, reply: &[u8]) {
    let mut stream = stream;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    // A client that went away is not the backend's problem; the probe reports it.
    let _ = stream.write_all(reply);
    let _ = stream.shutdown(std::net::Shutdown::Write);
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
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// A UDP backend: answers each datagram with `<name>`, from the address it is bound to.
pub struct UdpBackend {
    name: String,
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    worker: Option<Worker>,
}

impl UdpBackend {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub fn start(name: &str) -> UdpBackend {
        UdpBackend::start_on(name, "127.0.0.1:0".parse().expect("valid address"))
    }

    /// Starts on `addr` (a 127.0.0.0/8 address; port 0 picks an ephemeral port).
    pub fn start_on(name: &str, addr: SocketAddr) -> UdpBackend {
        check_loopback(addr);
        assert!(
            !name.contains('\n') && !name.starts_with("ERR") && !name.contains(" from "),
            "backend name {name:?} would be ambiguous in mesh-probe output"
        );
        let socket = bind_retrying(addr, UdpSocket::bind);
        let addr = socket.local_addr().expect("bound socket has an address");
        let mut backend = UdpBackend {
            name: name.to_owned(),
            addr,
            received: Arc::new(AtomicUsize::new(0)),
            worker: None,
        };
        backend.run(socket);
        backend
    }

    fn run(&mut self, socket: UdpSocket) {
        socket
            .set_read_timeout(Some(STOP_POLL))
            .expect("set read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let reply = self.name.clone().into_bytes();
        let received = Arc::clone(&self.received);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("udp-backend-{}", self.name))
            .spawn(move || udp_loop(&socket, &reply, &received, &thread_stop))
            .expect("spawn backend thread");
        self.worker = Some(Worker { stop, thread });
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received since it was created (across restarts).
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Closes the socket (datagrams to it get ICMP port unreachable). Idempotent.
    pub fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Binds the same address again. No-op if running.
    pub fn restart(&mut self) {
        if self.worker.is_none() {
            let socket = bind_retrying(self.addr, UdpSocket::bind);
            self.run(socket);
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for UdpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpBackend")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("received", &self.received())
            .field("running", &self.is_running())
            .finish()
    }
}

fn udp_loop(socket: &UdpSocket, reply: &[u8], received: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // Errors are the read timeout (look at the stop flag again), EINTR, or an ICMP error
        // from an earlier reply to a client that is gone: keep serving.
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            received.fetch_add(1, Ordering::SeqCst);
            let _ = socket.send_to(reply, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn fetch(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    }

    #[test]
    fn tcp_backend_replies_counts_stops_and_restarts() {
        let mut backend = TcpBackend::start("alpha");
        for _ in 0..5 {
            assert_eq!(fetch(backend.addr()).expect("connect"), "alpha\n");
        }
        assert_eq!(backend.accepted(), 5);

        backend.stop();
        let err = fetch(backend.addr()).expect_err("stopped backend refuses");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

        backend.restart();
        assert_eq!(fetch(backend.addr()).expect("connect"), "alpha\n");
        assert_eq!(backend.accepted(), 6);
    }

    #[test]
    fn udp_backend_replies_with_its_name() {
        let backend = UdpBackend::start("beta");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            client.send_to(b"hi", backend.addr()).expect("send");
            let (n, from) = client.recv_from(&mut buf).expect("reply");
            assert_eq!(&buf[..n], b"beta");
            assert_eq!(from, backend.addr());
        }
        assert_eq!(backend.received(), 3);
    }

    #[test]
    #[should_panic(expected = "only on loopback")]
    fn backends_refuse_non_loopback_addresses() {
        TcpBackend::start_on("x", "0.0.0.0:0".parse().expect("valid"));
    }
}
