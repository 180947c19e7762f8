#!/usr/bin/env bash
# Interleaved A/B benchmark of two dotproxy binaries on this machine, both
# against the same local unbound DoT upstream, all on loopback in a private
# network namespace:
#
#   dnsperf --UDP/TCP--> A or B --DoT (verified, dot.test)--> unbound upstream
#
# Usage (as root, from anywhere):
#   benchmarks/ab.sh [OPTIONS] A_BINARY B_BINARY
# Options:
#   --rounds N         interleaved rounds (default 3); odd rounds run A then B,
#                      even rounds B then A, to cancel drift
#   --seconds S        length of each measured dnsperf run (default 10)
#   --loads "Q..."     dnsperf -q values, queries outstanding (default "200 1000")
#   --scenarios "..."  any of udp tcp cache (default "udp tcp cache")
#   --warmup S         unrecorded dnsperf load after each start (default 2; 0 = none)
#   --labels "A B"     names of the two binaries in the report (default "A B")
#   --tag NAME         appended to the output file names (e.g. musl)
#   --out DIR          results directory (default benchmarks/results)
#   --max-minutes M    stop starting runs after M minutes (default 60); the
#                      report then covers the runs done so far
#   --quiet-wait S     before each run, wait up to S seconds (default 60; 0 =
#                      off) until other processes use under 20 % of one CPU
#                      (1 s samples of /proc/stat; a shared machine's compiles
#                      are the main noise); the run goes ahead after S anyway
#   --busy-max P       a run during which other processes used more than P %
#                      of one CPU (default 40) is repeated, up to
#   --busy-retries R   R times (default 2; 0 = never); the discarded attempts
#                      stay in the CSV as status "retried"
#   --nice N           run everything (upstream, binaries, dnsperf) at nice N
#                      (default 0; e.g. -10 on a machine shared with compiles).
#                      With sched_autogroup on, a process's nice only counts
#                      within its session, so the session's autogroup nice is
#                      set to N as well (it covers the calling shell's session)
#                      and put back at exit
#   --keep             keep the work directory (configs, logs, dnsperf output)
#
# Scenarios (dnsperf -c 10 -q LOAD -t 2 -v, like benchmarks/bench.sh):
#   udp    dnsperf -m udp, the proxy forwarding (no cache), 20,000-line query mix
#   tcp    the same over dnsperf -m tcp
#   cache  dnsperf -m udp, proxy with --cache-size 10000, 200 distinct queries
#          (100 hosts x A/AAAA): after the warm-up nearly every query is a hit
#
# For every round, scenario, load and binary: start the binary afresh
# (--listen 127.0.0.1:PORT --upstream 127.0.0.1:8853#dot.test --ca-file
# certs/ca.pem --timeout 2000 --log-level warn, plus the scenario's flags),
# wait until it answers over UDP and TCP (15 s at most), warm up, run dnsperf
# for S seconds while reading the proxy's utime+stime from /proc/PID/stat,
# read VmHWM (its peak RSS since start) from /proc/PID/status, stop it.
#
# Writes OUT/ab-DATE[-TAG].csv (one row per run, written as it goes) and
# OUT/ab-DATE[-TAG].md (medians over rounds per scenario x load, B/A ratios,
# min-max per round), and prints the tables. Exits 2 on a usage or set-up
# error (missing tool, binary or root). Every process started here is
# stopped by PID from an EXIT trap; the network namespace goes with them.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
DIE_PREFIX="ab: "
REQUIRE_HINT="run benchmarks/install.sh"
LOG_TIMES=1

usage() {
    sed -n '/^# Usage/,/^#   --keep/p' "$0" | sed 's/^# \{0,1\}//'
}
usage_error() {
    echo "ab: error: $*" >&2
    usage >&2
    exit 2
}

# ---------------------------------------------------------------- arguments
ORIG_ARGS=("$@")
ROUNDS=3 SECS=10 LOADS_ARG="200 1000" SCEN_ARG="udp tcp cache" WARMUP=2
LABELS_ARG="A B" TAG="" OUT=$HERE/results MAX_MIN=60 KEEP=0 QUIET_WAIT=60 BUSY_MAX=40 BUSY_RETRIES=2 NICE=0
while [ "$#" -gt 0 ]; do
    case $1 in
        --rounds | --seconds | --loads | --scenarios | --warmup | --labels | --tag | --out | --max-minutes | --quiet-wait | --busy-max | --busy-retries | --nice)
            [ "$#" -ge 2 ] || usage_error "$1 needs a value"
            case $1 in
                --rounds) ROUNDS=$2 ;;
                --seconds) SECS=$2 ;;
                --loads) LOADS_ARG=$2 ;;
                --scenarios) SCEN_ARG=$2 ;;
                --warmup) WARMUP=$2 ;;
                --labels) LABELS_ARG=$2 ;;
                --tag) TAG=$2 ;;
                --out) OUT=$2 ;;
                --max-minutes) MAX_MIN=$2 ;;
                --quiet-wait) QUIET_WAIT=$2 ;;
                --busy-max) BUSY_MAX=$2 ;;
                --busy-retries) BUSY_RETRIES=$2 ;;
                --nice) NICE=$2 ;;
            esac
            shift 2
            ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *) break ;;
    esac
done
[ "$#" -eq 2 ] || usage_error "expected A_BINARY B_BINARY"

int_in() { # VALUE MIN MAX
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]
}
int_in "$ROUNDS" 1 50 || usage_error "--rounds must be 1..50"
int_in "$SECS" 1 600 || usage_error "--seconds must be 1..600"
int_in "$WARMUP" 0 60 || usage_error "--warmup must be 0..60"
int_in "$MAX_MIN" 1 1440 || usage_error "--max-minutes must be 1..1440"
int_in "$QUIET_WAIT" 0 3600 || usage_error "--quiet-wait must be 0..3600"
int_in "$BUSY_MAX" 1 1000 || usage_error "--busy-max must be 1..1000"
int_in "$BUSY_RETRIES" 0 5 || usage_error "--busy-retries must be 0..5"
if ! [[ $NICE =~ ^-?[0-9]+$ ]] || [ "$NICE" -lt -20 ] || [ "$NICE" -gt 19 ]; then usage_error "--nice must be -20..19"; fi
read -r -a LOADS <<<"$LOADS_ARG"
if [ "${#LOADS[@]}" -lt 1 ] || [ "${#LOADS[@]}" -gt 8 ]; then usage_error "--loads: 1 to 8 values"; fi
for q in "${LOADS[@]}"; do int_in "$q" 1 100000 || usage_error "--loads: '$q' is not 1..100000"; done
read -r -a SCENARIOS <<<"$SCEN_ARG"
[ "${#SCENARIOS[@]}" -ge 1 ] || usage_error "--scenarios: at least one"
for s in "${SCENARIOS[@]}"; do
    case $s in udp | tcp | cache) ;; *) usage_error "--scenarios: unknown '$s' (udp tcp cache)" ;; esac
done
read -r LABEL_A LABEL_B rest <<<"$LABELS_ARG"
if [ -z "${LABEL_B:-}" ] || [ -n "${rest:-}" ]; then usage_error "--labels needs two words"; fi
[[ $TAG =~ ^[A-Za-z0-9._-]*$ ]] || usage_error "--tag: letters, digits, . _ - only"

declare -A BIN_SRC=([A]=$(readlink -f "$1" 2>/dev/null || echo "$1") [B]=$(readlink -f "$2" 2>/dev/null || echo "$2"))
for w in A B; do
    if [ ! -f "${BIN_SRC[$w]}" ] || [ ! -x "${BIN_SRC[$w]}" ]; then
        die "$w binary ${BIN_SRC[$w]} is not an executable file"
    fi
done

# the tools, before anything else (exit 2 naming the missing one)
require_tools unshare ip dnsperf unbound unbound-checkconf openssl python3 ss ps timeout sha256sum

# ---------------------------------------------------------------- re-exec
# the exact command for the report, quoted so that it can be pasted
if [ "${AB_IN_NETNS:-}" != 1 ]; then
    AB_QCMDLINE=$0
    for a in "${ORIG_ARGS[@]}"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            AB_QCMDLINE+=" $a"
        elif [[ $a != *\'* ]]; then
            AB_QCMDLINE+=" '$a'"
        else
            AB_QCMDLINE+=" $(printf '%q' "$a")"
        fi
    done
    export AB_QCMDLINE
fi
# as root, in a private network namespace with only loopback (up)
netns_reexec AB -- "${ORIG_ARGS[@]}"

# ---------------------------------------------------------------- set-up
cd "$ROOT"
AUTOGROUP_NICE=""
restore_autogroup() { echo "$AUTOGROUP_NICE" >"/proc/$$/autogroup" 2>/dev/null || true; }
if [ "$NICE" != 0 ]; then
    renice -n "$NICE" -p "$$" >/dev/null || die "renice -n $NICE failed"
    if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0)" = 1 ] &&
        [ -w "/proc/$$/autogroup" ]; then
        AUTOGROUP_NICE=$(awk '{print $NF}' "/proc/$$/autogroup")
        echo "$NICE" >"/proc/$$/autogroup" || die "could not set the autogroup nice to $NICE"
        at_exit restore_autogroup
    fi
fi
abs_path OUT
CLIENTS=10
TIMEOUT=2
NAMES=5000
CLK_TCK=$(getconf CLK_TCK)
UP_PLAIN=5300
UP_DOT=8853
PORT_BASE=5310 # the proxy's port rotates over PORT_BASE.. +39 (no rebind races)
STAMP=$(date -u +%Y%m%d-%H%M)
NAME=ab-$STAMP${TAG:+-$TAG}
CSV=$OUT/$NAME.csv
MD=$OUT/$NAME.md
T0=${AB_T0:-$(date +%s)}
DEADLINE=$((T0 + MAX_MIN * 60))

WORK=$(mktemp -d /tmp/dotproxy-ab.XXXXXX)
mkdir -p "$OUT" "$WORK/certs" "$WORK/generated" "$WORK/logs"
declare -A BIN LABEL=([A]=$LABEL_A [B]=$LABEL_B)
for w in A B; do
    # private copies: a rebuild during the run does not change what runs
    BIN[$w]=$WORK/dotproxy-$w
    cp "${BIN_SRC[$w]}" "${BIN[$w]}"
done
NOTES=()

ab_exit() {
    if [ "$KEEP" = 1 ] || [ "${EXIT_RC:-0}" != 0 ]; then
        echo "ab: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
at_exit stop_tracked 3
at_exit ab_exit

log "work directory $WORK"
run_or_die "$WORK/logs/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK/certs" "dotproxy ab CA"
python3 "$HERE/benchlib.py" zone "$WORK/generated" "$NAMES" | sed 's/^/    /'
# the cache scenario: 100 hosts x A/AAAA, so hits dominate after the warm-up
for ((i = 0; i < 100; i++)); do
    printf 'h%05d.bench.test A\nh%05d.bench.test AAAA\n' "$i" "$i"
done >"$WORK/generated/cache-queries.txt"
declare -A QFILE=([udp]=$WORK/generated/queries.txt [tcp]=$WORK/generated/queries.txt
    [cache]=$WORK/generated/cache-queries.txt)
declare -A DPMODE=([udp]=udp [tcp]=tcp [cache]=udp)

# the upstream: exactly bench.sh's
unbound_conf --comment "DoT upstream: one thread, local data only (bench.test), never recurses." \
    --plain "$UP_PLAIN" --dot "$UP_DOT" certs/server.key certs/server-chain.pem \
    --include generated/bench.test.conf \
    --set "verbosity: 0" --set "so-reuseport: yes" --set "so-rcvbuf: 8m" --set "so-sndbuf: 8m" \
    --set "incoming-num-tcp: 2000" --set "tcp-idle-timeout: 120000" \
    --set "edns-tcp-keepalive-timeout: 120000" --set "stream-wait-size: 64m" \
    >"$WORK/upstream.conf"
unbound_checkconf upstream.conf "$WORK"

probe() { python3 "$HERE/benchlib.py" probe "$1" h00001.bench.test udp tcp; }

log "starting the upstream (unbound, one thread; DoT :$UP_DOT, plain :$UP_PLAIN)"
(cd "$WORK" && exec unbound -d -c upstream.conf) >"$WORK/logs/upstream.log" 2>&1 &
UP_PID=$!
track "$UP_PID"
wait_until "$UP_PID" 15 0.25 probe "$UP_PLAIN" || {
    cat "$WORK/logs/upstream.log" >&2
    die "the upstream did not start"
}

# ---------------------------------------------------------------- helpers
QUIET_MAX_PCT=20
# quiet_wait: until a 1 s sample of the whole machine's busy time is under
# QUIET_MAX_PCT % of one CPU (nothing of ours runs then but the idle
# upstream), QUIET_WAIT seconds at most; PRE_BUSY = the last sample (%)
quiet_wait() {
    local deadline=$((SECONDS + QUIET_WAIT)) b0 b1 waited=0
    while :; do
        b0=$(sys_busy_ticks)
        sleep 1
        b1=$(sys_busy_ticks)
        PRE_BUSY=$(((b1 - b0) * 100 / CLK_TCK))
        [ "$PRE_BUSY" -lt "$QUIET_MAX_PCT" ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            [ "$QUIET_WAIT" -eq 0 ] || echo "    (machine still busy, $PRE_BUSY % of one CPU, after ${QUIET_WAIT}s: running anyway)"
            return 0
        fi
        waited=1
        sleep 1
    done
    [ "$waited" = 0 ] || echo "    (waited $((SECONDS - deadline + QUIET_WAIT))s for a quiet machine: $PRE_BUSY %)"
}
div() { # A B DIGITS: A / B, empty when B is 0
    awk -v a="$1" -v b="$2" -v d="$3" 'BEGIN { if (b > 0) printf "%.*f", d, a / b }'
}

CSV_HEADER="round,scenario,load,binary,label,position,port,status,mode,c,q,seconds,sent,completed,lost,qps,avg_lat_us,p50_us,p99_us,max_us,noerror,nxdomain,servfail,other_rcode,cpu_ticks,cpu_us_per_query,upstream_us_per_query,dnsperf_cpu_ms,vmhwm_kb,vmrss_kb,threads,sys_busy_pct,other_cpu_pct,pre_busy_pct,attempt,busy,started_at"
echo "$CSV_HEADER" >"$CSV"

RUN_NO=0
# run_one ROUND SCENARIO LOAD WHICH(A|B) POSITION(1|2) ATTEMPT FINAL(0|1):
# one run, one CSV row; RETRY=1 when it was too busy and not FINAL
run_one() {
    local round=$1 scen=$2 q=$3 w=$4 pos=$5 attempt=$6 final=$7 busy=0
    RETRY=0
    local port=$((PORT_BASE + RUN_NO % 40)) mode=${DPMODE[$2]} status=ok
    local -a cmd=("${BIN[$w]}" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$UP_DOT#dot.test"
        --ca-file certs/ca.pem --timeout 2000 --log-level warn)
    [ "$scen" = cache ] && cmd+=(--cache-size 10000)
    RUN_NO=$((RUN_NO + 1))
    is_running "$UP_PID" || die "the upstream died (see $WORK/logs/upstream.log)"
    PRE_BUSY=""
    quiet_wait

    local logf=$WORK/logs/$w-r$round-$scen-q$q.log pid
    echo "${cmd[*]}" >"$logf"
    (cd "$WORK" && exec "${cmd[@]}") >>"$logf" 2>&1 &
    pid=$!
    track "$pid"
    local -A r=()
    local c0=0 c1=0 u0=0 u1=0 s0=0 s1=0 d0=0 d1=0 w0 w1 hwm="" rss="" thr="" started
    started=$(date -u +%FT%TZ)
    if ! wait_until "$pid" 15 0.1 probe "$port"; then
        status=nostart
        echo "ab: $w (${LABEL[$w]}) did not answer on :$port within 15 s; last log lines:" >&2
        tail -n 10 "$logf" >&2 || true
        NOTES+=("round $round, $scen -q $q: ${LABEL[$w]} did not answer within 15 s of its start (log: $(tail -n 1 "$logf" | cut -c1-200)).")
    else
        if [ "$WARMUP" -gt 0 ]; then
            timeout $((WARMUP + TIMEOUT + 20)) dnsperf -m "$mode" -s 127.0.0.1 -p "$port" \
                -d "${QFILE[$scen]}" -l "$WARMUP" -c "$CLIENTS" -q 200 -t "$TIMEOUT" \
                >/dev/null 2>&1 || true
        fi
        local out=$WORK/dnsperf.out
        children_cpu_ms d0
        c0=$(cpu_ticks "$pid") u0=$(cpu_ticks "$UP_PID") s0=$(sys_busy_ticks) w0=$(date +%s%N)
        timeout $((SECS + TIMEOUT + 30)) dnsperf -m "$mode" -s 127.0.0.1 -p "$port" \
            -d "${QFILE[$scen]}" -l "$SECS" -c "$CLIENTS" -q "$q" -t "$TIMEOUT" -v \
            >"$out" 2>&1 || true
        c1=$(cpu_ticks "$pid") u1=$(cpu_ticks "$UP_PID") s1=$(sys_busy_ticks) w1=$(date +%s%N)
        children_cpu_ms d1
        if is_running "$pid"; then
            hwm=$(proc_status "$pid" VmHWM) rss=$(proc_status "$pid" VmRSS) thr=$(proc_status "$pid" Threads)
        else
            status=died
            NOTES+=("round $round, $scen -q $q: ${LABEL[$w]} exited during the run (log: $(tail -n 1 "$logf" | cut -c1-200)).")
        fi
        local k v
        while IFS='=' read -r k v; do r[$k]=$v; done < <(python3 "$HERE/benchlib.py" parse "$out")
        if [ "$KEEP" = 1 ]; then
            mv "$out" "$WORK/logs/dnsperf-$w-r$round-$scen-q$q.out"
        else
            rm -f "$out"
        fi
    fi
    stop_pid "$pid" 3
    wait "$pid" 2>/dev/null || true
    untrack "$pid"

    local completed=${r[completed]:-0} cpu_us="" up_us="" avg_us="" dp_ms=$((d1 - d0))
    local wall_ms=1 busy_pct="" other_pct=""
    [ -n "${w0:-}" ] && wall_ms=$(((w1 - w0) / 1000000))
    [ "$wall_ms" -gt 0 ] || wall_ms=1
    if [ "$status" = ok ] && [ "$completed" -gt 0 ]; then
        cpu_us=$(div "$(((c1 - c0) * 1000000 / CLK_TCK))" "$completed" 2)
        up_us=$(div "$(((u1 - u0) * 1000000 / CLK_TCK))" "$completed" 2)
        local busy_ms=$(((s1 - s0) * 1000 / CLK_TCK))
        local own_ms=$((((c1 - c0) + (u1 - u0)) * 1000 / CLK_TCK + dp_ms))
        busy_pct=$((busy_ms * 100 / wall_ms))
        other_pct=$(((busy_ms - own_ms) * 100 / wall_ms))
    elif [ "$status" = ok ]; then
        status=noanswers
        NOTES+=("round $round, $scen -q $q: ${LABEL[$w]} answered no query.")
    fi
    if [ -n "$other_pct" ] && [ "$other_pct" -gt "$BUSY_MAX" ]; then
        busy=1
        if [ "$status" = ok ] && [ "$final" = 0 ]; then
            status=retried
            RETRY=1
        fi
    fi
    [ -n "${r[avg_lat_s]:-}" ] && avg_us=$(awk -v s="${r[avg_lat_s]}" 'BEGIN {printf "%.0f", s * 1e6}')
    echo "$round,$scen,$q,$w,${LABEL[$w]},$pos,$port,$status,$mode,$CLIENTS,$q,$SECS,${r[sent]:-},${r[completed]:-},${r[lost]:-},${r[qps]:-},$avg_us,${r[p50_us]:-},${r[p99_us]:-},${r[max_us]:-},${r[noerror]:-},${r[nxdomain]:-},${r[servfail]:-},${r[other_rcode]:-},$((c1 - c0)),$cpu_us,$up_us,$dp_ms,$hwm,$rss,$thr,$busy_pct,$other_pct,$PRE_BUSY,$attempt,$busy,$started" >>"$CSV"
    printf '    r%s %-5s -q %-5s %s %-8s %-9s %9s qps  avg %6s us  p99 %7s us  lost %5s  cpu %7s us/q  hwm %6s kB  other-cpu %s%%\n' \
        "$round" "$scen" "$q" "$w" "${LABEL[$w]}" "$status" "${r[qps]:-?}" "${avg_us:-?}" "${r[p99_us]:-?}" \
        "${r[lost]:-?}" "${cpu_us:-?}" "${hwm:-?}" "${other_pct:-?}"
    sleep 1
}

# ---------------------------------------------------------------- runs
nruns=$((ROUNDS * ${#SCENARIOS[@]} * ${#LOADS[@]} * 2))
RETRY=0
eta=$((nruns * (SECS + WARMUP + 4) / 60 + 1))
log "A = ${LABEL[A]}: ${BIN_SRC[A]}"
log "B = ${LABEL[B]}: ${BIN_SRC[B]}"
log "$ROUNDS round(s) x ${#SCENARIOS[@]} scenario(s) x ${#LOADS[@]} load(s) x 2 binaries = $nruns runs of ${SECS}s (about $eta min; at most $MAX_MIN)"
LOAD_AVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
STOPPED_EARLY=""
for ((round = 1; round <= ROUNDS; round++)); do
    if [ $((round % 2)) = 1 ]; then order=(A B); else order=(B A); fi
    for scen in "${SCENARIOS[@]}"; do
        for q in "${LOADS[@]}"; do
            log "round $round/$ROUNDS: $scen -c $CLIENTS -q $q, ${SECS}s: ${order[0]} then ${order[1]}"
            for pos in 1 2; do
                if [ "$(date +%s)" -ge "$DEADLINE" ]; then
                    STOPPED_EARLY="--max-minutes $MAX_MIN reached in round $round; later runs were not made."
                    break 4
                fi
                for ((att = 1; att <= BUSY_RETRIES + 1; att++)); do
                    final=0
                    if [ "$att" -gt "$BUSY_RETRIES" ] || [ "$(date +%s)" -ge "$DEADLINE" ]; then final=1; fi
                    run_one "$round" "$scen" "$q" "${order[$((pos - 1))]}" "$pos" "$att" "$final"
                    [ "$RETRY" = 1 ] || break
                done
            done
        done
    done
done
LOAD_AVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
[ -n "$STOPPED_EARLY" ] && NOTES+=("$STOPPED_EARLY")
is_running "$UP_PID" || NOTES+=("the upstream was not running at the end.")

# ---------------------------------------------------------------- report
bin_facts() { # WHICH: one line about the binary
    local f=${BIN[$1]} kind ver
    ver=$("$f" --version 2>/dev/null | head -n 1 || echo '?')
    kind=$(file -b "$f" 2>/dev/null || true)
    case $kind in *"static-pie"* | *"statically linked"*) kind="static" ;; *dynamic*) kind="dynamic" ;; *) kind="?" ;; esac
    echo "$ver, \`${BIN_SRC[$1]}\`, $(stat -c %s "$f") bytes, $kind, sha256 $(sha256sum "$f" | cut -c1-12)…"
}
elapsed=$(($(date +%s) - T0))
other_cpu=$(python3 - "$CSV" <<'EOF'
import csv, statistics, sys
v = [int(r["other_cpu_pct"]) for r in csv.DictReader(open(sys.argv[1])) if r["other_cpu_pct"]]
print(f"median {statistics.median(v):.0f} %, max {max(v)} % of one CPU" if v else "?")
EOF
)

TABLES=$(python3 - "$CSV" "${LABEL[A]}" "${LABEL[B]}" <<'EOF'
import csv, statistics, sys
path, la, lb = sys.argv[1:4]
rows = list(csv.DictReader(open(path)))
ok = [r for r in rows if r["status"] == "ok"]
keys = []
for r in rows:
    k = (r["scenario"], int(r["load"]))
    if k not in keys:
        keys.append(k)

def f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def vals(scen, load, w, key):
    return [f(r[key]) for r in ok if r["scenario"] == scen and int(r["load"]) == load
            and r["binary"] == w and f(r[key]) is not None]

def med(v):
    return statistics.median(v) if v else None

def paired(scen, load, key):
    """B/A per round, both runs of the round ok"""
    out = []
    for rnd in sorted({r["round"] for r in ok}, key=int):
        a = [f(r[key]) for r in ok if r["round"] == rnd and r["scenario"] == scen
             and int(r["load"]) == load and r["binary"] == "A"]
        b = [f(r[key]) for r in ok if r["round"] == rnd and r["scenario"] == scen
             and int(r["load"]) == load and r["binary"] == "B"]
        if a and b and a[0] and b[0] is not None:
            out.append(b[0] / a[0])
    return out

METRICS = (("qps", "QPS", lambda v: f"{v:,.0f}"),
           ("cpu_us_per_query", "CPU µs/query", lambda v: f"{v:.2f}"),
           ("vmhwm_kb", "peak RSS MiB", lambda v: f"{v / 1024:.2f}"))
LAT = (("avg_lat_us", "avg latency µs", lambda v: f"{v:,.0f}"),
       ("p99_us", "p99 latency µs", lambda v: f"{v:,.0f}"))

def fmt(fn, v):
    return "—" if v is None else fn(v)

def ratio(a, b):
    return "—" if a in (None, 0) or b is None else f"{b / a:.3f}"

def main_table(metrics, title):
    h = "| scenario | -q | n A/B |"
    s = "|---|---:|---:|"
    for _, name, _ in metrics:
        h += f" {name} {la} | {name} {lb} | B/A |"
        s += "---:|---:|---:|"
    lines = [title, "", h, s]
    for scen, load in keys:
        na = len(vals(scen, load, "A", "qps"))
        nb = len(vals(scen, load, "B", "qps"))
        line = f"| {scen} | {load} | {na}/{nb} |"
        for key, _, fn in metrics:
            a, b = med(vals(scen, load, "A", key)), med(vals(scen, load, "B", key))
            line += f" {fmt(fn, a)} | {fmt(fn, b)} | **{ratio(a, b)}** |"
        lines.append(line)
    return "\n".join(lines)

def noise_table():
    lines = ["Spread over rounds: min–max of each binary's runs, the B/A ratio within each round (min–max), and A's own spread (max−min)/median.", "",
             "| scenario | -q | metric | " + la + " min–max | " + lb + " min–max | B/A per round | " + la + " spread |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for scen, load in keys:
        for key, name, fn in METRICS + LAT:
            a, b = vals(scen, load, "A", key), vals(scen, load, "B", key)
            p = paired(scen, load, key)
            rng = lambda v: f"{fn(min(v))}–{fn(max(v))}" if v else "—"  # noqa: E731
            pr = f"{min(p):.3f}–{max(p):.3f}" if p else "—"
            sp = f"{(max(a) - min(a)) / med(a) * 100:.1f} %" if a and med(a) else "—"
            lines.append(f"| {scen} | {load} | {name} | {rng(a)} | {rng(b)} | {pr} | {sp} |")
    return "\n".join(lines)

print(main_table(METRICS, f"Medians over rounds; B/A = median {lb} / median {la} (below 1 is better for CPU and RSS, above 1 for QPS)."))
print()
print(main_table(LAT, "Latency (dnsperf, answered queries; medians over rounds):"))
print()
print(noise_table())
bad = [r for r in rows if r["status"] not in ("ok", "retried")]
retried = [r for r in rows if r["status"] == "retried"]
still_busy = [r for r in ok if r.get("busy") == "1"]
lost = [r for r in ok if (f(r["lost"]) or 0) > 0 or (f(r["servfail"]) or 0) > 0]
print()
if bad:
    print("Runs that failed: " + "; ".join(f"round {r['round']} {r['scenario']} -q {r['load']} {r['label']}: {r['status']}" for r in bad) + ".")
else:
    print("Every run started, answered and stayed up.")
print()
print(f"{len(retried)} run(s) were repeated because other processes used more than the --busy-max share of a CPU meanwhile (status `retried` in the CSV, not in the tables)"
      + (f"; {len(still_busy)} counted run(s) were still that busy after the last retry: "
         + "; ".join(f"round {r['round']} {r['scenario']} -q {r['load']} {r['label']} ({r['other_cpu_pct']} %)" for r in still_busy)
         if still_busy else "; every counted run was under it") + ".")
if lost:
    print()
    print("Runs with lost queries or SERVFAIL: " + "; ".join(
        f"round {r['round']} {r['scenario']} -q {r['load']} {r['label']}: {r['lost']} lost, {r['servfail']} SERVFAIL of {r['sent']}" for r in lost) + ".")
else:
    print()
    print("No run lost a query or got a SERVFAIL.")
EOF
)

{
    echo "# dotproxy A/B — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`${AB_QCMDLINE:-benchmarks/ab.sh}\` (wall time $((elapsed / 60)) min $((elapsed % 60)) s)."
    echo
    echo "- **A** = ${LABEL[A]}: $(bin_facts A)"
    echo "- **B** = ${LABEL[B]}: $(bin_facts B)"
    echo
    echo "dnsperf (\`-c $CLIENTS -q LOAD -t $TIMEOUT -v\`, LOAD = queries outstanding, no rate limit, as in bench.sh) → A or B → DoT, verified → unbound $(unbound_version) (one thread, $NAMES-host local zone, kept running for every run), on loopback in a private network namespace. $ROUNDS interleaved round(s): per scenario and load, odd rounds run A then B, even rounds B then A. Each run starts the binary afresh (\`--timeout 2000 --log-level warn\`; \`cache\` adds \`--cache-size 10000\`), waits for a UDP and a TCP answer, warms up ${WARMUP} s (\`-q 200\`, not recorded), then runs ${SECS} s. CPU = the proxy's utime+stime (\`/proc/PID/stat\`, $CLK_TCK Hz ticks) during the ${SECS} s, per answered query. Peak RSS = VmHWM at the end of the run (peak since its start, warm-up included)."
    echo
    echo "Scenarios: \`udp\` and \`tcp\` (\`dnsperf -m tcp\`) send bench.sh's 20,000-line query mix (A, AAAA, TXT, NXDOMAIN); \`cache\` sends 200 distinct queries (100 hosts × A/AAAA) over UDP, so after the warm-up nearly all are cache hits (see the upstream CPU per query in the CSV)."
    echo
    echo "Machine: $(nproc) CPUs ($(cpu_model)), kernel $(uname -r); dnsperf, the upstream and the proxy share them. Load average at start / end: $LOAD_AVG_START / $LOAD_AVG_END. CPU used by other processes during the runs (busy time minus proxy, upstream and dnsperf; includes network softirq): $other_cpu. Before each run the script waited up to ${QUIET_WAIT} s for the machine to be under ${QUIET_MAX_PCT} % of one CPU busy (\`pre_busy_pct\` in the CSV); a run during which other processes used more than ${BUSY_MAX} % of one CPU was repeated up to ${BUSY_RETRIES} times (\`busy\`, \`attempt\`). Everything here ran at nice $(ps -o ni= -p $$ | tr -d ' ')$([ -n "$AUTOGROUP_NICE" ] && echo ", autogroup nice $(awk '{print $NF}' "/proc/$$/autogroup")"). dnsperf $(dnsperf_version)."
    echo
    echo "## Results"
    echo
    echo "$TABLES"
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "## Notes"
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
    echo
    echo "Raw per-run data: \`$NAME.csv\`."
} >"$MD"

echo
echo "$TABLES"
[ "${#NOTES[@]}" -eq 0 ] || printf 'note: %s\n' "${NOTES[@]}"
log "results: $MD, $CSV (${elapsed}s total)"
