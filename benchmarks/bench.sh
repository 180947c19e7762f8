#!/usr/bin/env bash
# Throughput / latency / CPU / memory benchmark of dotproxy against other
# plain-DNS -> DNS-over-TLS forwarders, all on loopback in a private network
# namespace:
#
#   dnsperf --UDP/TCP--> target --DoT (verified, dot.test)--> unbound upstream
#
# Targets (each started once and kept running across rounds):
#   direct-plain      dnsperf straight to the upstream's plain port (ceiling)
#   direct-dot        dnsperf -m dot straight to the upstream (DoT ceiling)
#   dotproxy          $DOTPROXY (default target/release/dotproxy)
#   dotproxy-dot      the same binary, dnsperf -m dot to its own DoT listener
#                     (--listen-tls 127.0.0.1:8530, the upstream's certificate;
#                     dnsperf does not verify it); tcp loads only, beside
#                     dotproxy's plain TCP rows
#   stubby            stubby / getdns
#   dnsdist           dnsdist, default backend (one query in flight per conn)
#   dnsdist-inflight  dnsdist, maxInFlight = 100
#   unbound-fwd       unbound as forwarder, forward-tls-upstream, no cache
# With BENCH_CACHE=1 also: dnsdist-cache, unbound-fwd-cache and, if
# `dotproxy --help` mentions --cache-size, dotproxy-cache.
#
# With BENCH_ZIPF=1 (and with BENCH_CACHE=1) also the Zipf block: dotproxy,
# dotproxy-cache, dnsdist-cache and unbound-fwd-cache, each as an instance of
# its own with comparable cache sizes, in front of a second unbound upstream
# (DoT :8854) that serves only zipf.test (TTLs 1..30 s); queries of Zipf-like
# popularity (s = 1) over its 10,000 names; the hit ratio is 1 - (A and AAAA
# queries that upstream received / answers dnsperf got).
#
# Usage (as root, from anywhere):   benchmarks/bench.sh
# Environment:
#   DOTPROXY=path         binary under test (default target/release/dotproxy)
#   BENCH_SECONDS=10      length of each dnsperf run
#   BENCH_ROUNDS=3        interleaved rounds (median over rounds is reported)
#   BENCH_QUICK=1         1 round of 3 s (development)
#   BENCH_CACHE=1         add the caching variants (and the Zipf block)
#   BENCH_ZIPF=1          add the Zipf block (cache on, realistic mix)
#   BENCH_ZIPF_QPS=10000  rate (-Q) of the paced Zipf load
#   BENCH_TARGETS="a b"   run only these targets (names as in the report)
#   BENCH_LOADS="a b"     run only these loads: udp-200 udp-1000 tcp-200
#                         tcp-1000 latency zipf-udp-200 zipf-udp-Q10000
#   BENCH_LATENCY_ALL=1   low-load latency run for every forwarder, not only dotproxy
#   BENCH_LOW_CLIENTS=1   dnsperf clients (-c) of the low-load latency runs
#   BENCH_TIMEOUT=2       dnsperf query timeout (s): later answers count as lost
#   BENCH_NAMES=5000      hosts in the generated zone
#   BENCH_KEEP=1          keep the work directory (configs, logs, dnsperf output)
#   BENCH_OUT=dir         results directory (default benchmarks/results)
#
# Writes OUT/latest.md (report), OUT/latest.csv (one row per run) and
# OUT/latest.png (chart). Every process started here is stopped by PID from an
# EXIT trap; the network namespace disappears with them.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
DIE_PREFIX="bench: "
REQUIRE_HINT="run benchmarks/install.sh"

# ---------------------------------------------------------------- re-exec
# as root, in a private network namespace with only loopback (up)
netns_reexec BENCH DOTPROXY BENCH_SECONDS BENCH_ROUNDS BENCH_QUICK BENCH_CACHE \
    BENCH_ZIPF BENCH_ZIPF_QPS BENCH_TARGETS BENCH_LOADS BENCH_LATENCY_ALL BENCH_LOW_CLIENTS BENCH_TIMEOUT BENCH_NAMES BENCH_KEEP BENCH_OUT -- "$@"

# ---------------------------------------------------------------- settings
cd "$ROOT"
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    SECONDS_RUN=${BENCH_SECONDS:-3}
    ROUNDS=${BENCH_ROUNDS:-1}
else
    SECONDS_RUN=${BENCH_SECONDS:-10}
    ROUNDS=${BENCH_ROUNDS:-3}
fi
TIMEOUT=${BENCH_TIMEOUT:-2}
NAMES=${BENCH_NAMES:-5000}
OUT=${BENCH_OUT:-$HERE/results}
abs_path OUT
CLIENTS=10
LOW_QPS=2000
# one client for the low-load latency runs: with -c 10 dnsperf's own DoT
# client adds ~5 ms to every answer at this rate (see README)
LOW_CLIENTS=${BENCH_LOW_CLIENTS:-1}
CLK_TCK=$(getconf CLK_TCK)
ZIPF=0
if [ "${BENCH_ZIPF:-0}" = 1 ] || [ "${BENCH_CACHE:-0}" = 1 ]; then ZIPF=1; fi
ZIPF_QPS=${BENCH_ZIPF_QPS:-10000}
# a Zipf run of a caching target starts at least this long (the longest TTL
# of zipf.test + 1 s) after its previous one: no answer of it is still live
ZIPF_GAP=31
# query file lines: more than the fastest target answers in a run (~215k q/s)
ZIPF_LINES=$((250000 * SECONDS_RUN))

# ---------------------------------------------------------------- filters
ALL_ORDER=(direct-plain direct-dot dotproxy dotproxy-dot stubby dnsdist dnsdist-inflight unbound-fwd dotproxy-cache dnsdist-cache unbound-fwd-cache)

# the loads, by name (BENCH_LOADS): "MODE Q" runs of every target, the
# low-load latency block, and the Zipf loads ("MODE Q QPS_LIMIT")
LOADS=("udp 200" "udp 1000" "tcp 200" "tcp 1000")
ZIPF_LOADS=("udp 200 0" "udp 200 $ZIPF_QPS")
load_name() { # MODE Q [QPS_LIMIT] [zipf]
    if [ "${4:-}" = zipf ]; then
        if [ "${3:-0}" = 0 ]; then echo "zipf-$1-$2"; else echo "zipf-$1-Q$3"; fi
    else
        echo "$1-$2"
    fi
}
KNOWN_LOADS=()
for l in "${LOADS[@]}"; do KNOWN_LOADS+=("$(load_name $l)"); done
KNOWN_LOADS+=(latency)
for l in "${ZIPF_LOADS[@]}"; do KNOWN_LOADS+=("$(load_name $l zipf)"); done

# in_list WORD LIST...: WORD is one of LIST
in_list() {
    local w=$1 x
    shift
    for x in "$@"; do [ "$x" = "$w" ] && return 0; done
    return 1
}
# the filters: empty = everything
# (word-split and joined again: one space between names)
# shellcheck disable=SC2086,SC2116
FILTER_TARGETS=$(echo ${BENCH_TARGETS:-})
# shellcheck disable=SC2086,SC2116
FILTER_LOADS=$(echo ${BENCH_LOADS:-})
for t in $FILTER_TARGETS; do
    in_list "$t" "${ALL_ORDER[@]}" || die "BENCH_TARGETS: unknown target '$t' (known: ${ALL_ORDER[*]})"
done
for l in $FILTER_LOADS; do
    in_list "$l" "${KNOWN_LOADS[@]}" || die "BENCH_LOADS: unknown load '$l' (known: ${KNOWN_LOADS[*]})"
    case $l in zipf-*) [ "$ZIPF" = 1 ] || die "BENCH_LOADS: $l needs BENCH_ZIPF=1 (or BENCH_CACHE=1)" ;; esac
done
target_wanted() { [ -z "$FILTER_TARGETS" ] || in_list "$1" $FILTER_TARGETS; }
load_wanted() { [ -z "$FILTER_LOADS" ] || in_list "$1" $FILTER_LOADS; }

require_tools unbound unbound-checkconf stubby dnsdist dnsperf openssl python3 gnuplot ss ps timeout
[ "$ZIPF" = 1 ] && require_tools unbound-control curl
dotproxy_under_test

WORK=$(mktemp -d /tmp/dotproxy-bench.XXXXXX)
mkdir -p "$OUT" "$WORK/certs" "$WORK/generated" "$WORK/run/stubby-appdata" "$WORK/logs"
private_dotproxy "$WORK"
CSV_TMP=$WORK/runs.csv
declare -A PID_OF PORT_OF FAILED_START IDLE_RSS RCVBUF
NOTES=()

bench_exit() {
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "bench: work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
at_exit stop_tracked 3
at_exit bench_exit

# ---------------------------------------------------------------- certs, zone
log "work directory $WORK"
run_or_die "$WORK/logs/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK/certs" "dotproxy bench CA"
python3 "$HERE/benchlib.py" zone "$WORK/generated" "$NAMES" | sed 's/^/    /'
QUERIES=$WORK/generated/queries.txt
ZIPF_QUERIES=$WORK/generated/zipf-queries.txt
if [ "$ZIPF" = 1 ]; then
    python3 "$HERE/benchlib.py" zipf "$WORK/generated" "$NAMES" "$ZIPF_LINES" | tee "$WORK/zipf.txt" | sed 's/^/    /'
fi

# ---------------------------------------------------------------- configs
# Adapted from the reference peer configurations (shared/peers/); paths are
# relative to $WORK, the daemons' working directory.
unbound_conf --comment "DoT upstream: one thread, local data only (bench.test), never recurses." \
    --plain 5300 --dot 8853 certs/server.key certs/server-chain.pem \
    --include generated/bench.test.conf \
    --set "verbosity: 0" --set "so-reuseport: yes" --set "so-rcvbuf: 8m" --set "so-sndbuf: 8m" \
    --set "incoming-num-tcp: 2000" --set "tcp-idle-timeout: 120000" \
    --set "edns-tcp-keepalive-timeout: 120000" --set "stream-wait-size: 64m" \
    >"$WORK/upstream.conf"

cat >"$WORK/stubby.yml" <<'EOF'
resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list:
  - GETDNS_TRANSPORT_TLS
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_ca_file: "certs/ca.pem"
tls_query_padding_blocksize: 128
edns_client_subnet_private: 1
round_robin_upstreams: 0
idle_timeout: 60000
tls_connection_retries: 5
tls_backoff_time: 5
timeout: 5000
dnssec: GETDNS_EXTENSION_FALSE
appdata_dir: "run/stubby-appdata"
listen_addresses:
  - 127.0.0.1@5301
upstream_recursive_servers:
  - address_data: 127.0.0.1
    tls_port: 8853
    tls_auth_name: "dot.test"
EOF

# control_clause SOCKET: an unbound remote-control clause on a unix socket,
# without certificates; appended after unbound_conf's `control-enable: no`,
# which it overrides
control_clause() {
    printf 'remote-control:\n    control-enable: yes\n    control-interface: "%s"\n    control-use-cert: no\n' "$1"
}

# dnsdist_conf PORT EXTRA_SERVER_OPTION EXTRA_LINES [ADDRESS CHECK_NAME CHECK_TYPE]
dnsdist_conf() {
    cat <<EOF
setLocal("127.0.0.1:$1")
setACL({"127.0.0.0/8"})
-- no security polling (it would query through the system resolver)
setSecurityPollSuffix("")
-- 4 MB UDP socket buffers (net.core.rmem_max here is 4 MB)
setUDPSocketBufferSizes(4194304, 4194304)
newServer({
  address = "${4:-127.0.0.1:8853}",
  tls = "openssl",
  subjectName = "dot.test",
  caStore = "certs/ca.pem",
  validateCertificates = true,$2
  checkName = "${5:-h00000.bench.test.}",
  checkType = "${6:-A}",
  checkInterval = 1,
})
setServerPolicy(firstAvailable)
$3
EOF
}
dnsdist_conf 5302 "" "" >"$WORK/dnsdist.conf"
dnsdist_conf 5306 "
  maxInFlight = 100," "" >"$WORK/dnsdist-inflight.conf"
dnsdist_conf 5304 "" 'pc = newPacketCache(100000, {maxTTL = 86400, minTTL = 0, temporaryFailureTTL = 60, staleTTL = 60, dontAge = false})
getPool(""):setCache(pc)' >"$WORK/dnsdist-cache.conf"

# unbound_fwd_conf PORT NO_CACHE(yes|no) [UNBOUND_CONF_OPTION...]: unbound as
# a forwarder to the upstream (a later --forward or --set replaces the one here)
unbound_fwd_conf() {
    local port=$1 no_cache=$2
    shift 2
    unbound_conf --plain "$port" --forward 127.0.0.1@8853#dot.test certs/ca.pem --forward-no-cache "$no_cache" \
        --set "verbosity: 0" --set "incoming-num-tcp: 1000" --set "so-rcvbuf: 4m" --set "so-sndbuf: 4m" \
        --set "outgoing-num-tcp: 64" --set "tcp-reuse-timeout: 60000" "$@"
}
unbound_fwd_conf 5303 yes >"$WORK/unbound-fwd.conf"
unbound_fwd_conf 5305 no >"$WORK/unbound-fwd-cache.conf"
CONFS=(upstream unbound-fwd unbound-fwd-cache)

# the Zipf block: its own upstream (zipf.test only, counters over a control
# socket) and its own instances of the caching targets, so that its counts
# and cache contents are those of the Zipf runs alone
ZIPF_DNSDIST_KEY=""
if [ "$ZIPF" = 1 ]; then
    {
        unbound_conf --comment "Zipf upstream: like the upstream, zipf.test only, query counts by type." \
            --plain 5320 --dot 8854 certs/server.key certs/server-chain.pem \
            --include generated/zipf.test.conf \
            --set "verbosity: 0" --set "so-reuseport: yes" --set "so-rcvbuf: 8m" --set "so-sndbuf: 8m" \
            --set "incoming-num-tcp: 2000" --set "tcp-idle-timeout: 120000" \
            --set "edns-tcp-keepalive-timeout: 120000" --set "stream-wait-size: 64m" \
            --set "extended-statistics: yes"
        control_clause "$WORK/run/upstream-zipf.ctl"
    } >"$WORK/upstream-zipf.conf"
    # unbound: prefetch on (dotproxy prefetches by default), caches large
    # enough for all 10,000 answers (dotproxy's --cache-memory default is 16M)
    {
        unbound_fwd_conf 5315 no --forward 127.0.0.1@8854#dot.test certs/ca.pem \
            --set "prefetch: yes" --set "msg-cache-size: 16m" --set "rrset-cache-size: 32m" \
            --set "extended-statistics: yes"
        control_clause "$WORK/run/zipf-unbound-fwd-cache.ctl"
    } >"$WORK/zipf-unbound-fwd-cache.conf"
    CONFS+=(upstream-zipf zipf-unbound-fwd-cache)
    ZIPF_DNSDIST_KEY=$(openssl rand -base64 32)
    # the health check asks for the SOA, which the hit ratio does not count
    dnsdist_conf 5314 "" "pc = newPacketCache(10000, {maxTTL = 86400, minTTL = 0, temporaryFailureTTL = 60, staleTTL = 60, dontAge = false})
getPool(\"\"):setCache(pc)
-- the cache's counters, for bench.sh (dnsdist -c)
controlSocket(\"127.0.0.1:5399\")
setKey(\"$ZIPF_DNSDIST_KEY\")" 127.0.0.1:8854 zipf.test. SOA >"$WORK/zipf-dnsdist-cache.conf"
fi

for f in "${CONFS[@]}"; do
    unbound_checkconf "$f.conf" "$WORK"
done

# ---------------------------------------------------------------- targets
DOTPROXY_HAS_CACHE=0
help_text=$("$DOTPROXY" --help 2>&1 || true)
case $help_text in *--cache-size*) DOTPROXY_HAS_CACHE=1 ;; esac

TARGETS=(direct-plain direct-dot dotproxy dotproxy-dot stubby dnsdist dnsdist-inflight unbound-fwd)
if [ "${BENCH_CACHE:-0}" = 1 ]; then
    if [ "$DOTPROXY_HAS_CACHE" = 1 ]; then
        TARGETS+=(dotproxy-cache)
    else
        NOTES+=("BENCH_CACHE=1: \`dotproxy --help\` does not mention \`--cache-size\`, so dotproxy-cache was not run.")
    fi
    TARGETS+=(dnsdist-cache unbound-fwd-cache)
fi

RUN_LOADS=()
for l in "${LOADS[@]}"; do load_wanted "$(load_name $l)" && RUN_LOADS+=("$l"); done
RUN_LATENCY=0
load_wanted latency && RUN_LATENCY=1
RUN_ZIPF_LOADS=()
if [ "$ZIPF" = 1 ]; then
    for l in "${ZIPF_LOADS[@]}"; do load_wanted "$(load_name $l zipf)" && RUN_ZIPF_LOADS+=("$l"); done
fi

LAT_TARGETS=("direct-plain udp" "direct-plain tcp" "direct-dot dot" "dotproxy udp" "dotproxy tcp")
if [ "${BENCH_LATENCY_ALL:-0}" = 1 ]; then
    for t in stubby dnsdist dnsdist-inflight unbound-fwd; do LAT_TARGETS+=("$t udp"); done
fi
# the targets of the load and latency blocks, then those of the Zipf block
WANT=()
if [ "${#RUN_LOADS[@]}" -gt 0 ]; then
    for t in "${TARGETS[@]}"; do target_wanted "$t" && WANT+=("$t"); done
elif [ "$RUN_LATENCY" = 1 ]; then
    for lt in "${LAT_TARGETS[@]}"; do
        set -- $lt
        if target_wanted "$1" && ! in_list "$1" "${WANT[@]}"; then WANT+=("$1"); fi
    done
fi
TARGETS=("${WANT[@]}")
ZIPF_TARGETS=()
if [ "${#RUN_ZIPF_LOADS[@]}" -gt 0 ]; then
    for t in dotproxy dotproxy-cache dnsdist-cache unbound-fwd-cache; do
        [ "$t" = dotproxy-cache ] && [ "$DOTPROXY_HAS_CACHE" = 0 ] && continue
        target_wanted "$t" && ZIPF_TARGETS+=("$t")
    done
    [ "$DOTPROXY_HAS_CACHE" = 0 ] &&
        NOTES+=("Zipf block: \`dotproxy --help\` does not mention \`--cache-size\`, so dotproxy-cache was not run.")
fi
for t in $FILTER_TARGETS; do
    in_list "$t" "${TARGETS[@]}" "${ZIPF_TARGETS[@]}" ||
        NOTES+=("BENCH_TARGETS names $t, which none of the loads run here (cache variants need BENCH_CACHE=1, the Zipf block BENCH_ZIPF=1).")
done
if [ "${#TARGETS[@]}" -eq 0 ] && [ "${#ZIPF_TARGETS[@]}" -eq 0 ]; then
    die "nothing to run with BENCH_TARGETS='$FILTER_TARGETS' BENCH_LOADS='$FILTER_LOADS'"
fi

PORT_OF=([direct-plain]=5300 [direct-dot]=8853 [stubby]=5301 [dnsdist]=5302 [unbound-fwd]=5303
    [dnsdist-cache]=5304 [unbound-fwd-cache]=5305 [dnsdist-inflight]=5306 [dotproxy]=5310
    [dotproxy-cache]=5311 [dotproxy-dot]=5316 [zipf-dotproxy]=5312 [zipf-dotproxy-cache]=5313 [zipf-dnsdist-cache]=5314
    [zipf-unbound-fwd-cache]=5315 [upstream-zipf]=5320)
ZIPF_METRICS=127.0.0.1:9313 # zipf-dotproxy-cache's /metrics
# dotproxy-dot's DoT listener (PORT_OF has its plain port, for the probes)
DOTPROXY_DOT_TLS=8530

# start_target NAME: start the daemon in $WORK, logs in $WORK/logs/NAME.log
start_target() {
    local name=$1 port=${PORT_OF[$1]}
    local -a cmd
    case $name in
        upstream) cmd=(unbound -d -c upstream.conf) ;;
        dotproxy) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8853#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn) ;;
        dotproxy-dot) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8853#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn
            --listen-tls "127.0.0.1:$DOTPROXY_DOT_TLS" --tls-cert certs/server-chain.pem --tls-key certs/server.key) ;;
        dotproxy-cache) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8853#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn --cache-size 10000) ;;
        upstream-zipf) cmd=(unbound -d -c upstream-zipf.conf) ;;
        zipf-dotproxy) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8854#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn) ;;
        zipf-dotproxy-cache) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8854#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn --cache-size 10000 --metrics "$ZIPF_METRICS") ;;
        zipf-dnsdist-cache) cmd=(dnsdist --supervised --disable-syslog -C "$name.conf") ;;
        zipf-unbound-fwd-cache) cmd=(unbound -d -c "$name.conf") ;;
        stubby) cmd=(stubby -C stubby.yml) ;;
        dnsdist*) cmd=(dnsdist --supervised --disable-syslog -C "$name.conf") ;;
        unbound-fwd*) cmd=(unbound -d -c "$name.conf") ;;
        *) die "unknown target $name" ;;
    esac
    (cd "$WORK" && exec "${cmd[@]}") >"$WORK/logs/$name.log" 2>&1 &
    PID_OF[$name]=$!
    track "$!"
    echo "${cmd[*]}" >"$WORK/logs/$name.cmd"
}

# wait_ready NAME PORT [QNAME]: a probe over UDP and one over TCP answer
# NOERROR (within 15 s)
wait_ready() {
    wait_until "${PID_OF[$1]}" 15 0.25 python3 "$HERE/benchlib.py" probe "$2" "${3:-h00001.bench.test}" udp tcp
}

udp_rcvbuf() { # receive buffer of the UDP socket listening on PORT
    ss -Hlunm "( sport = :$1 )" 2>/dev/null | grep -o 'rb[0-9]*' | head -n 1 | tr -d rb
}

log "starting the upstream (unbound, one thread; DoT :8853, plain :5300)"
PORT_OF[upstream]=5300
start_target upstream
wait_ready upstream 5300 || { cat "$WORK/logs/upstream.log" >&2; die "upstream did not start"; }
python3 "$HERE/benchlib.py" probe 8853 h00001.bench.test tcp 2>/dev/null && die "8853 answered plain DNS"
UP_PID=${PID_OF[upstream]}
PID_OF[direct-plain]=$UP_PID
PID_OF[direct-dot]=$UP_PID
IDLE_RSS[upstream]=$(proc_status "$UP_PID" VmRSS)
RCVBUF[upstream]=$(udp_rcvbuf 5300)

# start_ready NAME [QNAME]: start NAME, wait for its answers; 0 when it is up
start_ready() {
    local t=$1
    log "starting $t on 127.0.0.1:${PORT_OF[$t]}"
    start_target "$t"
    if wait_ready "$t" "${PORT_OF[$t]}" "${2:-}"; then
        IDLE_RSS[$t]=$(proc_status "${PID_OF[$t]}" VmRSS)
        RCVBUF[$t]=$(udp_rcvbuf "${PORT_OF[$t]}")
        return 0
    fi
    FAILED_START[$t]=1
    echo "bench: $t did not answer within 15 s; skipped. Last log lines:" >&2
    tail -n 20 "$WORK/logs/$t.log" >&2 || true
    NOTES+=("$t failed to start (no NOERROR answer within 15 s); it was skipped.")
    return 1
}

RUN_TARGETS=()
for t in "${TARGETS[@]}"; do
    case $t in
        direct-*) RUN_TARGETS+=("$t"); continue ;;
    esac
    start_ready "$t" && RUN_TARGETS+=("$t")
done

# the Zipf block's upstream and instances (instance zipf-T of target T)
ZIPF_RUN=()
ZIPF_UP_PID=""
if [ "${#ZIPF_TARGETS[@]}" -gt 0 ]; then
    if start_ready upstream-zipf z00001.zipf.test; then
        ZIPF_UP_PID=${PID_OF[upstream-zipf]}
        for t in "${ZIPF_TARGETS[@]}"; do
            start_ready "zipf-$t" z00001.zipf.test && ZIPF_RUN+=("$t")
        done
    fi
fi

# ---------------------------------------------------------------- runs
CSV_HEADER="round,kind,target,load_mode,mode,c,q,Q,seconds,sent,completed,lost,qps,p50_us,p90_us,p99_us,p999_us,max_us,noerror,nxdomain,servfail,other_rcode,cpu_ms,cpu_ms_per_1k,upstream_cpu_ms_per_1k,dnsperf_cpu_ms,sys_busy_pct,other_cpu_pct,vmhwm_kb,vmrss_kb,threads,started_at,upstream_queries,hit_ratio,own_hits,own_misses,own_prefetches,own_hit_ratio,cache_entries"
echo "$CSV_HEADER" >"$CSV_TMP"

# ---------------------------------------------------------------- Zipf counters
# zipf_upstream_count: A and AAAA queries the Zipf upstream has received (the
# dnsdist health checks ask for the SOA); unbound-control reads the config's
# includes from the daemons' working directory
zipf_upstream_count() {
    (cd "$WORK" && unbound-control -c upstream-zipf.conf stats_noreset 2>/dev/null) |
        awk -F= '$1 == "num.query.type.A" || $1 == "num.query.type.AAAA" {n += $2} END {print n + 0}'
}

# zipf_own INSTANCE: the cache's own counters, "hits misses prefetches
# entries", "-" for what it does not count
zipf_own() {
    case $1 in
        zipf-dotproxy-cache)
            curl -s --max-time 5 "http://$ZIPF_METRICS/metrics" | awk '
                $1 == "dotproxy_cache_lookups_total{result=\"hit\"}" {h = $2}
                $1 == "dotproxy_cache_lookups_total{result=\"miss\"}" {m = $2}
                $1 == "dotproxy_cache_prefetches_total" {p = $2}
                $1 == "dotproxy_cache_entries" {e = $2}
                END {print (h == "" ? "-" : h), (m == "" ? "-" : m), (p == "" ? "-" : p), (e == "" ? "-" : e)}' ;;
        zipf-dnsdist-cache)
            (cd "$WORK" && timeout 10 dnsdist -C zipf-dnsdist-cache.conf -c -e 'getPool(""):getCache():printStats()' 2>/dev/null) | awk '
                $1 == "Hits:" {h = $2}
                $1 == "Misses:" {m = $2}
                $1 == "Entries:" {split($2, a, "/"); e = a[1]}
                END {print (h == "" ? "-" : h), (m == "" ? "-" : m), "-", (e == "" ? "-" : e)}' ;;
        zipf-unbound-fwd-cache)
            (cd "$WORK" && unbound-control -c "$1.conf" stats_noreset 2>/dev/null) | awk -F= '
                $1 == "total.num.cachehits" {h = $2}
                $1 == "total.num.cachemiss" {m = $2}
                $1 == "total.num.prefetch" {p = $2}
                $1 == "msg.cache.count" {e = $2}
                END {print (h == "" ? "-" : h), (m == "" ? "-" : m), (p == "" ? "-" : p), (e == "" ? "-" : e)}' ;;
        *) echo "- - - -" ;;
    esac
}

# zipf_gap INSTANCE: wait until ZIPF_GAP seconds have passed since the end of
# the instance's last Zipf run (or warm-up): every run starts with no live
# zipf.test answer in its cache. The instance without a cache does not wait.
declare -A ZIPF_LAST
ZIPF_WAITED=0
zipf_gap() {
    [ "$1" = zipf-dotproxy ] && return 0
    local wait=$((${ZIPF_LAST[$1]:-0} + ZIPF_GAP - $(date +%s)))
    if [ "$wait" -gt 0 ]; then
        echo "    (waiting ${wait} s: no live answer left in $1's cache)"
        sleep "$wait"
        ZIPF_WAITED=$((ZIPF_WAITED + wait))
    fi
}

# d_or_empty A B: B - A, or "" when either is "-"
d_or_empty() {
    if [ "$1" = - ] || [ "$2" = - ]; then echo ""; else echo $(($2 - $1)); fi
}

# run_one ROUND KIND TARGET LOAD_MODE Q QPS_LIMIT(0=none)
# KIND load or latency: TARGET's daemon, the bench.test queries; zipf: its
# Zipf instance, the Zipf queries, the Zipf upstream's and the cache's counters
run_one() {
    local round=$1 kind=$2 t=$3 lmode=$4 q=$5 qlim=$6
    local inst=$t queries=$QUERIES up_pid=$UP_PID
    if [ "$kind" = zipf ]; then
        inst=zipf-$t queries=$ZIPF_QUERIES up_pid=$ZIPF_UP_PID
    fi
    local port=${PORT_OF[$inst]} pid=${PID_OF[$inst]} mode=$lmode
    local -a extra=()
    case $t in
        direct-dot) mode=dot ;;
        # its DoT listener, next to dotproxy's plain TCP: tcp loads only
        dotproxy-dot)
            [ "$lmode" = tcp ] || return 0
            mode=dot port=$DOTPROXY_DOT_TLS
            ;;
    esac
    [ "$qlim" != 0 ] && extra=(-Q "$qlim")
    if ! is_running "$pid"; then
        echo "    $t is not running any more: run skipped"
        NOTES+=("$inst died before a $kind run ($lmode -q $q, round $round).")
        return 0
    fi
    local uq0="" uq1="" own0=(- - - -) own1=(- - - -)
    if [ "$kind" = zipf ]; then
        zipf_gap "$inst"
        read -r -a own0 < <(zipf_own "$inst")
        uq0=$(zipf_upstream_count)
    fi
    echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true # reset VmHWM
    local started c0 u0 s0 d0 c1 u1 s1 d1 out=$WORK/dnsperf.out
    local clients=$CLIENTS w0 w1
    [ "$kind" = latency ] && clients=$LOW_CLIENTS
    started=$(date -u +%FT%TZ)
    children_cpu_ms d0
    c0=$(cpu_ticks "$pid") u0=$(cpu_ticks "$up_pid") s0=$(sys_busy_ticks) w0=$(date +%s%N)
    timeout $((SECONDS_RUN + TIMEOUT + 30)) dnsperf -m "$mode" -s 127.0.0.1 -p "$port" \
        -d "$queries" -l "$SECONDS_RUN" -c "$clients" -q "$q" "${extra[@]}" -t "$TIMEOUT" -v \
        >"$out" 2>&1 || true
    c1=$(cpu_ticks "$pid") u1=$(cpu_ticks "$up_pid") s1=$(sys_busy_ticks) w1=$(date +%s%N)
    children_cpu_ms d1
    if [ "$kind" = zipf ]; then
        uq1=$(zipf_upstream_count)
        read -r -a own1 < <(zipf_own "$inst")
        ZIPF_LAST[$inst]=$(date +%s)
    fi
    local hwm rss thr
    hwm=$(proc_status "$pid" VmHWM) rss=$(proc_status "$pid" VmRSS) thr=$(proc_status "$pid" Threads)
    local -A r=()
    local k v
    while IFS='=' read -r k v; do r[$k]=$v; done < <(python3 "$HERE/benchlib.py" parse "$out")
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        cp "$out" "$WORK/logs/dnsperf-r$round-$kind-$t-$lmode-q$q-Q$qlim.out"
    fi
    local completed=${r[completed]:-0}
    local cpu_ms=$(((c1 - c0) * 1000 / CLK_TCK))
    local up_ms=$(((u1 - u0) * 1000 / CLK_TCK))
    local dp_ms=$((d1 - d0))
    local wall_ms=$(((w1 - w0) / 1000000))
    [ "$wall_ms" -gt 0 ] || wall_ms=1
    local busy_ms=$(((s1 - s0) * 1000 / CLK_TCK))
    local own_ms=$((cpu_ms + dp_ms))
    [ "$pid" != "$up_pid" ] && own_ms=$((own_ms + up_ms))
    local cpu1k="" up1k="" busy_pct other_pct
    if [ "$completed" -gt 0 ]; then
        cpu1k=$(awk -v c="$cpu_ms" -v n="$completed" 'BEGIN {printf "%.2f", c * 1000 / n}')
        up1k=$(awk -v c="$up_ms" -v n="$completed" 'BEGIN {printf "%.2f", c * 1000 / n}')
    fi
    busy_pct=$((busy_ms * 100 / wall_ms))
    other_pct=$(((busy_ms - own_ms) * 100 / wall_ms))
    # Zipf: hit ratio = 1 - queries the upstream received / answers
    local upq="" hit="" oh="" om="" op="" ohit="" entries="" zipf_txt=""
    if [ "$kind" = zipf ]; then
        upq=$((uq1 - uq0))
        [ "$completed" -gt 0 ] && hit=$(awk -v u="$upq" -v n="$completed" 'BEGIN {printf "%.4f", 1 - u / n}')
        oh=$(d_or_empty "${own0[0]}" "${own1[0]}") om=$(d_or_empty "${own0[1]}" "${own1[1]}")
        op=$(d_or_empty "${own0[2]}" "${own1[2]}")
        entries=${own1[3]}
        [ "$entries" = - ] && entries=""
        if [ -n "$oh" ] && [ -n "$om" ] && [ $((oh + om)) -gt 0 ]; then
            ohit=$(awk -v h="$oh" -v m="$om" 'BEGIN {printf "%.4f", h / (h + m)}')
        fi
        zipf_txt="  hit ${hit:-?} (own ${ohit:-—})"
        if [ "${r[sent]:-0}" -gt "$ZIPF_LINES" ]; then
            NOTES+=("round $round, Zipf $lmode -q $q, $t: dnsperf sent ${r[sent]} queries, more than the $ZIPF_LINES lines of the query file (it started over).")
        fi
        # dnsperf's QPS counts the wait for the last answers too: the rate it
        # sent at is what makes the hit ratios comparable
        if [ "$qlim" != 0 ] && [ "${r[sent]:-0}" -lt $((qlim * SECONDS_RUN * 95 / 100)) ]; then
            NOTES+=("round $round, Zipf $lmode -Q $qlim, $t: dnsperf sent ${r[sent]:-0} queries in ${SECONDS_RUN} s, below 95 % of the paced rate (its hit ratio is not comparable with the others').")
        fi
    fi
    echo "$round,$kind,$t,$lmode,$mode,$clients,$q,$qlim,$SECONDS_RUN,${r[sent]:-},${r[completed]:-},${r[lost]:-},${r[qps]:-},${r[p50_us]:-},${r[p90_us]:-},${r[p99_us]:-},${r[p999_us]:-},${r[max_us]:-},${r[noerror]:-},${r[nxdomain]:-},${r[servfail]:-},${r[other_rcode]:-},$cpu_ms,$cpu1k,$up1k,$dp_ms,$busy_pct,$other_pct,$hwm,$rss,$thr,$started,$upq,$hit,$oh,$om,$op,$ohit,$entries" >>"$CSV_TMP"
    printf '    %-16s %-4s -q %-4s %s %9s qps  p50 %6s us  p99 %7s us  lost %5s  servfail %s  cpu %6s ms/1k  hwm %6s kB  thr %s  other-cpu %s%%%s\n' \
        "$t" "$mode" "$q" "$([ "$qlim" != 0 ] && echo "-Q $qlim" || echo "       ")" \
        "${r[qps]%.*}" "${r[p50_us]:-?}" "${r[p99_us]:-?}" "${r[lost]:-?}" "${r[servfail]:-?}" \
        "${cpu1k:-?}" "${hwm:-?}" "${thr:-?}" "$other_pct" "$zipf_txt"
    rm -f "$out"
    sleep 1
}

nt=${#RUN_TARGETS[@]}
[ "$nt" -gt 0 ] || RUN_LOADS=()
RUN_LAT=()
if [ "$RUN_LATENCY" = 1 ]; then
    for lt in "${LAT_TARGETS[@]}"; do
        set -- $lt
        in_list "$1" "${RUN_TARGETS[@]}" && RUN_LAT+=("$lt")
    done
fi
nz=${#ZIPF_RUN[@]}
[ "$nz" -gt 0 ] || RUN_ZIPF_LOADS=()
runs_per_round=$((nt * ${#RUN_LOADS[@]} + ${#RUN_LAT[@]} + nz * ${#RUN_ZIPF_LOADS[@]}))
if in_list dotproxy-dot "${RUN_TARGETS[@]}"; then # it skips the udp loads
    for l in "${RUN_LOADS[@]}"; do
        case $l in udp*) runs_per_round=$((runs_per_round - 1)) ;; esac
    done
fi
eta=$((ROUNDS * runs_per_round * (SECONDS_RUN + 3) / 60 + 1))
RUN_LOAD_NAMES=()
for l in "${RUN_LOADS[@]}"; do RUN_LOAD_NAMES+=("$(load_name $l)"); done
[ "${#RUN_LAT[@]}" -gt 0 ] && RUN_LOAD_NAMES+=(latency)
for l in "${RUN_ZIPF_LOADS[@]}"; do RUN_LOAD_NAMES+=("$(load_name $l zipf)"); done
log "targets: ${RUN_TARGETS[*]:-none}; Zipf block: ${ZIPF_RUN[*]:-none}"
log "loads: ${RUN_LOAD_NAMES[*]:-none}"
log "$ROUNDS round(s) x $runs_per_round runs of ${SECONDS_RUN}s (about $eta min)"

# short unrecorded warm-up: connections up, caches (where any) filled
log "warm-up"
for t in "${RUN_TARGETS[@]}"; do
    mode=udp port=${PORT_OF[$t]}
    [ "$t" = direct-dot ] && mode=dot
    [ "$t" = dotproxy-dot ] && mode=dot port=$DOTPROXY_DOT_TLS
    timeout 30 dnsperf -m "$mode" -s 127.0.0.1 -p "$port" -d "$QUERIES" \
        -l 2 -c "$CLIENTS" -q 200 -t "$TIMEOUT" >/dev/null 2>&1 || true
done
# the Zipf instances too, with the Zipf queries: their first runs then start
# like every later one, after ZIPF_GAP s, with expired answers in the cache
if [ "${#RUN_ZIPF_LOADS[@]}" -gt 0 ]; then
    for t in "${ZIPF_RUN[@]}"; do
        timeout 30 dnsperf -m udp -s 127.0.0.1 -p "${PORT_OF[zipf-$t]}" -d "$ZIPF_QUERIES" \
            -l 2 -c "$CLIENTS" -q 200 -t "$TIMEOUT" >/dev/null 2>&1 || true
        ZIPF_LAST[zipf-$t]=$(date +%s)
    done
fi
sleep 1

LOAD_AVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
ZIPF_T=0 # seconds spent in the Zipf block (runs and waits)
for ((round = 1; round <= ROUNDS; round++)); do
    li=0
    for load in "${RUN_LOADS[@]}"; do
        set -- $load
        lmode=$1 q=$2
        log "round $round/$ROUNDS: $lmode -c $CLIENTS -q $q, ${SECONDS_RUN}s"
        # rotate the order of the targets by round and load
        off=$(((round - 1 + li) % nt))
        for ((i = 0; i < nt; i++)); do
            t=${RUN_TARGETS[$(((i + off) % nt))]}
            run_one "$round" load "$t" "$lmode" "$q" 0
        done
        li=$((li + 1))
    done
    if [ "${#RUN_LAT[@]}" -gt 0 ]; then
        log "round $round/$ROUNDS: low load -c $LOW_CLIENTS -Q $LOW_QPS, ${SECONDS_RUN}s"
    fi
    for lt in "${RUN_LAT[@]}"; do
        set -- $lt
        [ -n "${FAILED_START[$1]:-}" ] && continue
        run_one "$round" latency "$1" "$2" 100 "$LOW_QPS"
    done
    # Zipf: the same order of the targets for each load of a round (a cache
    # meets its next run after the others' runs, fewer waits), rotated by round
    zt0=$(date +%s)
    for load in "${RUN_ZIPF_LOADS[@]}"; do
        set -- $load
        lmode=$1 q=$2 qlim=$3
        log "round $round/$ROUNDS: Zipf $lmode -c $CLIENTS -q $q$([ "$qlim" != 0 ] && echo " -Q $qlim"), ${SECONDS_RUN}s"
        off=$(((round - 1) % nz))
        for ((i = 0; i < nz; i++)); do
            t=${ZIPF_RUN[$(((i + off) % nz))]}
            run_one "$round" zipf "$t" "$lmode" "$q" "$qlim"
        done
    done
    ZIPF_T=$((ZIPF_T + $(date +%s) - zt0))
done
LOAD_AVG_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
log "writing the report"
# every daemon: the load targets, then the Zipf upstream and instances
PROCS=(upstream "${RUN_TARGETS[@]}")
if [ -n "$ZIPF_UP_PID" ]; then
    PROCS+=(upstream-zipf)
    for t in "${ZIPF_RUN[@]}"; do PROCS+=("zipf-$t"); done
fi
for t in "${PROCS[@]}"; do
    case $t in direct-*) continue ;; esac
    pid=${PID_OF[$t]}
    if is_running "$pid"; then
        :
    else
        NOTES+=("$t was not running at the end of the benchmark (see its log).")
    fi
done

cp "$CSV_TMP" "$OUT/latest.csv"
order=$(IFS=,; echo "${ALL_ORDER[*]}")
TABLES=$(python3 "$HERE/benchlib.py" report "$OUT/latest.csv" "$WORK" "$order" "$LOW_QPS")
ZIPF_TABLE=$(python3 "$HERE/benchlib.py" zipf-report "$OUT/latest.csv" "$order")
# a chart only when there are load runs (the data files have a row past the header)
HAVE_CHART=0
[ "$(wc -l <"$WORK/plot-qps.dat")" -gt 1 ] && HAVE_CHART=1
if [ -n "$FILTER_TARGETS$FILTER_LOADS" ]; then
    FILTERS="BENCH_TARGETS=\"${FILTER_TARGETS:-(all)}\", BENCH_LOADS=\"${FILTER_LOADS:-(all)}\": a partial run. Loads run: ${RUN_LOAD_NAMES[*]:-none}; targets: ${RUN_TARGETS[*]:-none}; Zipf targets: ${ZIPF_RUN[*]:-none}."
else
    FILTERS="none (every target and load of this configuration). Loads run: ${RUN_LOAD_NAMES[*]:-none}."
fi

ver_unbound=$(unbound_version)
ver_stubby="$(stubby -V 2>&1 | head -n 1) (getdns $(dpkg-query -W -f '${Version}' libgetdns10 2>/dev/null || echo '?'))"
ver_dnsdist=$(dnsdist --version 2>/dev/null | head -n 1)
ver_dnsperf=$(dnsperf_version)
ver_dotproxy=$("$DOTPROXY" --version 2>/dev/null | head -n 1 || echo '?')
ver_openssl=$(openssl version)
bin_size=$(stat -c %s "$DOTPROXY")
bin_sha=$(sha256sum "$DOTPROXY" | cut -c1-12)
bin_stripped=$(file -b "$DOTPROXY" 2>/dev/null || true)
case $bin_stripped in *"not stripped"*) bin_stripped="not stripped" ;; *stripped*) bin_stripped=stripped ;; *) bin_stripped="" ;; esac
cpu_model=$(cpu_model)
mem_total=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
elapsed=$(($(date +%s) - ${BENCH_T0:-$(date +%s)}))

# static per-process facts
STATIC="| process | PID | idle RSS MB (after start) | peak RSS MB (max over runs) | threads (max) | UDP listen rcvbuf |
|---|---:|---:|---:|---:|---:|"
for t in "${PROCS[@]}"; do
    case $t in direct-*) continue ;; esac
    peak=$(python3 - "$OUT/latest.csv" "$t" <<'EOF'
import csv, sys
path, t = sys.argv[1], sys.argv[2]
# the Zipf instance zipf-T has the rows of kind zipf of target T
kind_zipf = t.startswith("zipf-")
t = t[len("zipf-"):] if kind_zipf else t
hwm, thr = [], []
for r in csv.DictReader(open(path)):
    if (r["kind"] == "zipf") != kind_zipf:
        continue
    if r["target"] == t or (t == "upstream" and r["target"].startswith("direct-")):
        if r["vmhwm_kb"]: hwm.append(int(r["vmhwm_kb"]))
        if r["threads"]: thr.append(int(r["threads"]))
print(f"{max(hwm) / 1024:.1f}" if hwm else "—", max(thr) if thr else "—")
EOF
)
    set -- $peak
    idle=${IDLE_RSS[$t]:-}
    rb=${RCVBUF[$t]:-}
    STATIC+="
| $t | ${PID_OF[$t]} | $([ -n "$idle" ] && awk -v k="$idle" 'BEGIN {printf "%.1f", k / 1024}' || echo —) | $1 | $2 | $([ -n "$rb" ] && awk -v b="$rb" 'BEGIN {printf "%.0f KB", b / 1024}' || echo —) |"
done

other_cpu=$(python3 - "$OUT/latest.csv" <<'EOF'
import csv, statistics, sys
v = [int(r["other_cpu_pct"]) for r in csv.DictReader(open(sys.argv[1])) if r["other_cpu_pct"]]
print(f"median {statistics.median(v):.0f} %, max {max(v)} %" if v else "?")
EOF
)
lost_notes=$(python3 - "$OUT/latest.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    lost = int(r["lost"] or 0)
    sf = int(r["servfail"] or 0)
    if lost or sf:
        print(f"- round {r['round']}, {r['kind']} {r['load_mode']} -q {r['q']}{' -Q ' + r['Q'] if r['Q'] != '0' else ''}, "
              f"{r['target']}: {lost} lost, {sf} SERVFAIL of {r['sent']} sent")
EOF
)

# the Zipf section of the report
zipf_report_section() {
    echo "## Zipf-like popularity, cache on"
    echo
    echo "dnsperf (\`-c $CLIENTS\`, \`-t $TIMEOUT\`, over UDP) → an instance of the target that sees only this traffic → DoT → a second unbound upstream (DoT :8854, one thread, the settings of the first) that serves only \`zipf.test\`: $NAMES hosts with an A and an AAAA record each, $((2 * NAMES)) names to ask for, every answer NOERROR with one record. $ROUNDS round(s) of ${SECONDS_RUN} s per run, medians over rounds (peak RSS: max)."
    echo
    echo "- **TTL mix**: 1 to 30 s, each on 1/30 of the records (the A record of host i has TTL 1 + i mod 30, its AAAA 1 + (i + 15) mod 30), so answers expire during a run and popular names are fetched again."
    echo "- **Queries**: $ZIPF_LINES lines (more than any target answers in a run; each run starts at the top, so every target gets the same sequence), drawn from a Zipf distribution with s = 1 over the $((2 * NAMES)) names: the name of popularity rank k is asked with probability ∝ 1/k; ranks are given by a seeded shuffle, independent of the host number and the TTL; seeded, the same file every time. $(sed -n 's/.*; the top/The top/p' "$WORK/zipf.txt")."
    echo "- **Hit ratio** = 1 − (A and AAAA queries the Zipf upstream received during the run) / (answers dnsperf got), from \`unbound-control stats_noreset\` on the upstream (\`num.query.type.A\` + \`num.query.type.AAAA\`, before and after the run; dnsdist's health check asks for the SOA and is not counted). The same measure for every target; a prefetch counts as an upstream query. **Own counters**, a cross-check: dotproxy \`dotproxy_cache_lookups_total{result=\"hit\"}\` / (hit + miss) from \`--metrics\`; dnsdist \`getCache():printStats()\` Hits / (Hits + Misses) over its console; unbound \`total.num.cachehits\` / (\`cachehits\` + \`cachemiss\`). **entries at end**: \`dotproxy_cache_entries\`, dnsdist's \`Entries\`, unbound's \`msg.cache.count\`."
    echo "- **Start of a run**: a caching instance's run begins at least ${ZIPF_GAP} s (the longest TTL + 1) after its previous Zipf run or warm-up (2 s of these queries), so its cache holds only expired answers: the hit ratio includes the run's cold-start misses and grows with the run's length (a ${SECONDS_RUN} s run here)."
    echo "- **Loads**: \`-q 200\` unpaced gives QPS, CPU and latency at capacity, but a faster target also gets more hits per TTL, so its hit ratio is not comparable across targets; \`-Q $ZIPF_QPS\` gives every target the same rate, and so comparable hit ratios, CPU per answer and latency."
    echo "- **Caches**: dotproxy-cache \`--cache-size 10000\` (default \`--cache-memory 16M\`; prefetch on by default: a hit in the last tenth of an entry's TTL refreshes it in the background; identical queries in flight merged). dnsdist-cache \`newPacketCache(10000, {maxTTL = 86400, minTTL = 0, temporaryFailureTTL = 60, staleTTL = 60, dontAge = false})\`, its other settings dnsdist 1.7's defaults: no prefetch, no merging of identical queries in flight, expired entries removed by the cleaning pass (every 60 s), and the default backend of dnsdist-cache (one query in flight per DoT connection). unbound-fwd-cache: \`prefetch: yes\`, \`msg-cache-size: 16m\`, \`rrset-cache-size: 32m\`, \`extended-statistics: yes\` (for the entry count), otherwise the settings of unbound-fwd-cache. dotproxy without a cache is the reference (its hit ratio is 0)."
    echo "- Time in the Zipf block: $((ZIPF_T / 60)) min $((ZIPF_T % 60)) s, of which ${ZIPF_WAITED} s waiting for the ${ZIPF_GAP} s gap."
    echo
    echo "$ZIPF_TABLE"
}

{
    echo "# dotproxy benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`$BENCH_CMDLINE\` (total wall time $((elapsed / 60)) min $((elapsed % 60)) s)."
    echo
    echo "Filters: $FILTERS"
    echo
    echo "dnsperf (\`-c $CLIENTS\`, \`-t $TIMEOUT\`, \`-v\` for per-query latency) → target → DoT → unbound upstream (one thread, $NAMES-host local zone), all on loopback in a private network namespace. $ROUNDS interleaved round(s) of ${SECONDS_RUN} s per run; the table gives the median over rounds. Daemons are started once and kept running across rounds; peak RSS is VmHWM, reset (\`clear_refs\` 5) before each run."
    echo
    echo "## Machine"
    echo
    echo "- $(nproc) CPUs ($cpu_model), $mem_total, kernel $(uname -r); dnsperf, upstream and target share the CPUs"
    echo "- load average at start / end of the measured runs: $LOAD_AVG_START / $LOAD_AVG_END; CPU used by other processes during the runs (busy time minus target, upstream and dnsperf; includes network softirq): $other_cpu of one CPU"
    echo "- net.core.rmem_max $(cat /proc/sys/net/core/rmem_max)"
    echo
    echo "## Versions"
    echo
    echo "- dotproxy: $ver_dotproxy, git $(git_state), binary \`${DOTPROXY_SRC#"$ROOT"/}\` $bin_size bytes ($(awk -v b="$bin_size" 'BEGIN {printf "%.2f MiB", b / 1048576}')${bin_stripped:+, $bin_stripped}, sha256 $bin_sha…), copied to the work directory at the start"
    echo "- unbound $ver_unbound (upstream and forwarder)"
    echo "- $ver_stubby"
    echo "- $ver_dnsdist"
    echo "- dnsperf $ver_dnsperf"
    echo "- $ver_openssl"
    echo
    echo "## Results"
    echo
    echo "QPS = answered queries per second. × direct DoT = QPS / the median QPS of \`dnsperf -m dot\` straight to the upstream under the same load (run in the same block of each round). Latency percentiles from dnsperf's per-query output (answered queries only). lost = median of queries unanswered within ${TIMEOUT} s. CPU = utime+stime of the target process (all threads) per 1000 answered queries; for the direct rows it is the upstream's."
    echo
    echo "$TABLES"
    echo
    if [ -n "$ZIPF_TABLE" ]; then
        zipf_report_section
        echo
    fi
    echo "## Processes"
    echo
    echo "$STATIC"
    echo
    if [ "$HAVE_CHART" = 1 ]; then
        echo "![QPS and p99 per target](latest.png)"
        echo
    fi
    echo "## Notes"
    echo
    if [ "${#NOTES[@]}" -gt 0 ]; then
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
    if [ -n "$lost_notes" ]; then
        echo "Runs with lost queries or SERVFAIL answers:"
        echo
        echo "$lost_notes"
    else
        echo "- No run lost a query or got a SERVFAIL."
    fi
    echo
    echo "Raw per-run data: \`latest.csv\`."
} >"$OUT/latest.md"

# chart: grouped bars, QPS (k) on top, p99 (ms, log scale) below
if [ "$HAVE_CHART" = 1 ]; then
    ncol=$(head -n 1 "$WORK/plot-qps.dat" | awk -F'"' '{print int(NF / 2)}')
    gnuplot -e "qps='$WORK/plot-qps.dat'; p99='$WORK/plot-p99.dat'; out='$OUT/latest.png'; ncol=$ncol" \
        "$HERE/plot.gp" 2>"$WORK/logs/gnuplot.log" || {
        cat "$WORK/logs/gnuplot.log" >&2
        echo "bench: gnuplot failed; no chart" >&2
    }
fi

echo
echo "$TABLES"
echo
if [ -n "$ZIPF_TABLE" ]; then
    echo "$ZIPF_TABLE"
    echo
fi
echo "$STATIC"
echo
if [ "${#NOTES[@]}" -gt 0 ]; then printf 'note: %s\n' "${NOTES[@]}"; fi
[ -n "$lost_notes" ] && echo "$lost_notes"
log "results: $OUT/latest.md, $OUT/latest.csv$([ "$HAVE_CHART" = 1 ] && echo ", $OUT/latest.png") (${elapsed}s total)"
