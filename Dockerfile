# mesh: the node agent image (deploy/kubernetes/daemonset.yaml runs it).
#
# Two ways to get the `mesh` binary into the runtime image:
#
#   default target `runtime`: builds mesh from source in the `builder` stage, with the
#     project's toolchain recipe (the steps of `cargo xtask setup`: stable Rust for the agent,
#     a nightly with rust-src for the eBPF crate, bpf-linker against LLVM 22):
#       docker build -t mesh:0.1.0 .
#
#   target `prebuilt`: takes a binary built on the host (`cargo xtask build` leaves it at
#     target/release/mesh, or pass another path with MESH_BINARY); no Rust inside the build:
#       cargo xtask build
#       docker build --target prebuilt -t mesh:0.1.0 .
#
# BASE and RUST_IMAGE are normal public images by default. On a machine without an image
# registry, point them at local images, e.g. (what `cargo xtask image` does):
#   podman build --isolation=chroot --target prebuilt \
#     --build-arg BASE=localhost/debian:bookworm -t localhost/mesh:dev .
#
# The binary links glibc dynamically: build it on (or for) Debian 12 / glibc 2.36 or older
# when using `prebuilt`, so it runs on the bookworm runtime.

ARG BASE=docker.io/library/debian:bookworm-slim
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
# A dated nightly whose LLVM major is 22 (bpf-linker's `llvm-22` feature must match it).
ARG RUST_NIGHTLY=nightly-2026-05-19
ARG LLVM_PREFIX=/usr/lib/llvm-22
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*
# mesh-user's build.rs (aya-build) runs `rustup run nightly cargo build ...` for the eBPF
# crate: make the dated nightly answer to the name `nightly`, and check its LLVM major.
RUN rustup toolchain install "${RUST_NIGHTLY}" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && ln -sfn "${RUSTUP_HOME}/toolchains/${RUST_NIGHTLY}-${host}" \
      "${RUSTUP_HOME}/toolchains/nightly-${host}" \
 && rustc +nightly -vV | grep -q '^LLVM version: 22\.' \
 || { echo "the nightly toolchain is missing or its LLVM is not 22" >&2; exit 1; }
RUN PATH="${LLVM_PREFIX}/bin:${PATH}" LLVM_SYS_221_PREFIX="${LLVM_PREFIX}" \
      cargo install bpf-linker --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mesh-user \
 && install -D -m 0755 target/release/mesh /out/mesh

# ---------------------------------------------------------------------------------------------
# Only the binary and CA certificates (for API servers whose kubeconfig relies on the system
# store). `sh`, `stat` and `mount` (in every Debian base) serve the DaemonSet's init container
# that mounts bpffs on hosts without it.
FROM ${BASE} AS runtime-base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
LABEL org.opencontainers.image.title="mesh" \
      org.opencontainers.image.description="eBPF socket-level L4 load balancer (node agent)" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
ENTRYPOINT ["/usr/local/bin/mesh"]
CMD ["agent", "--config", "/etc/mesh/mesh.toml"]

# ---------------------------------------------------------------------------------------------
FROM runtime-base AS prebuilt
# Relative to the build context (the repository root); .dockerignore lets only this file of
# target/ through.
ARG MESH_BINARY=target/release/mesh
COPY ${MESH_BINARY} /usr/local/bin/mesh
RUN ["/usr/local/bin/mesh", "--version"]

# ---------------------------------------------------------------------------------------------
# The default target: built from source.
FROM runtime-base AS runtime
COPY --from=builder /out/mesh /usr/local/bin/mesh
RUN ["/usr/local/bin/mesh", "--version"]
