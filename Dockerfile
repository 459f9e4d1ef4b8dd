# syntax=docker/dockerfile:1
#
# sprint-sidecar container image: one static (musl) binary and the default sidecar.toml on
# `scratch`, running as the numeric non-root user 65532.
#
#   docker build -t sprint-sidecar:0.1.0 .
#   docker build --target ipc-lock -t sprint-sidecar:0.1.0-ipc-lock .   # only for memory.lock_all
#
# Nothing else is in the final image, on purpose: the relay's trust anchors are compiled in
# (webpki-roots) or mounted (upstream.ca_file), the user is numeric so no /etc/passwd is read,
# and musl reads /etc/resolv.conf and /etc/hosts, which the container runtime mounts.
# No HEALTHCHECK: Kubernetes probes /health and /ready on the admin port (charts/sprint-sidecar).
#
# tests/static_binary.rs runs the same cargo command (same target, CC and strip setting) and
# checks that the result is static and starts; keep the two in step.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# musl-tools gives musl-gcc, which builds the C parts of the crypto crates (aws-lc-sys, ring)
# against musl instead of glibc. Not version-pinned (DL3008): Debian stable replaces package
# revisions in place at each point release, so an exact pin stops building within months;
# the base image tag pins the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /build

# Dependencies first, in their own layer: only Cargo.toml and Cargo.lock go in, the crate's own
# sources are stubs, so editing src/ reuses this layer. Cargo refuses a manifest whose
# [[bench]]/[[test]]/[[example]] targets have no file, so each named one gets an empty stub
# (release builds never compile them; a stub beside a target with its own `path` is harmless).
# vendor/ holds the patched h2 and hyper that Cargo.toml's [patch.crates-io] points at.
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
RUN mkdir -p src \
    && echo 'fn main() {}' >src/main.rs \
    && touch src/lib.rs \
    && awk '/^\[\[(bench|test|example)\]\]/ { kind = $0; sub(/^\[\[/, "", kind); sub(/\]\].*/, "", kind); next } \
            /^\[/ { kind = "" } \
            kind != "" && /^[[:space:]]*name[[:space:]]*=/ { split($0, q, "\""); \
                dir = kind == "bench" ? "benches" : (kind == "test" ? "tests" : "examples"); \
                print dir "/" q[2] ".rs" }' Cargo.toml \
    | while read -r stub; do mkdir -p "$(dirname "${stub}")" && touch "${stub}"; done \
    && cargo build --release --locked --target x86_64-unknown-linux-musl \
    && rm -rf src

# The crate itself. COPY keeps the files' old modification times, older than the stub build
# above, so touch them or cargo would ship the stub.
COPY src ./src
COPY sidecar.toml ./
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --target x86_64-unknown-linux-musl \
    && install -D -m 0755 target/x86_64-unknown-linux-musl/release/sprint-sidecar /out/sprint-sidecar \
    && /out/sprint-sidecar --version \
    && /out/sprint-sidecar check-config --config sidecar.toml >/dev/null

# For memory.lock_all = true only: the binary carries the file capability cap_ipc_lock=+ep, so a
# non-root process gets CAP_IPC_LOCK at exec. Such a binary does not start unless the container
# adds IPC_LOCK and allows privilege escalation (the chart does both when lock_all is on), which
# is why it is a separate image. BuildKit keeps the capability (an xattr) on COPY --from.
FROM builder AS builder-ipc-lock
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin \
    && rm -rf /var/lib/apt/lists/* \
    && setcap cap_ipc_lock=+ep /out/sprint-sidecar \
    && getcap /out/sprint-sidecar | grep -q cap_ipc_lock

FROM scratch AS image-base
LABEL org.opencontainers.image.title="sprint-sidecar" \
      org.opencontainers.image.description="Sidecar proxy: plain HTTP from the app, a warm pool of TLS connections to the relay"
COPY --from=builder /build/sidecar.toml /etc/sprint-sidecar/sidecar.toml
USER 65532:65532
# 9090: data listener, bound to 127.0.0.1 by design (only the pod's own containers may use the
# relay credential); 9091: admin listener (the chart binds it to 0.0.0.0 for probes and scrapes).
EXPOSE 9090 9091
ENTRYPOINT ["/usr/local/bin/sprint-sidecar"]
CMD ["run", "--config", "/etc/sprint-sidecar/sidecar.toml"]

FROM image-base AS ipc-lock
COPY --from=builder-ipc-lock /out/sprint-sidecar /usr/local/bin/sprint-sidecar

# The default target: last in the file.
FROM image-base AS runtime
COPY --from=builder /out/sprint-sidecar /usr/local/bin/sprint-sidecar
