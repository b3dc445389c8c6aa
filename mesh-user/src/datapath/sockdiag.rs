//! Terminating connected UDP sockets by socket cookie (netlink `sock_diag`, `SOCK_DESTROY`).
//!
//! When a backend leaves a UDP service, the sockets that the load balancer connected to it
//! must be aborted so that their owners notice and re-resolve. The datapath records those
//! sockets by cookie; this module dumps the UDP sockets of both families with the backend's
//! port as their remote port over a `NETLINK_SOCK_DIAG` socket, picks the ones whose cookie is
//! in the given set and whose remote address is the backend's, and sends a
//! `SOCK_DESTROY` for each, echoing the exact `inet_diag_sockid` from the dump back to the
//! kernel. The kernel looks the socket up by that 4-tuple and checks the cookie again, so a
//! socket that was closed (or whose 4-tuple was reused) in the meantime is never hit: it
//! answers `ENOENT`, which is not an error here. The kernel aborts the socket with
//! `ECONNABORTED` (`udp_abort`): the next `recv`/`send` on it fails with that error and the
//! socket is disconnected.
//!
//! A `NETLINK_SOCK_DIAG` socket sees (and destroys) only the sockets of the network namespace
//! it was created in, and on a Kubernetes node every pod is a client in a namespace of its own.
//! So the search goes through every namespace of the node (see [`super::netns`]) until each
//! cookie is found: a thread that exists only for the search enters each one in turn (`setns`)
//! and opens a socket there. Socket cookies are unique on the node, so destroying by cookie is
//! exact in every namespace.
//!
//! Requires `CAP_NET_ADMIN` and a kernel with `CONFIG_INET_DIAG_DESTROY` and `udp_diag`; for
//! other namespaces also `CAP_SYS_ADMIN` (setns) and the node's pid namespace (/proc) or its
//! /run/netns. Every wait is bounded: the netlink socket has a receive timeout, the number of
//! receive calls per request is capped, and so are the namespaces one search enters and the
//! time it spends.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
#[cfg(test)]
use std::os::fd::BorrowedFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

use super::netns::{Namespaces, NetNs, Skipped};

// ---------------------------------------------------------------------------------------------
// Kernel ABI (include/uapi/linux/{netlink,sock_diag,inet_diag}.h, asm-generic/socket.h)
// ---------------------------------------------------------------------------------------------

/// `SO_COOKIE` (asm-generic/socket.h; the value differs only on mips/sparc/parisc, which
/// this agent does not target).
#[cfg(test)]
const SO_COOKIE: libc::c_int = 57;

/// `SOCK_DIAG_BY_FAMILY`: dump/query request and reply message type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`: abort the socket identified by an `inet_diag_req_v2`.
const SOCK_DESTROY: u16 = 21;

/// `NLMSG_ERROR`: payload is `struct nlmsgerr` (`int error` first; 0 = ACK).
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multi-part dump (payload: `int`, negative errno if the dump failed).
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;

/// Netlink messages are aligned to 4 bytes (`NLMSG_ALIGNTO`).
const NLMSG_ALIGNTO: usize = 4;

/// All TCP-like states (`idiag_states` is a bit mask of `1 << state`). Connected UDP sockets
/// are `TCP_ESTABLISHED`, unconnected ones `TCP_CLOSE`.
const ALL_STATES: u32 = !0;

/// `struct nlmsghdr`: every netlink message starts with it (host byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct NlMsgHdr {
    /// Length of the message including this header.
    nlmsg_len: u32,
    /// Message type (`SOCK_DIAG_BY_FAMILY`, `NLMSG_ERROR`, ...).
    nlmsg_type: u16,
    /// `NLM_F_*` flags.
    nlmsg_flags: u16,
    /// Sequence number, echoed by the kernel in its replies.
    nlmsg_seq: u32,
    /// Sender port id (0 = kernel).
    nlmsg_pid: u32,
}

/// `struct inet_diag_sockid`: identifies one socket.
///
/// Ports and addresses are in network byte order; they are kept as raw bytes and passed back
/// to the kernel unchanged. The interface index and the cookie words are host order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InetDiagSockId {
    /// `__be16 idiag_sport`: local port.
    idiag_sport: [u8; 2],
    /// `__be16 idiag_dport`: remote port (0 if not connected).
    idiag_dport: [u8; 2],
    /// `__be32 idiag_src[4]`: local address (IPv4 uses the first 4 bytes).
    idiag_src: [u8; 16],
    /// `__be32 idiag_dst[4]`: remote address (IPv4 uses the first 4 bytes).
    idiag_dst: [u8; 16],
    /// `__u32 idiag_if`: bound device index (0 if none).
    idiag_if: u32,
    /// `__u32 idiag_cookie[2]`: socket cookie, low word first.
    idiag_cookie: [u32; 2],
}

impl InetDiagSockId {
    fn cookie(&self) -> u64 {
        u64::from(self.idiag_cookie[0]) | (u64::from(self.idiag_cookie[1]) << 32)
    }
}

/// `struct inet_diag_req_v2`: payload of `SOCK_DIAG_BY_FAMILY` requests and `SOCK_DESTROY`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InetDiagReqV2 {
    /// `AF_INET` or `AF_INET6`.
    sdiag_family: u8,
    /// `IPPROTO_UDP`.
    sdiag_protocol: u8,
    /// Extensions requested (`INET_DIAG_*` bits); none.
    idiag_ext: u8,
    pad: u8,
    /// Bit mask of socket states to dump.
    idiag_states: u32,
    /// For dumps: zero ports mean "any"; a nonzero `idiag_dport` filters on the remote port.
    /// For `SOCK_DESTROY`: the exact socket, as reported by the dump.
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`: one socket in a `SOCK_DIAG_BY_FAMILY` reply (attributes follow;
/// none are requested).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InetDiagMsg {
    idiag_family: u8,
    idiag_state: u8,
    idiag_timer: u8,
    idiag_retrans: u8,
    id: InetDiagSockId,
    idiag_expires: u32,
    idiag_rqueue: u32,
    idiag_wqueue: u32,
    idiag_uid: u32,
    idiag_inode: u32,
}

/// A whole request datagram: header immediately followed by the request (no padding between).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DiagRequest {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

// The layouts must match the kernel's exactly and contain no padding (the request is sent as
// raw bytes, and replies are read by copying bytes into these types).
const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);
const _: () = assert!(size_of::<DiagRequest>() == 16 + 56);
const _: () = assert!(size_of::<NlMsgHdr>().is_multiple_of(NLMSG_ALIGNTO));

/// Marker for the plain-old-data ABI structs above.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, consist only of integers / integer arrays, and have no
/// padding, so that every byte pattern of `size_of::<Self>()` bytes is a valid value.
unsafe trait Pod: Copy {}
// SAFETY: repr(C), integer fields only, sizes asserted above to equal the sum of the fields.
unsafe impl Pod for NlMsgHdr {}
// SAFETY: as above.
unsafe impl Pod for InetDiagMsg {}

/// Copies a `T` out of the start of `bytes`, or `None` if `bytes` is too short.
fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least `size_of::<T>()` initialized bytes, `read_unaligned`
    // has no alignment requirement, and `T: Pod` is valid for any byte pattern.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

const fn nlmsg_align(len: usize) -> usize {
    (len + NLMSG_ALIGNTO - 1) & !(NLMSG_ALIGNTO - 1)
}

// ---------------------------------------------------------------------------------------------
// Netlink socket
// ---------------------------------------------------------------------------------------------

/// Receive buffer size. Dump skbs are at most 32 KiB (plus the header); bigger to be safe,
/// and truncation is detected anyway.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Upper bound for any single wait on the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on receive calls per request (a dump of ~64 Ki buffers of sockets is far more
/// than any host has; this only guarantees termination).
const MAX_RECV_CALLS: usize = 1 << 16;

/// One socket picked from a dump, enough to destroy it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    family: u8,
    id: InetDiagSockId,
}

struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };

        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid `timeval` and its exact size is passed.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Sends one request (to the kernel, port id 0) and returns its sequence number.
    fn send(&mut self, nlmsg_type: u16, flags: u16, req: InetDiagReqV2) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let msg = DiagRequest {
            hdr: NlMsgHdr {
                nlmsg_len: size_of::<DiagRequest>() as u32,
                nlmsg_type,
                nlmsg_flags: flags,
                nlmsg_seq: self.seq,
                nlmsg_pid: 0,
            },
            req,
        };
        // SAFETY: `msg` is a live repr(C) value without padding (asserted above), so all
        // `size_of::<DiagRequest>()` bytes behind the pointer are initialized.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                (&raw const msg).cast(),
                size_of::<DiagRequest>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != size_of::<DiagRequest>() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short send on sock_diag socket",
            ));
        }
        Ok(self.seq)
    }

    /// Receives one datagram into `self.buf` and returns its length.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe `self.buf`, which is writable. With
            // MSG_TRUNC the return value is the full datagram length, which may exceed it.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "timed out waiting for the kernel's sock_diag reply",
                        ));
                    }
                    _ => return Err(err),
                }
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("sock_diag reply truncated ({n} bytes)"),
                ));
            }
            return Ok(n);
        }
    }

    /// Receives replies to request `seq` and feeds each message of that sequence to
    /// `on_msg(type, payload)` until it returns `Some`. Messages of other sequences (late
    /// replies to an earlier request that failed) are skipped.
    fn recv_until<R>(
        &mut self,
        seq: u32,
        mut on_msg: impl FnMut(u16, &[u8]) -> Option<io::Result<R>>,
    ) -> io::Result<R> {
        for _ in 0..MAX_RECV_CALLS {
            let n = self.recv()?;
            if let Some(result) = walk_datagram(&self.buf[..n], seq, &mut on_msg) {
                return result;
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "sock_diag reply did not finish",
        ))
    }

    /// Dumps the UDP sockets of `family` (optionally only those with remote port `dport`,
    /// network order) and returns those for which `keep` is true.
    fn dump_udp(
        &mut self,
        family: u8,
        dport: Option<[u8; 2]>,
        mut keep: impl FnMut(&InetDiagMsg) -> bool,
    ) -> io::Result<Vec<Target>> {
        let req = InetDiagReqV2 {
            sdiag_family: family,
            sdiag_protocol: libc::IPPROTO_UDP as u8,
            idiag_ext: 0,
            pad: 0,
            idiag_states: ALL_STATES,
            id: InetDiagSockId {
                idiag_dport: dport.unwrap_or_default(),
                ..Default::default()
            },
        };
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)?;
        let mut targets = Vec::new();
        self.recv_until(seq, |ty, payload| {
            dump_reply(ty, payload, &mut keep, &mut targets)
        })?;
        Ok(targets)
    }

    /// Sends `SOCK_DESTROY` for `target` and waits for the ACK. `Ok(false)` if the socket is
    /// already gone (or its cookie no longer matches).
    fn destroy(&mut self, target: &Target) -> io::Result<bool> {
        let req = InetDiagReqV2 {
            sdiag_family: target.family,
            sdiag_protocol: libc::IPPROTO_UDP as u8,
            idiag_ext: 0,
            pad: 0,
            idiag_states: ALL_STATES,
            id: target.id,
        };
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)?;
        self.recv_until(seq, destroy_reply)
    }
}

// ---------------------------------------------------------------------------------------------
// Replies: pure parsing of what the kernel sent (fuzzed on raw bytes, see fuzz/)
// ---------------------------------------------------------------------------------------------

/// Feeds the messages of sequence `seq` in one received datagram to `on_msg`, until it returns
/// `Some`; `None` when the datagram ends first. A message whose length leaves the datagram is
/// malformed.
fn walk_datagram<R>(
    data: &[u8],
    seq: u32,
    on_msg: &mut impl FnMut(u16, &[u8]) -> Option<io::Result<R>>,
) -> Option<io::Result<R>> {
    const HDR_LEN: usize = size_of::<NlMsgHdr>();
    let mut off = 0;
    while off + HDR_LEN <= data.len() {
        let Some(hdr) = read_pod::<NlMsgHdr>(&data[off..]) else {
            return Some(Err(malformed()));
        };
        let len = hdr.nlmsg_len as usize;
        if len < HDR_LEN || len > data.len() - off {
            return Some(Err(malformed()));
        }
        if hdr.nlmsg_seq == seq
            && let Some(result) = on_msg(hdr.nlmsg_type, &data[off + HDR_LEN..off + len])
        {
            return Some(result);
        }
        off += nlmsg_align(len);
    }
    None
}

/// One message of a `SOCK_DIAG_BY_FAMILY` dump's reply: the sockets `keep` accepts go to
/// `targets`; `Some` ends the dump (done, or an error).
fn dump_reply(
    ty: u16,
    payload: &[u8],
    keep: &mut impl FnMut(&InetDiagMsg) -> bool,
    targets: &mut Vec<Target>,
) -> Option<io::Result<()>> {
    match ty {
        NLMSG_DONE => Some(match payload_errno(payload) {
            // Saturating: `-i32::MIN` overflows (found by the sockdiag fuzz target).
            Some(errno) if errno < 0 => Err(io::Error::from_raw_os_error(errno.saturating_neg())),
            _ => Ok(()),
        }),
        NLMSG_ERROR => Some(match payload_errno(payload) {
            // An ACK does not end a dump normally, but there is nothing more to read.
            Some(0) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno.saturating_neg())),
            None => Err(malformed()),
        }),
        SOCK_DIAG_BY_FAMILY => match read_pod::<InetDiagMsg>(payload) {
            Some(msg) => {
                if keep(&msg) {
                    targets.push(Target {
                        family: msg.idiag_family,
                        id: msg.id,
                    });
                }
                None
            }
            None => Some(Err(malformed())),
        },
        // NLMSG_NOOP and anything unexpected: ignore.
        _ => None,
    }
}

/// One message of a `SOCK_DESTROY`'s reply: `Ok(true)` destroyed, `Ok(false)` already gone.
fn destroy_reply(ty: u16, payload: &[u8]) -> Option<io::Result<bool>> {
    match ty {
        NLMSG_ERROR => Some(match payload_errno(payload) {
            Some(0) => Ok(true),
            Some(errno) if errno == -libc::ENOENT => Ok(false),
            Some(errno) => Err(io::Error::from_raw_os_error(errno.saturating_neg())),
            None => Err(malformed()),
        }),
        _ => None,
    }
}

/// The replies to a dump and to a destroy, parsed as `recv_until`, `dump_udp`, `destroy` and
/// `destroy_here` parse them, from `datagrams` as the kernel could send them (for the fuzz
/// targets: the parsing without the socket). `None`: the datagrams end before the reply does.
#[cfg(feature = "fuzzing")]
pub fn parse_replies(
    datagrams: &[&[u8]],
    seq: u32,
    cookies: &HashSet<u64>,
    backend: IpAddr,
) -> (Option<io::Result<Vec<u64>>>, Option<io::Result<bool>>) {
    let mut targets = Vec::new();
    let mut keep = |msg: &InetDiagMsg| wanted(msg, cookies, cookies, backend);
    let dump = datagrams.iter().find_map(|data| {
        walk_datagram(data, seq, &mut |ty, payload| {
            dump_reply(ty, payload, &mut keep, &mut targets)
        })
    });
    let dump = dump.map(|done| done.map(|()| targets.iter().map(|t| t.id.cookie()).collect()));
    let destroy = datagrams
        .iter()
        .find_map(|data| walk_datagram(data, seq, &mut destroy_reply));
    (dump, destroy)
}

/// Whether a dumped socket is one to destroy: its cookie is still pending and recorded for
/// `backend`, and its remote address is the backend's.
fn wanted(
    msg: &InetDiagMsg,
    pending: &HashSet<u64>,
    cookies: &HashSet<u64>,
    backend: IpAddr,
) -> bool {
    let cookie = msg.id.cookie();
    pending.contains(&cookie)
        && cookies.contains(&cookie)
        && remote_is(msg.idiag_family, &msg.id, backend)
}

/// The leading `int` of an `NLMSG_ERROR` / `NLMSG_DONE` payload.
fn payload_errno(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag message")
}

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Connected UDP sockets to terminate: backend address -> cookies of the sockets the datapath
/// connected to it.
pub type UdpTargets = BTreeMap<SocketAddr, HashSet<u64>>;

/// Upper bound on the network namespaces one search looks into (a node runs a few hundred
/// pods at most; this only guarantees termination).
const MAX_NAMESPACES: usize = 16_384;
/// Upper bound on the time one search spends going from namespace to namespace.
const SEARCH_BUDGET: Duration = Duration::from_secs(5);

/// What [`destroy_udp_sockets_everywhere`] did.
#[derive(Debug, Default)]
pub struct Termination {
    /// Sockets destroyed, per backend (backends without any are left out).
    pub destroyed: BTreeMap<SocketAddr, usize>,
    /// Network namespaces searched, the agent's own included.
    pub namespaces: usize,
    /// Namespaces that could not be opened, entered or searched (EPERM, ...): skipped.
    pub skipped: usize,
    /// Sockets found that could not be destroyed.
    pub undestroyed: usize,
    /// The first failure of either kind, with the namespace it happened in.
    pub first_failure: Option<String>,
    /// Cookies found in no namespace searched: sockets closed meanwhile, or in a namespace that
    /// neither a process nor /run/netns names.
    pub not_found: usize,
    /// The search stopped at its bound (namespaces or time) before it found every socket.
    pub truncated: bool,
}

impl Termination {
    /// Sockets destroyed in all.
    pub fn total(&self) -> usize {
        self.destroyed.values().sum()
    }

    /// Whether a socket of the targets may have been missed or left alive: one could not be
    /// destroyed, or one was not found while some namespace was skipped or the search cut off.
    pub fn incomplete(&self) -> bool {
        self.undestroyed > 0 || (self.not_found > 0 && (self.skipped > 0 || self.truncated))
    }

    fn skip(&mut self, netns: &Path, what: &str, err: &io::Error) {
        debug!(netns = %netns.display(), "sock_diag: skipped a namespace: {what}: {err}");
        self.skipped += 1;
        self.note(netns, what, err);
    }

    fn note(&mut self, netns: &Path, what: &str, err: &io::Error) {
        self.first_failure
            .get_or_insert_with(|| format!("{what} in {}: {err}", netns.display()));
    }
}

/// Destroys the connected UDP sockets (IPv4 and IPv6) of `targets`, in whichever network
/// namespace of the node they live: the agent's own (host processes), then every other one
/// (pods). Only sockets still connected to the backend they are listed under are destroyed
/// (the dump is narrowed in the kernel to the backend's port, the remote address is checked
/// here; an IPv4 backend also matches IPv6 sockets connected to its v4-mapped address).
///
/// A `sock_diag` socket sees only the sockets of the namespace it was created in, so each
/// namespace is entered (`setns`) on a thread of its own that exists only for this search; no
/// other thread of the agent ever leaves the agent's namespace. Socket cookies are unique on
/// the node, so destroying by cookie is exact in every namespace, and the search stops as soon
/// as every cookie has been found: when all the sockets belong to host processes, it never
/// leaves the agent's namespace.
///
/// Never fails as a whole: a namespace that vanished is passed over, one that cannot be entered
/// or searched (EPERM, ...) is counted in [`Termination::skipped`] and passed over, and sockets
/// closed meanwhile are not errors. Bounded: at most [`MAX_NAMESPACES`] namespaces and
/// [`SEARCH_BUDGET`] between them, each dump and destroy with a receive timeout.
pub fn destroy_udp_sockets_everywhere(targets: &UdpTargets) -> Termination {
    let pending: HashSet<u64> = targets.values().flatten().copied().collect();
    if pending.is_empty() {
        return Termination::default();
    }
    let cookies = pending.len();
    std::thread::scope(|scope| {
        let search = std::thread::Builder::new()
            .name("mesh-sockdiag".into())
            .spawn_scoped(scope, move || search_every_netns(targets, pending));
        let failed = |what: String| Termination {
            skipped: 1,
            first_failure: Some(what),
            not_found: cookies,
            ..Default::default()
        };
        match search {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| failed("the sock_diag search thread panicked".into())),
            Err(err) => failed(format!("starting the sock_diag search thread: {err}")),
        }
    })
}

/// The search of [`destroy_udp_sockets_everywhere`]; runs on its own thread, which it moves
/// from namespace to namespace.
fn search_every_netns(targets: &UdpTargets, mut pending: HashSet<u64>) -> Termination {
    let mut report = Termination::default();
    let started = Instant::now();
    let own = NetNs::current();
    let own_name = own
        .as_ref()
        .map_or_else(|_| PathBuf::from("(agent)"), |ns| ns.path().to_path_buf());
    // The thread starts in the agent's namespace.
    if let Err(err) = destroy_here(targets, &mut pending, &mut report, &own_name) {
        report.skip(&own_name, "searching", &err);
    }
    if pending.is_empty() {
        return report;
    }
    let namespaces = match own.and_then(|own| Namespaces::list(&own)) {
        Ok(namespaces) => namespaces,
        Err(err) => {
            report.skip(&own_name, "listing network namespaces", &err);
            report.not_found = pending.len();
            return report;
        }
    };
    for found in namespaces {
        if pending.is_empty() {
            break;
        }
        let ns = match found {
            Ok(ns) => ns,
            Err(Skipped::Vanished | Skipped::NotNew) => continue,
            Err(Skipped::Failed(path, err)) => {
                report.skip(&path, "opening", &err);
                continue;
            }
        };
        if report.namespaces >= MAX_NAMESPACES || started.elapsed() >= SEARCH_BUDGET {
            report.truncated = true;
            break;
        }
        if let Err(err) = ns.enter() {
            report.skip(ns.path(), "entering", &err);
            continue;
        }
        if let Err(err) = destroy_here(targets, &mut pending, &mut report, ns.path()) {
            report.skip(ns.path(), "searching", &err);
        }
    }
    report.not_found = pending.len();
    report
}

/// Finds the sockets of `targets` whose cookies are still `pending` in the calling thread's
/// network namespace (`netns`), takes them off `pending` and destroys them. An error of the
/// search itself is returned; every socket found is tried, and those that cannot be destroyed
/// are counted in the report.
fn destroy_here(
    targets: &UdpTargets,
    pending: &mut HashSet<u64>,
    report: &mut Termination,
    netns: &Path,
) -> io::Result<()> {
    let mut sock = DiagSocket::open()?;
    report.namespaces += 1;
    let mut found: Vec<(SocketAddr, Target)> = Vec::new();
    for (&backend, cookies) in targets {
        if cookies.is_disjoint(pending) {
            continue;
        }
        let families: &[u8] = match backend.ip().to_canonical() {
            // A v6-only backend cannot be the peer of an AF_INET socket.
            IpAddr::V6(_) => &[libc::AF_INET6 as u8],
            IpAddr::V4(_) => &[libc::AF_INET as u8, libc::AF_INET6 as u8],
        };
        let dport = backend.port().to_be_bytes();
        for &family in families {
            let targets = sock.dump_udp(family, Some(dport), |msg| {
                wanted(msg, pending, cookies, backend.ip())
            })?;
            found.extend(targets.into_iter().map(|target| (backend, target)));
        }
    }
    for (_, target) in &found {
        pending.remove(&target.id.cookie());
    }
    let mut undestroyed = 0;
    let destroyed = destroy_all(&found, |(backend, target)| {
        let destroyed = sock.destroy(target);
        match destroyed {
            Ok(true) => *report.destroyed.entry(*backend).or_default() += 1,
            Ok(false) => {}
            Err(_) => undestroyed += 1,
        }
        destroyed
    });
    if let Err(err) = destroyed {
        debug!(netns = %netns.display(), undestroyed, "sock_diag: destroying: {err}");
        report.undestroyed += undestroyed;
        report.note(netns, "destroying", &err);
    }
    Ok(())
}

/// The cookie of a socket (`SO_COOKIE`), as the datapath and `sock_diag` report it.
#[cfg(test)]
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes; `len` holds the buffer's size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected SO_COOKIE length",
        ));
    }
    Ok(cookie)
}

/// Whether the remote address of a dumped socket is `ip` (v4-mapped forms compare equal).
fn remote_is(family: u8, id: &InetDiagSockId, ip: IpAddr) -> bool {
    let remote = match i32::from(family) {
        libc::AF_INET => {
            let [a, b, c, d, ..] = id.idiag_dst;
            IpAddr::from([a, b, c, d])
        }
        libc::AF_INET6 => IpAddr::from(id.idiag_dst),
        _ => return false,
    };
    remote.to_canonical() == ip.to_canonical()
}

/// Applies `destroy_one` to every target: counts `Ok(true)`, ignores `Ok(false)` (gone), and
/// returns the first error only after all targets were tried.
fn destroy_all<T>(
    targets: &[T],
    mut destroy_one: impl FnMut(&T) -> io::Result<bool>,
) -> io::Result<usize> {
    let mut destroyed = 0;
    let mut first_err = None;
    for target in targets {
        match destroy_one(target) {
            Ok(true) => destroyed += 1,
            Ok(false) => {}
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    match first_err {
        Some(err) => Err(err),
        None => Ok(destroyed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::process::{Command, Stdio};

    const WAIT: Duration = Duration::from_secs(1);

    fn udp(bind: &str) -> UdpSocket {
        let sock = UdpSocket::bind(bind).expect("bind");
        sock.set_read_timeout(Some(WAIT)).expect("SO_RCVTIMEO");
        sock
    }

    fn cookie(sock: &UdpSocket) -> u64 {
        socket_cookie(sock.as_fd()).expect("SO_COOKIE")
    }

    fn connected_client(server: &UdpSocket) -> UdpSocket {
        let bind = if server.local_addr().unwrap().is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let client = udp(bind);
        client
            .connect(server.local_addr().unwrap())
            .expect("connect");
        client
    }

    /// Client sends, server replies to the client's source, client receives the reply.
    fn round_trip(server: &UdpSocket, client: &UdpSocket) {
        client.send(b"ping").expect("client send");
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).expect("server recv");
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, client.local_addr().unwrap());
        server.send_to(b"pong", from).expect("server send");
        let n = client.recv(&mut buf).expect("client recv");
        assert_eq!(&buf[..n], b"pong");
    }

    fn assert_aborted(client: &UdpSocket) {
        let mut buf = [0u8; 16];
        let err = client
            .recv(&mut buf)
            .expect_err("destroyed socket must fail");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ECONNABORTED),
            "unexpected error: {err}"
        );
    }

    /// What the search does in one namespace, here the test's own: destroys the sockets of
    /// `cookies` connected to `backend` and returns how many.
    fn destroy_to(cookies: &HashSet<u64>, backend: SocketAddr) -> io::Result<usize> {
        let targets = UdpTargets::from([(backend, cookies.clone())]);
        let mut pending = cookies.clone();
        let mut report = Termination::default();
        destroy_here(&targets, &mut pending, &mut report, Path::new("(test)"))?;
        assert_eq!(report.undestroyed, 0, "{report:?}");
        Ok(report.total())
    }

    fn destroys_only_named(server_addr: &str) {
        let server = udp(server_addr);
        let backend = server.local_addr().unwrap();
        let clients: Vec<_> = (0..3).map(|_| connected_client(&server)).collect();
        let cookies: HashSet<u64> = clients[..2].iter().map(cookie).collect();
        assert_eq!(cookies.len(), 2);

        assert_eq!(destroy_to(&cookies, backend).expect("destroy"), 2);

        assert_aborted(&clients[0]);
        assert_aborted(&clients[1]);
        round_trip(&server, &clients[2]);
        // Nothing left to destroy.
        assert_eq!(destroy_to(&cookies, backend).expect("destroy again"), 0);
    }

    #[test]
    fn destroys_only_the_named_connected_udp_sockets() {
        destroys_only_named("127.0.0.1:0");
    }

    #[test]
    fn ipv6_connected_udp_socket_is_destroyed() {
        destroys_only_named("[::1]:0");
    }

    #[test]
    fn unknown_cookie_destroys_nothing() {
        let server = udp("127.0.0.1:0");
        let client = connected_client(&server);
        let server6 = udp("[::1]:0");
        let client6 = connected_client(&server6);
        // Cookies are allocated from a global counter starting at 1, never 0 or u64::MAX.
        let unknown = HashSet::from([0, u64::MAX]);
        assert!(!unknown.contains(&cookie(&client)) && !unknown.contains(&cookie(&client6)));

        for backend in [server.local_addr().unwrap(), server6.local_addr().unwrap()] {
            assert_eq!(destroy_to(&unknown, backend).expect("destroy"), 0);
            assert_eq!(destroy_to(&HashSet::new(), backend).expect("destroy"), 0);
        }
        let nothing = destroy_udp_sockets_everywhere(&UdpTargets::new());
        assert_eq!((nothing.total(), nothing.namespaces), (0, 0), "{nothing:?}");

        round_trip(&server, &client);
        round_trip(&server6, &client6);
    }

    #[test]
    fn unconnected_socket_with_a_listed_cookie_is_left_alone() {
        // The agent never lists unconnected sockets; one that is listed anyway has no remote
        // address, so it is not connected to the backend and must not be touched.
        let server = udp("127.0.0.1:0");
        let unconnected = udp("127.0.0.1:0");
        let client = connected_client(&server);
        let cookies = HashSet::from([cookie(&unconnected), cookie(&client)]);

        let destroyed = destroy_to(&cookies, server.local_addr().unwrap()).expect("destroy");
        assert_eq!(destroyed, 1);
        assert_aborted(&client);
        unconnected
            .send_to(b"ping", server.local_addr().unwrap())
            .expect("the unconnected socket still sends");
        let mut buf = [0u8; 16];
        let (n, _) = server.recv_from(&mut buf).expect("server recv");
        assert_eq!(&buf[..n], b"ping");
    }

    #[test]
    fn vanished_socket_is_not_an_error() {
        let server = udp("127.0.0.1:0");
        let gone = connected_client(&server);
        let kept = connected_client(&server);
        let wanted = HashSet::from([cookie(&gone), cookie(&kept)]);

        let mut sock = DiagSocket::open().expect("sock_diag socket");
        let targets = sock
            .dump_udp(libc::AF_INET as u8, None, |msg| {
                wanted.contains(&msg.id.cookie())
            })
            .expect("dump");
        assert_eq!(targets.len(), 2);
        let gone_cookie = cookie(&gone);
        drop(gone);
        // close() unhashes a UDP socket, but under load a dump can still see it for a moment:
        // wait (bounded) until the kernel no longer lists it, so the destroy below meets a
        // socket that is really gone.
        for _ in 0..200 {
            let still = sock
                .dump_udp(libc::AF_INET as u8, None, |msg| {
                    msg.id.cookie() == gone_cookie
                })
                .expect("dump");
            if still.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let destroyed = destroy_all(&targets, |t| {
            let result = sock.destroy(t);
            if t.id.cookie() == gone_cookie {
                assert!(matches!(result, Ok(false)), "{result:?}");
            }
            result
        })
        .expect("destroy");
        assert_eq!(destroyed, 1);
        assert_aborted(&kept);
    }

    /// A netlink message as the kernel writes it: header, payload, padding to 4 bytes.
    fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = size_of::<NlMsgHdr>() + payload.len();
        let mut bytes = Vec::with_capacity(nlmsg_align(len));
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&ty.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(nlmsg_align(len), 0);
        bytes
    }

    /// Regression (fuzz/corpus/sockdiag/crash-done-errno-min.bin): an `NLMSG_DONE` carrying
    /// `i32::MIN` overflowed negating it (a panic with overflow checks on).
    #[test]
    fn a_dump_done_with_the_lowest_errno_is_an_error() {
        // An NLMSG_NOOP (1) first: skipped.
        let mut datagram = message(1, 7, &[0; 4]);
        datagram.extend(message(NLMSG_DONE, 7, &i32::MIN.to_ne_bytes()));
        let mut targets = Vec::new();
        let result = walk_datagram(&datagram, 7, &mut |ty, payload| {
            dump_reply(ty, payload, &mut |_| true, &mut targets)
        });
        let err = result
            .expect("the dump ends")
            .expect_err("a negative errno is an error");
        assert_eq!(err.raw_os_error(), Some(i32::MAX));
        assert!(targets.is_empty());
    }

    /// The bounds of the reply parser: a length past the datagram or below the header is
    /// malformed, other sequences are skipped, a truncated socket message is malformed.
    #[test]
    fn malformed_replies_are_errors() {
        let done = message(NLMSG_DONE, 7, &0i32.to_ne_bytes());
        let mut too_long = done.clone();
        too_long[..4].copy_from_slice(&(done.len() as u32 + 4).to_ne_bytes());
        let mut too_short = done.clone();
        too_short[..4].copy_from_slice(&15u32.to_ne_bytes());
        for bad in [
            too_long,
            too_short,
            message(SOCK_DIAG_BY_FAMILY, 7, &[0; 71]),
        ] {
            let result = walk_datagram(&bad, 7, &mut |ty, payload| {
                dump_reply(ty, payload, &mut |_| true, &mut Vec::new())
            });
            let err = result.expect("ends").expect_err("malformed");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
        let other_seq = walk_datagram(&done, 8, &mut |ty, payload| {
            dump_reply(ty, payload, &mut |_| true, &mut Vec::new())
        });
        assert!(other_seq.is_none());
        let ack = message(NLMSG_ERROR, 7, &(-libc::ENOENT).to_ne_bytes());
        let gone = walk_datagram(&ack, 7, &mut destroy_reply).expect("ends");
        assert!(matches!(gone, Ok(false)), "{gone:?}");
    }

    #[test]
    fn dump_reports_the_socket_ids_in_network_order() {
        let server = udp("127.0.0.1:0");
        let client = connected_client(&server);
        let want = cookie(&client);
        let mut sock = DiagSocket::open().expect("sock_diag socket");
        let targets = sock
            .dump_udp(libc::AF_INET as u8, None, |msg| msg.id.cookie() == want)
            .expect("dump");
        let [target] = targets[..] else {
            panic!("expected exactly one socket, got {targets:?}");
        };
        let local = client.local_addr().unwrap();
        let remote = server.local_addr().unwrap();
        assert_eq!(target.family, libc::AF_INET as u8);
        assert_eq!(target.id.idiag_sport, local.port().to_be_bytes());
        assert_eq!(target.id.idiag_dport, remote.port().to_be_bytes());
        assert_eq!(target.id.idiag_src[..4], [127, 0, 0, 1]);
        assert_eq!(target.id.idiag_dst[..4], [127, 0, 0, 1]);
        assert!(remote_is(target.family, &target.id, remote.ip()));
    }

    #[test]
    fn backend_filter_only_destroys_sockets_connected_to_it() {
        let server_a = udp("127.0.0.1:0");
        let server_b = udp("127.0.0.1:0");
        let to_a = connected_client(&server_a);
        let to_b = connected_client(&server_b);
        let cookies = HashSet::from([cookie(&to_a), cookie(&to_b)]);

        // Same address, other port: the kernel-side port filter excludes both.
        let unused = udp("127.0.0.1:0").local_addr().unwrap();
        assert_eq!(destroy_to(&cookies, unused).expect("destroy"), 0);
        // Right port, wrong address: excluded by the address check.
        let mut wrong_ip = server_a.local_addr().unwrap();
        wrong_ip.set_ip("127.0.0.2".parse().unwrap());
        assert_eq!(destroy_to(&cookies, wrong_ip).expect("destroy"), 0);

        let backend = server_a.local_addr().unwrap();
        assert_eq!(destroy_to(&cookies, backend).expect("destroy"), 1);
        assert_aborted(&to_a);
        round_trip(&server_b, &to_b);
    }

    /// A loopback server and two clients connected to it in a network namespace of their own,
    /// which a `sleep` child forked inside it keeps named in /proc (killed on Drop).
    struct OtherNetns {
        holder: std::process::Child,
        server: UdpSocket,
        clients: [UdpSocket; 2],
    }

    impl OtherNetns {
        fn new() -> Self {
            std::thread::spawn(|| {
                super::super::netns::unshare_for_test().expect("unshare(CLONE_NEWNET)");
                let up = Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .expect("run ip");
                assert!(up.success(), "ip link set lo up: {up}");
                let server = udp("127.0.0.1:0");
                let clients = [connected_client(&server), connected_client(&server)];
                let holder = Command::new("sleep")
                    .arg("30")
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn sleep");
                OtherNetns {
                    holder,
                    server,
                    clients,
                }
            })
            .join()
            .expect("thread")
        }
    }

    impl Drop for OtherNetns {
        fn drop(&mut self) {
            let _ = self.holder.kill();
            let _ = self.holder.wait();
        }
    }

    #[test]
    fn sockets_in_another_network_namespace_are_found_and_destroyed() {
        let other = OtherNetns::new();
        let own_server = udp("127.0.0.1:0");
        let own_client = connected_client(&own_server);
        let backend = other.server.local_addr().unwrap();
        let targets = UdpTargets::from([(backend, HashSet::from([cookie(&other.clients[0])]))]);

        let started = Instant::now();
        let report = destroy_udp_sockets_everywhere(&targets);
        eprintln!("{report:?} in {:?}", started.elapsed());
        assert_eq!(
            report.destroyed,
            BTreeMap::from([(backend, 1)]),
            "{report:?}"
        );
        // Namespaces this process may not open (EACCES on a sandbox's pid 1, say) are counted
        // in `skipped`; they do not hide this one.
        assert_eq!(report.not_found, 0, "{report:?}");
        assert!(report.namespaces >= 2, "{report:?}");
        assert!(!report.truncated);

        assert_aborted(&other.clients[0]);
        round_trip(&other.server, &other.clients[1]);
        round_trip(&own_server, &own_client);
        assert_eq!(
            NetNs::current().unwrap().inode(),
            NetNs::open(Path::new("/proc/self/ns/net")).unwrap().inode(),
            "the calling thread never left the process's namespace"
        );
    }

    #[test]
    fn search_stays_in_the_agents_namespace_when_every_socket_is_there() {
        let server = udp("127.0.0.1:0");
        let clients = [connected_client(&server), connected_client(&server)];
        let backend = server.local_addr().unwrap();
        let targets = UdpTargets::from([(backend, HashSet::from([cookie(&clients[0])]))]);

        let report = destroy_udp_sockets_everywhere(&targets);
        assert_eq!(
            report.destroyed,
            BTreeMap::from([(backend, 1)]),
            "{report:?}"
        );
        assert_eq!(report.namespaces, 1, "{report:?}");
        assert_aborted(&clients[0]);
        round_trip(&server, &clients[1]);
    }

    #[test]
    fn a_socket_found_nowhere_is_reported_after_searching_every_namespace() {
        let _other = OtherNetns::new();
        let backend: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let targets = UdpTargets::from([(backend, HashSet::from([u64::MAX]))]);

        let started = Instant::now();
        let report = destroy_udp_sockets_everywhere(&targets);
        eprintln!("{report:?} in {:?}", started.elapsed());
        assert_eq!(report.total(), 0);
        assert_eq!(report.not_found, 1, "{report:?}");
        assert!(report.namespaces >= 2, "{report:?}");
        assert!(!report.truncated, "{report:?}");
    }

    #[test]
    fn a_search_is_incomplete_only_when_a_socket_may_be_left() {
        let report = |undestroyed, not_found, skipped, truncated| Termination {
            undestroyed,
            not_found,
            skipped,
            truncated,
            ..Default::default()
        };
        // Everything found and destroyed; a skipped namespace hid nothing.
        assert!(!report(0, 0, 0, false).incomplete());
        assert!(!report(0, 0, 3, false).incomplete());
        // Not found, but every namespace was searched: the sockets were closed meanwhile.
        assert!(!report(0, 2, 0, false).incomplete());
        // Not found, and somewhere was not searched.
        assert!(report(0, 2, 1, false).incomplete());
        assert!(report(0, 2, 0, true).incomplete());
        // Found and still alive.
        assert!(report(1, 0, 0, false).incomplete());
    }

    #[test]
    fn destroy_all_tries_every_target_and_returns_the_first_error() {
        let mut tried = Vec::new();
        let result = destroy_all(&[1, 2, 3, 4, 5], |&t| {
            tried.push(t);
            match t {
                2 => Err(io::Error::from_raw_os_error(libc::EPERM)),
                4 => Err(io::Error::from_raw_os_error(libc::EINVAL)),
                3 => Ok(false),
                _ => Ok(true),
            }
        });
        assert_eq!(tried, [1, 2, 3, 4, 5]);
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EPERM));

        assert_eq!(
            destroy_all(&[1, 2, 3], |&t| Ok(t != 2)).expect("no errors"),
            2
        );
    }

    #[test]
    fn cookie_words_are_low_first() {
        let id = InetDiagSockId {
            idiag_cookie: [0x8765_4321, 0x1],
            ..Default::default()
        };
        assert_eq!(id.cookie(), 0x1_8765_4321);
    }
}
