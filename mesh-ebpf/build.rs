//! rustc passes `--cpu generic` to bpf-linker, and aya-build owns RUSTFLAGS, so `-C target-cpu`
//! cannot be set. The fetching atomic add used by round-robin needs the ALU32 instructions of
//! BPF ISA v3 (kernel >= 5.12); enable that feature at link time, where BPF code is generated.
fn main() {
    println!("cargo::rustc-link-arg-bins=--cpu-features=+alu32");
}
