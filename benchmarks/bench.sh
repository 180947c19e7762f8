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
#   stubby            stubby / getdns
#   dnsdist           dnsdist, default backend (one query in flight per conn)
#   dnsdist-inflight  dnsdist, maxInFlight = 100
#   unbound-fwd       unbound as forwarder, forward-tls-upstream, no cache
# With BENCH_CACHE=1 also: dnsdist-cache, unbound-fwd-cache and, if
# `dotproxy --help` mentions --cache-size, dotproxy-cache.
#
# Usage (as root, from anywhere):   benchmarks/bench.sh
# Environment:
#   DOTPROXY=path         binary under test (default target/release/dotproxy)
#   BENCH_SECONDS=10      length of each dnsperf run
#   BENCH_ROUNDS=3        interleaved rounds (median over rounds is reported)
#   BENCH_QUICK=1         1 round of 3 s (development)
#   BENCH_CACHE=1         add the caching variants
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
    BENCH_LATENCY_ALL BENCH_LOW_CLIENTS BENCH_TIMEOUT BENCH_NAMES BENCH_KEEP BENCH_OUT -- "$@"

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

require_tools unbound unbound-checkconf stubby dnsdist dnsperf openssl python3 gnuplot ss ps timeout
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

# dnsdist_conf PORT EXTRA_SERVER_OPTION EXTRA_LINES
dnsdist_conf() {
    cat <<EOF
setLocal("127.0.0.1:$1")
setACL({"127.0.0.0/8"})
-- no security polling (it would query through the system resolver)
setSecurityPollSuffix("")
-- 4 MB UDP socket buffers (net.core.rmem_max here is 4 MB)
setUDPSocketBufferSizes(4194304, 4194304)
newServer({
  address = "127.0.0.1:8853",
  tls = "openssl",
  subjectName = "dot.test",
  caStore = "certs/ca.pem",
  validateCertificates = true,$2
  checkName = "h00000.bench.test.",
  checkType = "A",
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

# unbound_fwd_conf PORT NO_CACHE(yes|no): unbound as a forwarder to the upstream
unbound_fwd_conf() {
    unbound_conf --plain "$1" --forward 127.0.0.1@8853#dot.test certs/ca.pem --forward-no-cache "$2" \
        --set "verbosity: 0" --set "incoming-num-tcp: 1000" --set "so-rcvbuf: 4m" --set "so-sndbuf: 4m" \
        --set "outgoing-num-tcp: 64" --set "tcp-reuse-timeout: 60000"
}
unbound_fwd_conf 5303 yes >"$WORK/unbound-fwd.conf"
unbound_fwd_conf 5305 no >"$WORK/unbound-fwd-cache.conf"

for f in upstream unbound-fwd unbound-fwd-cache; do
    unbound_checkconf "$f.conf" "$WORK"
done

# ---------------------------------------------------------------- targets
DOTPROXY_HAS_CACHE=0
help_text=$("$DOTPROXY" --help 2>&1 || true)
case $help_text in *--cache-size*) DOTPROXY_HAS_CACHE=1 ;; esac

TARGETS=(direct-plain direct-dot dotproxy stubby dnsdist dnsdist-inflight unbound-fwd)
if [ "${BENCH_CACHE:-0}" = 1 ]; then
    if [ "$DOTPROXY_HAS_CACHE" = 1 ]; then
        TARGETS+=(dotproxy-cache)
    else
        NOTES+=("BENCH_CACHE=1: \`dotproxy --help\` does not mention \`--cache-size\`, so dotproxy-cache was not run.")
    fi
    TARGETS+=(dnsdist-cache unbound-fwd-cache)
fi
ALL_ORDER=(direct-plain direct-dot dotproxy stubby dnsdist dnsdist-inflight unbound-fwd dotproxy-cache dnsdist-cache unbound-fwd-cache)

PORT_OF=([direct-plain]=5300 [direct-dot]=8853 [stubby]=5301 [dnsdist]=5302 [unbound-fwd]=5303
    [dnsdist-cache]=5304 [unbound-fwd-cache]=5305 [dnsdist-inflight]=5306 [dotproxy]=5310
    [dotproxy-cache]=5311)

# start_target NAME: start the daemon in $WORK, logs in $WORK/logs/NAME.log
start_target() {
    local name=$1 port=${PORT_OF[$1]}
    local -a cmd
    case $name in
        upstream) cmd=(unbound -d -c upstream.conf) ;;
        dotproxy) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8853#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn) ;;
        dotproxy-cache) cmd=("$DOTPROXY" --listen "127.0.0.1:$port" --upstream "127.0.0.1:8853#dot.test"
            --ca-file certs/ca.pem --timeout 2000 --log-level warn --cache-size 10000) ;;
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

# wait_ready NAME PORT: a probe over UDP and one over TCP answer NOERROR
# (within 15 s)
wait_ready() {
    wait_until "${PID_OF[$1]}" 15 0.25 python3 "$HERE/benchlib.py" probe "$2" h00001.bench.test udp tcp
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

RUN_TARGETS=()
for t in "${TARGETS[@]}"; do
    case $t in
        direct-*) RUN_TARGETS+=("$t"); continue ;;
    esac
    log "starting $t on 127.0.0.1:${PORT_OF[$t]}"
    start_target "$t"
    if wait_ready "$t" "${PORT_OF[$t]}"; then
        RUN_TARGETS+=("$t")
        IDLE_RSS[$t]=$(proc_status "${PID_OF[$t]}" VmRSS)
        RCVBUF[$t]=$(udp_rcvbuf "${PORT_OF[$t]}")
    else
        FAILED_START[$t]=1
        echo "bench: $t did not answer within 15 s; skipped. Last log lines:" >&2
        tail -n 20 "$WORK/logs/$t.log" >&2 || true
        NOTES+=("$t failed to start (no NOERROR answer within 15 s); it was skipped.")
    fi
done

# ---------------------------------------------------------------- runs
CSV_HEADER="round,kind,target,load_mode,mode,c,q,Q,seconds,sent,completed,lost,qps,p50_us,p90_us,p99_us,p999_us,max_us,noerror,nxdomain,servfail,other_rcode,cpu_ms,cpu_ms_per_1k,upstream_cpu_ms_per_1k,dnsperf_cpu_ms,sys_busy_pct,other_cpu_pct,vmhwm_kb,vmrss_kb,threads,started_at"
echo "$CSV_HEADER" >"$CSV_TMP"

# run_one ROUND KIND TARGET LOAD_MODE Q QPS_LIMIT(0=none)
run_one() {
    local round=$1 kind=$2 t=$3 lmode=$4 q=$5 qlim=$6
    local port=${PORT_OF[$t]} pid=${PID_OF[$t]} mode=$lmode
    local -a extra=()
    case $t in direct-dot) mode=dot ;; esac
    [ "$qlim" != 0 ] && extra=(-Q "$qlim")
    if ! is_running "$pid"; then
        echo "    $t is not running any more: run skipped"
        NOTES+=("$t died before a $kind run ($lmode -q $q, round $round).")
        return 0
    fi
    echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true # reset VmHWM
    local started c0 u0 s0 d0 c1 u1 s1 d1 out=$WORK/dnsperf.out
    local clients=$CLIENTS w0 w1
    [ "$kind" = latency ] && clients=$LOW_CLIENTS
    started=$(date -u +%FT%TZ)
    children_cpu_ms d0
    c0=$(cpu_ticks "$pid") u0=$(cpu_ticks "$UP_PID") s0=$(sys_busy_ticks) w0=$(date +%s%N)
    timeout $((SECONDS_RUN + TIMEOUT + 30)) dnsperf -m "$mode" -s 127.0.0.1 -p "$port" \
        -d "$QUERIES" -l "$SECONDS_RUN" -c "$clients" -q "$q" "${extra[@]}" -t "$TIMEOUT" -v \
        >"$out" 2>&1 || true
    c1=$(cpu_ticks "$pid") u1=$(cpu_ticks "$UP_PID") s1=$(sys_busy_ticks) w1=$(date +%s%N)
    children_cpu_ms d1
    local hwm rss thr
    hwm=$(proc_status "$pid" VmHWM) rss=$(proc_status "$pid" VmRSS) thr=$(proc_status "$pid" Threads)
    local -A r=()
    local k v
    while IFS='=' read -r k v; do r[$k]=$v; done < <(python3 "$HERE/benchlib.py" parse "$out")
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        cp "$out" "$WORK/logs/dnsperf-r$round-$kind-$t-$lmode-q$q.out"
    fi
    local completed=${r[completed]:-0}
    local cpu_ms=$(((c1 - c0) * 1000 / CLK_TCK))
    local up_ms=$(((u1 - u0) * 1000 / CLK_TCK))
    local dp_ms=$((d1 - d0))
    local wall_ms=$(((w1 - w0) / 1000000))
    [ "$wall_ms" -gt 0 ] || wall_ms=1
    local busy_ms=$(((s1 - s0) * 1000 / CLK_TCK))
    local own_ms=$((cpu_ms + dp_ms))
    [ "$pid" != "$UP_PID" ] && own_ms=$((own_ms + up_ms))
    local cpu1k="" up1k="" busy_pct other_pct
    if [ "$completed" -gt 0 ]; then
        cpu1k=$(awk -v c="$cpu_ms" -v n="$completed" 'BEGIN {printf "%.2f", c * 1000 / n}')
        up1k=$(awk -v c="$up_ms" -v n="$completed" 'BEGIN {printf "%.2f", c * 1000 / n}')
    fi
    busy_pct=$((busy_ms * 100 / wall_ms))
    other_pct=$(((busy_ms - own_ms) * 100 / wall_ms))
    echo "$round,$kind,$t,$lmode,$mode,$clients,$q,$qlim,$SECONDS_RUN,${r[sent]:-},${r[completed]:-},${r[lost]:-},${r[qps]:-},${r[p50_us]:-},${r[p90_us]:-},${r[p99_us]:-},${r[p999_us]:-},${r[max_us]:-},${r[noerror]:-},${r[nxdomain]:-},${r[servfail]:-},${r[other_rcode]:-},$cpu_ms,$cpu1k,$up1k,$dp_ms,$busy_pct,$other_pct,$hwm,$rss,$thr,$started" >>"$CSV_TMP"
    printf '    %-16s %-4s -q %-4s %s %9s qps  p50 %6s us  p99 %7s us  lost %5s  servfail %s  cpu %6s ms/1k  hwm %6s kB  thr %s  other-cpu %s%%\n' \
        "$t" "$mode" "$q" "$([ "$qlim" != 0 ] && echo "-Q $qlim" || echo "       ")" \
        "${r[qps]%.*}" "${r[p50_us]:-?}" "${r[p99_us]:-?}" "${r[lost]:-?}" "${r[servfail]:-?}" \
        "${cpu1k:-?}" "${hwm:-?}" "${thr:-?}" "$other_pct"
    rm -f "$out"
    sleep 1
}

LOADS=("udp 200" "udp 1000" "tcp 200" "tcp 1000")
LAT_TARGETS=("direct-plain udp" "direct-plain tcp" "direct-dot dot" "dotproxy udp" "dotproxy tcp")
if [ "${BENCH_LATENCY_ALL:-0}" = 1 ]; then
    for t in stubby dnsdist dnsdist-inflight unbound-fwd; do LAT_TARGETS+=("$t udp"); done
fi
nt=${#RUN_TARGETS[@]}
runs_per_round=$((nt * ${#LOADS[@]} + ${#LAT_TARGETS[@]}))
eta=$((ROUNDS * runs_per_round * (SECONDS_RUN + 3) / 60 + 1))
log "targets: ${RUN_TARGETS[*]}"
log "$ROUNDS round(s) x $runs_per_round runs of ${SECONDS_RUN}s (about $eta min)"

# short unrecorded warm-up: connections up, caches (where any) filled
log "warm-up"
for t in "${RUN_TARGETS[@]}"; do
    mode=udp
    [ "$t" = direct-dot ] && mode=dot
    timeout 30 dnsperf -m "$mode" -s 127.0.0.1 -p "${PORT_OF[$t]}" -d "$QUERIES" \
        -l 2 -c "$CLIENTS" -q 200 -t "$TIMEOUT" >/dev/null 2>&1 || true
done
sleep 1

LOAD_AVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    li=0
    for load in "${LOADS[@]}"; do
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
    log "round $round/$ROUNDS: low load -c $LOW_CLIENTS -Q $LOW_QPS, ${SECONDS_RUN}s"
    for lt in "${LAT_TARGETS[@]}"; do
        set -- $lt
        [ -n "${FAILED_START[$1]:-}" ] && continue
        run_one "$round" latency "$1" "$2" 100 "$LOW_QPS"
    done
done
LOAD_AVG_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
log "writing the report"
for t in upstream "${RUN_TARGETS[@]}"; do
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
for t in upstream "${RUN_TARGETS[@]}"; do
    case $t in direct-*) continue ;; esac
    peak=$(python3 - "$OUT/latest.csv" "$t" <<'EOF'
import csv, sys
path, t = sys.argv[1], sys.argv[2]
hwm, thr = [], []
for r in csv.DictReader(open(path)):
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

{
    echo "# dotproxy benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`$BENCH_CMDLINE\` (total wall time $((elapsed / 60)) min $((elapsed % 60)) s)."
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
    echo "## Processes"
    echo
    echo "$STATIC"
    echo
    echo "![QPS and p99 per target](latest.png)"
    echo
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
ncol=$(head -n 1 "$WORK/plot-qps.dat" | awk -F'"' '{print int(NF / 2)}')
gnuplot -e "qps='$WORK/plot-qps.dat'; p99='$WORK/plot-p99.dat'; out='$OUT/latest.png'; ncol=$ncol" \
    "$HERE/plot.gp" 2>"$WORK/logs/gnuplot.log" || {
    cat "$WORK/logs/gnuplot.log" >&2
    echo "bench: gnuplot failed; no chart" >&2
}

echo
echo "$TABLES"
echo
echo "$STATIC"
echo
if [ "${#NOTES[@]}" -gt 0 ]; then printf 'note: %s\n' "${NOTES[@]}"; fi
[ -n "$lost_notes" ] && echo "$lost_notes"
log "results: $OUT/latest.md, $OUT/latest.csv, $OUT/latest.png (${elapsed}s total)"
