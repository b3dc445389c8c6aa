//! Reverse translation: each translated socket keeps which backend stands for which VIP, so
//! getpeername(), recvmsg() and SO_ORIGINAL_DST show the VIP. A TCP socket keeps it in the
//! `TCP_PEERS` entry its cookie claims (nothing is allocated per connect); UDP sockets, and TCP
//! ones whose entry another socket holds or with SO_ORIGINAL_DST on, in socket-local storage.
//! Either goes at the socket's release (`release`).
//!
//! Entries hold addresses in the form the socket itself sees them: an AF_INET6 socket sees an
//! IPv4 peer v4-mapped, even when the kernel ran a 4 hook for it (sendmsg4 for its datagrams to
//! `::ffff:a.b.c.d`, connect4 for a UDP connect with a sockaddr_in), so that is how they are
//! stored and compared.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_socket_cookie, bpf_sk_storage_get},
    programs::SockAddrContext,
};
use mesh_common::{FAMILY_V4, PROTO_TCP, tcp_peer_index, v4_mapped};

use crate::addr::{Dest, read_dest, write_dest};
use crate::maps::{REV_SENT, RevEntry, SOCK_REV, SockRev, TCP_PEERS, TcpPeer, TcpPeerEntry};
use crate::stats::count;

/// `sockaddr.sa_family` of IPv6 sockets (`bpf_sock_addr.family`, `bpf_sock.family`).
pub const AF_INET6: u32 = 10;

/// `dest`, read or written by a hook of `family` on a socket of `sk_family`, in the form the
/// socket sees it.
#[inline(always)]
pub fn as_socket_sees(dest: &Dest, family: u8, sk_family: u32) -> Dest {
    if family == FAMILY_V4 && sk_family == AF_INET6 {
        Dest {
            ip: v4_mapped(dest.ip[0]),
            port: dest.port,
        }
    } else {
        *dest
    }
}

/// The entry for a translation from `vip` to `backend` (both as the socket sees them).
#[inline(always)]
pub fn entry(vip: &Dest, backend: &Dest) -> RevEntry {
    RevEntry {
        backend_ip: backend.ip,
        vip_ip: vip.ip,
        backend_port: backend.port,
        vip_port: vip.port,
    }
}

/// The socket's reverse-translation state, created on first use; None (counted) if the kernel
/// could not create it.
#[inline(always)]
pub fn sock_rev(ctx: &SockAddrContext) -> Option<*mut SockRev> {
    // SAFETY (both calls): the context's socket is valid for the program run.
    let existing = unsafe { SOCK_REV.get_ptr_mut(ctx) };
    if !existing.is_null() {
        return Some(existing);
    }
    let created = unsafe { SOCK_REV.get_or_insert_ptr_mut(ctx, None) };
    if created.is_null() {
        count(|s| s.rev_failed += 1);
        return None;
    }
    count(|s| s.rev_created += 1);
    Some(created)
}

/// The reverse-translation state of `sk`, if the load balancer gave it one (never creates).
#[inline(always)]
pub fn existing_sock_rev(sk: *mut bpf_sock) -> *const SockRev {
    // SAFETY: callers pass a socket the kernel handed to the program, checked non-null.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SOCK_REV) as *mut c_void,
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast()
}

/// Remembers a TCP socket's translation in its `TCP_PEERS` entry; false if another open socket
/// holds that entry (the caller falls back to socket storage). A socket that connects again
/// (after a failed connect) overwrites its own entry.
#[inline(always)]
pub fn remember_tcp_peer(ctx: &SockAddrContext, peer: &TcpPeer) -> bool {
    // SAFETY: the helper only reads the valid context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let Some(entry) = TCP_PEERS.get_ptr_mut(tcp_peer_index(cookie)) else {
        return false;
    };
    // Two sockets whose cookies share the entry may connect at once on two CPUs: one wins.
    // SAFETY: a field of a valid value of the array; the exchange is atomic.
    let (holder, claimed) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(&raw mut (*entry).cookie, 0, cookie)
    };
    if !claimed && holder != cookie {
        return false;
    }
    if claimed {
        count(|s| s.rev_created += 1);
    }
    // SAFETY: the entry holds this socket's cookie, so no other socket writes it; this socket
    // connects under its lock.
    unsafe { (*entry).peer = *peer };
    true
}

/// The `TCP_PEERS` entry of the TCP socket with `cookie`, if the socket holds it.
#[inline(always)]
pub fn tcp_peer(cookie: u64) -> Option<*mut TcpPeerEntry> {
    let entry = TCP_PEERS.get_ptr_mut(tcp_peer_index(cookie))?;
    // SAFETY: a field of a valid value of the array.
    (unsafe { (*entry).cookie } == cookie).then_some(entry)
}

/// Frees a socket's `TCP_PEERS` entry (from `tcp_peer`) once its translation has been read.
#[inline(always)]
pub fn forget_tcp_peer(entry: *mut TcpPeerEntry) {
    // An exchange, not a plain store: it orders the reads of the entry before another socket
    // can claim it and overwrite them.
    // SAFETY: a field of a valid value of the array; the exchange is atomic.
    unsafe {
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            &raw mut (*entry).cookie,
            0,
        )
    };
    count(|s| s.rev_released += 1);
}

/// Makes sure the TCP socket has a cookie, which is how its release knows it may hold a
/// translation (`outcome::current_cookie`). `remember_tcp_peer` gets one anyway.
#[inline(always)]
pub fn mark_translated(ctx: &SockAddrContext) {
    // SAFETY: the helper only reads (and on first use sets) the valid context's socket cookie.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
}

/// Remembers a datagram's translation: one entry per backend, overwriting a match, else the
/// oldest.
#[inline(always)]
pub fn remember_sent(rev: &mut SockRev, sent: RevEntry, backend: &Dest) {
    let mut slot = rev.next_sent as usize % REV_SENT;
    let mut i = 0;
    while i < REV_SENT {
        if same_addr(&rev.sent[i], backend) {
            slot = i;
            break;
        }
        i += 1;
    }
    if i == REV_SENT {
        rev.next_sent = rev.next_sent.wrapping_add(1);
    }
    if let Some(e) = rev.sent.get_mut(slot) {
        *e = sent;
    }
}

/// recvmsg()/getpeername(): a reply source (or peer) that is a backend this socket reached
/// through a VIP is shown as that VIP.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: u8, datagram: bool) {
    // SAFETY: the kernel hands a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // A 6 hook sees the address as the (AF_INET6) socket does; stored entries use that form.
    let seen = read_dest(sa, family);
    if !datagram && sa.protocol == u32::from(PROTO_TCP) {
        // SAFETY: the helper only reads the valid context's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        if let Some(entry) = tcp_peer(cookie) {
            // SAFETY: the socket's own entry, which only its connect and release write.
            let peer = unsafe { &(*entry).peer.peer };
            if same_addr(peer, &seen) {
                let vip = Dest {
                    ip: peer.vip_ip,
                    port: peer.vip_port,
                };
                write_dest(sa, &vip, family);
                return;
            }
        }
    }
    // SAFETY: the context's socket is valid for the program run.
    let rev = unsafe { SOCK_REV.get_ptr_mut(ctx) };
    if rev.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket.
    let rev = unsafe { &*rev };
    let mut found = None;
    if rev.has_peer != 0 && same_addr(&rev.peer, &seen) {
        found = Some(rev.peer);
    } else if datagram {
        let mut i = 0;
        while i < REV_SENT {
            if same_addr(&rev.sent[i], &seen) {
                found = Some(rev.sent[i]);
                break;
            }
            i += 1;
        }
    }
    if let Some(entry) = found {
        let vip = Dest {
            ip: entry.vip_ip,
            port: entry.vip_port,
        };
        write_dest(sa, &vip, family);
    }
}

#[inline(always)]
fn same_addr(entry: &RevEntry, dest: &Dest) -> bool {
    entry.backend_port == dest.port
        && entry.backend_ip[0] == dest.ip[0]
        && entry.backend_ip[1] == dest.ip[1]
        && entry.backend_ip[2] == dest.ip[2]
        && entry.backend_ip[3] == dest.ip[3]
}
