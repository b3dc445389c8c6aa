//! The destination address of a sock_addr context, read and written in its raw form.

use aya_ebpf::bindings::bpf_sock_addr;
use mesh_common::{Backend, FAMILY_V4, RawIp};

/// An address as the context holds it: raw network-order words (IPv4 is `[ip, 0, 0, 0]`), and
/// the port in `user_port` form.
#[derive(Clone, Copy)]
pub struct Dest {
    pub ip: RawIp,
    pub port: u32,
}

/// The context's address, as a hook of `family` sees it. The verifier only allows 4-byte
/// accesses to user_ip6, and only the field of the hook's own family.
#[inline(always)]
pub fn read_dest(sa: &bpf_sock_addr, family: u8) -> Dest {
    let ip = if family == FAMILY_V4 {
        [sa.user_ip4, 0, 0, 0]
    } else {
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    };
    Dest {
        ip,
        port: sa.user_port,
    }
}

/// Points the context at `backend` (v4-mapped for an IPv4 backend in a 6 hook); returns what
/// it wrote.
#[inline(always)]
pub fn write_backend(sa: &mut bpf_sock_addr, backend: &Backend, family: u8) -> Dest {
    let dest = Dest {
        ip: backend.raw_ip(family),
        port: backend.raw_port(),
    };
    write_dest(sa, &dest, family);
    dest
}

/// Writes `dest` into the context's address fields of a hook of `family`.
#[inline(always)]
pub fn write_dest(sa: &mut bpf_sock_addr, dest: &Dest, family: u8) {
    if family == FAMILY_V4 {
        sa.user_ip4 = dest.ip[0];
    } else {
        sa.user_ip6[0] = dest.ip[0];
        sa.user_ip6[1] = dest.ip[1];
        sa.user_ip6[2] = dest.ip[2];
        sa.user_ip6[3] = dest.ip[3];
    }
    sa.user_port = dest.port;
}
