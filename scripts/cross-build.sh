#!/usr/bin/env bash
# Static, stripped ARM binaries of dotproxy (`just cross`), and with --image
# a multi-arch image manifest around them (`just cross-image`):
#
#   aarch64-unknown-linux-musl        64-bit ARM: Raspberry Pi 3/4/5 with a
#                                     64-bit OS, most current routers and SBCs
#   armv7-unknown-linux-musleabihf    32-bit ARMv7, hard float: Raspberry Pi
#                                     2/3/4 with a 32-bit OS, older routers
#
# Both are cross-compiled with cargo-zigbuild: zig is the C compiler (ring
# builds C and assembly for the target) and the linker, and brings its own
# musl, so no cross gcc or musl sysroot is needed. The binaries land in
# target/TARGET/release/dotproxy; `file -b` and the size in bytes of each are
# printed.
#
# Usage: scripts/cross-build.sh [--image] [--no-build]
#   --image     also build the x86_64 musl binary (as `just musl` does, with
#               musl-gcc), one FROM-scratch image per architecture with the
#               Dockerfile's "local" target (--platform, --build-arg TARGET),
#               and the manifest list localhost/dotproxy:VERSION-multi of all
#               three (podman manifest), written with the images to the OCI
#               archive target/cross/dotproxy-VERSION-multi.oci.tar; no
#               registry, no base image. The list is then removed from local
#               storage (see below), unless CROSS_KEEP_MANIFEST=1
#   --no-build  use the binaries already in target/ (no cargo)
#
# Installs what is missing: zig (PyPI package ziglang) and cargo-zigbuild
# (PyPI package cargo-zigbuild, a prebuilt binary) with pip, the Rust targets
# with rustup; with --image, as root, podman buildah musl-tools with apt.
#
# A target whose standard library rustup cannot download (the armv7 musl one
# is missing from some rustup mirrors) is built with the standard library
# compiled from the rust-src component (cargo -Zbuild-std, allowed on stable
# by RUSTC_BOOTSTRAP=1, linked against zig's musl): this is said on stdout,
# the binary is the same kind.
#
# Environment:
#   CROSS_ZIGLANG         pip requirement for zig (default ziglang==0.17.1)
#   CROSS_ZIGBUILD        pip requirement for cargo-zigbuild
#                         (default cargo-zigbuild==0.24.1)
#   CROSS_IMAGE           image name without tag (default localhost/dotproxy)
#   CROSS_KEEP_MANIFEST=1 keep the manifest list in local storage
set -euo pipefail

LIB=$(dirname "$(readlink -f "$0")")/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
cd "$LIB/../.."

# target  platform  image tag suffix
CROSS_TARGETS=(
    "aarch64-unknown-linux-musl linux/arm64 arm64"
    "armv7-unknown-linux-musleabihf linux/arm/v7 armv7"
)
AMD64="x86_64-unknown-linux-musl linux/amd64 amd64"
ZIGLANG=${CROSS_ZIGLANG:-ziglang==0.17.1}
ZIGBUILD=${CROSS_ZIGBUILD:-cargo-zigbuild==0.24.1}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGE=${CROSS_IMAGE:-localhost/dotproxy}
MANIFEST=$IMAGE:$VERSION-multi
ARCHIVE=target/cross/dotproxy-$VERSION-multi.oci.tar

image=0
build=1
while [ "$#" -gt 0 ]; do
    case $1 in
        --image) image=1 ;;
        --no-build) build=0 ;;
        *) die "usage: $0 [--image] [--no-build]" ;;
    esac
    shift
done

bin_of() { echo "target/$1/release/dotproxy"; }

# ---------------------------------------------------------------- toolchain
# pip's scripts directory (cargo-zigbuild lands there) on PATH, for a python
# whose installs are not on it already
pip_scripts_on_path() {
    local dir
    dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || return 0
    case ":$PATH:" in *":$dir:"*) ;; *) PATH=$dir:$PATH ;; esac
}

zig_version() {
    # cargo-zigbuild takes zig from PATH, else from `python3 -m ziglang`
    if command -v zig >/dev/null 2>&1; then
        zig version
    else
        python3 -m ziglang version 2>/dev/null
    fi
}

ensure_zig() {
    require_tools python3
    pip_scripts_on_path
    if ! zig_version >/dev/null 2>&1; then
        log "pip install $ZIGLANG"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$ZIGLANG"
    fi
    zig_version >/dev/null 2>&1 || die "zig not found after pip install $ZIGLANG"
    if ! command -v cargo-zigbuild >/dev/null 2>&1; then
        log "pip install $ZIGBUILD"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$ZIGBUILD"
        hash -r
    fi
    REQUIRE_HINT="pip install $ZIGBUILD (or cargo install cargo-zigbuild --locked)" \
        require_tools cargo-zigbuild
    echo "zig $(zig_version), $(cargo-zigbuild --version), $(rustc --version)"
}

# ensure_std TARGET: the target's prebuilt standard library, or rust-src to
# build it from; sets BUILD_STD[TARGET]=1 in the second case
declare -A BUILD_STD=()
ensure_std() {
    local t=$1 out
    require_tools rustup
    rustup target list --installed | grep -qx "$t" && return 0
    if out=$(rustup target add "$t" 2>&1); then
        return 0
    fi
    printf '%s\n' "$out" | grep -m 3 -E '^(error|info: downloading|  *0:)' >&2 || true
    log "no prebuilt standard library for $t from rustup: building it from rust-src (-Zbuild-std)"
    if ! rustup component list --installed | grep -q '^rust-src'; then
        rustup component add rust-src
    fi
    BUILD_STD[$t]=1
}

# cross_cargo TARGET: the release build of one target
cross_cargo() {
    local t=$1 var
    if [ -n "${BUILD_STD[$t]:-}" ]; then
        # std from source: panic_abort for the release profile's
        # panic = "abort"; zig links its own crt and musl, so none of the
        # self-contained objects (which come only with the prebuilt std)
        var=CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$t")_RUSTFLAGS
        echo "+ RUSTC_BOOTSTRAP=1 $var='-C link-self-contained=no' cargo zigbuild --release --locked --target $t --bin dotproxy -Zbuild-std=std,panic_abort"
        env RUSTC_BOOTSTRAP=1 "$var=-C link-self-contained=no" \
            cargo zigbuild --release --locked --target "$t" --bin dotproxy -Zbuild-std=std,panic_abort
    else
        echo "+ cargo zigbuild --release --locked --target $t --bin dotproxy"
        cargo zigbuild --release --locked --target "$t" --bin dotproxy
    fi
}

# ---------------------------------------------------------------- build
if [ "$build" = 1 ]; then
    ensure_zig
    for spec in "${CROSS_TARGETS[@]}"; do
        read -r t _ <<<"$spec"
        ensure_std "$t"
    done
    for spec in "${CROSS_TARGETS[@]}"; do
        read -r t _ <<<"$spec"
        log "build $t${BUILD_STD[$t]:+ (std from rust-src)}"
        t0=$(date +%s)
        cross_cargo "$t"
        echo "$t: built in $(($(date +%s) - t0)) s"
    done
fi

require_tools file stat
for spec in "${CROSS_TARGETS[@]}"; do
    read -r t _ <<<"$spec"
    bin=$(bin_of "$t")
    [ -x "$bin" ] || die "$bin was not built"
    file -b "$bin"
    echo "$bin: $(stat -c %s "$bin") bytes"
done

[ "$image" = 1 ] || exit 0

# ---------------------------------------------------------------- images
if [ "$build" = 1 ]; then
    read -r t _ <<<"$AMD64"
    if ! command -v musl-gcc >/dev/null 2>&1 || ! command -v podman >/dev/null 2>&1 ||
        ! command -v buildah >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "needs podman, buildah and musl-gcc (musl-tools); run as root to install them"
        log "installing podman buildah musl-tools"
        apt_install -qq podman buildah musl-tools
    fi
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
    log "build $t (as just musl)"
    echo "+ CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target $t --bin dotproxy"
    CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target "$t" --bin dotproxy
fi
require_tools podman
[ -x "$(bin_of "${AMD64%% *}")" ] || die "$(bin_of "${AMD64%% *}") was not built"

if podman manifest exists "$MANIFEST" 2>/dev/null; then
    podman manifest rm "$MANIFEST" >/dev/null
fi
log "podman manifest create $MANIFEST"
podman manifest create "$MANIFEST" >/dev/null
for spec in "$AMD64" "${CROSS_TARGETS[@]}"; do
    read -r t platform suffix <<<"$spec"
    tag=$IMAGE:$VERSION-$suffix
    log "podman build --target local --platform $platform -> $tag"
    # --no-cache: buildah 1.28 reuses a cached stage across --platform values
    # (the arm image's variant v7 ended up on the amd64 and arm64 ones);
    # --squash-all: one layer, /dotproxy (without it, an empty one of the
    # base stage too). The previous image of that tag would be left behind
    # untagged.
    if podman image exists "$tag"; then
        podman rmi "$tag" >/dev/null
    fi
    podman build --quiet --pull=never --no-cache --squash-all --target local --platform "$platform" \
        --build-arg "TARGET=$t" -t "$tag" . >/dev/null
    IFS=/ read -r os arch variant <<<"$platform"
    podman manifest add --os "$os" --arch "$arch" ${variant:+--variant "$variant"} \
        "$MANIFEST" "containers-storage:$tag" >/dev/null
    echo "$tag: $(podman image inspect --format '{{.Size}}' "$tag") bytes ($platform)"
done
platforms=$(podman manifest inspect "$MANIFEST" | python3 -c 'import json, sys
for m in json.load(sys.stdin)["manifests"]:
    p = m["platform"]
    print("/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x))')
echo "$MANIFEST: $(tr '\n' ' ' <<<"$platforms")"

# The list as a file, then out of local storage: podman 4.3 keeps no copy of
# the instance manifests of images added from containers-storage, and once
# storage also holds intermediate images (any `podman build` with layers,
# e.g. scripts/image-test.sh) every `podman images` fails on the list
# ("locating item named manifest-sha256:...: file does not exist").
mkdir -p "$(dirname "$ARCHIVE")"
rm -f "$ARCHIVE"
podman manifest push --quiet --all "$MANIFEST" "oci-archive:$ARCHIVE" >/dev/null
echo "$ARCHIVE: $(stat -c %s "$ARCHIVE") bytes (OCI image index and the three images)"
if [ "${CROSS_KEEP_MANIFEST:-0}" = 1 ]; then
    echo "kept $MANIFEST in local storage (CROSS_KEEP_MANIFEST=1): podman manifest rm $MANIFEST when done"
else
    podman manifest rm "$MANIFEST" >/dev/null
fi
