//! `loadgen`: the benchmark's backends and its one client, the same for every path
//! (see `cargo xtask bench`).
//!
//! Backends (`serve`) speak a tiny protocol chosen by the first byte a client sends:
//! - `i`: identify: every byte received is answered with one byte, the backend's `--id`;
//! - `e`: echo: every byte received is sent back;
//! - `s` + a u64 length N (little endian): sink: the next N bytes are counted and dropped, then
//!   the count (u64, little endian) is sent back. No half-close is needed, so proxies that
//!   close abruptly (HAProxy with `option nolinger`) carry it unchanged.
//!
//! Clients: `crr` (connect, 1-byte request/reply, close: TCP_CRR), `connects` (the same
//! transaction an exact number of times, one after another, for the kernel's per-program
//! accounting), `rr` (1-byte round trips on
//! one connection: TCP_RR), `bulk` (upload throughput) and `probe` (connects in a loop and
//! prints when the answering backend changes). Every loop is bounded in count and time.
//! Traffic goes only to the addresses given, which xtask keeps inside 127.0.0.0/8.

#[path = "../bench/proto.rs"]
mod proto;

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use proto::{BulkResult, ConnectsResult, CpuWindow, CrrResult, Percentiles, RrResult};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Backends and load client of `cargo xtask bench`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A backend: one epoll thread serving `--addr` (see the module docs for the protocol).
    Serve {
        #[arg(long)]
        addr: SocketAddr,
        /// The byte this backend answers `i` requests with.
        #[arg(long)]
        id: u8,
        /// Exit after this long whatever happens (a leftover cannot outlive a bench for long).
        #[arg(long, default_value_t = 7200)]
        max_seconds: u64,
    },
    /// Connection rate: per thread, connect, send `i`, read 1 byte, close with RST (SO_LINGER 0).
    Crr {
        /// Where to connect; several targets are used in turn (the client balances itself).
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Measured window, seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Unmeasured warm-up before the window, seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Join this cgroup v2 directory first (the mesh path: its programs see our connects).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Exactly `--count` sequential `crr` transactions (connect, 1 byte each way, close with
    /// RST) over the targets in turn: every BPF program run they cause is theirs.
    Connects {
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Request latency: 1-byte round trips on one established connection.
    Rr {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        #[arg(long, default_value_t = 1_000)]
        warmup: u64,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Upload throughput over `--conns` connections, `--bytes` in total.
    Bulk {
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Connects to `--target` in a loop and prints `<backend id> <CLOCK_MONOTONIC ns>` whenever
    /// the answer changes (255: refused or failed). Stops after `--max-seconds` or when stdout
    /// is closed.
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Pause between attempts, microseconds.
        #[arg(long, default_value_t = 100)]
        interval_us: u64,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            addr,
            id,
            max_seconds,
        } => serve(addr, id, Duration::from_secs(max_seconds)),
        Command::Crr {
            targets,
            threads,
            duration,
            warmup,
            cgroup,
        } => {
            join_cgroup(cgroup.as_deref())?;
            let result = crr(&targets, threads.clamp(1, 256), duration, warmup)?;
            print_json(&result)
        }
        Command::Connects {
            targets,
            count,
            cgroup,
        } => {
            join_cgroup(cgroup.as_deref())?;
            print_json(&connects(&targets, count))
        }
        Command::Rr {
            target,
            count,
            warmup,
            cgroup,
        } => {
            join_cgroup(cgroup.as_deref())?;
            print_json(&rr(target, count, warmup)?)
        }
        Command::Bulk {
            targets,
            conns,
            bytes,
            cgroup,
        } => {
            join_cgroup(cgroup.as_deref())?;
            print_json(&bulk(&targets, conns.clamp(1, 64), bytes)?)
        }
        Command::Probe {
            target,
            cgroup,
            interval_us,
            max_seconds,
        } => {
            join_cgroup(cgroup.as_deref())?;
            probe(
                target,
                Duration::from_micros(interval_us),
                Duration::from_secs(max_seconds),
            )
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Moves this process (before it starts any thread) into `cgroup`.
fn join_cgroup(cgroup: Option<&Path>) -> Result<()> {
    if let Some(dir) = cgroup {
        std::fs::write(dir.join("cgroup.procs"), "0")
            .with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes (xtask reads the same clock).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        bail!("{what}: {}", io::Error::last_os_error());
    }
    Ok(rc)
}

// ---------------------------------------------------------------------------------------------
// Backend

/// Per-connection state of a backend.
#[derive(Default)]
struct Conn {
    /// The first byte received (0 before it).
    mode: u8,
    /// Sink mode: the length header as it arrives.
    header: [u8; 8],
    header_len: usize,
    /// Bytes counted in sink mode.
    sunk: u64,
}

fn listen(addr: SocketAddr) -> Result<libc::c_int> {
    let SocketAddr::V4(v4) = addr else {
        bail!("only IPv4 backends are supported, got {addr}");
    };
    // SAFETY: plain socket syscalls on values we own; the sockaddr outlives the calls.
    unsafe {
        let fd = check(
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            ),
            "socket",
        )?;
        let one: libc::c_int = 1;
        check(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            ),
            "SO_REUSEADDR",
        )?;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        check(
            libc::bind(
                fd,
                (&raw const sin).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            &format!("bind {addr}"),
        )?;
        check(libc::listen(fd, 4096), "listen")?;
        Ok(fd)
    }
}

fn epoll_add(ep: libc::c_int, fd: libc::c_int) -> Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads the event we own.
    check(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
        "epoll_ctl",
    )?;
    Ok(())
}

/// Writes all of `data` to a non-blocking socket whose send buffer has room (small replies);
/// false if it could not.
fn send_small(fd: libc::c_int, data: &[u8]) -> bool {
    // SAFETY: write(2) reads `data`, which we own.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    n == data.len() as isize
}

fn serve(addr: SocketAddr, id: u8, max: Duration) -> Result<()> {
    let listener = listen(addr)?;
    // SAFETY: epoll_create1 has no memory preconditions.
    let ep = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }, "epoll")?;
    epoll_add(ep, listener)?;
    eprintln!("loadgen: backend {id} serving {addr}");
    let mut conns: HashMap<libc::c_int, Conn> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        // SAFETY: the kernel writes at most `events.len()` entries into our buffer.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1000) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            bail!("epoll_wait: {}", io::Error::last_os_error());
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as libc::c_int;
            if fd == listener {
                accept_all(ep, listener, &mut conns);
            } else if !serve_readable(fd, id, &mut conns, &mut buf) {
                conns.remove(&fd);
                // SAFETY: we own fd; closing also removes it from the epoll set.
                unsafe { libc::close(fd) };
            }
        }
    }
    Ok(())
}

fn accept_all(ep: libc::c_int, listener: libc::c_int, conns: &mut HashMap<libc::c_int, Conn>) {
    for _ in 0..256 {
        // SAFETY: accept4 with null address pointers.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return; // EAGAIN (drained) or a connection reset before we got to it.
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads `one`.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if epoll_add(ep, fd).is_err() {
            // SAFETY: we own fd.
            unsafe { libc::close(fd) };
            continue;
        }
        conns.insert(fd, Conn::default());
    }
}

/// Handles one readable connection; false when it should be closed.
fn serve_readable(
    fd: libc::c_int,
    id: u8,
    conns: &mut HashMap<libc::c_int, Conn>,
    buf: &mut [u8],
) -> bool {
    let Some(conn) = conns.get_mut(&fd) else {
        return false;
    };
    // SAFETY: read(2) writes at most buf.len() bytes into buf.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return errno() == libc::EAGAIN;
    }
    if n == 0 {
        return false;
    }
    let mut data = &buf[..n as usize];
    if conn.mode == 0 {
        conn.mode = data[0];
        if conn.mode == b's' {
            data = &data[1..];
        }
    }
    match conn.mode {
        b'i' => {
            let reply = vec![id; data.len()];
            send_small(fd, &reply)
        }
        b'e' => send_small(fd, data),
        b's' => {
            let take = (8 - conn.header_len).min(data.len());
            conn.header[conn.header_len..conn.header_len + take].copy_from_slice(&data[..take]);
            conn.header_len += take;
            conn.sunk += (data.len() - take) as u64;
            let expected = u64::from_le_bytes(conn.header);
            if conn.header_len == 8 && conn.sunk >= expected {
                send_small(fd, &conn.sunk.to_le_bytes())
            } else {
                true
            }
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Nearest-rank percentiles of `samples_ns` (sorted in place), in microseconds.
fn percentiles(samples_ns: &mut [u64]) -> Percentiles {
    if samples_ns.is_empty() {
        return Percentiles::default();
    }
    samples_ns.sort_unstable();
    let n = samples_ns.len();
    let at = |q: f64| {
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        samples_ns[rank - 1] as f64 / 1_000.0
    };
    let sum: u128 = samples_ns.iter().map(|&s| u128::from(s)).sum();
    Percentiles {
        count: n as u64,
        mean: sum as f64 / n as f64 / 1_000.0,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: samples_ns[n - 1] as f64 / 1_000.0,
    }
}

/// SO_LINGER {on, 0}: close() sends RST, so no TIME_WAIT piles up on the client's ports.
fn linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn read_cpu() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Ok((busy, busy + get(3) + get(4)))
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}

#[derive(Default)]
struct CrrThread {
    latency_ns: Vec<u64>,
    connect_ns: Vec<u64>,
    errors: u64,
    per_backend: [u64; 8],
}

/// At most this many samples per thread (far above what 2 cores do in a window).
const MAX_SAMPLES: usize = 4_000_000;

fn crr_thread(
    targets: &[SocketAddr],
    first: usize,
    window_start: Instant,
    window_end: Instant,
    abort: &AtomicBool,
) -> CrrThread {
    let mut out = CrrThread::default();
    let mut next = first;
    let mut buf = [0u8; 1];
    while !abort.load(Ordering::Relaxed) && out.latency_ns.len() < MAX_SAMPLES {
        let t0 = Instant::now();
        if t0 >= window_end {
            break;
        }
        let target = targets[next % targets.len()];
        next += 1;
        let outcome = TcpStream::connect(target).and_then(|mut s| {
            let t1 = Instant::now();
            linger_zero(&s);
            s.set_nodelay(true)?;
            s.write_all(b"i")?;
            s.read_exact(&mut buf)?;
            drop(s);
            Ok(t1)
        });
        let t2 = Instant::now();
        let in_window = t0 >= window_start && t2 <= window_end;
        match outcome {
            Ok(t1) if in_window => {
                out.latency_ns.push((t2 - t0).as_nanos() as u64);
                out.connect_ns.push((t1 - t0).as_nanos() as u64);
                if let Some(c) = out.per_backend.get_mut(usize::from(buf[0])) {
                    *c += 1;
                }
            }
            Ok(_) => {}
            Err(_) => {
                if in_window {
                    out.errors += 1;
                }
                // A failing path must not spin: back off a little.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    out
}

fn crr(targets: &[SocketAddr], threads: usize, duration: f64, warmup: f64) -> Result<CrrResult> {
    let start = Instant::now();
    let window_start = start + Duration::from_secs_f64(warmup.max(0.0));
    let window_end = window_start + Duration::from_secs_f64(duration.clamp(0.1, 300.0));
    let abort = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let targets = targets.to_vec();
            let abort = abort.clone();
            std::thread::spawn(move || crr_thread(&targets, i, window_start, window_end, &abort))
        })
        .collect();
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    let (busy0, total0) = read_cpu()?;
    std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    let (busy1, total1) = read_cpu()?;
    // A thread stuck in a read (a path that lost a reply) must not hang the bench.
    let watchdog_abort = abort.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        watchdog_abort.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("loadgen: client threads still blocked 15 s after the window: giving up");
        std::process::exit(3);
    });
    let mut merged = CrrThread::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        merged.latency_ns.extend(t.latency_ns);
        merged.connect_ns.extend(t.connect_ns);
        merged.errors += t.errors;
        for (m, c) in merged.per_backend.iter_mut().zip(t.per_backend) {
            *m += c;
        }
    }
    let window_secs = (window_end - window_start).as_secs_f64();
    let conns = merged.latency_ns.len() as u64;
    let used = merged
        .per_backend
        .iter()
        .rposition(|&c| c > 0)
        .map_or(0, |i| i + 1);
    Ok(CrrResult {
        threads,
        conns,
        window_secs,
        conns_per_sec: conns as f64 / window_secs,
        errors: merged.errors,
        latency_us: percentiles(&mut merged.latency_ns),
        connect_us: percentiles(&mut merged.connect_ns),
        per_backend: merged.per_backend[..used].to_vec(),
        cpu: CpuWindow {
            busy_ticks: busy1.saturating_sub(busy0),
            total_ticks: total1.saturating_sub(total0),
            ticks_per_sec: ticks_per_sec(),
        },
    })
}

/// One transaction: connect, send `i`, read the backend's id, close with RST.
fn identify(target: SocketAddr, timeout: Duration) -> io::Result<u8> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    linger_zero(&s);
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"i")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn connects(targets: &[SocketAddr], count: u64) -> ConnectsResult {
    let count = count.clamp(1, 10_000_000);
    // Bounded in time too: a path that fails slowly stops the run instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut result = ConnectsResult::default();
    let mut per_backend = [0u64; 8];
    let start = Instant::now();
    for i in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        match identify(targets[i as usize % targets.len()], Duration::from_secs(2)) {
            Ok(id) => {
                result.conns += 1;
                if let Some(c) = per_backend.get_mut(usize::from(id)) {
                    *c += 1;
                }
            }
            Err(_) => result.errors += 1,
        }
    }
    result.secs = start.elapsed().as_secs_f64();
    let used = per_backend
        .iter()
        .rposition(|&c| c > 0)
        .map_or(0, |i| i + 1);
    result.per_backend = per_backend[..used].to_vec();
    result
}

fn rr(target: SocketAddr, count: u64, warmup: u64) -> Result<RrResult> {
    let count = count.clamp(1, 10_000_000);
    let mut s = TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = [0u8; 1];
    s.write_all(b"e")?;
    s.read_exact(&mut b)?;
    let mut samples = Vec::with_capacity(count as usize);
    for k in 0..warmup.min(1_000_000) + count {
        let t0 = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        if k >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    linger_zero(&s);
    Ok(RrResult {
        round_trips: samples.len() as u64,
        latency_us: percentiles(&mut samples),
    })
}

fn bulk(targets: &[SocketAddr], conns: usize, bytes: u64) -> Result<BulkResult> {
    let per_conn = (bytes / conns as u64).max(1);
    let barrier = Arc::new(Barrier::new(conns + 1));
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let target = targets[i % targets.len()];
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<u64> {
                let connected = TcpStream::connect(target);
                barrier.wait();
                let mut s = connected.with_context(|| format!("connecting to {target}"))?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                s.set_write_timeout(Some(Duration::from_secs(60)))?;
                let chunk = vec![0x5au8; 256 * 1024];
                s.write_all(b"s")?;
                s.write_all(&per_conn.to_le_bytes())?;
                let mut left = per_conn;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                let mut count = [0u8; 8];
                s.read_exact(&mut count)?;
                let got = u64::from_le_bytes(count);
                if got != per_conn {
                    bail!("backend {target} counted {got} bytes, sent {per_conn}");
                }
                Ok(got)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("bulk thread panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(BulkResult {
        conns,
        bytes: total,
        secs,
        gbytes_per_sec: total as f64 / secs / 1e9,
    })
}

/// One probe attempt: the answering backend's id, or 255.
fn probe_once(target: SocketAddr) -> u8 {
    identify(target, Duration::from_millis(500)).unwrap_or(255)
}

fn probe(target: SocketAddr, interval: Duration, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    let mut last: Option<u8> = None;
    let mut out = io::stdout().lock();
    while Instant::now() < deadline {
        let at = monotonic_ns();
        let id = probe_once(target);
        if last != Some(id) {
            if writeln!(out, "{id} {at}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return Ok(()); // xtask stopped listening.
            }
            last = Some(id);
        }
        std::thread::sleep(interval);
    }
    Ok(())
}
