# shellcheck shell=bash
# Sourced by tests/peers/run.sh (not run on its own): end-to-end checks of
# the newer features against the real unbound DoT upstream that run.sh
# started. Uses the helpers of scripts/lib/common.sh and dig.sh that run.sh
# sourced (pass, fail, skip, log, track, wait_listen, wait_until, stop_pid,
# is_running, now_ms, dig_at, dig_noerror, status_of, expect) and run.sh's
# own: pick_port, peers_unbound_conf, WORK, CA, DOT_PORT, ZONE, A_RE, BIN.
#
#   peer_features        cache, SPKI pins, split forwarding, reload, padding
#                        on the wire, edns-tcp-keepalive idle close
#   peer_plain_forward   --forward ZONE=plain:IP:PORT against a second unbound
#                        serving plain DNS (the kube-dns stand-in), the rest
#                        over DoT, --watch-config on a ConfigMap-style mount,
#                        and deploy/kubernetes/node-local's own config file
#   peer_features_final  after all other checks: no upstream that should be
#                        reachable was ever logged "down"; stop the proxies
#
# Every proxy started here is tracked (run.sh's EXIT trap kills it by PID),
# every client call runs under timeout(1), every wait has a deadline.
#
# Optional: tcpdump and python3 for the padding-on-the-wire check (skipped,
# not failed, when either is missing).

FEAT_PROXIES=()  # "name pid port" of every proxy started here
FEAT_OK_LOGS=()  # logs of proxies whose upstream on DOT_PORT must never go down
FEAT_KA_DOT=     # DoT port of the second unbound (1 s keepalive)

# spki_pin PEM: base64 SHA-256 of the certificate's SubjectPublicKeyInfo
spki_pin() {
    openssl x509 -in "$1" -pubkey -noout |
        openssl pkey -pubin -outform der |
        openssl dgst -sha256 -binary | base64
}

# feat_start NAME PORT ARGS...: start BIN listening on 127.0.0.1:PORT with
# its log in $WORK/proxy-NAME.log; sets FEAT_PID
feat_start() {
    local name=$1 port=$2
    shift 2
    "$BIN" --listen "127.0.0.1:$port" --timeout 2000 --log-level info "$@" \
        >"$WORK/proxy-$name.log" 2>&1 &
    FEAT_PID=$!
    track "$FEAT_PID"
    FEAT_PROXIES+=("$name $FEAT_PID $port")
}

# feat_dig PORT ARGS...: one dig, bounded
feat_dig() {
    local port=$1
    shift
    dig_at "$port" +time=3 "$@"
}

# wait_log FILE REGEX SECONDS: until FILE has a line matching REGEX
wait_log() {
    local f=$1 re=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        grep -qE "$re" "$f" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ttl_of OUTPUT SECTION TYPE: TTL of the first TYPE record in SECTION
# (ANSWER or AUTHORITY) of dig's output
ttl_of() {
    awk -v sec=";; $2 SECTION:" -v t="$3" '
        $0 == sec { on = 1; next }
        /^;; / || /^$/ { on = 0 }
        on && $4 == t { print $2; exit }' <<<"$1"
}

# reload_check PID PORT TEXT LOG_RE CHECK LOG_CHECK: replace reload.conf
# with TEXT, SIGHUP the proxy PID; once its log matches LOG_RE (within 5 s)
# it must still answer a.ZONE on PORT (CHECK), else LOG_CHECK fails
reload_check() {
    printf '%s\n' "$3" >"$WORK/reload.conf.new"
    mv "$WORK/reload.conf.new" "$WORK/reload.conf"
    kill -HUP "$1"
    if wait_log "$WORK/proxy-reload.log" "$4" 5; then
        expect "$5" "$(feat_dig "$2" "a.$ZONE" A)" NOERROR "$A_RE"
    else
        fail "$6"
        sed 's/^/      | /' "$WORK/proxy-reload.log" | tail -n 5
    fi
}

# metric FILE LINE-PREFIX: value of the first sample starting with PREFIX
metric() {
    awk -v p="$2" 'index($0, p " ") == 1 { print $NF; exit }' "$1"
}

# sleep_until MS: sleep until now_ms reaches MS (bounded by the caller)
sleep_until() {
    local left=$(($1 - $(now_ms)))
    if [ "$left" -gt 0 ]; then
        sleep "$((left / 1000)).$(printf '%03d' $((left % 1000)))"
    fi
}

# ttl_range STORE_START STORE_END ASK_START ASK_END (ms): sets TTL_LO and
# TTL_HI, the bounds for a 300 s TTL aged by whole seconds (rounded down or
# up) between an answer stored in the first interval and read in the second
ttl_range() {
    local lo_ms=$(($3 - $2)) hi_ms=$(($4 - $1))
    TTL_LO=$((300 - hi_ms / 1000 - 1))
    TTL_HI=$((300 - lo_ms / 1000))
}

# upstream_lport PID PORT: local port of PID's established TCP connection to
# 127.0.0.1:PORT (empty if none)
upstream_lport() {
    ss -Htnp state established "( dport = :$2 )" 2>/dev/null |
        awk -v pid="pid=$1," 'index($0, pid) { n = split($3, a, ":"); print a[n]; exit }'
}

# tls_records PCAP: one line "SPORT TYPE LENGTH" per TLS record found in the
# TCP payload of the captured packets, streams reassembled by sequence number
tls_records() {
    python3 - "$1" <<'PY'
import struct, sys

data = open(sys.argv[1], "rb").read()
if len(data) < 24:
    sys.exit("short pcap")
magic = data[:4]
if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
    end = "<"
elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
    end = ">"
else:
    sys.exit("not a pcap file")
linktype = struct.unpack(end + "I", data[20:24])[0] & 0xFFFF
skip = {1: 14, 113: 16, 276: 20, 0: 4, 101: 0, 228: 0}.get(linktype)
if skip is None:
    sys.exit("unsupported link type %d" % linktype)

streams = {}  # sport -> {seq: payload}
off = 24
while off + 16 <= len(data):
    incl = struct.unpack(end + "I", data[off + 8:off + 12])[0]
    pkt = data[off + 16:off + 16 + incl]
    off += 16 + incl
    ip = pkt[skip:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
        continue
    ihl = (ip[0] & 15) * 4
    total = struct.unpack(">H", ip[2:4])[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        continue
    sport, _dport, seq = struct.unpack(">HHI", tcp[:8])
    payload = tcp[(tcp[12] >> 4) * 4:]
    if payload:
        streams.setdefault(sport, {})[seq] = payload

for sport, segs in sorted(streams.items()):
    buf = b""
    nxt = None
    for seq in sorted(segs):  # no wrap-around within a few queries
        p = segs[seq]
        if nxt is not None and seq < nxt:  # retransmission / overlap
            p = p[nxt - seq:]
        buf += p
        nxt = seq + len(segs[seq]) if nxt is None else max(nxt, seq + len(segs[seq]))
    i = 0
    while i + 5 <= len(buf):
        rtype = buf[i]
        rlen = struct.unpack(">H", buf[i + 3:i + 5])[0]
        if i + 5 + rlen > len(buf):
            print(sport, "partial", rlen)
            break
        print(sport, rtype, rlen)
        i += 5 + rlen
PY
}

# ---------------------------------------------------------------- features
peer_features() {
    local dead_port cache_port cache_mport pin_ok_port pin_bad_port pin_only_port
    local pin_noca_port fwd_port rel_port pad_port nopad_port ka_port ka_mport
    local ka_plain ka_dot pin_srv pin_ca f p name pid port out st i t_cache t_ka
    local ttl1 ttl2 nttl1 nttl2 t_cache_end t_nx t_nx_end t2 hits miss entries ka_unbound_pid ka_ready
    local pad_pid nopad_pid lport1 lport2 cap_pid names lens1 lens2 rel_pid ka_pid v
    local -a l1 l2

    log "newer features against unbound: cache, SPKI pins, forwarding, reload, padding, keepalive"

    pin_srv=$(spki_pin "$WORK/server.pem")
    pin_ca=$(spki_pin "$CA")
    echo "      SPKI pin of unbound's certificate: $pin_srv"
    echo "      SPKI pin of the CA (wrong pin):    $pin_ca"

    # nothing listens on dead_port: pick_port checked it is free and hands
    # it out once
    pick_port dead_port
    for v in cache_port cache_mport pin_ok_port pin_bad_port pin_only_port \
        pin_noca_port fwd_port rel_port pad_port nopad_port ka_port ka_mport \
        ka_plain ka_dot; do
        pick_port "$v"
    done
    FEAT_KA_DOT=$ka_dot

    # a second unbound, same zone and certificate, announcing a 1 s
    # edns-tcp-keepalive timeout, so that an idle connection is closed
    # within the run
    peers_unbound_conf "$ka_plain" "$ka_dot" 1000 >"$WORK/unbound-ka.conf"
    unbound -d -c "$WORK/unbound-ka.conf" >"$WORK/unbound-ka.log" 2>&1 &
    ka_unbound_pid=$!
    track "$ka_unbound_pid"

    printf 'upstream 127.0.0.1:%s#dot.test\nca-file %s\n' "$dead_port" "$CA" \
        >"$WORK/reload.conf"

    feat_start cache "$cache_port" --upstream "127.0.0.1:$DOT_PORT#dot.test" \
        --ca-file "$CA" --cache-size 1000 --metrics "127.0.0.1:$cache_mport"
    FEAT_OK_LOGS+=("$WORK/proxy-cache.log")
    feat_start pin-ok "$pin_ok_port" --upstream "127.0.0.1:$DOT_PORT#dot.test@pin=$pin_srv" \
        --ca-file "$CA"
    FEAT_OK_LOGS+=("$WORK/proxy-pin-ok.log")
    feat_start pin-wrong "$pin_bad_port" --upstream "127.0.0.1:$DOT_PORT#dot.test@pin=$pin_ca" \
        --ca-file "$CA"
    feat_start pin-only "$pin_only_port" --upstream "127.0.0.1:$DOT_PORT@pin=$pin_srv"
    FEAT_OK_LOGS+=("$WORK/proxy-pin-only.log")
    feat_start pin-noca "$pin_noca_port" --upstream "127.0.0.1:$DOT_PORT#dot.test@pin=$pin_srv"
    feat_start forward "$fwd_port" --upstream "127.0.0.1:$dead_port#dot.test" \
        --forward "$ZONE=127.0.0.1:$DOT_PORT#dot.test@ca=$CA"
    FEAT_OK_LOGS+=("$WORK/proxy-forward.log")
    feat_start reload "$rel_port" --config "$WORK/reload.conf"
    rel_pid=$FEAT_PID
    FEAT_OK_LOGS+=("$WORK/proxy-reload.log")
    feat_start pad128 "$pad_port" --upstream "127.0.0.1:$DOT_PORT#dot.test" --ca-file "$CA"
    pad_pid=$FEAT_PID
    FEAT_OK_LOGS+=("$WORK/proxy-pad128.log")
    feat_start pad0 "$nopad_port" --upstream "127.0.0.1:$DOT_PORT#dot.test" --ca-file "$CA" \
        --padding 0
    nopad_pid=$FEAT_PID
    FEAT_OK_LOGS+=("$WORK/proxy-pad0.log")
    feat_start keepalive "$ka_port" --upstream "127.0.0.1:$ka_dot#dot.test" --ca-file "$CA" \
        --metrics "127.0.0.1:$ka_mport"
    ka_pid=$FEAT_PID
    FEAT_OK_LOGS+=("$WORK/proxy-keepalive.log")

    for f in "${FEAT_PROXIES[@]}"; do
        read -r name pid port <<<"$f"
        if ! wait_listen "$port" 10 "$pid"; then
            fail "features: proxy '$name' listening within 10 s"
            sed 's/^/      | /' "$WORK/proxy-$name.log" | tail -n 20
            return 0
        fi
    done
    ka_ready=0
    if wait_until "$ka_unbound_pid" 10 0.1 dig_noerror "$ka_plain" "a.$ZONE"; then
        ka_ready=1
    fi

    # ---- 1. cache: first lookups now, the second ones >= 2 s later
    t_cache=$(now_ms)
    out=$(feat_dig "$cache_port" "a.$ZONE" A)
    t_cache_end=$(now_ms)
    ttl1=$(ttl_of "$out" ANSWER A)
    st=$(status_of "$out")
    t_nx=$(now_ms)
    out=$(feat_dig "$cache_port" "nx.$ZONE" A)
    t_nx_end=$(now_ms)
    nttl1=$(ttl_of "$out" AUTHORITY SOA)
    if [ "$st" = NOERROR ] && [ "$ttl1" = 300 ] && [ "$(status_of "$out")" = NXDOMAIN ] &&
        [ "$nttl1" = 300 ]; then
        pass "cache: first answers come from unbound (A TTL $ttl1, NXDOMAIN with SOA TTL $nttl1)"
    else
        fail "cache: first answers come from unbound" \
            "A: $st TTL ${ttl1:-none}; nx: $(status_of "$out") SOA TTL ${nttl1:-none}"
    fi

    # ---- 6b. keepalive: first query on a connection to the 1 s unbound
    t_ka=$(now_ms)
    if [ "$ka_ready" = 1 ]; then
        out=$(feat_dig "$ka_port" "a.$ZONE" A)
        if [ "$(status_of "$out")" != NOERROR ]; then
            fail "keepalive: first query through the 1 s keepalive unbound" \
                "status '$(status_of "$out")'"
        fi
    fi

    # ---- 2. SPKI pinning
    expect "pin: #dot.test@pin=<unbound's key> + --ca-file: a.$ZONE" \
        "$(feat_dig "$pin_ok_port" "a.$ZONE" A)" NOERROR "$A_RE"
    expect "pin: 127.0.0.1:PORT@pin=<unbound's key> (pin alone, no --ca-file): a.$ZONE" \
        "$(feat_dig "$pin_only_port" "a.$ZONE" A)" NOERROR "$A_RE"
    out=$(feat_dig "$pin_bad_port" "a.$ZONE" A)
    if [ "$(status_of "$out")" = SERVFAIL ] &&
        wait_log "$WORK/proxy-pin-wrong.log" 'SPKI pin' 2; then
        pass "pin: wrong pin (the CA's key) -> SERVFAIL, logged: $(grep -m1 -o 'down: .*SPKI pin' \
            "$WORK/proxy-pin-wrong.log")"
    else
        fail "pin: wrong pin -> SERVFAIL and a log line mentioning 'SPKI pin'" \
            "status '$(status_of "$out")'"
        sed 's/^/      | /' "$WORK/proxy-pin-wrong.log" | tail -n 5
    fi
    out=$(feat_dig "$pin_noca_port" "a.$ZONE" A)
    if [ "$(status_of "$out")" = SERVFAIL ] &&
        wait_log "$WORK/proxy-pin-noca.log" ' down: ' 2; then
        pass "pin: name + right pin but no --ca-file -> SERVFAIL (the name still needs a trusted chain;$(grep -m1 -o ' down: [^;]*' \
            "$WORK/proxy-pin-noca.log" | sed 's/^ down://'))"
    else
        fail "pin: name + right pin, no --ca-file -> SERVFAIL, upstream logged down" \
            "status '$(status_of "$out")'"
        sed 's/^/      | /' "$WORK/proxy-pin-noca.log" | tail -n 5
    fi

    # ---- 3. split forwarding: only --forward reaches unbound
    expect "forward: $ZONE -> unbound (@ca=, no --ca-file): a.$ZONE" \
        "$(feat_dig "$fwd_port" "a.$ZONE" A)" NOERROR "$A_RE"
    expect "forward: zone match ignores case: A.PEERS.TEST" \
        "$(feat_dig "$fwd_port" "A.PEERS.TEST" A)" NOERROR
    expect "forward: nx.$ZONE -> NXDOMAIN from unbound" \
        "$(feat_dig "$fwd_port" "nx.$ZONE" A)" NXDOMAIN
    expect "forward: x$ZONE (not under $ZONE) -> dead default upstream, SERVFAIL" \
        "$(feat_dig "$fwd_port" "x$ZONE" A)" SERVFAIL
    expect "forward: www.example.com -> dead default upstream, SERVFAIL" \
        "$(feat_dig "$fwd_port" www.example.com A)" SERVFAIL

    # ---- 4. reload on SIGHUP
    expect "reload: --config with a dead upstream: SERVFAIL" \
        "$(feat_dig "$rel_port" "a.$ZONE" A)" SERVFAIL
    reload_check "$rel_pid" "$rel_port" \
        "$(printf 'upstream 127.0.0.1:%s#dot.test\nca-file %s' "$DOT_PORT" "$CA")" \
        'configuration reloaded' \
        "reload: after SIGHUP with unbound in the file: a.$ZONE" \
        "reload: 'configuration reloaded' logged within 5 s of SIGHUP"
    reload_check "$rel_pid" "$rel_port" \
        "$(printf 'upstream 127.0.0.1:%s#dot.test\nno-such-option 1' "$dead_port")" \
        'reload failed, keeping the running configuration' \
        "reload: a bad file is refused, the running configuration kept: a.$ZONE" \
        "reload: a bad file logs 'reload failed' within 5 s of SIGHUP"

    # ---- 5. padding on the wire (RFC 8467): the TLS records from the proxy
    # to unbound, one per query, captured on lo
    names=("a.$ZONE" "n123.$ZONE" "a-much-longer-name-for-the-padding-check.$ZONE")
    if [ "${PEERS_CAPTURE:-1}" = 0 ]; then
        skip "padding on the wire" "PEERS_CAPTURE=0"
    elif ! command -v tcpdump >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
        skip "padding on the wire" "needs tcpdump and python3"
    else
        # warm up: the TLS handshake is done before the capture starts
        feat_dig "$pad_port" "a.$ZONE" A >/dev/null
        feat_dig "$nopad_port" "a.$ZONE" A >/dev/null
        lport1=$(upstream_lport "$pad_pid" "$DOT_PORT")
        lport2=$(upstream_lport "$nopad_pid" "$DOT_PORT")
        if [ -z "$lport1" ] || [ -z "$lport2" ]; then
            fail "padding: find the proxies' upstream connections with ss -p" \
                "ports '${lport1:-?}' '${lport2:-?}'"
        else
            # --immediate-mode and -U: each packet is in the file at once
            timeout 20 tcpdump -i lo -n -U --immediate-mode -w - \
                "tcp and dst port $DOT_PORT and (src port $lport1 or src port $lport2)" \
                >"$WORK/padding.pcap" 2>"$WORK/tcpdump.log" &
            cap_pid=$!
            track "$cap_pid"
            if ! wait_log "$WORK/tcpdump.log" 'listening on' 5; then
                stop_pid "$cap_pid" 1
                if grep -qiE 'permission|not permitted' "$WORK/tcpdump.log"; then
                    skip "padding on the wire" "tcpdump may not capture here (not root?)"
                else
                    fail "padding: tcpdump starts capturing within 5 s"
                    sed 's/^/      | /' "$WORK/tcpdump.log" | tail -n 5
                fi
            else
                for name in "${names[@]}"; do
                    # dig returns after the answer: one query per TLS record
                    feat_dig "$pad_port" "$name" A >/dev/null
                    feat_dig "$nopad_port" "$name" A >/dev/null
                    sleep 0.05
                done
                # until 2 x 3 application-data records are in the file (3 s)
                for ((i = 0; i < 30; i++)); do
                    tls_records "$WORK/padding.pcap" >"$WORK/padding.txt" 2>&1 || true
                    [ "$(awk '$2 == 23' "$WORK/padding.txt" | wc -l)" -ge 6 ] && break
                    sleep 0.1
                done
                # SIGTERM to timeout(1), which passes it on to tcpdump (a
                # background job of a script ignores SIGINT)
                stop_pid "$cap_pid" 2
                wait "$cap_pid" 2>/dev/null || true
                tls_records "$WORK/padding.pcap" >"$WORK/padding.txt" 2>&1 || true
                # application data (23) records of each connection
                lens1=$(awk -v p="$lport1" '$1 == p && $2 == 23 { printf "%s ", $3 }' "$WORK/padding.txt")
                lens2=$(awk -v p="$lport2" '$1 == p && $2 == 23 { printf "%s ", $3 }' "$WORK/padding.txt")
                lens1=${lens1% }
                lens2=${lens2% }
                echo "      TLS application-data record lengths, proxy -> unbound, for" \
                    "names of ${#names[0]}, ${#names[1]}, ${#names[2]} characters:"
                echo "        --padding 128: $lens1"
                echo "        --padding 0:   $lens2"
                read -ra l1 <<<"$lens1"
                read -ra l2 <<<"$lens2"
                if [ "${#l1[@]}" = 3 ] && [ "${l1[0]}" = "${l1[1]}" ] && [ "${l1[1]}" = "${l1[2]}" ]; then
                    pass "padding 128: 3 queries of different sizes, 3 TLS records of equal length (${l1[0]} bytes)"
                else
                    fail "padding 128: 3 TLS records of equal length" "lengths: ${lens1:-none}"
                    sed 's/^/      | /' "$WORK/padding.txt" | head -n 20
                fi
                if [ "${#l2[@]}" = 3 ] && [ "${l2[0]}" -lt "${l2[1]}" ] && [ "${l2[1]}" -lt "${l2[2]}" ]; then
                    pass "padding 0: the 3 TLS records grow with the name (${l2[*]} bytes)"
                else
                    fail "padding 0: 3 TLS records of growing length" "lengths: ${lens2:-none}"
                    sed 's/^/      | /' "$WORK/padding.txt" | head -n 20
                fi
            fi
        fi
    fi

    # ---- 1 (cont.). cache: the same questions >= 2 s later
    sleep_until $((t_cache_end + 2100))
    # aged by whole seconds: the answer was stored between the first query's
    # start and end, so the TTL must lie in ttl_range's bounds
    t2=$(now_ms)
    out=$(feat_dig "$cache_port" "a.$ZONE" A)
    ttl_range "$t_cache" "$t_cache_end" "$t2" "$(now_ms)"
    ttl2=$(ttl_of "$out" ANSWER A)
    if [ "$(status_of "$out")" = NOERROR ] && grep -qE "$A_RE" <<<"$out" &&
        [ -n "$ttl2" ] && [ -n "$ttl1" ] && [ "$ttl2" -lt "$ttl1" ] &&
        [ "$ttl2" -ge "$TTL_LO" ] && [ "$ttl2" -le "$TTL_HI" ]; then
        pass "cache: a.$ZONE again $((t2 - t_cache_end)) ms later: NOERROR from the cache, TTL $ttl1 -> $ttl2"
    else
        fail "cache: a.$ZONE again $((t2 - t_cache_end)) ms later: NOERROR, TTL in [$TTL_LO, $TTL_HI]" \
            "status '$(status_of "$out")', TTL ${ttl1:-none} -> ${ttl2:-none}"
        printf '%s\n' "$out" | sed 's/^/      | /' | head -n 30
    fi
    t2=$(now_ms)
    out=$(feat_dig "$cache_port" "nx.$ZONE" A)
    ttl_range "$t_nx" "$t_nx_end" "$t2" "$(now_ms)"
    nttl2=$(ttl_of "$out" AUTHORITY SOA)
    if [ "$(status_of "$out")" = NXDOMAIN ] && [ -n "$nttl2" ] && [ -n "$nttl1" ] &&
        [ "$nttl2" -lt "$nttl1" ] && [ "$nttl2" -ge "$TTL_LO" ] && [ "$nttl2" -le "$TTL_HI" ]; then
        pass "cache: nx.$ZONE again $((t2 - t_nx_end)) ms later: NXDOMAIN from the cache (negative caching), SOA TTL $nttl1 -> $nttl2"
    else
        fail "cache: nx.$ZONE again $((t2 - t_nx_end)) ms later: NXDOMAIN, SOA TTL in [$TTL_LO, $TTL_HI]" \
            "status '$(status_of "$out")', SOA TTL ${nttl1:-none} -> ${nttl2:-none}"
        printf '%s\n' "$out" | sed 's/^/      | /' | head -n 30
    fi
    out=$(feat_dig "$cache_port" "A.Peers.TEST" A)
    if [ "$(status_of "$out")" = NOERROR ] &&
        grep -qE '^;A\.Peers\.TEST\.[[:space:]]+IN[[:space:]]+A' <<<"$out" &&
        grep -qE '^A\.Peers\.TEST\.[[:space:]]+[0-9]+[[:space:]]+IN[[:space:]]+A[[:space:]]+192\.0\.2\.10' <<<"$out"; then
        pass "cache: A.Peers.TEST hits the cached a.$ZONE and keeps the client's case"
    else
        fail "cache: A.Peers.TEST from the cache with the client's case" "status '$(status_of "$out")'"
        printf '%s\n' "$out" | sed 's/^/      | /' | head -n 30
    fi
    timeout 5 curl -s -o "$WORK/metrics-cache.txt" "http://127.0.0.1:$cache_mport/metrics" || true
    hits=$(metric "$WORK/metrics-cache.txt" 'dotproxy_cache_lookups_total{result="hit"}')
    miss=$(metric "$WORK/metrics-cache.txt" 'dotproxy_cache_lookups_total{result="miss"}')
    entries=$(metric "$WORK/metrics-cache.txt" 'dotproxy_cache_entries')
    if [ "${hits:-0}" -ge 3 ] && [ "${miss:-x}" = 2 ] && [ "${entries:-0}" -ge 2 ]; then
        pass "cache: /metrics: lookups hit $hits, miss $miss, entries $entries"
    else
        fail "cache: /metrics: 3 hits, 2 misses" \
            "hit ${hits:-none}, miss ${miss:-none}, entries ${entries:-none}"
    fi

    # ---- 6b (cont.). keepalive: unbound announced 1 s; after 2 s idle the
    # connection is gone, and the next query opens a new one, no failure
    if [ "$ka_ready" != 1 ]; then
        fail "keepalive: second unbound (edns-tcp-keepalive-timeout 1000) answers within 10 s"
        sed 's/^/      | /' "$WORK/unbound-ka.log" | tail -n 10
    else
        sleep_until $((t_ka + 2000))
        p=$(upstream_lport "$ka_pid" "$ka_dot")
        out=$(feat_dig "$ka_port" "a.$ZONE" A)
        timeout 5 curl -s -o "$WORK/metrics-ka.txt" "http://127.0.0.1:$ka_mport/metrics" || true
        local conns fails resumed lbl="{upstream=\"127.0.0.1:$ka_dot#dot.test\"}"
        conns=$(metric "$WORK/metrics-ka.txt" "dotproxy_upstream_connects_total$lbl")
        fails=$(metric "$WORK/metrics-ka.txt" "dotproxy_upstream_failures_total$lbl")
        resumed=$(metric "$WORK/metrics-ka.txt" "dotproxy_upstream_resumed_total$lbl")
        if [ -z "$p" ] && [ "$(status_of "$out")" = NOERROR ] && [ "${conns:-0}" = 2 ] &&
            [ "${fails:-x}" = 0 ]; then
            pass "keepalive: idle connection closed after the announced 1 s, next query on a new one (connects $conns, failures $fails, resumed ${resumed:-?})"
        else
            fail "keepalive: idle connection closed after 1 s, next query NOERROR, no failure" \
                "still open: ${p:-no}; status '$(status_of "$out")'; connects ${conns:-?}, failures ${fails:-?}"
        fi
        if [ "${resumed:-0}" -ge 1 ]; then
            pass "keepalive: the reconnection resumed the TLS session (resumed $resumed)"
        else
            fail "keepalive: the reconnection resumed the TLS session" "resumed ${resumed:-none}"
        fi
    fi
}

# ---------------------------------------------------------------- final
peer_features_final() {
    local f name pid port bad=() n
    # stop the feature proxies first (all at once, then wait for each):
    # their shutdown must not log "down" either
    for f in "${FEAT_PROXIES[@]}"; do
        read -r name pid port <<<"$f"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for f in "${FEAT_PROXIES[@]}"; do
        read -r name pid port <<<"$f"
        stop_pid "$pid" 3
    done
    if ! grep -qE '^[[:space:]]*edns-tcp-keepalive:[[:space:]]*yes' "$WORK/unbound.conf"; then
        skip "keepalive: no upstream marked down" "unbound.conf has no edns-tcp-keepalive: yes"
        return 0
    fi
    n=0
    for f in "$WORK/proxy.log" "${FEAT_OK_LOGS[@]}"; do
        [ -f "$f" ] || continue
        n=$((n + 1))
        # an upstream on unbound's ports (DOT_PORT or the keepalive one) that
        # went down; the dead ports of the forward and reload checks may
        if grep -qE "upstream 127\\.0\\.0\\.1:($DOT_PORT|${FEAT_KA_DOT:-0})([#@][^ ]*)?( \\([^)]*\\))? down:" "$f"; then
            bad+=("$(basename "$f")")
        fi
    done
    if [ "${#bad[@]}" = 0 ]; then
        pass "keepalive: unbound announces edns-tcp-keepalive; no 'down' line in $n proxy logs after all checks"
    else
        fail "keepalive: no 'down' line for a reachable upstream" "in ${bad[*]}"
        for f in "${bad[@]}"; do
            grep -E ' down:' "$WORK/$f" | sed "s/^/      | $f: /" | head -n 5
        done
    fi
}

# ---------------------------------------------------------------- plain upstream
PLAIN_CM_YAML=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../../deploy/kubernetes/node-local/configmap.yaml
# plain_cm_write DIR VERSION TEXT: DIR/dotproxy.conf as the kubelet mounts a
# ConfigMap: DIR/dotproxy.conf -> ..data/dotproxy.conf, ..data -> ..VERSION,
# the new version written first and ..data swapped by one rename, then the
# old version removed (what the kubelet's atomic writer does)
plain_cm_write() {
    local dir=$1 v=..$2 old
    mkdir -p "$dir/$v"
    printf '%s\n' "$3" >"$dir/$v/dotproxy.conf"
    old=$(readlink "$dir/..data" 2>/dev/null || true)
    ln -s "$v" "$dir/..data.tmp"
    mv -T "$dir/..data.tmp" "$dir/..data"
    [ -e "$dir/dotproxy.conf" ] || ln -s ..data/dotproxy.conf "$dir/dotproxy.conf"
    [ -z "$old" ] || rm -rf "${dir:?}/$old"
}

# plain_ready PORT: the plain server on PORT answers over TCP
plain_ready() {
    [ "$(status_of "$(dig_at "$1" +tcp +time=1 web.default.svc.cluster.local A)")" = NOERROR ]
}

# plain_stat CONF KEY: one counter of the unbound behind CONF (stats_noreset)
plain_stat() {
    timeout 5 unbound-control -c "$1" stats_noreset 2>/dev/null |
        sed -n "s/^$2=\\([0-9]*\\).*/\\1/p" || true
}

# peer_plain_forward: --forward ZONE=plain:IP:PORT against a second unbound
# that serves plain DNS only, in the shape of deploy/kubernetes/node-local/:
# cluster.local and 10.in-addr.arpa to the plain server (the kube-dns
# stand-in), everything else to the DoT unbound, the options in a --config
# file mounted the way the kubelet mounts a ConfigMap, reloaded by
# --watch-config. The two servers give different answers for the same names
# (run.sh's zone has decoys), so each answer shows the path it took; the
# plain server's own counters show it was asked over TCP only.
peer_plain_forward() {
    local pport port mport nl_port nl_mport conf cm pid upid out mode opt n=0 i st tcp0 tot0 tcp1 tot1 conns
    local web_re ptr_plain ptr_dot lbl up rc cfg1 cfg2
    local -a names=()

    log "plain DNS upstream for forward zones (node-local split) against a second, plain unbound"
    if ! command -v unbound-control >/dev/null 2>&1; then
        fail "plain: unbound-control (package unbound) is installed: it reads the plain server's counters"
        return 0
    fi
    pick_port pport
    pick_port port
    pick_port mport
    pick_port nl_port
    pick_port nl_mport
    conf=$WORK/unbound-plain.conf
    cm=$WORK/configmap
    {
        unbound_conf --comment "plain DNS upstream for features.sh (kube-dns stand-in): no TLS, local data only" \
            --dir "$WORK" --plain "$pport" \
            --zone cluster.local \
            --data 'web.default.svc.cluster.local. 300 IN A 10.96.1.1' \
            --data 'db.default.svc.cluster.local. 300 IN A 10.96.1.2' \
            --zone 10.in-addr.arpa \
            --data '1.1.96.10.in-addr.arpa. 300 IN PTR web.default.svc.cluster.local.' \
            --zone "$ZONE" \
            --data "a.$ZONE. 300 IN A 10.96.9.9" \
            --set 'extended-statistics: yes'
        # a later clause wins: remote control on a Unix socket (no TLS, no
        # port), for unbound-control stats_noreset
        printf 'remote-control:\n    control-enable: yes\n    control-interface: "%s"\n' \
            "$WORK/unbound-plain.ctl"
    } >"$conf"
    unbound_checkconf "$conf"
    unbound -d -c "$conf" >"$WORK/unbound-plain.log" 2>&1 &
    upid=$!
    track "$upid"

    web_re=$(rr_re web.default.svc.cluster.local A 10.96.1.1)
    ptr_plain=$(rr_re 1.1.96.10.in-addr.arpa PTR web.default.svc.cluster.local.)
    ptr_dot=$(rr_re 1.1.96.10.in-addr.arpa PTR decoy.dot.test.)
    if ! wait_until "$upid" 10 0.1 plain_ready "$pport"; then
        fail "plain: second unbound (plain DNS only) answers over TCP within 10 s"
        sed 's/^/      | /' "$WORK/unbound-plain.log" | tail -n 10
        return 0
    fi
    expect "plain: the plain unbound itself (tcp): web.default.svc.cluster.local A 10.96.1.1" \
        "$(dig_at "$pport" +tcp web.default.svc.cluster.local A)" NOERROR "$web_re"
    expect "plain: the DoT unbound has decoys (kdig +tls): web.default.svc.cluster.local A 192.0.2.250" \
        "$(timeout 10 kdig @127.0.0.1 -p "$DOT_PORT" +tls +tls-ca="$CA" +tls-hostname=dot.test \
            +time=2 +retry=0 web.default.svc.cluster.local A 2>&1 || true)" NOERROR \
        "$(rr_re web.default.svc.cluster.local A 192.0.2.250)"
    tcp0=$(plain_stat "$conf" num.query.tcp)
    tot0=$(plain_stat "$conf" total.num.queries)
    if [ -z "$tcp0" ] || [ -z "$tot0" ]; then
        fail "plain: unbound-control stats_noreset reads the plain server's counters"
        timeout 5 unbound-control -c "$conf" stats_noreset 2>&1 | sed 's/^/      | /' | head -n 5
        return 0
    fi

    # refused where it would replace DoT
    rc=0
    out=$(timeout 5 "$BIN" --listen "127.0.0.1:$port" --upstream "plain:127.0.0.1:$pport" 2>&1) || rc=$?
    if [ "$rc" = 2 ] && grep -qi 'unencrypted' <<<"$out"; then
        pass "plain: --upstream plain:IP:PORT refused, exit 2 ($(head -n 1 <<<"$out" | cut -c1-90)...)"
    else
        fail "plain: --upstream plain:IP:PORT refused with exit 2" "exit $rc: $(head -n 1 <<<"$out")"
    fi

    # the options in a file mounted as a ConfigMap is; the reverse zone is
    # added by an update of that "ConfigMap" further down
    cfg1=$(printf '%s\n' \
        "# the node-local variant's shape, on loopback" \
        "upstream 127.0.0.1:$DOT_PORT#dot.test" \
        "ca-file $CA" \
        "forward cluster.local=plain:127.0.0.1:$pport" \
        "allow 127.0.0.0/8" \
        "metrics 127.0.0.1:$mport" \
        "watch-config 1")
    plain_cm_write "$cm" 2026_01_01_00_00_00.1 "$cfg1"
    feat_start plain "$port" --config "$cm/dotproxy.conf"
    pid=$FEAT_PID
    FEAT_OK_LOGS+=("$WORK/proxy-plain.log")
    if ! wait_listen "$port" 10 "$pid"; then
        fail "plain: proxy with --forward cluster.local=plain:... listening within 10 s"
        sed 's/^/      | /' "$WORK/proxy-plain.log" | tail -n 20
        return 0
    fi

    for mode in udp tcp; do
        opt=+notcp
        [ "$mode" = tcp ] && opt=+tcp
        expect "plain ($mode): web.default.svc.cluster.local A from the plain server (10.96.1.1, not the DoT decoy)" \
            "$(feat_dig "$port" "$opt" web.default.svc.cluster.local A)" NOERROR "$web_re"
        expect "plain ($mode): nx.default.svc.cluster.local -> NXDOMAIN from the plain server" \
            "$(feat_dig "$port" "$opt" nx.default.svc.cluster.local A)" NXDOMAIN
        expect "plain ($mode): a.$ZONE A over DoT (192.0.2.10, not the plain server's 10.96.9.9)" \
            "$(feat_dig "$port" "$opt" "a.$ZONE" A)" NOERROR "$A_RE"
        n=$((n + 2))
    done
    expect "plain: zone match ignores case: WEB.Default.SVC.Cluster.Local" \
        "$(feat_dig "$port" WEB.Default.SVC.Cluster.Local A)" NOERROR \
        "$(rr_re WEB.Default.SVC.Cluster.Local A 10.96.1.1)"
    n=$((n + 1))
    expect "plain: xcluster.local (not under cluster.local) over DoT: NXDOMAIN from the DoT unbound" \
        "$(feat_dig "$port" web.xcluster.local A)" NXDOMAIN

    # 20 UDP queries at once: all pipelined on the plain TCP connection(s)
    for ((i = 0; i < 10; i++)); do
        names+=(-t A web.default.svc.cluster.local -t A db.default.svc.cluster.local)
    done
    out=$(timeout 15 mdig @127.0.0.1 -p "$port" +notcp +nottlunits +timeout=3 "${names[@]}" 2>&1 || true)
    st=$(grep -c 'status: NOERROR' <<<"$out" || true)
    conns=$(ss -Htnp state established "( dport = :$pport )" 2>/dev/null | grep -c "pid=$pid," || true)
    if [ "$st" = 20 ] && grep -qE "$(rr_re db.default.svc.cluster.local A 10.96.1.2)" <<<"$out" &&
        [ "$conns" -ge 1 ] && [ "$conns" -le 4 ]; then
        pass "plain: mdig, 20 UDP queries in flight at once: 20 NOERROR over $conns TCP connection(s) to the plain server"
    else
        fail "plain: mdig, 20 UDP queries at once: 20 NOERROR over 1 to 4 TCP connections" \
            "$st NOERROR, $conns connections"
        printf '%s\n' "$out" | sed 's/^/      | /' | head -n 20
    fi
    n=$((n + 20))

    # a ConfigMap update: the reverse zone joins; --watch-config 1 notices
    expect "plain: 1.1.96.10.in-addr.arpa PTR over DoT before the update (the DoT decoy)" \
        "$(feat_dig "$port" -x 10.96.1.1)" NOERROR "$ptr_dot"
    cfg2=$(printf '%s\n' "$cfg1" "forward 10.in-addr.arpa=plain:127.0.0.1:$pport")
    plain_cm_write "$cm" 2026_01_01_00_01_00.2 "$cfg2"
    if wait_log "$WORK/proxy-plain.log" 'configuration reloaded' 6; then
        expect "plain: ConfigMap-style update (..data swapped) reloaded by --watch-config 1: PTR now from the plain server" \
            "$(feat_dig "$port" -x 10.96.1.1)" NOERROR "$ptr_plain"
        n=$((n + 1))
    else
        fail "plain: 'configuration reloaded' logged within 6 s of a ConfigMap-style update (--watch-config 1)"
        sed 's/^/      | /' "$WORK/proxy-plain.log" | tail -n 5
    fi

    # the shipped ConfigMap's file (deploy/kubernetes/node-local), its
    # addresses moved to loopback: listen from the command line, the DoT
    # upstreams replaced by the DoT unbound, kube-dns by the plain unbound;
    # timeout and log-level come from feat_start's command line (an option
    # given in both places is refused)
    awk '/^  dotproxy.conf: [|]$/ { on = 1; next }
        on && /^    / { print substr($0, 5); next }
        on && /^$/ { print ""; next }
        on { exit }' "$PLAIN_CM_YAML" >"$WORK/node-local.conf.orig" 2>/dev/null || true
    if ! grep -q '^forward cluster.local=plain:' "$WORK/node-local.conf.orig"; then
        fail "plain: read dotproxy.conf out of $PLAIN_CM_YAML"
    else
        {
            sed -e '/^listen /d' -e '/^upstream /d' -e '/^ca-file /d' \
                -e '/^timeout /d' -e '/^log-level /d' \
                -e "s/^metrics .*/metrics 127.0.0.1:$nl_mport/" \
                -e "s/=plain:[^ ]*\$/=plain:127.0.0.1:$pport/" "$WORK/node-local.conf.orig"
            printf 'upstream 127.0.0.1:%s#dot.test\nca-file %s\n' "$DOT_PORT" "$CA"
        } >"$WORK/node-local.conf"
        feat_start node-local "$nl_port" --config "$WORK/node-local.conf"
        FEAT_OK_LOGS+=("$WORK/proxy-node-local.log")
        if ! wait_listen "$nl_port" 10 "$FEAT_PID"; then
            fail "plain: proxy with the node-local ConfigMap's file listening within 10 s"
            sed 's/^/      | /' "$WORK/proxy-node-local.log" | tail -n 20
        else
            expect "node-local ConfigMap: web.default.svc.cluster.local A from the plain server" \
                "$(feat_dig "$nl_port" web.default.svc.cluster.local A)" NOERROR "$web_re"
            expect "node-local ConfigMap: 10.96.1.1 PTR (10.in-addr.arpa) from the plain server" \
                "$(feat_dig "$nl_port" -x 10.96.1.1)" NOERROR "$ptr_plain"
            expect "node-local ConfigMap: a.$ZONE A over DoT" \
                "$(feat_dig "$nl_port" "a.$ZONE" A)" NOERROR "$A_RE"
            n=$((n + 2))
            st=$(timeout 5 curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$nl_mport/healthz" || true)
            if [ "$st" = 200 ] && ! grep -qiE 'warn|error' "$WORK/proxy-node-local.log"; then
                pass "node-local ConfigMap: /healthz 200 on its metrics port, no warning logged"
            else
                fail "node-local ConfigMap: /healthz 200, no warning logged" "HTTP ${st:-none}"
                sed 's/^/      | /' "$WORK/proxy-node-local.log" | tail -n 10
            fi
        fi
    fi

    # what the plain server saw: every query that should reach it, all over TCP
    tcp1=$(plain_stat "$conf" num.query.tcp)
    tot1=$(plain_stat "$conf" total.num.queries)
    if [ -n "$tcp1" ] && [ -n "$tot1" ] && [ $((tcp1 - tcp0)) -ge "$n" ] &&
        [ $((tot1 - tot0)) = $((tcp1 - tcp0)) ]; then
        pass "plain: unbound-control stats: $((tcp1 - tcp0)) queries over TCP (>= the $n sent to cluster zones), $((tot1 - tot0 - tcp1 + tcp0)) over UDP"
    else
        fail "plain: unbound-control stats: >= $n queries over TCP, none over UDP" \
            "num.query.tcp ${tcp0:-?} -> ${tcp1:-?}, total.num.queries ${tot0:-?} -> ${tot1:-?}"
    fi

    timeout 5 curl -s -o "$WORK/metrics-plain.txt" "http://127.0.0.1:$mport/metrics" || true
    lbl="{upstream=\"plain:127.0.0.1:$pport\"}"
    up=$(metric "$WORK/metrics-plain.txt" "dotproxy_upstream_up$lbl")
    if [ "$up" = 1 ]; then
        pass "plain: /metrics: dotproxy_upstream_up$lbl 1"
    else
        fail "plain: /metrics: dotproxy_upstream_up$lbl 1" "got '${up:-none}'"
        grep 'plain:' "$WORK/metrics-plain.txt" | sed 's/^/      | /' | head -n 10
    fi
    if grep -qE 'plain:[^ ]* down:' "$WORK/proxy-plain.log"; then
        fail "plain: the plain upstream was never logged down"
        grep -E 'plain:[^ ]* down:' "$WORK/proxy-plain.log" | sed 's/^/      | /' | head -n 5
    else
        pass "plain: the plain upstream was never logged down"
    fi
}
