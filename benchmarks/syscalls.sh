#!/usr/bin/env bash
# System calls per answered query, per binary: a count, not a timing, so it
# holds on a busy machine where CPU time does not. For each binary, in a
# private loopback-only network namespace with a local unbound DoT upstream:
# start it, warm it up, count its system calls during one dnsperf run of a fixed
# number of queries, and divide each call's count by the answers. Counted
# with perf's syscall tracepoints, which cost little enough not to change
# how the loop batches (strace would slow it and flatter batching).
#
# Usage (as root): benchmarks/syscalls.sh [--queries N] [--load Q] [--mode udp|tcp]
#                  [--cache] BINARY...
# Prints one table (calls per 1000 answers) to stdout.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
DIE_PREFIX="syscalls: "
netns_reexec SYSCALLS -- "$@"

QUERIES=200000 LOAD=200 MODE=udp CACHE=0
BINS=()
while [ "$#" -gt 0 ]; do
    case $1 in
        --queries) QUERIES=$2; shift 2 ;;
        --load) LOAD=$2; shift 2 ;;
        --mode) MODE=$2; shift 2 ;;
        --cache) CACHE=1; shift ;;
        -*) die "unknown option $1" ;;
        *) BINS+=("$1"); shift ;;
    esac
done
[ "${#BINS[@]}" -gt 0 ] || die "usage: $0 [--queries N] [--load Q] [--mode udp|tcp] [--cache] BINARY..."
require_tools unbound dnsperf perf openssl python3 dig

WORK=$(mktemp -d /tmp/dotproxy-syscalls.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/certs"
make_dot_certs "$WORK/certs" "syscalls CA" >/dev/null 2>&1

# 200 names (100 hosts x A/AAAA): with --cache nearly every query is a hit
data=()
: >"$WORK/queries"
for i in $(seq 1 100); do
    data+=(--data "h$i.bench.test. 3600 IN A 10.0.$((i / 256)).$((i % 256))")
    data+=(--data "h$i.bench.test. 3600 IN AAAA 2001:db8::$i")
    printf 'h%s.bench.test A\nh%s.bench.test AAAA\n' "$i" "$i" >>"$WORK/queries"
done
unbound_conf --dir "$WORK" --dot 18853 certs/server.key certs/server-chain.pem \
    --zone bench.test "${data[@]}" >"$WORK/upstream.conf"
(cd "$WORK" && exec unbound -d -c upstream.conf) >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)

ready() { # PORT: until a UDP query is answered (10 s at most)
    local i
    for i in $(seq 1 100); do
        if dig +short +time=1 +tries=1 -p "$1" @127.0.0.1 h1.bench.test >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

printf '| binary | answers | peak RSS kB | calls per 1000 answers |\n|---|---:|---:|---|\n'
port=15300
for bin in "${BINS[@]}"; do
    port=$((port + 1))
    extra=()
    [ "$CACHE" = 1 ] && extra=(--cache-size 10000)
    "$bin" --listen "127.0.0.1:$port" --upstream 127.0.0.1:18853#dot.test \
        --ca-file "$WORK/certs/ca.pem" --log-level warn "${extra[@]}" >"$WORK/proxy-$port.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    ready "$port" || die "$bin did not answer on $port"
    dnsperf -s 127.0.0.1 -p "$port" -m "$MODE" -c 10 -q "$LOAD" -l 2 -d "$WORK/queries" >/dev/null 2>&1
    events=raw_syscalls:sys_enter
    for c in recvfrom recvmmsg sendto sendmsg sendmmsg epoll_wait epoll_pwait read write writev setsockopt getsockopt getrandom clock_gettime mmap munmap; do
        events+=",syscalls:sys_enter_$c"
    done
    perf stat -x, -e "$events" -o "$WORK/perf-$port" -p "$pid" &
    spid=$!
    sleep 0.5
    dnsperf -s 127.0.0.1 -p "$port" -m "$MODE" -c 10 -q "$LOAD" -n $((QUERIES / 200)) \
        -d "$WORK/queries" >"$WORK/dnsperf-$port" 2>&1
    kill -INT "$spid"
    wait "$spid" 2>/dev/null || true
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    kill "$pid"
    answered=$(awk '/Queries completed:/ {print $3}' "$WORK/dnsperf-$port")
    top=$(python3 - "$WORK/perf-$port" "$answered" <<'PY'
import sys
total, rows = 0, []
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0].isdigit():
        continue
    calls, event = int(f[0]), f[2]
    if event == "raw_syscalls:sys_enter":
        total = calls
    elif calls:
        rows.append((calls, event.split("sys_enter_")[-1]))
n = int(sys.argv[2])
rows.sort(reverse=True)
print(f"all {1000 * total / n:.0f}: " + ", ".join(f"{name} {1000 * c / n:.0f}" for c, name in rows))
PY
)
    printf '| %s | %s | %s | %s |\n' "$(basename "$bin")" "$answered" "$hwm" "$top"
done
