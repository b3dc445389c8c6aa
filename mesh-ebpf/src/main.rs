//! mesh kernel programs: socket-level load balancing.
//!
//! - `connect4/6` rewrite a connect() to a service VIP into a backend chosen by weighted
//!   round-robin (or session affinity) over the service's live slot set. After connect() the
//!   socket talks to the backend directly: no per-packet work at all.
//! - `sendmsg4/6` do the same per datagram for unconnected UDP; `recvmsg4/6` make replies
//!   appear to come from the VIP; `getpeername4/6` and getsockopt(SO_ORIGINAL_DST) report the
//!   VIP. The reverse translation of TCP sockets lives in an array entry claimed by socket
//!   cookie (freed at release), the rest in socket-local storage, freed with the socket.
//! - Dual-stack sockets (AF_INET6, IPV6_V6ONLY=0) reach IPv4 services through v4-mapped
//!   addresses (`::ffff:a.b.c.d`): the 6 hooks look those up as the IPv4 service, write the
//!   backend v4-mapped, and show the VIP v4-mapped.
//! - `sock_release` forgets TCP translations and connected UDP flows, and reads how each TCP
//!   connection it made went from the socket (passive health detection, telemetry).
//!
//! Entry points are thin; the logic is in the modules, by concern.
#![no_std]
#![no_main]
#![feature(core_intrinsics, asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only fetching atomic add on bpf"
)]

mod addr;
mod connect;
mod kfunc;
mod maps;
mod nodeport;
mod outcome;
mod release;
mod reverse;
mod service;
mod settings;
mod sockopt;
mod stats;
mod udp;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier},
    programs::{SockAddrContext, SockContext, SockoptContext, TcContext},
};
use mesh_common::{FAMILY_V4, FAMILY_V6};

/// Verdict of cgroup sock_addr, sock and sockopt programs that lets the syscall go on.
const ALLOW: i32 = 1;
/// `bpf_map_update_elem` with BPF_NOEXIST on an existing key.
const EEXIST: i32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    connect::connect(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    connect::connect(&ctx, FAMILY_V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    udp::sendmsg(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    udp::sendmsg(&ctx, FAMILY_V6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::reverse(&ctx, FAMILY_V4, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::reverse(&ctx, FAMILY_V6, true);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::reverse(&ctx, FAMILY_V4, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::reverse(&ctx, FAMILY_V6, false);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    release::release(&ctx);
    ALLOW
}

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    // Whether or not it answers, the syscall goes on (with the kernel's answer otherwise).
    sockopt::original_dst(&ctx);
    ALLOW
}

/// TC ingress of the node's external devices: traffic from other hosts to external services.
#[classifier]
pub fn nodeport_ingress(ctx: TcContext) -> i32 {
    nodeport::ingress(&ctx)
}

/// TC egress of the node's external devices: replies of local backends to such traffic.
#[classifier]
pub fn nodeport_egress(ctx: TcContext) -> i32 {
    nodeport::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
