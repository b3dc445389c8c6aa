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
# and for the default target (what `cargo xtask image --from-source` does, with a stand-in Rust
# image made of the machine's toolchains, whose nightly is the floating `nightly`, and the
# machine's CA store for the crate downloads):
#   podman build --isolation=chroot --build-arg BASE=localhost/debian:bookworm \
#     --build-arg RUST_IMAGE=localhost/mesh-rust:host --build-arg RUST_NIGHTLY=nightly \
#     -v /etc/ssl/certs:/etc/ssl/certs:ro -t localhost/mesh:from-source .
#
# The binary links glibc dynamically: build it on (or for) Debian 12 / glibc 2.36 or older
# when using `prebuilt`, so it runs on the bookworm runtime.

ARG BASE=docker.io/library/debian:bookworm-slim
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
# The nightly the project builds with (rustc 1.97.0-nightly e50aa6fba 2026-05-19, LLVM 22):
# its LLVM major must be 22, as bpf-linker is built with its `llvm-22` feature.
ARG RUST_NIGHTLY=nightly-2026-05-20
ARG LLVM_PREFIX=/usr/lib/llvm-22
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*
# mesh-user's build.rs (aya-build) runs `rustup run nightly cargo build ...` for the eBPF
# crate: install the dated nightly (unless the base image has it) with rust-src, make it answer
# to the name `nightly`, and check that its LLVM major is 22.
RUN host="$(rustc -vV | sed -n 's/^host: //p')" \
 && if ! rustup toolchain list | grep -q "^${RUST_NIGHTLY}-${host}"; then \
      rustup toolchain install "${RUST_NIGHTLY}" --profile minimal --component rust-src; \
    fi \
 && if ! rustup component list --toolchain "${RUST_NIGHTLY}" --installed | grep -q '^rust-src'; then \
      rustup component add rust-src --toolchain "${RUST_NIGHTLY}"; \
    fi \
 && if [ "${RUST_NIGHTLY}" != nightly ]; then \
      ln -sfn "${RUSTUP_HOME}/toolchains/${RUST_NIGHTLY}-${host}" \
        "${RUSTUP_HOME}/toolchains/nightly-${host}"; \
    fi \
 && { rustc +nightly -vV | grep -q '^LLVM version: 22\.' \
      || { echo "the nightly toolchain is missing or its LLVM is not 22" >&2; exit 1; }; }
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
