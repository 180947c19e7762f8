#!/usr/bin/env bash
# End-to-end check of a DNS -> DNS-over-TLS proxy against real third-party
# software, loopback only:
#
#   dig / kdig / mdig / dnsperf  --UDP+TCP-->  BIN  --DoT-->  unbound
#
# Usage: tests/peers/run.sh BIN
#
# BIN is started as
#   BIN --listen 127.0.0.1:PORT --upstream 127.0.0.1:DOTPORT#dot.test \
#       --ca-file CA.pem --timeout 2000 --log-level info
#
# Needs: unbound, dig + mdig (dnsutils), kdig (knot-dnsutils), dnsperf,
# openssl, ss (iproute2), ps (procps), timeout (coreutils), curl, promtool
# (prometheus), unbound-control (unbound), stubby (the DoT listener's checks
# fail without it); optional: tcpdump, python3.
#
# Everything is bounded: each client call runs under timeout(1), each wait
# loop has a deadline, and every process started here is killed by PID from
# an EXIT trap. Prints one PASS/FAIL line per check and exits non-zero if any
# check failed (or 2 on a setup error).
#
# Environment:
#   PEERS_KEEP=1        keep the temporary work directory
#   PEERS_DURATION=5    dnsperf run length in seconds
#   PEERS_QPS=2000      dnsperf rate limit (-Q)
#   PEERS_CAPTURE=0     skip the padding-on-the-wire check (tcpdump)
#   PEERS_DOT_LISTENER=0  skip dot-listener.sh (for a BIN without
#                       --listen-tls, e.g. unbound-shim.sh)
#   PEERS_FEATURES=0    skip features.sh (e.g. for unbound-shim.sh, which has
#                       no cache, pins, forwarding or --config)
#
# The checks of dotproxy's own DoT listener (--listen-tls, --client-ca)
# against kdig, openssl s_client, dnsperf -m dot and stubby are in
# dot-listener.sh, sourced from here.
#
# The checks of the newer features (cache, SPKI pins, --forward, --config
# and SIGHUP, padding on the wire, edns-tcp-keepalive, plain upstreams for
# forward zones with --watch-config) are in features.sh,
# sourced from here. The padding check needs tcpdump and python3 and root
# (capture on lo); without them it is skipped, not failed.
set -euo pipefail
LIB=$(dirname "$(readlink -f "$0")")/../../scripts/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
# shellcheck source=scripts/lib/dig.sh
. "$LIB/dig.sh"
# shellcheck source=scripts/lib/unbound.sh
. "$LIB/unbound.sh"
# shellcheck source=scripts/lib/dot-certs.sh
. "$LIB/dot-certs.sh"

if [ "$#" -ne 1 ]; then
    echo "usage: $0 PATH/TO/dotproxy" >&2
    exit 2
fi
BIN=$1
case $BIN in
    */*) ;;
    *) BIN=./$BIN ;;
esac
if [ ! -x "$BIN" ]; then
    echo "error: $BIN is not an executable file" >&2
    exit 2
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

DURATION=${PEERS_DURATION:-5}
QPS=${PEERS_QPS:-2000}
ZONE=peers.test
NAMES=500
TXT_RECORDS=30

require_tools unbound dig mdig kdig dnsperf openssl ss ps timeout

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dotproxy-peers.XXXXXX")
PROXY_PID=
UNBOUND_PID=

peers_exit() {
    if [ "$EXIT_RC" -ne 0 ] && [ -d "$WORK" ]; then
        show_logs 200 "$WORK"/proxy*.log "$WORK"/unbound.log
    fi
    if [ "${PEERS_KEEP:-0}" = 1 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
at_exit stop_tracked 2
at_exit peers_exit

# ---------------------------------------------------------------- ports
# pick_port VAR (scripts/lib/common.sh): a free loopback port

# ---------------------------------------------------------------- certificates
log "work directory: $WORK"
log "generating a private CA and a certificate for dot.test"
run_or_die "$WORK/openssl.log" "certificate generation failed" \
    make_dot_certs "$WORK" "dotproxy peers test CA"
CA=$WORK/ca.pem

# ---------------------------------------------------------------- zone
log "writing zone $ZONE ($NAMES names, $TXT_RECORDS TXT records on big.$ZONE)"
{
    printf '    local-zone: "%s." static\n' "$ZONE"
    printf "    local-data: '%s. 300 IN SOA ns.%s. hostmaster.%s. 1 3600 600 86400 300'\n" \
        "$ZONE" "$ZONE" "$ZONE"
    printf "    local-data: '%s. 300 IN NS ns.%s.'\n" "$ZONE" "$ZONE"
    printf "    local-data: 'ns.%s. 300 IN A 192.0.2.53'\n" "$ZONE"
    printf "    local-data: 'a.%s. 300 IN A 192.0.2.10'\n" "$ZONE"
    printf "    local-data: 'aaaa.%s. 300 IN AAAA 2001:db8::10'\n" "$ZONE"
    filler=$(printf '%0100d' 0 | tr 0 x)
    for ((i = 0; i < TXT_RECORDS; i++)); do
        # 100 bytes of text per record, each one distinct
        txt=$(printf 'txt-%02d-%s' "$i" "$filler")
        printf "    local-data: 'big.%s. 300 IN TXT \"%s\"'\n" "$ZONE" "${txt:0:100}"
    done
    for ((i = 0; i < NAMES; i++)); do
        printf "    local-data: 'n%d.%s. 300 IN A 192.0.2.%d'\n" \
            "$i" "$ZONE" $((i % 250 + 1))
    done
    # decoys for the plain-upstream check (features.sh): over DoT the
    # cluster's names have other answers than from the plain server, so an
    # answer shows which path it took
    printf '    local-zone: "cluster.local." static\n'
    printf "    local-data: 'web.default.svc.cluster.local. 300 IN A 192.0.2.250'\n"
    printf '    local-zone: "10.in-addr.arpa." static\n'
    printf "    local-data: '1.1.96.10.in-addr.arpa. 300 IN PTR decoy.dot.test.'\n"
} >"$WORK/zone.conf"
for ((i = 0; i < NAMES; i++)); do
    printf 'n%d.%s A\n' "$i" "$ZONE"
done >"$WORK/queries.txt"

# ---------------------------------------------------------------- unbound
# peers_unbound_conf PLAIN_PORT DOT_PORT KEEPALIVE_MS: the DoT upstream
# (features.sh starts a second one with a 1 s edns-tcp-keepalive timeout)
peers_unbound_conf() {
    unbound_conf --comment "DoT upstream for tests/peers/run.sh: local data only, never recurses." \
        --dir "$WORK" --plain "$1" --dot "$2" "$WORK/server.key" "$WORK/server-chain.pem" \
        --include "$WORK/zone.conf" --set "edns-tcp-keepalive-timeout: $3"
}
pick_port PLAIN_PORT
pick_port DOT_PORT
peers_unbound_conf "$PLAIN_PORT" "$DOT_PORT" 30000 >"$WORK/unbound.conf"
unbound_checkconf "$WORK/unbound.conf"

log "starting unbound $(unbound_version) (plain :$PLAIN_PORT, DoT :$DOT_PORT)"
unbound -d -c "$WORK/unbound.conf" >"$WORK/unbound.log" 2>&1 &
UNBOUND_PID=$!
track "$UNBOUND_PID"

# bounded poll: the plain port answers
if ! wait_until "$UNBOUND_PID" 10 0.1 dig_noerror "$PLAIN_PORT" "a.$ZONE"; then
    cat "$WORK/unbound.log" >&2
    die "unbound did not come up within 10 s"
fi

# ---------------------------------------------------------------- helpers
# shellcheck source-path=SCRIPTDIR source=features.sh
. "$(dirname "$(readlink -f "$0")")/features.sh"
# shellcheck source-path=SCRIPTDIR source=dot-listener.sh
. "$(dirname "$(readlink -f "$0")")/dot-listener.sh"

# flags_of TEXT: header flags of the first dig response
flags_of() {
    grep -m 1 '^;; flags:' <<<"$1" | cut -d';' -f3 | sed 's/^ *flags: *//'
}
# msg_size_of TEXT: size of the last message dig received
msg_size_of() {
    grep 'MSG SIZE' <<<"$1" | tail -n 1 | grep -o '[0-9]*$'
}
txt_count() {
    grep -cE 'IN[[:space:]]+TXT[[:space:]]+"' <<<"$1" || true
}

PORT=
dig_p() {
    dig_at "$PORT" "$@"
}
kdig_p() {
    timeout 10 kdig @127.0.0.1 -p "$PORT" +time=2 +retry=0 "$@" 2>&1 || true
}

A_RE=$(rr_re "a.$ZONE" A 192.0.2.10)
AAAA_RE=$(rr_re "aaaa.$ZONE" AAAA 2001:db8::10)

# ---------------------------------------------------------------- upstream
log "upstream sanity checks (unbound directly)"
PORT=$DOT_PORT
expect "upstream: kdig +tls (CA-validated, dot.test) a.$ZONE A" \
    "$(kdig_p +tls +tls-ca="$CA" +tls-hostname=dot.test "a.$ZONE" A)" NOERROR "$A_RE"
out=$(kdig_p +tls +tls-ca="$CA" +tls-hostname=wrong.test "a.$ZONE" A)
if [ -z "$(status_of "$out")" ]; then
    pass "upstream: kdig +tls refuses hostname wrong.test"
else
    fail "upstream: kdig +tls refuses hostname wrong.test" "got an answer"
fi
out=$(timeout 20 dnsperf -m dot -s 127.0.0.1 -p "$DOT_PORT" -d "$WORK/queries.txt" \
    -l 2 -c 2 -Q "$QPS" -t 2 2>&1 || true)
if grep -q 'Queries lost: *0 ' <<<"$out"; then
    pass "upstream: dnsperf -m dot, no loss ($(grep -o 'Queries per second: *[0-9.]*' <<<"$out" | grep -o '[0-9.]*$') qps)"
else
    fail "upstream: dnsperf -m dot, no loss"
    printf '%s\n' "$out" | sed 's/^/      | /' | tail -n 25
fi

# ---------------------------------------------------------------- proxy
pick_port PORT
pick_port METRICS_PORT
log "starting proxy on :$PORT -> 127.0.0.1:$DOT_PORT#dot.test (metrics on :$METRICS_PORT)"
"$BIN" --listen "127.0.0.1:$PORT" --upstream "127.0.0.1:$DOT_PORT#dot.test" \
    --ca-file "$CA" --timeout 2000 --log-level info \
    --metrics "127.0.0.1:$METRICS_PORT" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
track "$PROXY_PID"

if ! { wait_listen "$PORT" 10 "$PROXY_PID" &&
    wait_until "$PROXY_PID" 5 0.25 dig_noerror "$PORT" "a.$ZONE"; }; then
    if is_running "$PROXY_PID"; then
        why="running, but no NOERROR answer"
    else
        rc=0
        wait "$PROXY_PID" || rc=$?
        why="exited with status $rc"
    fi
    fail "proxy: starts and answers a.$ZONE within 15 s" "$why"
    exit 1
fi
pass "proxy: starts and answers a.$ZONE"

log "dig over UDP and TCP"
for mode in udp tcp; do
    opt=+notcp
    [ "$mode" = tcp ] && opt=+tcp
    expect "dig $mode: a.$ZONE A" "$(dig_p "$opt" "a.$ZONE" A)" NOERROR "$A_RE"
    expect "dig $mode: aaaa.$ZONE AAAA" "$(dig_p "$opt" "aaaa.$ZONE" AAAA)" NOERROR "$AAAA_RE"
    out=$(dig_p "$opt" "a.$ZONE" AAAA)
    expect "dig $mode: a.$ZONE AAAA (NODATA)" "$out" NOERROR "ANSWER: 0,"
    expect "dig $mode: nx.$ZONE A" "$(dig_p "$opt" "nx.$ZONE" A)" NXDOMAIN
done

log "truncation"
out=$(dig_p +noedns +ignore "big.$ZONE" TXT)
flags=$(flags_of "$out")
size=$(msg_size_of "$out")
if grep -qw tc <<<"$flags" && [ -n "$size" ] && [ "$size" -le 512 ]; then
    pass "dig udp +noedns: big.$ZONE TXT truncated (flags: $flags; $size bytes)"
else
    fail "dig udp +noedns: big.$ZONE TXT truncated" "flags '$flags', size '${size:-none}'"
    printf '%s\n' "$out" | sed 's/^/      | /' | head -n 30
fi

out=$(dig_p +bufsize=1232 +ignore "big.$ZONE" TXT)
flags=$(flags_of "$out")
size=$(msg_size_of "$out")
if grep -qw tc <<<"$flags" && grep -q 'OPT PSEUDOSECTION' <<<"$out" &&
    [ -n "$size" ] && [ "$size" -le 1232 ]; then
    pass "dig udp +bufsize=1232: big.$ZONE TXT truncated, OPT kept ($size bytes)"
else
    fail "dig udp +bufsize=1232: big.$ZONE TXT truncated with OPT" \
        "flags '$flags', size '${size:-none}'"
    printf '%s\n' "$out" | sed 's/^/      | /' | head -n 30
fi

out=$(dig_p "big.$ZONE" TXT)
n=$(txt_count "$out")
if [ "$(status_of "$out")" = NOERROR ] && [ "$n" -eq "$TXT_RECORDS" ] &&
    grep -q 'Truncated, retrying in TCP' <<<"$out"; then
    pass "dig default: big.$ZONE TXT truncated over UDP, $n TXT records over TCP ($(msg_size_of "$out") bytes)"
else
    fail "dig default: big.$ZONE TXT via TC + TCP retry" \
        "status '$(status_of "$out")', $n TXT records"
    printf '%s\n' "$out" | sed 's/^/      | /' | head -n 20
fi

out=$(dig_p +tcp "big.$ZONE" TXT)
n=$(txt_count "$out")
if [ "$(status_of "$out")" = NOERROR ] && [ "$n" -eq "$TXT_RECORDS" ]; then
    pass "dig tcp: big.$ZONE TXT, $n TXT records"
else
    fail "dig tcp: big.$ZONE TXT" "status '$(status_of "$out")', $n TXT records"
fi

log "kdig"
expect "kdig udp: a.$ZONE A" "$(kdig_p +notcp "a.$ZONE" A)" NOERROR "$A_RE"
expect "kdig tcp: a.$ZONE A" "$(kdig_p +tcp "a.$ZONE" A)" NOERROR "$A_RE"
expect "kdig tcp: aaaa.$ZONE AAAA" "$(kdig_p +tcp "aaaa.$ZONE" AAAA)" NOERROR "$AAAA_RE"
expect "kdig udp: nx.$ZONE A" "$(kdig_p +notcp "nx.$ZONE" A)" NXDOMAIN

# several queries, one after another, on one kept-open TCP connection
out=$(kdig_p +tcp +keepopen "a.$ZONE" A "aaaa.$ZONE" AAAA "nx.$ZONE" A "big.$ZONE" TXT "n7.$ZONE" A)
st=$(grep -o 'status: [A-Z]*' <<<"$out" | cut -d' ' -f2 | tr '\n' ' ')
if [ "$st" = "NOERROR NOERROR NXDOMAIN NOERROR NOERROR " ] &&
    grep -qE "$A_RE" <<<"$out" && grep -qE "$AAAA_RE" <<<"$out" &&
    [ "$(txt_count "$out")" -eq "$TXT_RECORDS" ]; then
    pass "kdig tcp +keepopen: 5 queries on one connection"
else
    fail "kdig tcp +keepopen: 5 queries on one connection" "statuses: $st"
    printf '%s\n' "$out" | sed 's/^/      | /' | head -n 40
fi

log "mdig (all queries sent at once)"
mdig_names=("a.$ZONE" "nx.$ZONE" "big.$ZONE")
for ((i = 0; i < 20; i++)); do mdig_names+=("n$((i * 7)).$ZONE"); done
# mdig: options before the first name are global defaults, later local
# options apply to the name that follows them
mdig_args=(+nottlunits +timeout=3 -t A)
for name in "${mdig_names[@]}"; do
    t=A
    [ "$name" = "big.$ZONE" ] && t=TXT
    mdig_args+=(-t "$t" "$name")
done
for mode in udp tcp; do
    opt=+notcp
    [ "$mode" = tcp ] && opt=+tcp
    out=$(timeout 15 mdig @127.0.0.1 -p "$PORT" "$opt" "${mdig_args[@]}" 2>&1 || true)
    noerr=$(grep -c 'status: NOERROR' <<<"$out" || true)
    nx=$(grep -c 'status: NXDOMAIN' <<<"$out" || true)
    # over UDP big.* comes back truncated (mdig does not retry): any status is fine
    want_noerr=$((${#mdig_names[@]} - 1))
    if [ "$nx" -eq 1 ] && [ "$noerr" -ge $((want_noerr - 1)) ] &&
        { [ "$mode" = udp ] || [ "$noerr" -eq "$want_noerr" ]; } &&
        grep -qE "$A_RE" <<<"$out"; then
        pass "mdig $mode: ${#mdig_names[@]} queries in flight at once ($noerr NOERROR, $nx NXDOMAIN)"
    else
        fail "mdig $mode: ${#mdig_names[@]} queries in flight at once" "$noerr NOERROR, $nx NXDOMAIN"
        printf '%s\n' "$out" | sed 's/^/      | /' | head -n 40
    fi
done
if [ "$(txt_count "$out")" -eq "$TXT_RECORDS" ]; then
    pass "mdig tcp: big.$ZONE TXT complete among pipelined answers"
else
    fail "mdig tcp: big.$ZONE TXT complete among pipelined answers" "$(txt_count "$out") TXT records"
fi

log "certificate name mismatch"
pick_port BAD_PORT
"$BIN" --listen "127.0.0.1:$BAD_PORT" --upstream "127.0.0.1:$DOT_PORT#wrong.test" \
    --ca-file "$CA" --timeout 2000 --log-level info >"$WORK/proxy-wrong-name.log" 2>&1 &
BAD_PID=$!
track "$BAD_PID"
if wait_listen "$BAD_PORT" 10 "$BAD_PID"; then
    for mode in udp tcp; do
        opt=+notcp
        [ "$mode" = tcp ] && opt=+tcp
        t0=$(now_ms)
        out=$(dig_at "$BAD_PORT" +time=3 "$opt" "a.$ZONE" A)
        dt=$(($(now_ms) - t0))
        if [ "$(status_of "$out")" = SERVFAIL ] && [ "$dt" -lt 3000 ]; then
            pass "wrong name ($mode): SERVFAIL in $dt ms"
        else
            fail "wrong name ($mode): SERVFAIL within 3 s" \
                "status '$(status_of "$out")' after $dt ms"
        fi
    done
else
    fail "wrong name: second proxy instance listening within 10 s"
fi
stop_pid "$BAD_PID" 3

log "dnsperf: $NAMES names, ${DURATION}s, 4 clients, -Q $QPS"
for mode in udp tcp; do
    out=$(timeout $((DURATION + 30)) dnsperf -m "$mode" -s 127.0.0.1 -p "$PORT" \
        -d "$WORK/queries.txt" -l "$DURATION" -c 4 -Q "$QPS" -t 3 2>&1 || true)
    sent=$(sed -n 's/^ *Queries sent: *\([0-9]*\).*/\1/p' <<<"$out")
    done_=$(sed -n 's/^ *Queries completed: *\([0-9]*\).*/\1/p' <<<"$out")
    lost=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' <<<"$out")
    qps=$(sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p' <<<"$out")
    lat=$(sed -n 's/^ *Average Latency (s): *\([0-9.]*\).*/\1/p' <<<"$out" | head -n 1)
    codes=$(sed -n 's/^ *Response codes: *//p' <<<"$out")
    summary="sent=${sent:-?} completed=${done_:-?} lost=${lost:-?} qps=${qps:-?} avg_latency_s=${lat:-?} rcodes: ${codes:-?}"
    echo "      dnsperf $mode: $summary"
    if [ -n "$sent" ] && [ "$sent" -gt 0 ] && [ "$lost" = 0 ] &&
        [ "$done_" = "$sent" ] && grep -q "^NOERROR $sent " <<<"$codes"; then
        pass "dnsperf $mode: $sent/$sent completed, 0 lost, ${qps%.*} qps"
    else
        fail "dnsperf $mode: all queries completed, none lost" "$summary"
        printf '%s\n' "$out" | sed 's/^/      | /' | tail -n 25
    fi
done

log "metrics and health (curl, promtool)"
murl="http://127.0.0.1:$METRICS_PORT"
code=$(timeout 5 curl -s -o "$WORK/metrics.txt" -w '%{http_code}' "$murl/metrics" || true)
if [ "$code" = 200 ] && timeout 10 promtool check metrics <"$WORK/metrics.txt" >"$WORK/promtool.txt" 2>&1; then
    pass "metrics: 200 and promtool check metrics is clean"
else
    fail "metrics: 200 and promtool check metrics is clean" "HTTP $code"
    sed 's/^/      | /' "$WORK/promtool.txt" | head -n 20
fi
udp_q=$(sed -n 's/^dotproxy_queries_total{transport="udp"} //p' "$WORK/metrics.txt")
tcp_q=$(sed -n 's/^dotproxy_queries_total{transport="tcp"} //p' "$WORK/metrics.txt")
trunc=$(sed -n 's/^dotproxy_truncated_total //p' "$WORK/metrics.txt")
inflight=$(sed -n 's/^dotproxy_inflight //p' "$WORK/metrics.txt")
if [ "${udp_q:-0}" -gt 1000 ] && [ "${tcp_q:-0}" -gt 1000 ] && [ "${trunc:-0}" -ge 1 ] && [ "$inflight" = 0 ]; then
    pass "metrics: counters match the traffic (udp $udp_q, tcp $tcp_q, truncated $trunc, in flight $inflight)"
else
    fail "metrics: counters match the traffic" "udp ${udp_q:-?} tcp ${tcp_q:-?} truncated ${trunc:-?} inflight ${inflight:-?}"
fi
for probe in "GET /healthz 200" "GET /nope 404" "POST /metrics 405"; do
    read -r method path want <<<"$probe"
    code=$(timeout 5 curl -s -o /dev/null -X "$method" -w '%{http_code}' "$murl$path" || true)
    if [ "$code" = "$want" ]; then
        pass "metrics: $method $path -> $want"
    else
        fail "metrics: $method $path -> $want" "got $code"
    fi
done

if [ "${PEERS_DOT_LISTENER:-1}" != 0 ]; then
    peer_dot_listener
fi

if [ "${PEERS_FEATURES:-1}" != 0 ]; then
    peer_features
    peer_plain_forward
fi

log "proxy process"
if is_running "$PROXY_PID"; then
    rss=$(sed -n 's/^VmRSS:[[:space:]]*//p' "/proc/$PROXY_PID/status" 2>/dev/null || true)
    pass "proxy: still running after all checks (RSS ${rss:-?})"
    t0=$(now_ms)
    kill -TERM "$PROXY_PID"
    for ((i = 0; i < 30; i++)); do
        is_running "$PROXY_PID" || break
        sleep 0.1
    done
    if is_running "$PROXY_PID"; then
        fail "proxy: exits within 3 s of SIGTERM"
    else
        rc=0
        wait "$PROXY_PID" || rc=$?
        dt=$(($(now_ms) - t0))
        if [ "$rc" = 0 ]; then
            pass "proxy: exits on SIGTERM in $dt ms (status $rc)"
        else
            fail "proxy: exits cleanly on SIGTERM" "exit status $rc after $dt ms"
        fi
    fi
else
    rc=0
    wait "$PROXY_PID" || rc=$?
    fail "proxy: still running after all checks" "exited with status $rc"
fi

if [ -s "$WORK/proxy.log" ]; then
    echo "      proxy log: $(wc -l <"$WORK/proxy.log") lines," \
        "$(grep -ciE 'warn|error' "$WORK/proxy.log" || true) mentioning warn/error"
fi

if [ "${PEERS_FEATURES:-1}" != 0 ]; then
    peer_features_final
fi

checks_done peers || exit 1
