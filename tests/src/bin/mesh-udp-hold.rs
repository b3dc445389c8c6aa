//! Test client for UDP flow termination: opens connected UDP sockets (through a VIP, and one
//! straight to a backend) and an unconnected one, does one exchange on each, signals ready,
//! waits for a stop file, then exchanges again and prints how each socket fared.
//!
//! `mesh-udp-hold --vip IP:PORT --direct IP:PORT --count N --ready-file P --stop-file P --max-ms MS
//! [--bind IP]`
//!
//! Sockets are bound to `--bind` (default 127.0.0.1) with an ephemeral port; in a network
//! namespace whose backends are not on loopback, `--bind 0.0.0.0` lets the kernel pick the
//! namespace's own address.
//!
//! Output, one line per socket: `<kind> <index> <first reply> <ok <reply> | err <ERRNO>>`, kind
//! being `vip` (connected through the VIP), `direct` (connected to a backend address) or
//! `unconnected` (sendto the VIP).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

struct Args {
    vip: SocketAddr,
    direct: SocketAddr,
    count: usize,
    ready_file: PathBuf,
    stop_file: PathBuf,
    max: Duration,
    bind: IpAddr,
}

fn parse() -> Result<Args, String> {
    let mut flags = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        flags.insert(flag, value);
    }
    let get = |k: &str| flags.get(k).cloned().ok_or(format!("{k} is required"));
    Ok(Args {
        vip: get("--vip")?.parse().map_err(|e| format!("--vip: {e}"))?,
        direct: get("--direct")?
            .parse()
            .map_err(|e| format!("--direct: {e}"))?,
        count: get("--count")?
            .parse()
            .map_err(|e| format!("--count: {e}"))?,
        ready_file: get("--ready-file")?.into(),
        stop_file: get("--stop-file")?.into(),
        max: Duration::from_millis(
            get("--max-ms")?
                .parse()
                .map_err(|e| format!("--max-ms: {e}"))?,
        ),
        bind: match flags.get("--bind") {
            Some(ip) => ip.parse().map_err(|e| format!("--bind: {e}"))?,
            None => IpAddr::from([127, 0, 0, 1]),
        },
    })
}

fn socket(bind: IpAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(socket)
}

/// One exchange on a connected socket (or via sendto when `to` is given). A pending socket
/// error (what a terminated socket holds: ECONNABORTED) is reported first.
fn exchange(socket: &UdpSocket, to: Option<SocketAddr>) -> Result<String, String> {
    if let Some(pending) = socket.take_error().map_err(|e| errno(&e))? {
        return Err(errno(&pending));
    }
    let sent = match to {
        Some(to) => socket.send_to(b"ping", to),
        None => socket.send(b"ping"),
    };
    sent.map_err(|e| errno(&e))?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).map_err(|e| errno(&e))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn errno(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EAGAIN) => "TIMEOUT".into(),
        _ => e.to_string(),
    }
}

fn main() -> Result<(), String> {
    let args = parse()?;
    let mut sockets = Vec::new();
    for _ in 0..args.count {
        let s = socket(args.bind).map_err(|e| e.to_string())?;
        s.connect(args.vip).map_err(|e| e.to_string())?;
        sockets.push(("vip", s, None));
    }
    let direct = socket(args.bind).map_err(|e| e.to_string())?;
    direct.connect(args.direct).map_err(|e| e.to_string())?;
    sockets.push(("direct", direct, None));
    sockets.push((
        "unconnected",
        socket(args.bind).map_err(|e| e.to_string())?,
        Some(args.vip),
    ));

    let first: Vec<String> = sockets
        .iter()
        .map(|(_, s, to)| exchange(s, *to).unwrap_or_else(|e| format!("ERR-{e}")))
        .collect();
    std::fs::write(&args.ready_file, first.join("\n")).map_err(|e| e.to_string())?;

    let started = Instant::now();
    while !args.stop_file.exists() {
        if started.elapsed() > args.max {
            return Err("stop file never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for (i, ((kind, s, to), first)) in sockets.iter().zip(&first).enumerate() {
        match exchange(s, *to) {
            Ok(reply) => println!("{kind} {i} {first} ok {reply}"),
            Err(e) => println!("{kind} {i} {first} err {e}"),
        }
    }
    Ok(())
}
