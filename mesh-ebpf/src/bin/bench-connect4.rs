//! The bench's "minimal connect4" baseline (`cargo xtask bench`), not part of mesh: the least a
//! socket-level balancer can do per connect. It looks the destination up in a hash of VIPs and
//! rewrites it to the next backend of that VIP, round-robin with one atomic add; no counters,
//! no reverse translation, no affinity, no state for later hooks. mesh's cost per connect is
//! reported as a ratio to this program's, measured in the same run.
//!
//! The bench loads it with bpftool and fills the maps itself; the agent never loads it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only fetching atomic add on bpf"
)]

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};

/// A VIP as connect4 sees it: `user_ip4` and `user_port`, both network order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Vip {
    pub ip: u32,
    pub port: u32,
}

/// A VIP's backends: `count` entries of `BACKENDS` starting at `first`, and the round-robin
/// position (advanced atomically in place).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pool {
    pub next: u64,
    pub first: u32,
    pub count: u32,
}

/// VIP -> its backends.
#[btf_map]
static VIPS: HashMap<Vip, Pool, 16> = HashMap::new();

/// Backend addresses, in the `Vip` form.
#[btf_map]
static BACKENDS: Array<Vip, 64> = Array::new();

#[cgroup_sock_addr(connect4)]
pub fn bench_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = Vip {
        ip: sa.user_ip4,
        port: sa.user_port,
    };
    let Some(pool) = VIPS.get_ptr_mut(vip) else {
        return 1;
    };
    // SAFETY: a valid value of the map; the add is atomic (SeqCst: see mesh's round-robin).
    let (turn, first, count) = unsafe {
        let turn = core::intrinsics::atomic_xadd::<
            u64,
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(&raw mut (*pool).next, 1);
        (turn, (*pool).first, (*pool).count)
    };
    if count == 0 {
        return 1;
    }
    let index = first.wrapping_add((turn % u64::from(count)) as u32);
    if let Some(backend) = BACKENDS.get(index) {
        sa.user_ip4 = backend.ip;
        sa.user_port = backend.port;
    }
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
