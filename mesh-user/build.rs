//! Builds the eBPF programs (`mesh-ebpf`) for bpfel-unknown-none with BTF and leaves the object
//! in OUT_DIR, where `datapath` embeds it.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // `AYA_BUILD_SKIP=1` (for `cargo check`/`clippy` without bpf-linker) leaves an empty object:
    // the binary then fails at load time with a clear error instead of not compiling.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(std::path::Path::new(&out_dir).join("mesh"), [])?;
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("mesh-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
