//! getsockopt(SO_ORIGINAL_DST): the VIP a translated socket connected to, as proxies that
//! expect netfilter DNAT ask for it.

use aya_ebpf::programs::SockoptContext;
use mesh_common::is_v4_mapped;

use crate::reverse::{AF_INET6, existing_sock_rev};

const AF_INET: u16 = 2;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6) share the number.
const SO_ORIGINAL_DST: i32 = 80;

/// Answers SO_ORIGINAL_DST for a socket whose connect was translated: at SOL_IP with a
/// `sockaddr_in` (for an AF_INET socket, or an AF_INET6 one connected to a v4-mapped VIP), at
/// SOL_IPV6 with a `sockaddr_in6` (for an AF_INET6 socket: v4-mapped when the VIP is IPv4).
/// Anything else is left to the kernel.
#[inline(always)]
pub fn original_dst(ctx: &SockoptContext) {
    // SAFETY: the kernel hands a valid sockopt context; optval..optval_end is checked below.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optname != SO_ORIGINAL_DST || (opt.level != SOL_IP && opt.level != SOL_IPV6) {
        return;
    }
    // SAFETY: the context's socket, valid (and non-null) for the program run.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    let rev = existing_sock_rev(sk);
    if rev.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket.
    let rev = unsafe { &*rev };
    if rev.has_peer == 0 {
        return;
    }
    let vip = rev.peer.vip_ip;
    // SAFETY: reading a field of the valid socket.
    let v6_socket = unsafe { (*sk).family } == AF_INET6;
    // Entries hold the VIP as the socket sees it: [ip, 0, 0, 0] on an AF_INET socket, 16 bytes
    // (v4-mapped for IPv4) on an AF_INET6 one.
    // SAFETY: the union fields are the kernel's optval pointers.
    let start = unsafe { opt.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { opt.__bindgen_anon_3.optval_end } as *mut u8;
    if opt.level == SOL_IP {
        let ip4 = if !v6_socket {
            vip[0]
        } else if is_v4_mapped(&vip) {
            vip[3]
        } else {
            return;
        };
        // struct sockaddr_in. SAFETY: the 16 bytes written lie within optval..optval_end.
        unsafe {
            if start.add(16) > end {
                return;
            }
            (start as *mut u16).write_unaligned(AF_INET);
            (start.add(2) as *mut u16).write_unaligned(rev.peer.vip_port as u16);
            (start.add(4) as *mut u32).write_unaligned(ip4);
            (start.add(8) as *mut u64).write_unaligned(0);
        }
        opt.optlen = 16;
    } else {
        if !v6_socket {
            return;
        }
        // struct sockaddr_in6. SAFETY: the 28 bytes written lie within optval..optval_end.
        unsafe {
            if start.add(28) > end {
                return;
            }
            (start as *mut u16).write_unaligned(AF_INET6 as u16);
            (start.add(2) as *mut u16).write_unaligned(rev.peer.vip_port as u16);
            (start.add(4) as *mut u32).write_unaligned(0);
            (start.add(8) as *mut u32).write_unaligned(vip[0]);
            (start.add(12) as *mut u32).write_unaligned(vip[1]);
            (start.add(16) as *mut u32).write_unaligned(vip[2]);
            (start.add(20) as *mut u32).write_unaligned(vip[3]);
            (start.add(24) as *mut u32).write_unaligned(0);
        }
        opt.optlen = 28;
    }
    opt.retval = 0;
}
