# syntax=docker/dockerfile:1
#
# dotproxy container image: one static (musl) binary in an otherwise empty
# image. The CA roots are compiled in (webpki-roots), so no /etc/ssl is needed;
# --ca-file with a mounted PEM file replaces them.
#
# Targets:
#   (default, last stage) "image": builds from source in a Rust image
#       podman build -t dotproxy .            (or: docker build -t dotproxy .)
#   "local": packs an already built binary, no Rust image needed
#       cargo build --release --target x86_64-unknown-linux-musl
#       podman build --target local -t dotproxy:local .
#
# Run (the image listens on 0.0.0.0:5053, UDP and TCP, as uid 65534):
#   podman run -d --name dotproxy -p 53:5053/udp -p 53:5053/tcp dotproxy \
#       --upstream 9.9.9.9#dns.quad9.net
# Arguments after the image name are appended to the entrypoint (--upstream,
# --ca-file, --timeout, --log-level, ...). To listen elsewhere, e.g. on IPv6
# as well (dual-stack socket), replace the entrypoint:
#   podman run --entrypoint /dotproxy dotproxy --listen '[::]:5053' ...
# Port 53 inside the container would need CAP_NET_BIND_SERVICE for the
# non-root user: publish 53 -> 5053 instead.
# Listening on all addresses is safe because of the access list: only
# loopback, private and link-local clients are served by default (published
# ports keep the client's own address); widen it with --allow CIDR.
# Metrics and health: add --metrics 0.0.0.0:9153 and publish 9153/tcp.
# No HEALTHCHECK: a scratch image has no shell or HTTP client to run one, and
# the OCI image format (podman's default) has no such field; Kubernetes probes
# /healthz and /metrics instead (deploy/kubernetes/daemonset.yaml).
# checkov:skip=CKV_DOCKER_2: scratch image, nothing to run a HEALTHCHECK with; orchestrator probes use /healthz and /metrics

# The builder image is an argument: pin it by digest for a reproducible build
# with --build-arg RUST_IMAGE=docker.io/library/rust@sha256:... (this
# repository cannot: its machines reach no container registry). It never
# ships: the final image is FROM scratch plus the binary, built --locked.
# checkov:skip=CKV_DOCKER_7: builder tag is an ARG (default rust:1-bookworm), pinned by the builder; the image shipped is scratch
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS build
ARG TARGET=x86_64-unknown-linux-musl
# ring compiles C (and assembly) for the target: musl-gcc comes with musl-tools
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "${TARGET}"
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target directories are build caches (BuildKit and
# buildah/podman both support cache mounts): the binary is copied out of the
# cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target "${TARGET}" --bin dotproxy \
    && install -D -m 0755 "target/${TARGET}/release/dotproxy" /out/dotproxy \
    && /out/dotproxy --version

# ---------------------------------------------------------------- base
# Shared runtime settings of both final stages (no files).
FROM scratch AS base
LABEL org.opencontainers.image.title="dotproxy" \
      org.opencontainers.image.description="DNS (UDP+TCP) to DNS-over-TLS (RFC 7858) proxy" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# nobody:nogroup; there is no /etc/passwd in the image, so numeric ids
USER 65534:65534
EXPOSE 5053/udp 5053/tcp
# SIGTERM: stop accepting, drain the queries in flight, exit 0
STOPSIGNAL SIGTERM
# 0.0.0.0 rather than [::]: a [::] socket is refused on kernels booted with
# ipv6.disable=1, and carries IPv4 clients as ::ffff:a.b.c.d mapped addresses.
ENTRYPOINT ["/dotproxy", "--listen", "0.0.0.0:5053"]

# ---------------------------------------------------------------- local
# The binary from the work tree (see .dockerignore, which lets only these
# files of target/ into the build context). TARGET picks another static build
# of `just cross`, with the matching platform (scripts/cross-build.sh --image):
#   podman build --no-cache --squash-all --target local --platform linux/arm64 \
#       --build-arg TARGET=aarch64-unknown-linux-musl -t dotproxy:arm64 .
# (--no-cache: buildah 1.28 would reuse this stage cached for another
# platform, variant included; --squash-all: one layer.)
FROM base AS local
ARG TARGET=x86_64-unknown-linux-musl
COPY --chmod=0755 target/${TARGET}/release/dotproxy /dotproxy

# ---------------------------------------------------------------- image
# Default target: the binary built above.
FROM base AS image
COPY --from=build --chmod=0755 /out/dotproxy /dotproxy
