//! `mesh-probe`: a tiny client (and backend) for mesh's end-to-end tests. The harness runs it
//! inside a test cgroup so its connects go through mesh's programs, and, for IPv6 tests, inside
//! a test network namespace (`ip netns exec`).
//!
//! ```text
//! mesh-probe connect --addr IP:PORT --count N [--timeout-ms T] [--summary]
//!     N sequential TCP connects; each: connect, read the reply until EOF, close.
//!     Prints one line per connect: the reply's first line, or `ERR <errno name or message>`.
//! mesh-probe udp --addr IP:PORT --count N [--timeout-ms T] [--summary]
//!     N request/replies on one unconnected UDP socket (sendto/recvfrom).
//!     Prints `<reply> from <ip:port>` or `ERR <errno name or message>` per datagram.
//! mesh-probe udp-fresh --addr IP:PORT --count N [--timeout-ms T] [--summary] [--keep-open]
//!     As `udp`, but every datagram from a new unconnected socket (closed after the reply).
//!     With `--keep-open` every socket stays open until the end, so each has a port of its
//!     own: the kernel may give a port closed a moment ago to the next socket, whose datagram
//!     then continues the old socket's flow at a translation layer (conntrack, nodeport).
//! mesh-probe udp-burst --addr IP:PORT --count N [--timeout-ms T] [--summary]
//!     As `udp`, but all N datagrams are sent before the first reply is read, so the socket
//!     has sent to N backends when it reads their replies. Output as `udp`, in reply order.
//! mesh-probe udp-connected --addr IP:PORT --count N [--timeout-ms T] [--summary] [--keep-open]
//!     N new connected UDP sockets: connect, send, recv, close (`--keep-open`: as udp-fresh).
//!     Output as `udp`.
//! mesh-probe connect-until --addr IP:PORT --stop-file PATH --max-ms M [--timeout-ms T]
//!     TCP connects (as `connect`) in a loop until PATH exists or M ms have passed.
//!     Always prints a summary.
//! mesh-probe peer --addr IP:PORT --proto tcp|udp [--timeout-ms T] [--hold-ms H]
//!     One connect (TCP, or connected UDP and one request). Prints
//!     `peer <getpeername() or ERR ..>`, `original_dst <getsockopt SO_ORIGINAL_DST or ERR ..>`
//!     and `reply <reply> from <source>` (or `reply ERR ..`), one per line. With --hold-ms it
//!     keeps the socket open that long before closing it and exiting.
//! mesh-probe http --addr IP:PORT --count N [--path P] [--timeout-ms T] [--summary]
//!     N sequential HTTP/1.1 GETs of P (default `/`), each on a new connection
//!     (`Connection: close`). Prints per request the first line of a 2xx response's body (a
//!     backend's name), `ERR HTTP <status>` for other statuses, the first line of a reply that
//!     is not HTTP at all (a decoy), or `ERR <errno name or message>`.
//! mesh-probe http-until --addr IP:PORT --stop-file PATH --max-ms M [--path P] [--timeout-ms T]
//!     As `http`, in a loop until PATH exists or M ms have passed. Always prints a summary.
//! mesh-probe hold --addr IP:PORT --count N --every-ms E [--timeout-ms T]
//!     One TCP connection held open: every E ms it sends `ping <i>\n` and reads one line,
//!     which must be `<name> ping <i>`; N times, then it closes. Prints per exchange `<name>`
//!     or `ERR <errno name or message>` (after an error the connection is given up: the
//!     remaining exchanges print `ERR closed`); `ERR connect <errno>` alone if it cannot
//!     connect.
//! mesh-probe serve-tcp --addr IP:PORT --name NAME --max-ms M
//!     A TCP backend: writes `NAME\n` to each connection and closes it.
//! mesh-probe serve-udp --addr IP:PORT --name NAME --max-ms M
//!     A UDP backend: answers each datagram with `NAME`.
//!     Both print `ready <bound ip:port>` once listening, and exit after M ms.
//! ```
//!
//! `--dual-stack` (with an IPv6 `--addr`, e.g. `[::ffff:127.100.1.1]:53`; `udp`, `udp-fresh`,
//! `udp-connected` and `peer`) makes every client socket an AF_INET6 socket with IPV6_V6ONLY
//! set to 0 explicitly, whatever the `net.ipv6.bindv6only` default: the socket of a dual-stack
//! application that reaches IPv4 services through v4-mapped addresses.
//!
//! `--summary` replaces the per-attempt lines with one JSON object (see
//! [`integration_tests::probe::ProbeSummary`]): attempts, replies, reply sources, errors, the
//! slowest connect() in microseconds and the elapsed time.
//!
//! It first prints `mesh-probe: cgroup <0:: line of /proc/self/cgroup>` on stderr, and exits 0
//! once all attempts are reported (2 on usage errors).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use integration_tests::probe::{CGROUP_LINE_PREFIX, errno_name};

/// Largest reply read per connection.
const MAX_REPLY: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Connect,
    Udp,
    UdpFresh,
    UdpBurst,
    UdpConnected,
    ConnectUntil,
    Peer,
    ServeTcp,
    ServeUdp,
    Http,
    HttpUntil,
    Hold,
}

struct Args {
    mode: Mode,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
    summary: bool,
    stop_file: Option<PathBuf>,
    max: Duration,
    proto_udp: bool,
    name: String,
    hold: Duration,
    path: String,
    every: Duration,
    dual_stack: bool,
    keep_open: bool,
}

const USAGE: &str =
    "usage: mesh-probe connect|udp|udp-fresh|udp-burst|udp-connected --addr IP:PORT --count N \
[--timeout-ms T] [--summary] [--keep-open (udp-fresh, udp-connected)]
       mesh-probe connect-until --addr IP:PORT --stop-file PATH --max-ms M [--timeout-ms T]
       mesh-probe http --addr IP:PORT --count N [--path P] [--timeout-ms T] [--summary]
       mesh-probe http-until --addr IP:PORT --stop-file PATH --max-ms M [--path P] [--timeout-ms T]
       mesh-probe hold --addr IP:PORT --count N --every-ms E [--timeout-ms T]
       mesh-probe peer --addr IP:PORT --proto tcp|udp [--timeout-ms T] [--hold-ms H]
       mesh-probe serve-tcp|serve-udp --addr IP:PORT --name NAME --max-ms M
       (udp, udp-fresh, udp-connected and peer also take --dual-stack, with an IPv6 --addr)";

fn parse_ms(flag: &str, value: &str) -> Result<Duration, String> {
    let ms = value
        .parse::<u64>()
        .map_err(|e| format!("{flag} {value:?}: {e}"))?;
    if ms == 0 {
        return Err(format!("{flag} must be > 0"));
    }
    Ok(Duration::from_millis(ms))
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mode, rest) = args.split_first().ok_or("missing command")?;
    let mode = match mode.as_str() {
        "connect" => Mode::Connect,
        "udp" => Mode::Udp,
        "udp-fresh" => Mode::UdpFresh,
        "udp-burst" => Mode::UdpBurst,
        "udp-connected" => Mode::UdpConnected,
        "connect-until" => Mode::ConnectUntil,
        "peer" => Mode::Peer,
        "serve-tcp" => Mode::ServeTcp,
        "serve-udp" => Mode::ServeUdp,
        "http" => Mode::Http,
        "http-until" => Mode::HttpUntil,
        "hold" => Mode::Hold,
        other => return Err(format!("unknown command {other:?}")),
    };
    let mut flags: HashMap<&str, &str> = HashMap::new();
    let mut summary = false;
    let mut dual_stack = false;
    let mut keep_open = false;
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        if flag == "--summary" {
            summary = true;
            continue;
        }
        if flag == "--keep-open" {
            if !matches!(mode, Mode::UdpFresh | Mode::UdpConnected) {
                return Err("--keep-open works with udp-fresh and udp-connected".into());
            }
            keep_open = true;
            continue;
        }
        if flag == "--dual-stack" {
            dual_stack = true;
            continue;
        }
        let known = [
            "--addr",
            "--count",
            "--timeout-ms",
            "--stop-file",
            "--max-ms",
            "--proto",
            "--name",
            "--hold-ms",
            "--path",
            "--every-ms",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag:?}"));
        }
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        flags.insert(flag.as_str(), value.as_str());
    }
    let addr = flags
        .get("--addr")
        .ok_or("--addr is required")?
        .parse::<SocketAddr>()
        .map_err(|e| format!("--addr: {e}"))?;
    let needs_count = matches!(
        mode,
        Mode::Connect
            | Mode::Udp
            | Mode::UdpFresh
            | Mode::UdpBurst
            | Mode::UdpConnected
            | Mode::Http
            | Mode::Hold
    );
    let count = match flags.get("--count") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|e| format!("--count {v:?}: {e}"))?,
        None if needs_count => return Err("--count is required".into()),
        None => 0,
    };
    let timeout = match flags.get("--timeout-ms") {
        Some(v) => parse_ms("--timeout-ms", v)?,
        None => Duration::from_millis(2000),
    };
    let needs_max = matches!(
        mode,
        Mode::ConnectUntil | Mode::HttpUntil | Mode::ServeTcp | Mode::ServeUdp
    );
    let max = match flags.get("--max-ms") {
        Some(v) => parse_ms("--max-ms", v)?,
        None if needs_max => return Err("--max-ms is required".into()),
        None => Duration::ZERO,
    };
    let hold = match flags.get("--hold-ms") {
        Some(v) => parse_ms("--hold-ms", v)?,
        None => Duration::ZERO,
    };
    let every = match flags.get("--every-ms") {
        Some(v) => parse_ms("--every-ms", v)?,
        None if mode == Mode::Hold => return Err("--every-ms is required".into()),
        None => Duration::ZERO,
    };
    let path = flags.get("--path").copied().unwrap_or("/").to_owned();
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(format!(
            "--path must start with / and have no spaces, got {path:?}"
        ));
    }
    let stop_file = flags.get("--stop-file").map(PathBuf::from);
    if matches!(mode, Mode::ConnectUntil | Mode::HttpUntil) && stop_file.is_none() {
        return Err("--stop-file is required".into());
    }
    let proto_udp = match (mode, flags.get("--proto").copied()) {
        (Mode::Peer, Some("tcp")) => false,
        (Mode::Peer, Some("udp")) => true,
        (Mode::Peer, other) => return Err(format!("--proto must be tcp or udp, got {other:?}")),
        _ => false,
    };
    if dual_stack {
        if !matches!(
            mode,
            Mode::Udp | Mode::UdpFresh | Mode::UdpConnected | Mode::Peer
        ) {
            return Err("--dual-stack works with udp, udp-fresh, udp-connected and peer".into());
        }
        if !addr.is_ipv6() {
            return Err(format!(
                "--dual-stack needs an IPv6 --addr (e.g. [::ffff:a.b.c.d]:port), got {addr}"
            ));
        }
    }
    let name = flags.get("--name").map(|s| (*s).to_owned());
    if matches!(mode, Mode::ServeTcp | Mode::ServeUdp) && name.is_none() {
        return Err("--name is required".into());
    }
    Ok(Args {
        mode,
        addr,
        count,
        timeout,
        summary: summary || matches!(mode, Mode::ConnectUntil | Mode::HttpUntil),
        stop_file,
        max,
        proto_udp,
        name: name.unwrap_or_default(),
        keep_open,
        hold,
        path,
        every,
        dual_stack,
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mesh-probe: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    report_cgroup();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = match args.mode {
        Mode::ServeTcp => serve_tcp(&args, &mut out),
        Mode::ServeUdp => serve_udp(&args, &mut out),
        Mode::Peer => peer(&args, &mut out),
        Mode::Hold => hold(&args, &mut out),
        _ => client(&args, &mut out),
    };
    if let Err(e) = result.and_then(|()| out.flush()) {
        eprintln!("mesh-probe: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn report_cgroup() {
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let line = membership
        .lines()
        .find(|line| line.starts_with("0::"))
        .unwrap_or("<no cgroup v2 membership>");
    eprintln!("{CGROUP_LINE_PREFIX}{line}");
}

/// What one client attempt gave.
struct Attempt {
    /// The reply and, for UDP, where it came from; or the error.
    outcome: Result<(String, Option<SocketAddr>), String>,
    /// How long connect() took (TCP and connected UDP).
    connect: Option<Duration>,
}

/// Totals of a client run, printed as one JSON object with `--summary`.
#[derive(Default)]
struct Summary {
    attempts: u64,
    replies: BTreeMap<String, u64>,
    sources: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    max_connect: Duration,
}

impl Summary {
    fn add(&mut self, attempt: &Attempt) {
        self.attempts += 1;
        match &attempt.outcome {
            Ok((reply, from)) => {
                *self.replies.entry(reply.clone()).or_default() += 1;
                if let Some(from) = from {
                    *self.sources.entry(from.to_string()).or_default() += 1;
                }
            }
            Err(e) => *self.errors.entry(e.clone()).or_default() += 1,
        }
        if let Some(took) = attempt.connect {
            self.max_connect = self.max_connect.max(took);
        }
    }

    fn to_json(&self, elapsed: Duration) -> serde_json::Value {
        serde_json::json!({
            "attempts": self.attempts,
            "replies": self.replies,
            "sources": self.sources,
            "errors": self.errors,
            "max_connect_us": u64::try_from(self.max_connect.as_micros()).unwrap_or(u64::MAX),
            "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

fn client(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    let started = Instant::now();
    let mut summary = Summary::default();
    // `udp` and `udp-burst` keep one socket for all datagrams.
    let shared = if matches!(args.mode, Mode::Udp | Mode::UdpBurst) {
        Some(unconnected_socket(args)?)
    } else {
        None
    };
    // `udp-burst` sends everything first; a datagram that cannot be sent shows as its error,
    // and then as one reply fewer (a timeout) below.
    let mut send_errors = Vec::new();
    if let (Mode::UdpBurst, Some(socket)) = (args.mode, &shared) {
        for i in 0..args.count {
            let request = format!("mesh-probe {i}\n");
            if let Err(e) = socket.send_to(request.as_bytes(), args.addr) {
                send_errors.push(failed(&e));
            }
        }
    }
    let mut send_errors = send_errors.into_iter();
    let mut kept = Vec::new();
    let mut i = 0usize;
    loop {
        if matches!(args.mode, Mode::ConnectUntil | Mode::HttpUntil) {
            let stop = args.stop_file.as_ref().is_some_and(|f| f.exists());
            if stop || started.elapsed() >= args.max {
                break;
            }
        } else if i >= args.count {
            break;
        }
        let attempt = match args.mode {
            Mode::Connect | Mode::ConnectUntil => connect_once(args.addr, args.timeout),
            Mode::Udp => udp_exchange(
                shared.as_ref().expect("udp mode has a socket"),
                args.addr,
                i,
            ),
            Mode::UdpFresh => match unconnected_socket(args) {
                Ok(socket) => {
                    let attempt = udp_exchange(&socket, args.addr, i);
                    if args.keep_open {
                        kept.push(socket);
                    }
                    attempt
                }
                Err(e) => failed(&e),
            },
            Mode::UdpBurst => send_errors.next().unwrap_or_else(|| Attempt {
                outcome: udp_reply(shared.as_ref().expect("udp-burst mode has a socket")),
                connect: None,
            }),
            Mode::UdpConnected => udp_connected_once(args, i, &mut kept),
            Mode::Http | Mode::HttpUntil => http_once(args.addr, &args.path, args.timeout),
            Mode::Peer | Mode::ServeTcp | Mode::ServeUdp | Mode::Hold => {
                unreachable!("not a client loop")
            }
        };
        if args.summary {
            summary.add(&attempt);
        } else {
            match &attempt.outcome {
                Ok((reply, Some(from))) => writeln!(out, "{reply} from {from}")?,
                Ok((reply, None)) => writeln!(out, "{reply}")?,
                Err(e) => writeln!(out, "ERR {e}")?,
            }
        }
        i += 1;
    }
    if args.summary {
        writeln!(out, "{}", summary.to_json(started.elapsed()))?;
    }
    Ok(())
}

fn failed(e: &std::io::Error) -> Attempt {
    Attempt {
        outcome: Err(errno_name(e)),
        connect: None,
    }
}

/// One connect, read until EOF, close. The reply's first line, or the error to print.
fn connect_once(addr: SocketAddr, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let connected = TcpStream::connect_timeout(&addr, timeout);
    let connect = Some(started.elapsed());
    let outcome = connected
        .map_err(|e| errno_name(&e))
        .and_then(|stream| read_reply(&stream, timeout))
        .map(|reply| (reply, None));
    Attempt { outcome, connect }
}

/// One HTTP GET on a new connection (`Connection: close`), read until EOF.
fn http_once(addr: SocketAddr, path: &str, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let connected = TcpStream::connect_timeout(&addr, timeout);
    let connect = Some(started.elapsed());
    let outcome = connected
        .map_err(|e| errno_name(&e))
        .and_then(|mut stream| {
            stream
                .set_write_timeout(Some(timeout))
                .map_err(|e| errno_name(&e))?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .map_err(|e| errno_name(&e))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| errno_name(&e))?;
            let mut reply = Vec::new();
            (&stream)
                .take(MAX_REPLY)
                .read_to_end(&mut reply)
                .map_err(|e| errno_name(&e))?;
            http_reply(&reply)
        })
        .map(|reply| (reply, None));
    Attempt { outcome, connect }
}

/// A 2xx response's first body line; `HTTP <status>` as an error otherwise; a reply that is not
/// HTTP (a decoy that writes its name) as it is.
fn http_reply(reply: &[u8]) -> Result<String, String> {
    if !reply.starts_with(b"HTTP/1.") {
        return first_line(reply).ok_or_else(|| "empty".to_owned());
    }
    let text = String::from_utf8_lossy(reply);
    let status = text
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "bad HTTP status line".to_owned())?;
    if !(200..300).contains(&status) {
        return Err(format!("HTTP {status}"));
    }
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| "truncated HTTP response".to_owned())?;
    first_line(body.as_bytes()).ok_or_else(|| "empty HTTP body".to_owned())
}

/// `hold`: one connection, `count` ping/reply exchanges `every` apart.
fn hold(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    let stream = match TcpStream::connect_timeout(&args.addr, args.timeout) {
        Ok(stream) => stream,
        Err(e) => {
            writeln!(out, "ERR connect {}", errno_name(&e))?;
            return Ok(());
        }
    };
    stream.set_read_timeout(Some(args.timeout))?;
    stream.set_write_timeout(Some(args.timeout))?;
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut broken = false;
    for i in 0..args.count {
        if i > 0 {
            std::thread::sleep(args.every);
        }
        if broken {
            writeln!(out, "ERR closed")?;
            continue;
        }
        let result = exchange(&stream, &mut reader, i);
        match result {
            Ok(name) => writeln!(out, "{name}")?,
            Err(e) => {
                broken = true;
                writeln!(out, "ERR {e}")?;
            }
        }
        // Each line as it happens: the harness may read the output of a killed probe.
        out.flush()?;
    }
    Ok(())
}

fn exchange(
    mut stream: &TcpStream,
    reader: &mut std::io::BufReader<TcpStream>,
    i: usize,
) -> Result<String, String> {
    let ping = format!("ping {i}");
    stream
        .write_all(format!("{ping}\n").as_bytes())
        .map_err(|e| errno_name(&e))?;
    let mut line = String::new();
    match std::io::BufRead::read_line(reader, &mut line) {
        Ok(0) => return Err("EOF".to_owned()),
        Ok(_) => {}
        Err(e) => return Err(errno_name(&e)),
    }
    let line = line.trim_end();
    match line.strip_suffix(&format!(" {ping}")) {
        Some(name) if !name.is_empty() => Ok(name.to_owned()),
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

fn read_reply(stream: &TcpStream, timeout: Duration) -> Result<String, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| errno_name(&e))?;
    let mut reply = Vec::new();
    stream
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .map_err(|e| errno_name(&e))?;
    first_line(&reply).ok_or_else(|| "empty".to_owned())
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    }
}

fn unconnected_socket(args: &Args) -> std::io::Result<UdpSocket> {
    let socket = if args.dual_stack {
        let fd = dual_stack_socket(libc::SOCK_DGRAM)?;
        // [::]:0, as UdpSocket::bind would.
        let any = sockaddr_in6(&SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0));
        // SAFETY: `any` is a valid sockaddr_in6 that outlives the call; its length is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const any).cast(),
                socklen_of::<libc::sockaddr_in6>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        UdpSocket::from(fd)
    } else {
        UdpSocket::bind(unspecified_for(args.addr))?
    };
    socket.set_read_timeout(Some(args.timeout))?;
    Ok(socket)
}

/// An AF_INET6 socket with IPV6_V6ONLY=0, so it reaches IPv4 peers as ::ffff:a.b.c.d.
fn dual_stack_socket(kind: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let raw = unsafe { libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let off: libc::c_int = 0;
    // SAFETY: `off` is a c_int that outlives the call; its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// A blocking TCP connect from a dual-stack socket, bounded by `timeout` (SO_SNDTIMEO bounds
/// connect(2) on Linux).
fn dual_stack_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let SocketAddr::V6(addr) = addr else {
        unreachable!("--dual-stack is checked to come with an IPv6 address");
    };
    let fd = dual_stack_socket(libc::SOCK_STREAM)?;
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(timeout))?;
    let sin6 = sockaddr_in6(&addr);
    // SAFETY: `sin6` is a valid sockaddr_in6 that outlives the call; its length is passed.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const sin6).cast(),
            socklen_of::<libc::sockaddr_in6>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_write_timeout(None)?;
    Ok(stream)
}

fn sockaddr_in6(addr: &SocketAddrV6) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all zeroes is a valid value.
    let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = addr.port().to_be();
    sin6.sin6_addr.s6_addr = addr.ip().octets();
    sin6.sin6_flowinfo = addr.flowinfo();
    sin6.sin6_scope_id = addr.scope_id();
    sin6
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("a sockaddr is small")
}

fn udp_exchange(socket: &UdpSocket, addr: SocketAddr, i: usize) -> Attempt {
    let request = format!("mesh-probe {i}\n");
    let outcome = match socket.send_to(request.as_bytes(), addr) {
        Err(e) => Err(errno_name(&e)),
        Ok(_) => udp_reply(socket),
    };
    Attempt {
        outcome,
        connect: None,
    }
}

fn udp_reply(socket: &UdpSocket) -> Result<(String, Option<SocketAddr>), String> {
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => match first_line(&buf[..n]) {
            Some(reply) => Ok((reply, Some(from))),
            None => Err(format!("empty from {from}")),
        },
        Err(e) => Err(errno_name(&e)),
    }
}

fn udp_connected_once(args: &Args, i: usize, kept: &mut Vec<UdpSocket>) -> Attempt {
    let socket = match unconnected_socket(args) {
        Ok(socket) => socket,
        Err(e) => return failed(&e),
    };
    let attempt = udp_connected_exchange(&socket, args.addr, i);
    if args.keep_open {
        kept.push(socket);
    }
    attempt
}

fn udp_connected_exchange(socket: &UdpSocket, addr: SocketAddr, i: usize) -> Attempt {
    let started = Instant::now();
    let connected = socket.connect(addr);
    let connect = Some(started.elapsed());
    let outcome = connected.map_err(|e| errno_name(&e)).and_then(|()| {
        let request = format!("mesh-probe {i}\n");
        socket
            .send(request.as_bytes())
            .map_err(|e| errno_name(&e))?;
        udp_reply(socket)
    });
    Attempt { outcome, connect }
}

/// `peer`: what getpeername() and SO_ORIGINAL_DST say about one connected socket.
fn peer(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    if args.proto_udp {
        let socket = unconnected_socket(args)?;
        if let Err(e) = socket.connect(args.addr) {
            return writeln!(out, "ERR connect {}", errno_name(&e));
        }
        writeln!(out, "peer {}", show(socket.peer_addr()))?;
        writeln!(
            out,
            "original_dst {}",
            show(original_dst(&socket, args.addr))
        )?;
        let reply = socket
            .send(b"mesh-probe peer\n")
            .map_err(|e| errno_name(&e))
            .and_then(|_| udp_reply(&socket));
        match reply {
            Ok((reply, Some(from))) => writeln!(out, "reply {reply} from {from}")?,
            Ok((reply, None)) => writeln!(out, "reply {reply}")?,
            Err(e) => writeln!(out, "reply ERR {e}")?,
        }
        std::thread::sleep(args.hold);
        Ok(())
    } else {
        let connected = if args.dual_stack {
            dual_stack_connect(args.addr, args.timeout)
        } else {
            TcpStream::connect_timeout(&args.addr, args.timeout)
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(e) => return writeln!(out, "ERR connect {}", errno_name(&e)),
        };
        writeln!(out, "peer {}", show(stream.peer_addr()))?;
        writeln!(
            out,
            "original_dst {}",
            show(original_dst(&stream, args.addr))
        )?;
        match read_reply(&stream, args.timeout) {
            Ok(reply) => writeln!(out, "reply {reply}")?,
            Err(e) => writeln!(out, "reply ERR {e}")?,
        }
        std::thread::sleep(args.hold);
        Ok(())
    }
}

fn show(addr: std::io::Result<SocketAddr>) -> String {
    match addr {
        Ok(addr) => addr.to_string(),
        Err(e) => format!("ERR {}", errno_name(&e)),
    }
}

/// getsockopt(SOL_IP, SO_ORIGINAL_DST) for IPv4 sockets, getsockopt(SOL_IPV6,
/// IP6T_SO_ORIGINAL_DST) for IPv6 ones (both are option 80).
fn original_dst(socket: &impl AsRawFd, like: SocketAddr) -> std::io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (level, mut len) = if like.is_ipv4() {
        (libc::SOL_IP, size_of::<libc::sockaddr_in>())
    } else {
        (libc::SOL_IPV6, size_of::<libc::sockaddr_in6>())
    };
    let mut optlen = libc::socklen_t::try_from(len).expect("small");
    // SAFETY: `storage` is large enough for either sockaddr and outlives the call; optlen says
    // how much of it the kernel may write.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&raw mut storage).cast(),
            &mut optlen,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    len = usize::try_from(optlen).unwrap_or(0);
    sockaddr_to_std(&storage, len)
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage, len: usize) -> std::io::Result<SocketAddr> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, and storage is aligned for it.
            let sin = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in>()) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says it is a sockaddr_in6, and storage is aligned for it.
            let sin6 = unsafe { &*(std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>()) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        family => Err(invalid(format!(
            "unexpected sockaddr: family {family}, length {len}"
        ))),
    }
}

/// Prints `ready <addr>` and flushes, so the harness knows the backend listens.
fn announce(out: &mut impl Write, addr: SocketAddr) -> std::io::Result<()> {
    writeln!(out, "ready {addr}")?;
    out.flush()
}

fn serve_tcp(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.addr)?;
    listener.set_nonblocking(true)?;
    announce(out, listener.local_addr()?)?;
    let reply = format!("{}\n", args.name).into_bytes();
    let deadline = Instant::now() + args.max;
    while Instant::now() < deadline {
        if !wait_readable(listener.as_raw_fd(), Duration::from_millis(50)) {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = stream.write_all(&reply);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("mesh-probe: accept: {e}");
                    break;
                }
            }
        }
    }
    Ok(())
}

fn serve_udp(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    let socket = UdpSocket::bind(args.addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    announce(out, socket.local_addr()?)?;
    let deadline = Instant::now() + args.max;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // Errors: the read timeout, EINTR, or ICMP from a client that is gone.
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(args.name.as_bytes(), peer);
        }
    }
    Ok(())
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

fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next().unwrap_or_default().trim_end();
    (!line.is_empty()).then(|| line.to_owned())
}
