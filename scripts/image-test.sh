#!/usr/bin/env bash
# Container image check, loopback only, no registry needed:
#
#   1. build the static musl binary (cargo, musl-gcc)
#   2. podman build --target local: the Dockerfile's final stage around it
#   3. inspect the image: one file, static binary, uid 65534, entrypoint,
#      stop signal, exposed ports; report its size
#   4. in a private network namespace made here (its own loopback):
#        unbound as a DNS-over-TLS server for dot.test (private CA made with
#        openssl, as tests/peers/run.sh does)
#        the image, run with podman --network ns:..., default entrypoint
#        (--listen 0.0.0.0:5053), CA file mounted read-only + --ca-file,
#        --metrics 0.0.0.0:9153 as in deploy/kubernetes/daemonset.yaml
#      dig over UDP and TCP through the container must get the answer;
#      /healthz and /metrics (the Kubernetes probes) must answer 200;
#      after SIGHUP (reload) it must still answer
#   5. podman stop: the container must exit by itself, with status 0
#
# Usage: scripts/image-test.sh        (as root; CI: bash scripts/image-test.sh)
#
# Installs what is missing (podman buildah runc musl-tools unbound dnsutils
# openssl iproute2 procps file curl, the musl Rust target) and writes
# /etc/containers/containers.conf when there is none. Every wait is bounded,
# and everything started here is stopped from an EXIT trap.
#
# Prints one PASS/FAIL line per check, then "image-test: N passed, N failed";
# exits 1 if a check failed, 2 on a setup error.
#
# Environment:
#   IMAGE_TEST_KEEP=1     keep the work directory and the image
#   IMAGE_TEST_NO_BUILD=1 use the musl binary already in target/ (no cargo)
#   IMAGE_TEST_IMAGE      image name (default localhost/dotproxy:image-test)
set -euo pipefail

LIB=$(dirname "$(readlink -f "$0")")/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
# shellcheck source=scripts/lib/dig.sh
. "$LIB/dig.sh"
# shellcheck source=scripts/lib/netns.sh
. "$LIB/netns.sh"
# shellcheck source=scripts/lib/unbound.sh
. "$LIB/unbound.sh"
# shellcheck source=scripts/lib/dot-certs.sh
. "$LIB/dot-certs.sh"
cd "$LIB/../.."

TARGET=x86_64-unknown-linux-musl
BIN=target/$TARGET/release/dotproxy
IMAGE=${IMAGE_TEST_IMAGE:-localhost/dotproxy:image-test}
ZONE=image.test
PROXY_PORT=5053 # the image's own default (ENTRYPOINT --listen 0.0.0.0:5053)
METRICS_PORT=9153
PLAIN_PORT=5300 # unbound, plain DNS (readiness only)
DOT_PORT=853    # unbound, DNS over TLS
NS=dotproxy-image-test-$$
CTR=dotproxy-image-test-$$
CA_IN_CTR=/etc/dotproxy/ca.pem

WORK=
UNBOUND_PID=
NS_MADE=0
CTR_MADE=0
IMAGE_MADE=0

# at exit: the container first (its log on failure), then unbound, then the
# namespace, the work directory and the image
container_exit() {
    [ "$CTR_MADE" = 1 ] || return 0
    if [ "$EXIT_RC" -ne 0 ]; then
        echo "----- container log -----"
        timeout 10 podman logs "$CTR" 2>&1 | tail -n 100 || true
    fi
    timeout 30 podman rm -f -t 2 "$CTR" >/dev/null 2>&1 || true
}
image_test_exit() {
    if [ "$EXIT_RC" -ne 0 ] && [ -n "$WORK" ]; then
        show_logs 50 "$WORK/unbound.log"
    fi
    [ "$NS_MADE" = 0 ] || netns_delete "$NS"
    if [ "${IMAGE_TEST_KEEP:-0}" = 1 ]; then
        [ -z "$WORK" ] || echo "kept: work directory $WORK, image $IMAGE"
    else
        [ -z "$WORK" ] || rm -rf "$WORK"
        if [ "$IMAGE_MADE" = 1 ]; then
            timeout 60 podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
        fi
    fi
}
at_exit container_exit
at_exit stop_tracked 3
at_exit image_test_exit

# ---------------------------------------------------------------- setup
PACKAGES=(podman buildah runc musl-tools unbound dnsutils openssl iproute2 procps file curl)
install_packages() {
    local -a missing
    missing_packages missing "${PACKAGES[@]}"
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    apt_install "${missing[@]}"
}

# Podman here runs rootful with runc (no crun on Debian 12 by default); the
# nofile/nproc limits keep runc from inheriting an unbounded or tiny ulimit.
containers_conf() {
    local f=/etc/containers/containers.conf
    [ -e "$f" ] && return 0
    log "writing $f"
    mkdir -p /etc/containers
    printf '%s\n' '[engine]' 'runtime = "runc"' '' '[containers]' \
        'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]' |
        cat >"$f"
}

# rootful podman, ip netns, apt-get
[ "$(id -u)" = 0 ] || die "run as root"

log "setup"
install_packages
containers_conf
require_tools podman buildah runc unbound unbound-checkconf dig openssl ip ps file curl timeout
echo "podman: $(podman --version | sed 's/^podman version //')," \
    "buildah: $(buildah --version | cut -d' ' -f3)," \
    "runc: $(runc --version | sed -n '1s/^runc version //p')," \
    "unbound: $(unbound_version)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dotproxy-image-test.XXXXXX")
chmod 0755 "$WORK"

# ---------------------------------------------------------------- 1. binary
if [ "${IMAGE_TEST_NO_BUILD:-0}" = 1 ]; then
    log "using the existing $BIN (IMAGE_TEST_NO_BUILD=1)"
else
    if command -v rustup >/dev/null 2>&1 &&
        ! rustup target list --installed | grep -qx "$TARGET"; then
        rustup target add "$TARGET"
    fi
    log "cargo build --release --target $TARGET"
    CC_x86_64_unknown_linux_musl=musl-gcc \
        cargo build --release --locked --target "$TARGET" --bin dotproxy
fi
[ -x "$BIN" ] || die "$BIN was not built"

desc=$(file -b "$BIN")
size=$(stat -c %s "$BIN")
echo "      $BIN: $size bytes; $desc"
if grep -qE 'static(-pie)? linked|statically linked' <<<"$desc" && ! grep -q 'interpreter' <<<"$desc"; then
    pass "binary: statically linked"
else
    fail "binary: statically linked" "$desc"
fi
if grep -q ', stripped' <<<"$desc"; then
    pass "binary: stripped ($size bytes)"
else
    fail "binary: stripped" "$desc"
fi

# ---------------------------------------------------------------- 2. image
log "podman build --target local -t $IMAGE"
IMAGE_MADE=1
run_or_die "$WORK/build.log" "podman build failed" \
    timeout 600 podman build --pull=never --target local -t "$IMAGE" .
pass "image: podman build --target local"

# ---------------------------------------------------------------- 3. inspect
fmt='{{.Size}}|{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}|{{.Config.StopSignal}}|{{len .RootFS.Layers}}'
IFS='|' read -r isize iuser ientry icmd isig ilayers < <(podman image inspect --format "$fmt" "$IMAGE")
iports=$(podman image inspect --format '{{range $p, $v := .Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")
echo "      image $IMAGE: $isize bytes ($(podman images --format '{{.Size}}' "$IMAGE")), $ilayers layer(s)"
echo "      user $iuser; entrypoint $ientry; cmd $icmd; stop signal $isig; ports $iports"
if [ "$iuser" = 65534:65534 ]; then pass "image: user 65534:65534"; else fail "image: user 65534:65534" "user '$iuser'"; fi
if [ "$ientry" = '["/dotproxy","--listen","0.0.0.0:5053"]' ]; then
    pass "image: entrypoint /dotproxy --listen 0.0.0.0:5053"
else
    fail "image: entrypoint /dotproxy --listen 0.0.0.0:5053" "$ientry"
fi
if [ "$isig" = SIGTERM ]; then pass "image: stop signal SIGTERM"; else fail "image: stop signal SIGTERM" "'$isig'"; fi
if grep -q '5053/udp' <<<"$iports" && grep -q '5053/tcp' <<<"$iports"; then
    pass "image: exposes 5053/udp and 5053/tcp"
else
    fail "image: exposes 5053/udp and 5053/tcp" "$iports"
fi
if [ "$ilayers" = 1 ]; then pass "image: one layer"; else fail "image: one layer" "$ilayers layers"; fi

mnt=$(podman image mount "$IMAGE")
files=$(cd "$mnt" && find . -mindepth 1 -printf '%y %m %U:%G %s %P\n' | sort)
podman image unmount "$IMAGE" >/dev/null || true
while IFS= read -r line; do printf '      | %s\n' "$line"; done <<<"$files"
if [ "$(wc -l <<<"$files")" = 1 ] && grep -qE '^f [0-9]*755 0:0 [0-9]+ dotproxy$' <<<"$files"; then
    pass "image: holds exactly one file, /dotproxy (mode 755)"
else
    fail "image: holds exactly one file, /dotproxy" "$(wc -l <<<"$files") entries"
fi

# ---------------------------------------------------------------- 4. run
log "network namespace $NS (own loopback)"
NS_MADE=1
netns_add "$NS"
DIG_NETNS=$NS # dig_at and dig_noerror: in the namespace

log "private CA and a certificate for dot.test"
run_or_die "$WORK/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK" "dotproxy image-test CA"

unbound_conf --comment "DoT upstream for scripts/image-test.sh: local data only, never recurses." \
    --dir "$WORK" --plain "$PLAIN_PORT" --dot "$DOT_PORT" "$WORK/server.key" "$WORK/server-chain.pem" \
    --zone "$ZONE" \
    --data "$ZONE. 300 IN SOA ns.$ZONE. hostmaster.$ZONE. 1 3600 600 86400 300" \
    --data "a.$ZONE. 300 IN A 192.0.2.10" \
    --data "aaaa.$ZONE. 300 IN AAAA 2001:db8::10" >"$WORK/unbound.conf"
unbound_checkconf "$WORK/unbound.conf"

log "unbound in $NS (plain :$PLAIN_PORT, DoT :$DOT_PORT)"
# "ip netns exec" execs unbound, so $! is unbound's own PID (no function or
# subshell in between, or killing $! would leave unbound behind)
ip netns exec "$NS" unbound -d -c "$WORK/unbound.conf" >"$WORK/unbound.log" 2>&1 &
UNBOUND_PID=$!
track "$UNBOUND_PID"

wait_until "$UNBOUND_PID" 10 0.1 dig_noerror "$PLAIN_PORT" "a.$ZONE" || {
    cat "$WORK/unbound.log" >&2
    die "unbound did not answer within 10 s"
}

log "podman run $IMAGE in $NS"
CTR_MADE=1
run_or_die "$WORK/run.log" "podman run failed" \
    timeout 60 podman run -d --pull=never --name "$CTR" \
    --network "ns:/run/netns/$NS" \
    -v "$WORK/ca.pem:$CA_IN_CTR:ro" \
    "$IMAGE" \
    --upstream "127.0.0.1:$DOT_PORT#dot.test" --ca-file "$CA_IN_CTR" \
    --metrics "0.0.0.0:$METRICS_PORT" --timeout 2000 --log-level info

# readiness: both listening lines logged, or the container is gone
ready=0
for ((i = 0; i < 100; i++)); do
    logs=$(timeout 10 podman logs "$CTR" 2>&1 || true)
    if grep -q "listening on udp 0.0.0.0:$PROXY_PORT" <<<"$logs" &&
        grep -q "listening on tcp 0.0.0.0:$PROXY_PORT" <<<"$logs" &&
        grep -q "metrics on http://0.0.0.0:$METRICS_PORT/" <<<"$logs"; then
        ready=1
        break
    fi
    [ "$(timeout 10 podman inspect --format '{{.State.Running}}' "$CTR" 2>/dev/null)" = true ] || break
    sleep 0.1
done
if [ "$ready" = 1 ]; then
    pass "container: listening on udp+tcp 0.0.0.0:$PROXY_PORT, metrics on :$METRICS_PORT"
else
    fail "container: listening on udp+tcp 0.0.0.0:$PROXY_PORT, metrics on :$METRICS_PORT within 10 s" \
        "state $(timeout 10 podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}}' "$CTR" 2>&1)"
    exit 1
fi

# the running process, as the kernel sees it
cpid=$(timeout 10 podman inspect --format '{{.State.Pid}}' "$CTR")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$cpid/status" 2>/dev/null || true)
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$cpid/status" 2>/dev/null || true)
caps=$(awk '/^CapEff:/ {print $2}' "/proc/$cpid/status" 2>/dev/null || true)
if [ "$uids" = "65534 65534 65534 65534" ] && [ "$gids" = "65534 65534 65534 65534" ]; then
    pass "container: process runs as uid/gid 65534 (effective capabilities $caps)"
else
    fail "container: process runs as uid/gid 65534" "uid '$uids' gid '$gids'"
fi

A_RE=$(rr_re "a.$ZONE" A 192.0.2.10)

log "dig @127.0.0.1 -p $PROXY_PORT (inside $NS) -> container -> DoT -> unbound"
expect_zone "" "$PROXY_PORT" "$ZONE"

# the Kubernetes probes: readiness GET /healthz, liveness GET /metrics
http_get() {
    ip netns exec "$NS" timeout 10 curl -sS -o "$WORK/body" -w '%{http_code}' --max-time 5 \
        "http://127.0.0.1:$METRICS_PORT$1" 2>&1 || true
}
code=$(http_get /healthz)
if [ "$code" = 200 ] && grep -qx ok "$WORK/body"; then
    pass "metrics: GET /healthz -> 200 ok"
else
    fail "metrics: GET /healthz -> 200 ok" "got '$code' $(head -c 200 "$WORK/body" 2>/dev/null)"
fi
code=$(http_get /metrics)
if [ "$code" = 200 ] && grep -q '^dotproxy_queries_total' "$WORK/body"; then
    pass "metrics: GET /metrics -> 200, $(grep -c '^dotproxy_' "$WORK/body") dotproxy_ samples"
else
    fail "metrics: GET /metrics -> 200 with dotproxy_queries_total" "got '$code'"
fi

log "SIGHUP (reload)"
timeout 30 podman kill --signal HUP "$CTR" >/dev/null
sleep 0.5
running=$(timeout 10 podman inspect --format '{{.State.Running}}' "$CTR" 2>&1 || true)
logs=$(timeout 10 podman logs "$CTR" 2>&1 || true)
if [ "$running" = true ] && grep -q 'configuration reloaded' <<<"$logs" && ! grep -q 'reload failed' <<<"$logs"; then
    pass "container: SIGHUP reloads, keeps running"
else
    fail "container: SIGHUP reloads, keeps running" "running '$running'"
fi
expect "dig udp after reload: a.$ZONE A" "$(dig_at "$PROXY_PORT" +notcp "a.$ZONE" A)" NOERROR "$A_RE"

# ---------------------------------------------------------------- 5. stop
log "podman stop (SIGTERM, 10 s grace)"
t0=$(date +%s%N)
timeout 60 podman stop -t 10 "$CTR" >/dev/null 2>&1 || true
dt=$((($(date +%s%N) - t0) / 1000000))
state=$(timeout 10 podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$CTR" 2>&1 || true)
logs=$(timeout 10 podman logs "$CTR" 2>&1 || true)
if [ "$state" = "exited 0" ] && [ "$dt" -lt 9000 ]; then
    pass "container: podman stop -> exit status 0 in $dt ms"
else
    fail "container: podman stop -> exit status 0 before the 10 s grace" "state '$state' after $dt ms"
fi
if grep -q 'stopped:' <<<"$logs"; then
    pass "container: drained and logged its summary"
else
    fail "container: drained and logged its summary" "no 'stopped:' line"
fi
echo "$logs" | sed 's/^/      log | /' | tail -n 12

checks_done image-test || exit 1
