//! Kernel functions the programs call, as raw instructions the agent completes at load
//! (`mesh_common::kfunc`).

use aya_ebpf::bindings::bpf_sock;
use mesh_common::kfunc::{CALL_RDONLY_CAST, MOV_R2_TCP_SOCK};

/// The TCP socket a sock_release program was handed, as a read-only BTF pointer to its
/// `struct tcp_sock` (`bpf_rdonly_cast`): the program loads fields through it directly, each
/// load checked by the verifier against the kernel's BTF and safe against faults. Only for
/// TCP sockets (the cast does not check the type).
#[inline(always)]
pub fn tcp_sock(sk: *mut bpf_sock) -> *const u8 {
    let tcp: *const u8;
    // SAFETY: the two instructions are `r2 = <btf id of struct tcp_sock>` and a call of the
    // kfunc `bpf_rdonly_cast(r1, r2)`, which returns r1 retyped; a kfunc call clobbers r1-r5
    // like a helper call. The agent fills in the ids before loading (the verifier rejects the
    // placeholders).
    unsafe {
        core::arch::asm!(
            ".8byte {mov}",
            ".8byte {call}",
            mov = const MOV_R2_TCP_SOCK,
            call = const CALL_RDONLY_CAST,
            inout("r1") sk => _,
            out("r2") _,
            out("r3") _,
            out("r4") _,
            out("r5") _,
            lateout("r0") tcp,
            options(nostack, pure, readonly),
        );
    }
    tcp
}
