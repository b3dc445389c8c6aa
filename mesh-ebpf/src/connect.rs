//! connect(): applies the backend choice to the socket, remembers the translation for
//! getpeername/SO_ORIGINAL_DST and records connected UDP flows.

use aya_ebpf::programs::SockAddrContext;

use crate::ALLOW;
use crate::addr::{read_dest, write_backend};
use crate::maps::TcpPeer;
use crate::reverse::{as_socket_sees, entry, mark_translated, remember_tcp_peer, sock_rev};
use crate::service::{Verdict, refuse, translate};
use crate::settings::{original_dst_on, telemetry_on};
use crate::udp;

/// connect(): translate, remember the translation for getpeername/SO_ORIGINAL_DST, and record
/// connected UDP flows so the agent can terminate them when their backend leaves.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, family: u8) -> i32 {
    // SAFETY: the kernel hands a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = read_dest(sa, family);
    match translate(ctx, &vip, family) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Rewrite {
            service_id,
            backend_id,
            backend,
            passive,
        } => {
            let dest = write_backend(sa, &backend, family);
            let peer = entry(
                &as_socket_sees(&vip, family, sa.family),
                &as_socket_sees(&dest, family, sa.family),
            );
            let observe = u32::from(passive || telemetry_on());
            let udp = udp::is_udp(sa.protocol);
            // TCP's common case: the socket's `TCP_PEERS` entry, no allocation on the connect path.
            if !udp
                && !original_dst_on()
                && remember_tcp_peer(
                    ctx,
                    &TcpPeer {
                        peer,
                        service_id,
                        backend_id,
                        observe,
                    },
                )
            {
                return ALLOW;
            }
            // Without state the connection still goes to the backend; only its reverse view
            // (and, for UDP, its flow record, which could never be removed) is missing.
            let Some(rev) = sock_rev(ctx) else {
                return ALLOW;
            };
            // SAFETY: storage of this socket, which only this program run writes now (a socket
            // connects under its lock).
            let rev = unsafe { &mut *rev };
            rev.peer = peer;
            rev.has_peer = 1;
            rev.service_id = service_id;
            rev.backend_id = backend_id;
            rev.observe = observe;
            if udp {
                udp::record_flow(ctx, rev, service_id, backend_id);
            } else {
                mark_translated(ctx);
            }
            ALLOW
        }
    }
}
