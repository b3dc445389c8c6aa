//! `mesh-probe`: a tiny client for mesh's end-to-end tests. The harness runs it inside a test
//! cgroup so its connects go through mesh's programs.
//!
//! ```text
//! mesh-probe connect --addr IP:PORT --count N [--timeout-ms T]
//!     N sequential TCP connects; each: connect, read the reply until EOF, close.
//!     Prints one line per connect: the reply's first line, or `ERR <errno name or message>`.
//! mesh-probe udp --addr IP:PORT --count N [--timeout-ms T]
//!     N request/replies on one unconnected UDP socket (sendto/recvfrom).
//!     Prints `<reply> from <ip:port>` or `ERR <errno name or message>` per datagram.
//! ```
//!
//! It first prints `mesh-probe: cgroup <0:: line of /proc/self/cgroup>` on stderr, and exits 0
//! once all attempts are reported (2 on usage errors).

use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use integration_tests::probe::{CGROUP_LINE_PREFIX, errno_name};

/// Largest reply read per connection.
const MAX_REPLY: u64 = 4096;

enum Mode {
    Connect,
    Udp,
}

struct Args {
    mode: Mode,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
}

const USAGE: &str = "usage: mesh-probe connect|udp --addr IP:PORT --count N [--timeout-ms T]";

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mode, rest) = args.split_first().ok_or("missing command")?;
    let mode = match mode.as_str() {
        "connect" => Mode::Connect,
        "udp" => Mode::Udp,
        other => return Err(format!("unknown command {other:?}")),
    };
    let mut addr = None;
    let mut count = None;
    let mut timeout = Duration::from_millis(2000);
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => {
                addr = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--addr {value:?}: {e}"))?,
                );
            }
            "--count" => {
                count = Some(
                    value
                        .parse::<usize>()
                        .map_err(|e| format!("--count {value:?}: {e}"))?,
                );
            }
            "--timeout-ms" => {
                let ms = value
                    .parse::<u64>()
                    .map_err(|e| format!("--timeout-ms {value:?}: {e}"))?;
                if ms == 0 {
                    return Err("--timeout-ms must be > 0".into());
                }
                timeout = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Args {
        mode,
        addr: addr.ok_or("--addr is required")?,
        count: count.ok_or("--count is required")?,
        timeout,
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
        Mode::Connect => connect_loop(&args, &mut out),
        Mode::Udp => udp_loop(&args, &mut out),
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

fn connect_loop(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    for _ in 0..args.count {
        match connect_once(args.addr, args.timeout) {
            Ok(reply) => writeln!(out, "{reply}")?,
            Err(e) => writeln!(out, "ERR {e}")?,
        }
    }
    Ok(())
}

/// One connect, read until EOF, close. The reply's first line, or the error to print.
fn connect_once(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| errno_name(&e))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| errno_name(&e))?;
    let mut reply = Vec::new();
    (&stream)
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .map_err(|e| errno_name(&e))?;
    first_line(&reply).ok_or_else(|| "empty".to_owned())
}

fn udp_loop(args: &Args, out: &mut impl Write) -> std::io::Result<()> {
    let bind: SocketAddr = if args.addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(args.timeout))?;
    let mut buf = [0u8; 2048];
    for i in 0..args.count {
        let request = format!("mesh-probe {i}\n");
        let line = match socket.send_to(request.as_bytes(), args.addr) {
            Err(e) => format!("ERR {}", errno_name(&e)),
            Ok(_) => match socket.recv_from(&mut buf) {
                Ok((n, from)) => match first_line(&buf[..n]) {
                    Some(reply) => format!("{reply} from {from}"),
                    None => format!("ERR empty from {from}"),
                },
                Err(e) => format!("ERR {}", errno_name(&e)),
            },
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next().unwrap_or_default().trim_end();
    (!line.is_empty()).then(|| line.to_owned())
}
