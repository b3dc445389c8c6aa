//! The bench's floor baseline (`cargo xtask bench --kernel-cost`), not part of mesh: a connect4
//! and a sock_release program that do nothing at all. Their cost per connection is what the
//! kernel accounts for running a cgroup program before it does any work (the run itself and
//! its run-time accounting), once per hook. mesh's TCP path needs both hooks (the translation
//! at connect4, the outcome and the reverse entry at sock_release), so this pair is the least
//! any such design can cost per connection here.
//!
//! The bench loads both with `bpftool prog loadall`; the agent never loads them.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};

#[cgroup_sock_addr(connect4)]
pub fn bench_empty_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock(sock_release)]
pub fn bench_empty_release(_ctx: SockContext) -> i32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
