#!/usr/bin/env bash
# Smoke test of the ARM builds (`just cross`) under qemu-user-static, and of
# the multi-arch image manifest (`just cross-image`), loopback only:
#
#   1. scripts/cross-build.sh --image: the aarch64 and armv7 musl binaries
#      (cargo-zigbuild), the x86_64 musl one, a FROM-scratch image of each and
#      the manifest list localhost/dotproxy:VERSION-multi
#   2. each ARM binary: static, stripped, of its architecture; --version runs
#      under qemu-aarch64-static / qemu-arm-static (called explicitly: binfmt
#      may not be registered)
#   3. unbound as a DNS-over-TLS server for dot.test on 127.0.0.1 (private CA
#      made with openssl, as tests/peers/run.sh does); for each ARM binary,
#      under qemu:
#        BIN --listen 127.0.0.1:PORT --upstream 127.0.0.1:DOTPORT#dot.test
#            --ca-file CA.pem
#      ready when dig gets an answer through it (polled, bounded); then
#      dig +notcp and dig +tcp must get the A and AAAA records of the local
#      zone and NXDOMAIN for a missing name; SIGTERM must end it with status 0
#   4. podman manifest inspect: linux/amd64, linux/arm64 and linux/arm/v7;
#      each image holds one file, /dotproxy, the very binary tested above,
#      runs as 65534:65534 with the Dockerfile's entrypoint; the OCI archive
#      of the list has the same three platforms. The list is then removed
#      from local storage (podman 4.3 bug, see cross-build.sh); the images
#      and the archive stay
#
# Usage: scripts/cross-test.sh     (as root; CI: bash scripts/cross-test.sh)
#
# Installs what is missing (qemu-user-static unbound dnsutils openssl
# iproute2 procps file podman buildah musl-tools with apt; zig and
# cargo-zigbuild with pip and the Rust targets, by cross-build.sh). Never
# skips: a missing tool is a setup error. Every wait is bounded, and
# everything started here is stopped from an EXIT trap.
#
# Prints one PASS/FAIL line per check, a summary with the binary sizes, then
# "cross-test: N passed, N failed"; exits 1 if a check failed, 2 on a setup
# error.
#
# Environment:
#   CROSS_TEST_KEEP=1      keep the work directory
#   CROSS_TEST_NO_BUILD=1  use the binaries already in target/ (no cargo; the
#                          images and the manifest are still made)
set -euo pipefail

LIB=$(dirname "$(readlink -f "$0")")/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
# shellcheck source=scripts/lib/dig.sh
. "$LIB/dig.sh"
# shellcheck source=scripts/lib/unbound.sh
. "$LIB/unbound.sh"
# shellcheck source=scripts/lib/dot-certs.sh
. "$LIB/dot-certs.sh"
cd "$LIB/../.."

T0=$(date +%s)
ZONE=cross.test
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGE=${CROSS_IMAGE:-localhost/dotproxy}
MANIFEST=$IMAGE:$VERSION-multi
ARCHIVE=target/cross/dotproxy-$VERSION-multi.oci.tar
# target  qemu  `file -b` must say  platform  image tag suffix
ARCHES=(
    "aarch64-unknown-linux-musl qemu-aarch64-static ARM_aarch64 linux/arm64 arm64"
    "armv7-unknown-linux-musleabihf qemu-arm-static 32-bit_LSB.*_ARM,_EABI5 linux/arm/v7 armv7"
)
AMD64="x86_64-unknown-linux-musl - x86-64 linux/amd64 amd64"
READY_SECS=30 # qemu start, first TLS handshake under emulation

WORK=
SUMMARY=()
PLAIN_PORT= # unbound, plain DNS (readiness only)
DOT_PORT=   # unbound, DNS over TLS
proxy_port= # the binary under test

cross_exit() {
    if [ "$EXIT_RC" -ne 0 ] && [ -n "$WORK" ]; then
        show_logs 50 "$WORK"/proxy-*.log "$WORK/unbound.log"
    fi
    if [ "${CROSS_TEST_KEEP:-0}" = 1 ]; then
        [ -z "$WORK" ] || echo "work directory kept: $WORK"
    else
        [ -z "$WORK" ] || rm -rf "$WORK"
    fi
}
# the manifest list, kept for the checks, would break `podman images` later
# (see cross-build.sh); the images and the OCI archive stay
manifest_exit() {
    if podman manifest exists "$MANIFEST" 2>/dev/null; then
        timeout 60 podman manifest rm "$MANIFEST" >/dev/null 2>&1 || true
    fi
}
at_exit stop_tracked 3
at_exit cross_exit
at_exit manifest_exit

# ---------------------------------------------------------------- ports
# pick_port VAR (scripts/lib/common.sh): a free loopback port

# ---------------------------------------------------------------- setup
PACKAGES=(qemu-user-static unbound dnsutils openssl iproute2 procps file podman buildah musl-tools)
install_packages() {
    local -a missing
    missing_packages missing "${PACKAGES[@]}"
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    apt_install "${missing[@]}"
}

# rootful podman and apt-get
[ "$(id -u)" = 0 ] || die "run as root"

log "setup"
install_packages
require_tools qemu-aarch64-static qemu-arm-static unbound unbound-checkconf dig openssl \
    ss ps file stat sha256sum timeout podman python3 cargo rustup
echo "$(qemu-aarch64-static --version | head -n 1), unbound $(unbound_version)," \
    "podman $(podman --version | sed 's/^podman version //')"

# ---------------------------------------------------------------- 1. build
if [ "${CROSS_TEST_NO_BUILD:-0}" = 1 ]; then
    log "scripts/cross-build.sh --image --no-build (CROSS_TEST_NO_BUILD=1)"
    CROSS_KEEP_MANIFEST=1 timeout 300 scripts/cross-build.sh --image --no-build
else
    log "scripts/cross-build.sh --image"
    tb=$(date +%s)
    CROSS_KEEP_MANIFEST=1 timeout 3000 scripts/cross-build.sh --image
    SUMMARY+=("build (both ARM targets, amd64, images): $(($(date +%s) - tb)) s")
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dotproxy-cross-test.XXXXXX")

# ---------------------------------------------------------------- 2. binaries
log "binaries"
for spec in "${ARCHES[@]}"; do
    read -r t qemu want _ <<<"$spec"
    bin=target/$t/release/dotproxy
    desc=$(file -b "$bin")
    size=$(stat -c %s "$bin")
    if grep -qE "${want//_/ }" <<<"$desc" && grep -q 'statically linked' <<<"$desc" &&
        grep -q ', stripped' <<<"$desc"; then
        pass "$t: static, stripped ($desc)"
    else
        fail "$t: static, stripped, ${want//_/ }" "$desc"
    fi
    SUMMARY+=("$(printf '%-32s %8s bytes  %s' "$t" "$size" "$bin")")
    ver=$(timeout 30 "$qemu" "$bin" --version 2>&1 || true)
    if [ "$ver" = "dotproxy $VERSION" ]; then
        pass "$t: $qemu $bin --version -> $ver"
    else
        fail "$t: $qemu $bin --version" "got '$ver'"
    fi
done

# ---------------------------------------------------------------- 3. dig
log "private CA and a certificate for dot.test"
run_or_die "$WORK/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK" "dotproxy cross-test CA"

pick_port PLAIN_PORT
pick_port DOT_PORT
unbound_conf --comment "DoT upstream for scripts/cross-test.sh: local data only, never recurses." \
    --dir "$WORK" --plain "$PLAIN_PORT" --dot "$DOT_PORT" "$WORK/server.key" "$WORK/server-chain.pem" \
    --zone "$ZONE" \
    --data "$ZONE. 300 IN SOA ns.$ZONE. hostmaster.$ZONE. 1 3600 600 86400 300" \
    --data "a.$ZONE. 300 IN A 192.0.2.10" \
    --data "aaaa.$ZONE. 300 IN AAAA 2001:db8::10" >"$WORK/unbound.conf"
unbound_checkconf "$WORK/unbound.conf"

log "unbound $(unbound_version) (plain :$PLAIN_PORT, DoT :$DOT_PORT)"
unbound -d -c "$WORK/unbound.conf" >"$WORK/unbound.log" 2>&1 &
UNBOUND_PID=$!
track "$UNBOUND_PID"
wait_until "$UNBOUND_PID" 10 0.1 dig_noerror "$PLAIN_PORT" "a.$ZONE" || {
    cat "$WORK/unbound.log" >&2
    die "unbound did not answer within 10 s"
}

for spec in "${ARCHES[@]}"; do
    read -r t qemu _ <<<"$spec"
    bin=target/$t/release/dotproxy
    pick_port proxy_port
    log "$qemu $bin on 127.0.0.1:$proxy_port -> 127.0.0.1:$DOT_PORT#dot.test"
    # qemu-user runs the guest in its own process: $! is the proxy
    "$qemu" "$bin" --listen "127.0.0.1:$proxy_port" --upstream "127.0.0.1:$DOT_PORT#dot.test" \
        --ca-file "$WORK/ca.pem" --timeout 5000 --log-level info >"$WORK/proxy-$t.log" 2>&1 &
    pid=$!
    track "$pid"

    # ready: an answer through the proxy (so through TLS to unbound)
    t_ready=$(now_ms)
    if wait_until "$pid" "$READY_SECS" 0.2 dig_noerror "$proxy_port" "a.$ZONE"; then
        pass "$t: answers through the DoT upstream after $(($(now_ms) - t_ready)) ms"
    else
        fail "$t: answers within $READY_SECS s" "$(is_running "$pid" && echo running || echo exited)"
        continue
    fi
    expect_zone "$t: " "$proxy_port" "$ZONE"

    # SIGTERM: drain and exit 0 (the signal goes through qemu to the guest)
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        is_running "$pid" || break
        sleep 0.1
    done
    rc=0
    if is_running "$pid"; then
        fail "$t: SIGTERM -> exit 0 within 10 s" "still running"
    else
        wait "$pid" || rc=$?
        untrack "$pid"
        if [ "$rc" = 0 ] && grep -q 'stopped:' "$WORK/proxy-$t.log"; then
            pass "$t: SIGTERM -> drained, exit 0"
        else
            fail "$t: SIGTERM -> exit 0" "exit $rc"
        fi
    fi
done

# ---------------------------------------------------------------- 4. manifest
log "podman manifest inspect $MANIFEST"
if ! platforms=$(podman manifest inspect "$MANIFEST" 2>&1 | python3 -c 'import json, sys
for m in json.load(sys.stdin)["manifests"]:
    p = m["platform"]
    print("/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x), m["digest"])'); then
    fail "manifest: podman manifest inspect $MANIFEST" "$platforms"
    platforms=
fi
while IFS= read -r line; do printf '      | %s\n' "$line"; done <<<"$platforms"
n=$(grep -c . <<<"$platforms" || true)
for spec in "$AMD64" "${ARCHES[@]}"; do
    read -r t _ _ platform suffix <<<"$spec"
    tag=$IMAGE:$VERSION-$suffix
    if grep -q "^$platform sha256:" <<<"$platforms"; then
        pass "manifest: $platform"
    else
        fail "manifest: $platform" "not among $(tr '\n' ' ' <<<"${platforms:-nothing}")"
    fi
    # the image around that very binary, with the Dockerfile's settings
    fmt='{{.Os}}/{{.Architecture}}|{{.Config.User}}|{{json .Config.Entrypoint}}|{{len .RootFS.Layers}}|{{.Config.StopSignal}}'
    if ! IFS='|' read -r iplat iuser ientry ilayers isig < <(podman image inspect --format "$fmt" "$tag" 2>/dev/null); then
        fail "image $tag: exists"
        continue
    fi
    mnt=$(podman image mount "$tag")
    files=$(cd "$mnt" && find . -mindepth 1 -printf '%P\n')
    sum=$(sha256sum <"$mnt/dotproxy" 2>/dev/null | cut -d' ' -f1 || true)
    podman image unmount "$tag" >/dev/null || true
    want=$(sha256sum <"target/$t/release/dotproxy" | cut -d' ' -f1)
    if [ "$iplat" = "${platform%/v7}" ] && [ "$iuser" = 65534:65534 ] && [ "$ilayers" = 1 ] &&
        [ "$isig" = SIGTERM ] && [ "$ientry" = '["/dotproxy","--listen","0.0.0.0:5053"]' ] && [ "$files" = dotproxy ] &&
        [ "$sum" = "$want" ]; then
        pass "image $tag: $iplat, one layer, only /dotproxy = target/$t/release/dotproxy, user 65534:65534, Dockerfile entrypoint"
    else
        fail "image $tag: one layer, only /dotproxy = the binary, user 65534, entrypoint, SIGTERM" \
            "platform $iplat, user $iuser, entrypoint $ientry, stop signal $isig, $ilayers layer(s), files $(tr '\n' ' ' <<<"$files"), sha256 ${sum:0:12} vs ${want:0:12}"
    fi
done
if [ "$n" = 3 ]; then
    pass "manifest: exactly 3 images"
else
    fail "manifest: exactly 3 images" "$n"
fi

# the same list in the OCI archive: index.json -> the image index -> platforms
if arch_platforms=$(python3 - "$ARCHIVE" <<'PY' 2>&1
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    blob = lambda d: json.load(tar.extractfile("blobs/" + d.replace(":", "/")))
    (top,) = json.load(tar.extractfile("index.json"))["manifests"]
    for m in blob(top["digest"])["manifests"]:
        p = m["platform"]
        blob(m["digest"])  # each image's manifest is in the archive too
        print("/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x))
PY
); then
    if [ "$(sort <<<"$arch_platforms" | tr '\n' ' ')" = "linux/amd64 linux/arm/v7 linux/arm64 " ]; then
        pass "archive $ARCHIVE: $(tr '\n' ' ' <<<"$arch_platforms")($(stat -c %s "$ARCHIVE") bytes)"
    else
        fail "archive $ARCHIVE: linux/amd64 linux/arm64 linux/arm/v7" "$(tr '\n' ' ' <<<"$arch_platforms")"
    fi
else
    fail "archive $ARCHIVE: readable OCI image index" "$arch_platforms"
fi

# ---------------------------------------------------------------- summary
SUMMARY+=("manifest $MANIFEST: $(cut -d' ' -f1 <<<"$platforms" | tr '\n' ' ')")
SUMMARY+=("archive $ARCHIVE: $(stat -c %s "$ARCHIVE" 2>/dev/null || echo 0) bytes")
SUMMARY+=("total: $(($(date +%s) - T0)) s")
echo
echo "cross-test summary"
printf '  %s\n' "${SUMMARY[@]}"

checks_done cross-test || exit 1
