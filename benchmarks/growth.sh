#!/usr/bin/env bash
# How the proxy's memory grows (issue 11): peak RSS (VmHWM) of dotproxy
# against queries in flight, idle TCP clients and cached entries, all on
# loopback in a private network namespace:
#
#   python sender --UDP/TCP--> dotproxy --DoT (verified, dot.test)--> unbound
#                                       \--DoT, names under hold.test--> blackhole
#
# The blackhole is a tiny Python TLS server (on three ports, three
# --forward upstreams: one upstream holds at most 4 connections x 1,000
# queries) that reads queries and never answers, so queries under hold.test
# stay in flight until --timeout.
#
# Usage (as root): benchmarks/growth.sh [--keep]
#   DOTPROXY=path  the binary (default target/release/dotproxy)
#   INFLIGHT="1000 10000" TCPIDLE="100 1000" CACHE="10000 100000"  the N values
#
# Each measurement starts the binary afresh with its scenario's flags, waits
# until it answers one query over UDP and TCP (the baseline: VmHWM/VmRSS read
# then), loads it with N items, checks the matching gauge on --metrics
# (dotproxy_inflight, dotproxy_tcp_clients, dotproxy_cache_entries), reads
# VmHWM/VmRSS again and stops it. "over baseline" = VmHWM after - VmHWM at the
# baseline of the same process; per item = that / N.
#   inflight  --timeout 10000 --max-inflight 20000; N distinct UDP queries
#             under hold.test from one socket
#   tcpidle   --max-tcp-clients 2000 --tcp-idle-timeout 60000; N TCP
#             connections that send nothing
#   cache     --cache-size 200000 --cache-memory 1G; N distinct A queries
#             (answered by unbound from a generated local zone)
# Writes benchmarks/results/growth.md and growth.csv. Runs in under a minute.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
DIE_PREFIX="growth: "
REQUIRE_HINT="run benchmarks/install.sh"
LOG_TIMES=1
ORIG_ARGS=("$@")
KEEP=0
for a in "$@"; do
    case $a in
        --keep) KEEP=1 ;;
        -h | --help) sed -n '/^# Usage/,/^#   INFLIGHT/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $a" ;;
    esac
done
require_tools unshare ip unbound unbound-checkconf openssl python3 ss timeout
netns_reexec GROWTH DOTPROXY INFLIGHT TCPIDLE CACHE -- "${ORIG_ARGS[@]}"

cd "$ROOT"
dotproxy_under_test
read -r -a INFLIGHT_N <<<"${INFLIGHT:-1000 10000}"
read -r -a TCPIDLE_N <<<"${TCPIDLE:-100 1000}"
read -r -a CACHE_N <<<"${CACHE:-10000 100000}"
MAXC=0
for n in "${CACHE_N[@]}"; do [ "$n" -gt "$MAXC" ] && MAXC=$n; done
OUT=$HERE/results
UP_PLAIN=5300 UP_DOT=8853 HOLE=8854 PORT=5353 MPORT=9153
WORK=$(mktemp -d /tmp/dotproxy-growth.XXXXXX)
mkdir -p "$OUT" "$WORK/certs" "$WORK/generated" "$WORK/logs"
private_dotproxy "$WORK"
growth_exit() {
    if [ "$KEEP" = 1 ] || [ "${EXIT_RC:-0}" != 0 ]; then
        echo "growth: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
at_exit stop_tracked 3
at_exit growth_exit
# the sender opens up to 1,000+ sockets
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------- helper
PY=$WORK/growthlib.py
cat >"$PY" <<'EOF'
"""growth.sh's helper (python3 standard library only)."""
import asyncio, os, select, socket, ssl, struct, sys, time, urllib.request
sys.path.insert(0, os.environ["BENCH_DIR"])
import dnslib  # noqa: E402


def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)


def cmd_zone(outdir, n):
    n = int(n)
    hosts = [f"c{i:06d}.growth.test." for i in range(n)]
    dnslib.write_zone(outdir, "growth.test", dnslib.host_records(hosts, 10 ** 9),
                      [f"c{i:06d}.growth.test A" for i in range(n)], f"{n} hosts, A only")


def cmd_blackhole(port, cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(reader, writer):
        try:
            while await reader.read(65536):
                pass
        except Exception:
            pass
        writer.close()

    async def main():
        srvs = [await asyncio.start_server(handle, "127.0.0.1", int(p), ssl=ctx, backlog=1024)
                for p in port.split(",")]
        await asyncio.gather(*(s.serve_forever() for s in srvs))
    asyncio.run(main())


def metric(mport, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            parts = line.split()
            if len(parts) >= 2 and (parts[0] == name or parts[0].startswith(name + "{")):
                return int(float(parts[1]))
    return -1


def cmd_wait_metric(mport, name, want, secs):
    """poll until NAME >= WANT (SECS at most); print the last value"""
    deadline, v = time.time() + float(secs), -1
    while True:
        try:
            v = metric(mport, name)
        except OSError:
            pass
        if v >= int(want) or time.time() > deadline:
            break
        time.sleep(0.1)
    print(v)


def cmd_flood(port, n, prefix):
    """N distinct UDP queries PREFIX-i.hold.test, paced so that none is
    dropped by the receive buffer; the answers (none) are not awaited"""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(n)):
        s.sendto(query(f"{prefix}{i:06d}.hold.test", i & 0xFFFF), ("127.0.0.1", int(port)))
        if i % 200 == 199:
            time.sleep(0.005)


def cmd_tcpidle(port, n):
    """open N TCP connections that send nothing; print 'ready'; hold them
    until stdin closes"""
    socks = []
    for _ in range(int(n)):
        socks.append(socket.create_connection(("127.0.0.1", int(port)), timeout=5))
    print("ready", flush=True)
    sys.stdin.read()


def cmd_fill(port, n, window="500"):
    """N distinct A queries c{i}.growth.test over UDP, WINDOW outstanding;
    unanswered ones are re-sent after 1 s; print answered count"""
    n, window = int(n), int(window)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    addr = ("127.0.0.1", int(port))
    pending, nxt, done, qid = {}, 0, 0, 0
    sent_at = {}
    deadline = time.time() + 600
    while (nxt < n or pending) and time.time() < deadline:
        while nxt < n and len(pending) < window:
            qid = (qid + 1) & 0xFFFF
            while qid in pending:
                qid = (qid + 1) & 0xFFFF
            pending[qid] = nxt
            s.sendto(query(f"c{nxt:06d}.growth.test", qid), addr)
            sent_at[qid] = time.time()
            nxt += 1
        r, _, _ = select.select([s], [], [], 1.0)
        if r:
            while True:
                try:
                    data = s.recv(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                rid = struct.unpack(">H", data[:2])[0]
                if rid in pending:
                    del pending[rid]
                    done += 1
        now = time.time()
        for q, i in list(pending.items()):
            if now - sent_at[q] > 1.0:
                s.sendto(query(f"c{i:06d}.growth.test", q), addr)
                sent_at[q] = now
    print(done)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "probe":
        sys.exit(dnslib.cmd_probe(*sys.argv[2:]))
    globals()["cmd_" + cmd.replace("-", "_")](*sys.argv[2:])
EOF
export BENCH_DIR=$HERE
py() { python3 "$PY" "$@"; }

# ---------------------------------------------------------------- set-up
log "work directory $WORK"
run_or_die "$WORK/logs/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK/certs" "dotproxy growth CA"
py zone "$WORK/generated" "$MAXC"
unbound_conf --comment "DoT upstream: local data only (growth.test), never recurses." \
    --plain "$UP_PLAIN" --dot "$UP_DOT" certs/server.key certs/server-chain.pem \
    --include generated/growth.test.conf \
    --set "verbosity: 0" --set "so-rcvbuf: 8m" --set "so-sndbuf: 8m" \
    --set "incoming-num-tcp: 2000" --set "tcp-idle-timeout: 120000" \
    --set "edns-tcp-keepalive-timeout: 120000" --set "stream-wait-size: 64m" \
    >"$WORK/upstream.conf"
unbound_checkconf upstream.conf "$WORK"
log "starting the upstream (unbound, $MAXC names) and the blackhole (:$HOLE)"
(cd "$WORK" && exec unbound -d -c upstream.conf) >"$WORK/logs/upstream.log" 2>&1 &
UP_PID=$!
track "$UP_PID"
wait_until "$UP_PID" 60 0.25 py probe "$UP_PLAIN" c000000.growth.test || {
    cat "$WORK/logs/upstream.log" >&2
    die "the upstream did not start"
}
py blackhole "$HOLE,$((HOLE + 1)),$((HOLE + 2))" "$WORK/certs/server-chain.pem" "$WORK/certs/server.key" >"$WORK/logs/blackhole.log" 2>&1 &
HOLE_PID=$!
track "$HOLE_PID"
wait_until "$HOLE_PID" 10 0.1 tcp_listening "$HOLE" || die "the blackhole did not start"

# one upstream holds at most 4 connections x 1,000 queries (src/upstream/pool.rs),
# so hold.test goes to three blackhole upstreams: room for 12,000
HOLD_FWD=()
for p in "$HOLE" $((HOLE + 1)) $((HOLE + 2)); do HOLD_FWD+=(--forward "hold.test=127.0.0.1:$p#dot.test"); done
CSV=$OUT/growth.csv
echo "scenario,n,gauge,base_hwm_kb,base_rss_kb,hwm_kb,rss_kb,over_baseline_kb,bytes_per_item,seconds" >"$CSV"
ROWS=()
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# measure SCENARIO N GAUGE FLAG...: one fresh binary, one row
measure() {
    local scen=$1 n=$2 gauge=$3 pid bh br h r got t0=$SECONDS holder=""
    shift 3
    local -a cmd=("$DOTPROXY" --listen "127.0.0.1:$PORT" --metrics "127.0.0.1:$MPORT"
        --upstream "127.0.0.1:$UP_DOT#dot.test" "${HOLD_FWD[@]}"
        --ca-file certs/ca.pem --log-level warn "$@")
    local logf=$WORK/logs/$scen-$n.log
    echo "${cmd[*]}" >"$logf"
    (cd "$WORK" && exec "${cmd[@]}") >>"$logf" 2>&1 &
    pid=$!
    track "$pid"
    wait_until "$pid" 15 0.1 py probe "$PORT" c000000.growth.test udp tcp || {
        tail -n 5 "$logf" >&2
        die "$scen $n: the binary did not answer within 15 s"
    }
    sleep 0.5
    bh=$(proc_status "$pid" VmHWM) br=$(proc_status "$pid" VmRSS)
    case $scen in
        inflight)
            py flood "$PORT" "$n" "q$n-"
            got=$(py wait-metric "$MPORT" dotproxy_inflight "$n" 8)
            ;;
        tcpidle)
            exec {HOLD_FD}> >(exec python3 "$PY" tcpidle "$PORT" "$n" >"$WORK/tcpidle.out" 2>&1)
            holder=1
            got=$(py wait-metric "$MPORT" dotproxy_tcp_clients "$n" 20)
            ;;
        cache)
            local answered
            answered=$(py fill "$PORT" "$n")
            [ "$answered" = "$n" ] || echo "    (cache $n: only $answered answered)"
            got=$(py wait-metric "$MPORT" dotproxy_cache_entries "$n" 5)
            ;;
        *) got=- ;;
    esac
    sleep 0.5
    h=$(proc_status "$pid" VmHWM) r=$(proc_status "$pid" VmRSS)
    is_running "$pid" || die "$scen $n: the binary exited (see $logf)"
    [ -z "$holder" ] || exec {HOLD_FD}>&-
    stop_pid "$pid" 3
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
    local over=$((h - bh)) per
    per=$(awk -v o="$over" -v n="$n" 'BEGIN { printf "%.0f", o * 1024 / n }')
    echo "$scen,$n,$got,$bh,$br,$h,$r,$over,$per,$((SECONDS - t0))" >>"$CSV"
    ROWS+=("| $scen | $n | $got | $(kib_mib "$bh") | $(kib_mib "$h") | $(kib_mib "$r") | $(kib_mib "$over") | $per |")
    printf '    %-8s N=%-6s gauge=%-6s baseline %s kB  VmHWM %s kB  VmRSS %s kB  +%s kB  %s B/item\n' \
        "$scen" "$n" "$got" "$bh" "$h" "$r" "$over" "$per"
    [ "$got" = - ] || [ "$got" -ge "$n" ] || echo "    (warning: $gauge reached only $got of $n)"
    sleep 1
}

log "baseline (one query), then queries in flight, idle TCP clients, cached entries"
measure baseline 1 none
for n in "${INFLIGHT_N[@]}"; do measure inflight "$n" dotproxy_inflight --timeout 10000 --max-inflight 20000; done
for n in "${TCPIDLE_N[@]}"; do measure tcpidle "$n" dotproxy_tcp_clients --max-tcp-clients 2000 --tcp-idle-timeout 60000; done
for n in "${CACHE_N[@]}"; do measure cache "$n" dotproxy_cache_entries --cache-size 200000 --cache-memory 1G; done

MD=$OUT/growth.md
{
    echo "# dotproxy memory growth"
    echo
    echo "$(date -u +%F), \`$DOTPROXY_SRC\` ($("$DOTPROXY" --version 2>/dev/null | head -n 1)), git $(git_state), $(cpu_model), $(nproc) CPUs."
    echo "Command: \`${GROWTH_CMDLINE:-$0}\`"
    echo
    echo "Each row is a fresh process: baseline = after one answered query (UDP and TCP probe); then N items, the gauge read on --metrics, VmHWM/VmRSS read from /proc while the items are held. Over baseline = VmHWM - baseline VmHWM of the same process; per item = that / N."
    echo
    echo "| scenario | N | gauge | baseline VmHWM MiB | peak RSS (VmHWM) MiB | VmRSS MiB | RSS over baseline MiB | per-item bytes |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Marginal cost between the two sizes of each scenario (VmHWM difference / N difference; removes fixed costs such as up-front table allocations):"
    echo
    awk -F, 'NR > 1 && $1 != "baseline" {
        if ($1 == prev) printf "- %s %s -> %s: %.0f bytes per item\n", $1, pn, $2, ($6 - ph) * 1024 / ($2 - pn)
        prev = $1; pn = $2; ph = $6 }' "$CSV"
    echo
    echo "Gauges: inflight = dotproxy_inflight, tcpidle = dotproxy_tcp_clients, cache = dotproxy_cache_entries. Flags: inflight \`--timeout 10000 --max-inflight 20000\` (queries under hold.test go to a TLS upstream that never answers); tcpidle \`--max-tcp-clients 2000 --tcp-idle-timeout 60000\`; cache \`--cache-size 200000 --cache-memory 1G\` (A records from a generated unbound local zone). Raw figures: growth.csv."
} >"$MD"
cat "$MD"
log "wrote $MD and $CSV"
