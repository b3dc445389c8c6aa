//! sock_release: the end of every socket of the cgroup. A TCP connection the load balancer made
//! records how it went (`outcome`); every translation and connected-UDP flow is forgotten.

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockContext};
use mesh_common::{BackendStatsKey, PROTO_TCP};

use crate::reverse::{existing_sock_rev, forget_tcp_peer, tcp_peer};
use crate::stats::count;
use crate::{kfunc, outcome, udp};

/// `bpf_sock.type` of TCP sockets.
const SOCK_STREAM: u32 = 1;

/// sock_release: forget the socket's translation (and its UDP flow), counting it as released;
/// for a TCP connection the load balancer made, record how it went (`outcome`) first.
#[inline(always)]
pub fn release(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: the kernel hands a valid socket to sock_release programs.
    let (protocol, sock_type) = unsafe { ((*sk).protocol, (*sk).type_) };
    // Only a stream socket of protocol TCP is a `struct tcp_sock` (a raw one is not).
    let tcp = protocol == u32::from(PROTO_TCP) && sock_type == SOCK_STREAM;
    if tcp {
        let tcp_sock = kfunc::tcp_sock(sk);
        let cookie = match outcome::current_cookie(tcp_sock) {
            // Never translated: nothing to forget or record (most TCP sockets of the cgroup).
            Some(0) => return,
            Some(cookie) => cookie,
            // SAFETY: the helper only reads the valid socket.
            None => unsafe { bpf_get_socket_cookie(sk.cast()) },
        };
        if let Some(entry) = tcp_peer(cookie) {
            // SAFETY: the socket's own entry, which only its connect and release write.
            let (key, observe) = unsafe {
                let peer = &(*entry).peer;
                (stats_key(peer.service_id, peer.backend_id), peer.observe)
            };
            if observe != 0 {
                outcome::tcp_released(ctx, tcp_sock, &key);
            }
            forget_tcp_peer(entry);
            return;
        }
    }
    let rev = existing_sock_rev(sk);
    if rev.is_null() {
        return;
    }
    count(|s| s.rev_released += 1);
    // SAFETY: non-null storage of this socket.
    let rev = unsafe { &*rev };
    if tcp && rev.has_peer != 0 && rev.observe != 0 {
        let tcp_sock = kfunc::tcp_sock(sk);
        outcome::tcp_released(ctx, tcp_sock, &stats_key(rev.service_id, rev.backend_id));
    }
    if rev.has_flow != 0 {
        udp::forget_flow(sk);
    }
}

#[inline(always)]
fn stats_key(service_id: u32, backend_id: u32) -> BackendStatsKey {
    BackendStatsKey {
        service_id,
        backend_id,
    }
}
