//! Kernel functions (kfuncs) the programs call. The Rust BPF toolchain emits no kfunc
//! relocations, so the programs carry each call as a raw instruction whose BTF id is a
//! placeholder, and the agent writes the running kernel's ids into the object before loading
//! it (`patch`).
//!
//! The one used: `bpf_rdonly_cast(ptr, btf_id)`, which turns the socket a sock_release program
//! gets into a read-only BTF pointer to its `struct tcp_sock`. Loads through it are plain
//! (fault-safe) loads the verifier checks against the kernel's BTF, instead of a
//! `bpf_probe_read_kernel` helper call per field. The verifier replaces the call itself with
//! a register move.

/// Placeholder for the BTF id of the kfunc `bpf_rdonly_cast`.
pub const RDONLY_CAST_PLACEHOLDER: u32 = 0x6d65_6b01;
/// Placeholder for the BTF id of `struct tcp_sock`.
pub const TCP_SOCK_PLACEHOLDER: u32 = 0x6d65_6b02;

/// `call` of the kfunc with BTF id `id` in vmlinux (`BPF_JMP | BPF_CALL`, src_reg
/// `BPF_PSEUDO_KFUNC_CALL`, off 0: the kernel's own BTF).
pub const fn call_kfunc(id: u32) -> u64 {
    0x85 | (2 << 12) | ((id as u64) << 32)
}

/// `r2 = imm` (`BPF_ALU64 | BPF_MOV | BPF_K`, dst_reg 2).
pub const fn mov_r2(imm: u32) -> u64 {
    0xb7 | (2 << 8) | ((imm as u64) << 32)
}

/// The instructions the programs carry: `r2 = <tcp_sock>; call <bpf_rdonly_cast>`.
pub const CALL_RDONLY_CAST: u64 = call_kfunc(RDONLY_CAST_PLACEHOLDER);
pub const MOV_R2_TCP_SOCK: u64 = mov_r2(TCP_SOCK_PLACEHOLDER);

/// The running kernel's BTF ids the placeholders stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KfuncIds {
    pub rdonly_cast: u32,
    pub tcp_sock: u32,
}

/// Writes `ids` into every placeholder instruction of `text` (BPF instructions, 8 bytes each,
/// little-endian); returns how many were written.
pub fn patch(text: &mut [u8], ids: KfuncIds) -> usize {
    let mut patched = 0;
    for insn in text.chunks_exact_mut(8) {
        let word = u64::from_le_bytes(insn.try_into().expect("8-byte chunk"));
        let replacement = match word {
            CALL_RDONLY_CAST => call_kfunc(ids.rdonly_cast),
            MOV_R2_TCP_SOCK => mov_r2(ids.tcp_sock),
            _ => continue,
        };
        insn.copy_from_slice(&replacement.to_le_bytes());
        patched += 1;
    }
    patched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        // code, regs (dst | src << 4), off (2 bytes), imm (4 bytes).
        assert_eq!(
            call_kfunc(0x1234).to_le_bytes(),
            [0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]
        );
        assert_eq!(
            mov_r2(0x1234).to_le_bytes(),
            [0xb7, 0x02, 0, 0, 0x34, 0x12, 0, 0]
        );
    }

    #[test]
    fn patch_fills_every_placeholder_and_nothing_else() {
        let other = mov_r2(7);
        let words = [
            other,
            MOV_R2_TCP_SOCK,
            CALL_RDONLY_CAST,
            other,
            CALL_RDONLY_CAST,
        ];
        let mut text = [0u8; 40];
        for (chunk, word) in text.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let ids = KfuncIds {
            rdonly_cast: 64927,
            tcp_sock: 36680,
        };
        assert_eq!(patch(&mut text, ids), 3);
        let expected = [
            other,
            mov_r2(36680),
            call_kfunc(64927),
            other,
            call_kfunc(64927),
        ];
        for (chunk, word) in text.chunks_exact(8).zip(expected) {
            assert_eq!(chunk, word.to_le_bytes());
        }
        // Already patched: nothing left to write.
        assert_eq!(patch(&mut text, ids), 0);
    }
}
