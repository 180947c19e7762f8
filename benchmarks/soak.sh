#!/usr/bin/env bash
# Soak test of dotproxy: long steady load while the DoT upstream is restarted
# again and again, all on loopback in a private network namespace:
#
#   dnsperf -m udp (-Q 5000) --+
#   dnsperf -m tcp (-Q 1000) --+--> dotproxy --DoT (verified, dot.test)--> unbound
#                                                                (restarted every 30 s)
#
# Checks the claim "no query is ever lost, and memory and file descriptors
# stay flat": every query dnsperf sends must get an answer within dnsperf's
# timeout (SERVFAIL counts as an answer: some are expected while the upstream
# is down), the proxy's VmRSS must not grow by 1 MiB or more after the first
# minute, and its open fds by no more than 4.
#
# Usage (as root, from anywhere):   benchmarks/soak.sh        (or: just soak)
# Environment:
#   DOTPROXY=path          binary under test (default target/release/dotproxy;
#                          copied to the work directory at the start)
#   SOAK_SECONDS=600       length of the load (one dnsperf run per transport)
#   SOAK_RESTART_EVERY=30  restart the upstream every this many seconds
#   SOAK_SAMPLE_EVERY=10   sample the proxy's RSS, fds and /metrics
#   SOAK_UDP_QPS=5000      dnsperf -Q over UDP   SOAK_UDP_CLIENTS=10 (-c)
#   SOAK_TCP_QPS=1000      dnsperf -Q over TCP   SOAK_TCP_CLIENTS=4  (-c)
#   SOAK_TIMEOUT=5         dnsperf -t: an answer later than this is lost
#   SOAK_NAMES=300         hosts in the generated zone
#   SOAK_UPSTREAM_KEEPALIVE=yes  unbound's edns-tcp-keepalive (yes|no)
#   SOAK_LOG_LEVEL=info    the proxy's --log-level
#   SOAK_PROXY_ARGS="..."  extra arguments for the proxy (word-split)
#   SOAK_KEEP=1            keep the work directory (kept anyway on FAIL)
#   SOAK_OUT=dir           results directory (default benchmarks/results)
#
# Writes OUT/soak.csv (one row per sample) and OUT/soak.md (summary and
# verdict); exits 0 on PASS, 1 on FAIL, 2 on a set-up error. Every process
# started here is stopped by PID from an EXIT trap; the network namespace
# disappears with them.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
DIE_PREFIX="soak: "
LOG_TIMES=1

# ---------------------------------------------------------------- re-exec
# as root, in a private network namespace with only loopback (up)
netns_reexec SOAK DOTPROXY SOAK_SECONDS SOAK_RESTART_EVERY SOAK_SAMPLE_EVERY SOAK_UDP_QPS \
    SOAK_UDP_CLIENTS SOAK_TCP_QPS SOAK_TCP_CLIENTS SOAK_TIMEOUT SOAK_NAMES \
    SOAK_UPSTREAM_KEEPALIVE SOAK_LOG_LEVEL SOAK_PROXY_ARGS SOAK_KEEP SOAK_OUT -- "$@"

# ---------------------------------------------------------------- settings
cd "$ROOT"
SECS=${SOAK_SECONDS:-600}
EVERY=${SOAK_RESTART_EVERY:-30}
SAMPLE_EVERY=${SOAK_SAMPLE_EVERY:-10}
UDP_QPS=${SOAK_UDP_QPS:-5000}
UDP_CLIENTS=${SOAK_UDP_CLIENTS:-10}
TCP_QPS=${SOAK_TCP_QPS:-1000}
TCP_CLIENTS=${SOAK_TCP_CLIENTS:-4}
DP_TIMEOUT=${SOAK_TIMEOUT:-5}
NAMES=${SOAK_NAMES:-300}
LOG_LEVEL=${SOAK_LOG_LEVEL:-info}
KEEPALIVE=${SOAK_UPSTREAM_KEEPALIVE:-yes}
case $KEEPALIVE in yes | no) ;; *) die "SOAK_UPSTREAM_KEEPALIVE must be yes or no" ;; esac
OUT=${SOAK_OUT:-$HERE/results}
abs_path OUT
for v in SECS EVERY SAMPLE_EVERY UDP_QPS UDP_CLIENTS TCP_QPS TCP_CLIENTS DP_TIMEOUT NAMES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
read -r -a PROXY_EXTRA <<<"${SOAK_PROXY_ARGS:-}"

PLAIN_PORT=5300   # upstream, plain DNS (readiness probe only)
DOT_PORT=8853     # upstream, DoT
PROXY_PORT=5310
METRICS_PORT=9310
LIB=$HERE/soaklib.py

require_tools unbound unbound-checkconf dnsperf openssl python3 ss ps curl
# the interpreter itself, not a version-manager shim (probes run in loops)
PY=$(python3 -c 'import sys; print(sys.executable)')
dotproxy_under_test

WORK=$(mktemp -d /tmp/dotproxy-soak.XXXXXX)
mkdir -p "$OUT" "$WORK/certs" "$WORK/generated"
private_dotproxy "$WORK"

# processes started here are tracked by PID (common.sh: each is a child of
# this shell, and only signalled while it still is, which guards against
# PID reuse)
UP_PID=
KEEP=${SOAK_KEEP:-0}

soak_exit() {
    if [ "$KEEP" = 1 ] || [ "$EXIT_RC" -ne 0 ]; then
        echo "soak: work directory kept: $WORK (logs, dnsperf output, timelines)"
    else
        rm -rf "$WORK"
    fi
}
at_exit stop_tracked 5
at_exit soak_exit

# ---------------------------------------------------------------- certs, zone
log "work directory $WORK"
run_or_die "$WORK/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK/certs" "dotproxy soak CA"
"$PY" "$LIB" zone "$WORK/generated" "$NAMES" | sed 's/^/    /'
QUERIES=$WORK/generated/queries.txt
QUERY_LINES=$(wc -l <"$QUERIES")

unbound_conf --comment "DoT upstream for benchmarks/soak.sh: one thread, local data only, never recurses." \
    --plain "$PLAIN_PORT" --dot "$DOT_PORT" certs/server.key certs/server-chain.pem \
    --include generated/soak.test.conf --set "edns-tcp-keepalive: $KEEPALIVE" >"$WORK/upstream.conf"
unbound_checkconf upstream.conf "$WORK"

# ---------------------------------------------------------------- upstream
start_upstream() {
    echo "----- soak: start at $(date +%T.%N | cut -c1-12)" >>"$WORK/upstream.log"
    (cd "$WORK" && exec unbound -d -c upstream.conf) >>"$WORK/upstream.log" 2>&1 &
    UP_PID=$!
    track "$UP_PID"
}

# wait_upstream SECONDS: answers on the plain port and listens on the DoT port
upstream_ready() {
    tcp_listening "$DOT_PORT" && "$PY" "$LIB" probe "$PLAIN_PORT" n001.soak.test udp
}
wait_upstream() {
    wait_until "$UP_PID" "$1" 0.02 upstream_ready
}

RESTART_CSV=$WORK/restarts.csv
echo "k,t_stop_s,closed_ms,ready_ms,exit_status,note" >"$RESTART_CSV"

# restart_upstream K: SIGTERM, wait until it has exited and the DoT port is
# closed, start again, wait until it answers; one CSV row
restart_upstream() {
    local k=$1 t_stop t_closed t_ready note="" rc=0 i
    t_stop=$(now_ms)
    kill -TERM "$UP_PID" 2>/dev/null || note="already gone"
    for ((i = 0; i < 1000; i++)); do
        is_running "$UP_PID" || break
        sleep 0.01
    done
    if is_running "$UP_PID"; then
        note="SIGKILL after 10 s"
        kill -KILL "$UP_PID" 2>/dev/null || true
    fi
    wait "$UP_PID" 2>/dev/null || rc=$?
    untrack "$UP_PID"
    for ((i = 0; i < 1000; i++)); do
        tcp_listening "$DOT_PORT" || break
        sleep 0.01
    done
    tcp_listening "$DOT_PORT" && die "DoT port $DOT_PORT still listening 10 s after unbound exited"
    t_closed=$(now_ms)
    start_upstream
    wait_upstream 15 || { tail -n 30 "$WORK/upstream.log" >&2; die "upstream did not come back within 15 s (restart $k)"; }
    t_ready=$(now_ms)
    local t_rel
    t_rel=$(awk -v a="$t_stop" -v b="$T0_MS" 'BEGIN {printf "%.2f", (a - b) / 1000}')
    echo "$k,$t_rel,$((t_closed - t_stop)),$((t_ready - t_stop)),$rc,$note" >>"$RESTART_CSV"
    printf '    restart %2d at %6ss: closed after %4d ms, answering after %4d ms (unbound exit %s)%s\n' \
        "$k" "$t_rel" $((t_closed - t_stop)) $((t_ready - t_stop)) "$rc" "${note:+; $note}"
}

log "starting the upstream (unbound $(unbound_version); DoT :$DOT_PORT, plain :$PLAIN_PORT)"
start_upstream
wait_upstream 15 || { cat "$WORK/upstream.log" >&2; die "upstream did not start"; }

# ---------------------------------------------------------------- proxy
PROXY_CMD=("$DOTPROXY" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$DOT_PORT#dot.test"
    --ca-file certs/ca.pem --metrics "127.0.0.1:$METRICS_PORT" --log-level "$LOG_LEVEL" "${PROXY_EXTRA[@]}")
log "starting the proxy: ${PROXY_CMD[*]#"$WORK/"}"
(cd "$WORK" && exec "${PROXY_CMD[@]}") >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
track "$PROXY_PID"
wait_until "$PROXY_PID" 15 0.25 "$PY" "$LIB" probe "$PROXY_PORT" n001.soak.test udp tcp ||
    { cat "$WORK/proxy.log" >&2; die "the proxy did not answer within 15 s"; }

# ---------------------------------------------------------------- load
n_restarts=$(((SECS - 1) / EVERY))
log "load for ${SECS}s: udp -Q $UDP_QPS -c $UDP_CLIENTS, tcp -Q $TCP_QPS -c $TCP_CLIENTS, -t $DP_TIMEOUT;" \
    "upstream restart every ${EVERY}s ($n_restarts restarts); samples every ${SAMPLE_EVERY}s"
LOAD_AVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
CPU0=$(cpu_ticks "$PROXY_PID")

T0=$EPOCHREALTIME
T0_MS=$(now_ms)
"$PY" "$LIB" sample "$PROXY_PID" "$METRICS_PORT" "$T0" "$SAMPLE_EVERY" "$SECS" "$WORK/samples.csv" \
    2>>"$WORK/sampler.log" &
SAMPLER_PID=$!
track "$SAMPLER_PID"

declare -A DP_PID FILTER_PID
for mode in udp tcp; do
    mkfifo "$WORK/dnsperf-$mode.fifo"
    "$PY" "$LIB" timeline "$T0" "$WORK/timeline-$mode.csv" "$WORK/dnsperf-$mode.stats" \
        <"$WORK/dnsperf-$mode.fifo" &
    FILTER_PID[$mode]=$!
    track "$!"
    if [ "$mode" = udp ]; then q=$UDP_QPS c=$UDP_CLIENTS; else q=$TCP_QPS c=$TCP_CLIENTS; fi
    dnsperf -m "$mode" -s 127.0.0.1 -p "$PROXY_PORT" -d "$QUERIES" -l "$SECS" \
        -c "$c" -Q "$q" -t "$DP_TIMEOUT" -v >"$WORK/dnsperf-$mode.fifo" 2>&1 &
    DP_PID[$mode]=$!
    track "$!"
done
sleep 0.2
for mode in udp tcp; do
    is_running "${DP_PID[$mode]}" || die "dnsperf $mode exited at once: $(cat "$WORK/dnsperf-$mode.stats" 2>/dev/null)"
done

# restarts at k*EVERY for k*EVERY < SECS; between them check everybody is up
for ((k = 1; k * EVERY < SECS; k++)); do
    target=$((T0_MS + k * EVERY * 1000))
    while [ "$(now_ms)" -lt "$target" ]; do
        is_running "$PROXY_PID" || die "the proxy died at $((($(now_ms) - T0_MS) / 1000)) s: $(tail -n 20 "$WORK/proxy.log")"
        left=$((target - $(now_ms)))
        if [ "$left" -gt 500 ]; then sleep 0.5; elif [ "$left" -gt 0 ]; then sleep "0.$(printf '%03d' "$left")"; fi
    done
    restart_upstream "$k"
done

# wait for both dnsperf runs: SECS plus the timeout for the last queries
deadline=$((T0_MS + (SECS + DP_TIMEOUT + 60) * 1000))
for mode in udp tcp; do
    while is_running "${DP_PID[$mode]}" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.5; done
    is_running "${DP_PID[$mode]}" && die "dnsperf $mode still running $((SECS + DP_TIMEOUT + 60)) s after the start"
    wait "${DP_PID[$mode]}" || echo "soak: dnsperf $mode exited with status $?" >&2
    untrack "${DP_PID[$mode]}"
    for ((i = 0; i < 100; i++)); do is_running "${FILTER_PID[$mode]}" || break; sleep 0.1; done
    wait "${FILTER_PID[$mode]}" || die "the dnsperf $mode output filter failed"
    untrack "${FILTER_PID[$mode]}"
done
T_END_S=$((($(now_ms) - T0_MS) / 1000))
for ((i = 0; i < 300; i++)); do is_running "$SAMPLER_PID" || break; sleep 0.1; done
stop_pid "$SAMPLER_PID" 1
wait "$SAMPLER_PID" 2>/dev/null || echo "soak: the sampler ended with an error: $(cat "$WORK/sampler.log")" >&2
untrack "$SAMPLER_PID"
log "load done after ${T_END_S}s"

# one more sample with the load gone, then the metrics, then stop the proxy
sleep 2
"$PY" "$LIB" sample-once "$PROXY_PID" "$METRICS_PORT" "$T0" after-load "$WORK/samples.csv" ||
    echo "soak: the proxy is gone before the final sample" >&2
curl -s --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/metrics-end.txt" || true
LOAD_AVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
CPU1=$(cpu_ticks "$PROXY_PID")
PROXY_CPU_S=$(awk -v t=$((CPU1 - CPU0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz}')

proxy_exit=gone
if is_running "$PROXY_PID"; then
    kill -TERM "$PROXY_PID"
    for ((i = 0; i < 100; i++)); do is_running "$PROXY_PID" || break; sleep 0.1; done
    if is_running "$PROXY_PID"; then
        proxy_exit="still running 10 s after SIGTERM"
        kill -KILL "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
    else
        proxy_exit=0
        wait "$PROXY_PID" || proxy_exit=$?
    fi
fi
untrack "$PROXY_PID"
stop_pid "$UP_PID" 5
wait "$UP_PID" 2>/dev/null || true
untrack "$UP_PID"

# ---------------------------------------------------------------- report
export SOAKR_DATE SOAKR_VERSIONS SOAKR_WALL SOAKR_PROXY_CMD SOAKR_PROXY_EXIT
SOAKR_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
SOAKR_WALL=$(($(date +%s) - ${SOAK_T0:-$(date +%s)}))
SOAKR_PROXY_CMD="dotproxy ${PROXY_CMD[*]:1}"
SOAKR_PROXY_EXIT=$proxy_exit
SOAKR_VERSIONS=$(
    echo "$("$DOTPROXY" --version 2>/dev/null | head -n 1), git $(git_state), binary \`${DOTPROXY_SRC#"$ROOT"/}\` $(stat -c %s "$DOTPROXY") bytes, sha256 $(sha256sum "$DOTPROXY" | cut -c1-12)…"
    echo "unbound $(unbound_version), dnsperf $(dnsperf_version), $(openssl version)"
    echo "$(nproc) CPUs ($(cpu_model)), kernel $(uname -r); shared with other work: load average at start / end of the load $LOAD_AVG_START / $LOAD_AVG_END"
    echo "proxy CPU time during the load: $PROXY_CPU_S s (utime + stime) over ${T_END_S} s"
)
"$PY" - "$WORK/report-env.json" <<EOF
import json, os, sys
json.dump({
    "date": os.environ["SOAKR_DATE"], "cmdline": os.environ.get("SOAK_CMDLINE", "benchmarks/soak.sh"),
    "wall_s": os.environ["SOAKR_WALL"], "seconds": "$SECS", "restart_every": "$EVERY",
    "sample_every": "$SAMPLE_EVERY", "udp_qps": "$UDP_QPS", "udp_clients": "$UDP_CLIENTS",
    "tcp_qps": "$TCP_QPS", "tcp_clients": "$TCP_CLIENTS", "dnsperf_timeout": "$DP_TIMEOUT",
    "names": "$NAMES", "query_lines": "$QUERY_LINES", "proxy_port": "$PROXY_PORT",
    "dot_port": "$DOT_PORT", "log_level": "$LOG_LEVEL", "keepalive": "$KEEPALIVE",
    "proxy_cmd": os.environ["SOAKR_PROXY_CMD"], "proxy_exit": os.environ["SOAKR_PROXY_EXIT"],
    "versions": os.environ["SOAKR_VERSIONS"].splitlines(),
}, open(sys.argv[1], "w"), indent=1)
EOF

cp "$WORK/samples.csv" "$OUT/soak.csv"
verdict=0
"$PY" "$LIB" report "$WORK" "$OUT/soak.md" || verdict=$?
log "results: $OUT/soak.md, $OUT/soak.csv"
if [ "$verdict" != 0 ]; then
    KEEP=1
    echo "soak: FAIL (details in $OUT/soak.md; proxy log $WORK/proxy.log, per-second timelines $WORK/timeline-*.csv)" >&2
    exit 1
fi
