#!/usr/bin/env bash
# Soak test of dotproxy: long steady load while the DoT upstream is restarted
# again and again, with hostile actors in the mix, all on loopback in a
# private network namespace:
#
#   dnsperf -m udp (-Q 5000) --+                  +--DoT--> unbound :8853 (restarted every 30 s)
#   dnsperf -m tcp (-Q 1000) --+                  |            ^ plain :5300
#   burst client (np zone) ----+                  |            |
#   slow reader (TCP) ---------+--> dotproxy -----+            |
#   slowloris (50 conns) ------+                  +--DoT--> dnsdist :8854 (np.soak.test:
#                                                                does not pipeline)
#
# Checks the claim "no query is ever lost, and memory and file descriptors
# stay flat": every honest query (dnsperf's, and with the actors the burst
# client's) must get an answer within dnsperf's timeout (SERVFAIL counts as
# an answer: some are expected while the upstream is down), the proxy's VmRSS must not grow by 1 MiB or more after the first
# minute, and its open fds by no more than 4 (with the actors: its fds other
# than client and upstream connections, whose number the actors vary; those
# must stay within what the clients hold).
#
# The hostile actors (on by default; SOAK_ACTORS=0 or --no-actors for the
# plain soak): a TCP client that pipelines queries for TXT answers of ~3.3 kB
# (cached) and reads slowly, always 100-400 KiB unread, stalling now and then
# until the proxy closes it; 50 connections that send one byte of a length
# prefix and nothing else (replaced when closed); and a zone, np.soak.test,
# forwarded to dnsdist 1.7 with its default DoT frontend, which handles one
# query of a connection at a time (queries that came in the same TLS record
# wait until another record arrives). Honest queries for that zone come from
# a client of its own in bursts of 4, 1 s on and 1 s off: a steady stream
# (dnsperf's) would keep such a server going and hide it. Honest records
# then have TTL 0, so the cache keeps only the slow reader's.
#
# Usage (as root, from anywhere):   benchmarks/soak.sh [--short] [--no-actors]
#                                   (or: just soak --short)
#   --short                the short mode: SOAK_SHORT=1
#   --no-actors            SOAK_ACTORS=0
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
#   SOAK_SHORT=1           short mode: SOAK_SECONDS defaults to 150
#   SOAK_ACTORS=1          the hostile actors (1|0)
#   SOAK_SLOWLORIS=50      slowloris connections held at a time
#   SOAK_SLOW_READ_KIBPS=100  the slow reader's read rate
#   SOAK_SLOW_STALL_EVERY=60  the slow reader stalls every this many s (0: never)
#   SOAK_NP_PERCENT=0      share of dnsperf's query file under np.soak.test
#   SOAK_TCP_IDLE_MS=10000 the proxy's --tcp-idle-timeout (with the actors)
#   SOAK_CACHE_SIZE=1000   the proxy's --cache-size (with the actors)
#   SOAK_NP_BURST_QPS=80   honest queries for np.soak.test over one TCP
#                          connection, in bursts of 4, this rate for 1 s,
#                          then 1 s quiet (with the actors)
#   SOAK_TCP_WMEM_MAX=131072  net.ipv4.tcp_wmem's maximum in the private
#                          namespace (with the actors; 0: the kernel's): on
#                          loopback the kernel would otherwise hold the slow
#                          reader's whole backlog, and the proxy's limits on
#                          its own buffers would never be reached
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

for a in "$@"; do
    case $a in
        --short) ARG_SHORT=1 ;;
        --no-actors) ARG_ACTORS=0 ;;
        --actors) ARG_ACTORS=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$a' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- re-exec
# as root, in a private network namespace with only loopback (up)
netns_reexec SOAK DOTPROXY SOAK_SECONDS SOAK_RESTART_EVERY SOAK_SAMPLE_EVERY SOAK_UDP_QPS \
    SOAK_UDP_CLIENTS SOAK_TCP_QPS SOAK_TCP_CLIENTS SOAK_TIMEOUT SOAK_NAMES \
    SOAK_UPSTREAM_KEEPALIVE SOAK_LOG_LEVEL SOAK_PROXY_ARGS SOAK_KEEP SOAK_OUT SOAK_SHORT \
    SOAK_ACTORS SOAK_SLOWLORIS SOAK_SLOW_READ_KIBPS SOAK_SLOW_STALL_EVERY SOAK_NP_PERCENT \
    SOAK_TCP_IDLE_MS SOAK_CACHE_SIZE SOAK_NP_BURST_QPS SOAK_TCP_WMEM_MAX -- "$@"

# ---------------------------------------------------------------- settings
cd "$ROOT"
SHORT=${ARG_SHORT:-${SOAK_SHORT:-0}}
if [ "$SHORT" = 1 ]; then SECS=${SOAK_SECONDS:-150}; else SECS=${SOAK_SECONDS:-600}; fi
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
ACTORS=${ARG_ACTORS:-${SOAK_ACTORS:-1}}
case $ACTORS in 1 | 0) ;; *) die "SOAK_ACTORS must be 1 or 0" ;; esac
SLOWLORIS=${SOAK_SLOWLORIS:-50}
SLOW_KIBPS=${SOAK_SLOW_READ_KIBPS:-100}
STALL_EVERY=${SOAK_SLOW_STALL_EVERY:-60}
NP_PERCENT=${SOAK_NP_PERCENT:-0}
IDLE_MS=${SOAK_TCP_IDLE_MS:-10000}
CACHE_SIZE=${SOAK_CACHE_SIZE:-1000}
BURST_QPS=${SOAK_NP_BURST_QPS:-80}
WMEM_MAX=${SOAK_TCP_WMEM_MAX:-131072}
for v in SECS EVERY SAMPLE_EVERY UDP_QPS UDP_CLIENTS TCP_QPS TCP_CLIENTS DP_TIMEOUT NAMES \
    SLOWLORIS SLOW_KIBPS IDLE_MS CACHE_SIZE BURST_QPS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $STALL_EVERY =~ ^[0-9]+$ ]] || die "STALL_EVERY must be a number of seconds (got '$STALL_EVERY')"
[[ $NP_PERCENT =~ ^[0-9]+$ ]] || die "NP_PERCENT must be a number (got '$NP_PERCENT')"
[[ $WMEM_MAX =~ ^[0-9]+$ ]] || die "WMEM_MAX must be a number of bytes (got '$WMEM_MAX')"
[ "$NP_PERCENT" -lt 50 ] || die "NP_PERCENT must be below 50"
read -r -a PROXY_EXTRA <<<"${SOAK_PROXY_ARGS:-}"

PLAIN_PORT=5300   # upstream, plain DNS (readiness probe only)
DOT_PORT=8853     # upstream, DoT
PROXY_PORT=5310
METRICS_PORT=9310
NP_DOT_PORT=8854  # dnsdist, DoT frontend (the upstream that does not pipeline)
NP_PLAIN_PORT=5320  # dnsdist, plain (readiness probe only)
BIG_NAMES=16 BIG_BYTES=3500  # the slow reader's TXT records
NP_HOSTS=$((NAMES / 10 > 10 ? NAMES / 10 : 10))  # hosts under np.soak.test
LIB=$HERE/soaklib.py

tools=(unbound unbound-checkconf dnsperf openssl python3 ss ps curl)
[ "$ACTORS" = 1 ] && tools+=(dnsdist)
require_tools "${tools[@]}"
# the interpreter itself, not a version-manager shim (probes run in loops)
PY=$(python3 -c 'import sys; print(sys.executable)')
dotproxy_under_test

TCP_WMEM=$(sysctl -n net.ipv4.tcp_wmem | tr -s '\t ' ' ')
if [ "$ACTORS" = 1 ] && [ "$WMEM_MAX" != 0 ]; then
    # this namespace's own setting (per network namespace since Linux 4.15)
    sysctl -qw net.ipv4.tcp_wmem="4096 16384 $WMEM_MAX" || die "cannot set net.ipv4.tcp_wmem here"
    TCP_WMEM=$(sysctl -n net.ipv4.tcp_wmem | tr -s '\t ' ' ')
fi

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
if [ "$ACTORS" = 1 ]; then
    # honest records with TTL 0: the cache (for the slow reader) keeps none of them
    "$PY" "$LIB" zone "$WORK/generated" "$NAMES" 0 "$NP_HOSTS" "$NP_PERCENT" "$BIG_NAMES" "$BIG_BYTES"
else
    "$PY" "$LIB" zone "$WORK/generated" "$NAMES"
fi | sed 's/^/    /'
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

# the upstream that does not pipeline: dnsdist's DoT frontend with its
# defaults (one query of a connection at a time), in front of unbound's plain port
NP_PID=
dnsdist_version() { dnsdist --version 2>/dev/null | head -n 1 | cut -d' ' -f1-2; }
np_ready() {
    tcp_listening "$NP_DOT_PORT" && "$PY" "$LIB" probe "$NP_PLAIN_PORT" p000.np.soak.test udp
}
if [ "$ACTORS" = 1 ]; then
    cat >"$WORK/dnsdist.conf" <<EOF
-- the upstream that does not pipeline, for benchmarks/soak.sh: loopback only
setLocal("127.0.0.1:$NP_PLAIN_PORT")
addTLSLocal("127.0.0.1:$NP_DOT_PORT", "certs/server-chain.pem", "certs/server.key")
setACL({"127.0.0.0/8"})
-- no security polling (it would query through the system resolver)
setSecurityPollSuffix("")
newServer({address = "127.0.0.1:$PLAIN_PORT", checkName = "p000.np.soak.test.", checkInterval = 1})
EOF
    log "starting the upstream that does not pipeline ($(dnsdist_version); DoT :$NP_DOT_PORT, plain :$NP_PLAIN_PORT)"
    (cd "$WORK" && exec dnsdist --supervised --disable-syslog -C dnsdist.conf) >"$WORK/dnsdist.log" 2>&1 &
    NP_PID=$!
    track "$NP_PID"
    # up to 15 s for it to answer; listening on the DoT port is what it must
    wait_until "$NP_PID" 15 0.25 np_ready || tcp_listening "$NP_DOT_PORT" ||
        { cat "$WORK/dnsdist.log" >&2; die "dnsdist did not start"; }
fi

# ---------------------------------------------------------------- proxy
PROXY_CMD=("$DOTPROXY" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$DOT_PORT#dot.test"
    --ca-file certs/ca.pem --metrics "127.0.0.1:$METRICS_PORT" --log-level "$LOG_LEVEL")
export SOAKLIB_PROXY_PORT=$PROXY_PORT SOAKLIB_MAIN_UPSTREAM="127.0.0.1:$DOT_PORT#dot.test" \
    SOAKLIB_NP_UPSTREAM="" SOAKLIB_ACTOR_DIR=""
if [ "$ACTORS" = 1 ]; then
    PROXY_CMD+=(--forward "np.soak.test=127.0.0.1:$NP_DOT_PORT#dot.test" --cache-size "$CACHE_SIZE"
        --tcp-idle-timeout "$IDLE_MS")
    SOAKLIB_NP_UPSTREAM="127.0.0.1:$NP_DOT_PORT#dot.test" SOAKLIB_ACTOR_DIR=$WORK
fi
PROXY_CMD+=("${PROXY_EXTRA[@]}")
log "starting the proxy: ${PROXY_CMD[*]#"$WORK/"}"
(cd "$WORK" && exec "${PROXY_CMD[@]}") >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
track "$PROXY_PID"
proxy_ready() {
    "$PY" "$LIB" probe "$PROXY_PORT" n001.soak.test udp tcp &&
        { [ "$ACTORS" = 0 ] || "$PY" "$LIB" probe "$PROXY_PORT" p000.np.soak.test udp; }
}
wait_until "$PROXY_PID" 15 0.25 proxy_ready ||
    { cat "$WORK/proxy.log" >&2; die "the proxy did not answer within 15 s"; }

# ---------------------------------------------------------------- load
n_restarts=$(((SECS - 1) / EVERY))
log "load for ${SECS}s: udp -Q $UDP_QPS -c $UDP_CLIENTS, tcp -Q $TCP_QPS -c $TCP_CLIENTS, -t $DP_TIMEOUT;" \
    "upstream restart every ${EVERY}s ($n_restarts restarts); samples every ${SAMPLE_EVERY}s"
if [ "$ACTORS" = 1 ]; then
    log "hostile actors: slow reader (${SLOW_KIBPS} KiB/s, 100-400 KiB unread, stall every ${STALL_EVERY}s)," \
        "slowloris x $SLOWLORIS, np.soak.test via dnsdist ($BURST_QPS q/s in bursts of 4, 1 s on / 1 s off; $NP_PERCENT % of dnsperf's);" \
        "tcp_wmem $TCP_WMEM"
fi
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
declare -A ACTOR_PID
if [ "$ACTORS" = 1 ]; then
    "$PY" "$LIB" slowreader "$PROXY_PORT" "$SECS" "$WORK/slowreader.json" "$BIG_NAMES" "$BIG_BYTES" \
        "$IDLE_MS" "$STALL_EVERY" "$SLOW_KIBPS" 2>>"$WORK/actors.log" &
    ACTOR_PID[slowreader]=$!
    track "$!"
    "$PY" "$LIB" slowloris "$PROXY_PORT" "$SECS" "$WORK/slowloris.json" "$SLOWLORIS" "$IDLE_MS" \
        2>>"$WORK/actors.log" &
    ACTOR_PID[slowloris]=$!
    track "$!"
    # not hostile: honest queries for np.soak.test in bursts, so that some
    # reach dnsdist in one TLS record, with pauses for it to be seen stuck
    "$PY" "$LIB" burst "$PROXY_PORT" "$SECS" "$WORK/burst.json" "$NP_HOSTS" "$BURST_QPS" 4 "$DP_TIMEOUT" 1 1 \
        2>>"$WORK/actors.log" &
    ACTOR_PID[burst]=$!
    track "$!"
fi
sleep 0.2
for mode in udp tcp; do
    is_running "${DP_PID[$mode]}" || die "dnsperf $mode exited at once: $(cat "$WORK/dnsperf-$mode.stats" 2>/dev/null)"
done
for a in "${!ACTOR_PID[@]}"; do
    is_running "${ACTOR_PID[$a]}" || die "the $a actor exited at once: $(cat "$WORK/actors.log")"
done

# restarts at k*EVERY for k*EVERY < SECS; between them check everybody is up
for ((k = 1; k * EVERY < SECS; k++)); do
    target=$((T0_MS + k * EVERY * 1000))
    while [ "$(now_ms)" -lt "$target" ]; do
        is_running "$PROXY_PID" || die "the proxy died at $((($(now_ms) - T0_MS) / 1000)) s: $(tail -n 20 "$WORK/proxy.log")"
        [ -z "$NP_PID" ] || is_running "$NP_PID" || die "dnsdist died at $((($(now_ms) - T0_MS) / 1000)) s: $(tail -n 20 "$WORK/dnsdist.log")"
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
for a in "${!ACTOR_PID[@]}"; do
    while is_running "${ACTOR_PID[$a]}" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.5; done
    is_running "${ACTOR_PID[$a]}" && die "the $a actor still running $((SECS + DP_TIMEOUT + 60)) s after the start"
    wait "${ACTOR_PID[$a]}" || echo "soak: the $a actor exited with status $?: $(tail -n 5 "$WORK/actors.log")" >&2
    untrack "${ACTOR_PID[$a]}"
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
if [ -n "$NP_PID" ]; then
    stop_pid "$NP_PID" 5
    wait "$NP_PID" 2>/dev/null || true
    untrack "$NP_PID"
fi

# ---------------------------------------------------------------- report
export SOAKR_DATE SOAKR_VERSIONS SOAKR_WALL SOAKR_PROXY_CMD SOAKR_PROXY_EXIT
SOAKR_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
SOAKR_WALL=$(($(date +%s) - ${SOAK_T0:-$(date +%s)}))
SOAKR_PROXY_CMD="dotproxy ${PROXY_CMD[*]:1}"
SOAKR_PROXY_EXIT=$proxy_exit
SOAKR_VERSIONS=$(
    echo "$("$DOTPROXY" --version 2>/dev/null | head -n 1), git $(git_state), binary \`${DOTPROXY_SRC#"$ROOT"/}\` $(stat -c %s "$DOTPROXY") bytes, sha256 $(sha256sum "$DOTPROXY" | cut -c1-12)…"
    echo "unbound $(unbound_version),${NP_PID:+ $(dnsdist_version),} dnsperf $(dnsperf_version), $(openssl version)"
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
    "actors": "$ACTORS" == "1", "slowloris": "$SLOWLORIS", "slow_kibps": "$SLOW_KIBPS",
    "stall_every": "$STALL_EVERY", "np_percent": "$NP_PERCENT", "tcp_idle_ms": "$IDLE_MS",
    "cache_size": "$CACHE_SIZE", "np_dot_port": "$NP_DOT_PORT", "big_names": "$BIG_NAMES",
    "big_bytes": "$BIG_BYTES", "burst_qps": "$BURST_QPS", "tcp_wmem": "$TCP_WMEM",
    "np_zone_cmd": "dnsdist --supervised --disable-syslog -C dnsdist.conf",
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
