//! UDP: per-datagram translation of unconnected sockets (sendmsg), and the `UDP_FLOWS` record
//! of connected ones, from connect() to the socket's release.

use aya_ebpf::{bindings::bpf_sock, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use aya_log_ebpf::warn;
use mesh_common::{PROTO_UDP, UdpFlow};

use crate::ALLOW;
use crate::addr::{read_dest, write_backend};
use crate::maps::SockRev;
use crate::maps::UDP_FLOWS;
use crate::reverse::{as_socket_sees, entry, remember_sent, sock_rev};
use crate::service::{Verdict, refuse, translate};
use crate::stats::count;

#[inline(always)]
pub fn is_udp(protocol: u32) -> bool {
    protocol == u32::from(PROTO_UDP)
}

/// sendmsg() of unconnected UDP: translate this datagram and remember the pair for recvmsg.
///
/// A datagram of an AF_INET6 socket to `::ffff:a.b.c.d` reaches sendmsg4 (the kernel hands
/// v4-mapped destinations to the IPv4 path before sendmsg6 runs, and refuses a v4-mapped
/// rewrite in sendmsg6), so the pair is stored v4-mapped, as recvmsg6 will see the reply.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, family: u8) -> i32 {
    // SAFETY: the kernel hands a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = read_dest(sa, family);
    match translate(ctx, &vip, family) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Rewrite { backend, .. } => {
            let dest = write_backend(sa, &backend, family);
            if let Some(rev) = sock_rev(ctx) {
                let backend = as_socket_sees(&dest, family, sa.family);
                let sent = entry(&as_socket_sees(&vip, family, sa.family), &backend);
                // SAFETY: storage of this socket; sends on one socket are serialized by its
                // lock.
                remember_sent(unsafe { &mut *rev }, sent, &backend);
            }
            ALLOW
        }
    }
}

/// Records a connected UDP socket (which has reverse state, so its release deletes the
/// record again).
#[inline(always)]
pub fn record_flow(ctx: &SockAddrContext, rev: &mut SockRev, service_id: u32, backend_id: u32) {
    // SAFETY: the helper only reads the valid context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let flow = UdpFlow {
        service_id,
        backend_id,
    };
    match UDP_FLOWS.insert(cookie, flow, 0) {
        Ok(()) => {
            rev.has_flow = 1;
            count(|s| s.udp_flows_added += 1);
        }
        Err(_) => {
            // A reconnect that fails to update keeps the earlier record (and `has_flow`).
            count(|s| s.udp_flows_full += 1);
            warn!(
                ctx,
                "udp_flows is full: a connected UDP socket is not tracked"
            );
        }
    }
}

/// Forgets the flow of a released connected UDP socket (one whose reverse state says it has
/// one).
#[inline(always)]
pub fn forget_flow(sk: *mut bpf_sock) {
    // SAFETY: the helper only reads the valid socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let _ = UDP_FLOWS.remove(cookie);
}
