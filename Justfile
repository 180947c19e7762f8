# dotproxy tasks: `just` (or `just --list`) shows them.
# just itself: `cargo install just --locked` (Debian 12 has no package).
# Recipe arguments are passed on as separate, quoted words.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

musl_target := "x86_64-unknown-linux-musl"
musl_bin := "target/" + musl_target + "/release/dotproxy"
version := `sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1`
# podman here; CONTAINER_ENGINE=docker works too
engine := env_var_or_default("CONTAINER_ENGINE", "podman")

# List the recipes
default:
    @just --list --unsorted

# Run the proxy from source: just run --listen 127.0.0.1:5053 --log-level debug
run *ARGS:
    cargo run --release -- "$@"

# Release build (glibc): target/release/dotproxy
build:
    cargo build --release

# The test suite, as CI runs it
test *ARGS:
    cargo test --release "$@"

# Formatting and clippy, warnings are errors
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Static, stripped musl binary (needs musl-tools; ring builds C with musl-gcc)
musl:
    rustup target list --installed | grep -qx {{musl_target}} || rustup target add {{musl_target}}
    CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target {{musl_target}} --bin dotproxy
    @file -b {{musl_bin}}
    @echo "{{musl_bin}}: $(stat -c %s {{musl_bin}}) bytes"

# Static, stripped ARM binaries: aarch64-unknown-linux-musl and armv7-unknown-linux-musleabihf (zig and cargo-zigbuild from pip)
cross:
    scripts/cross-build.sh

# Container image built from source by the Dockerfile (needs the Rust base image from a registry)
image *ARGS:
    {{engine}} build -t dotproxy:{{version}} "$@" .

# Container image around the local musl binary (Dockerfile target "local"; no registry needed)
image-local: musl
    {{engine}} build --target local -t dotproxy:{{version}}-local .
    @{{engine}} images dotproxy:{{version}}-local

# Build the image (target "local") and check it end to end with podman, as root
image-test:
    scripts/image-test.sh

# Multi-arch manifest dotproxy:VERSION-multi (amd64, arm64, arm/v7) of FROM-scratch images around the static binaries, as OCI archive in target/cross/, as root
cross-image:
    scripts/cross-build.sh --image

# The ARM binaries under qemu-user-static through a local DoT upstream (dig, UDP and TCP), and the manifest, as root
cross-test:
    scripts/cross-test.sh

# Kubernetes manifests, the Dockerfile and the systemd unit: static checks
deploy-check:
    scripts/supply-check.sh manifests
    scripts/deploy-check.sh

# cargo deny, the manifests (kubernetes-validate, checkov) and line coverage, as CI runs them: just supply-check [deny|manifests|coverage]
supply-check *ARGS:
    scripts/supply-check.sh "$@"

# dig/kdig/mdig/dnsperf against the release binary through unbound (DoT), as root
peers: build
    tests/peers/run.sh target/release/dotproxy

# Benchmark the static musl binary (what containers and small hosts run) against stubby, dnsdist and unbound, as root (~30 min; BENCH_QUICK=1 for ~3 min)
bench *ARGS: musl
    benchmarks/install.sh
    DOTPROXY={{musl_bin}} BENCH_CACHE=${BENCH_CACHE:-1} benchmarks/bench.sh "$@"

# Long-running load and leak check, as root
soak *ARGS: build
    benchmarks/soak.sh "$@"

# Fuzz every cargo-fuzz target (or the ones named) for SECONDS each: just fuzz 300 walk
fuzz SECONDS="60" *TARGETS:
    #!/usr/bin/env bash
    set -euo pipefail
    seconds=$1
    shift
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "error: needs a nightly toolchain and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz --locked)" >&2
        exit 2
    fi
    if [ "$#" -gt 0 ]; then
        targets=("$@")
    else
        mapfile -t targets < <(cargo +nightly fuzz list)
    fi
    if [ "${#targets[@]}" -eq 0 ]; then
        echo "error: no fuzz targets (cargo +nightly fuzz list is empty)" >&2
        exit 2
    fi
    failed=()
    for t in "${targets[@]}"; do
        echo "==> fuzz $t for ${seconds}s"
        cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" || failed+=("$t")
    done
    echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "failed: ${failed[*]} (crashes under fuzz/artifacts/)" >&2
        exit 1
    fi
