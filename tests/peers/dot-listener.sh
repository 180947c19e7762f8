# shellcheck shell=bash
# Sourced by tests/peers/run.sh (not run on its own): dotproxy's own
# DNS-over-TLS listener (--listen-tls, --tls-cert, --tls-key, --client-ca)
# against real third-party DoT clients:
#
#   kdig (GnuTLS) / openssl s_client / dnsperf -m dot / stubby (getdns)
#       --DoT-->  BIN --listen-tls  --DoT-->  unbound
#
# Uses the helpers of scripts/lib/common.sh and dig.sh that run.sh sourced
# and run.sh's own: pick_port, WORK, CA, DOT_PORT, ZONE, A_RE, BIN, QPS,
# txt_count, TXT_RECORDS; metric, spki_pin and wait_log of features.sh.
#
#   peer_dot_listener    every check below; the proxies it starts are
#                        tracked (run.sh's EXIT trap kills them by PID)
#
# Certificates (in $WORK/dotl): the listener's, dot.proxy.test + IP
# 127.0.0.1, from run.sh's CA (ca.pem); a client CA with one client
# certificate (extendedKeyUsage=clientAuth); a second, "rogue" CA with a
# client certificate of the same name, which --client-ca must refuse.
#
# A missing client tool (stubby) fails its checks; it is never skipped.

# dotl_ca NAME CN: a CA in NAME.key / NAME.pem (ECDSA P-256, two days)
dotl_ca() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$1.key.tmp"
    openssl pkcs8 -topk8 -nocrypt -in "$1.key.tmp" -out "$1.key"
    openssl req -x509 -new -key "$1.key" -sha256 -days 2 -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$1.pem"
}

# dotl_leaf NAME CA CN EKU [SAN]: NAME.key, NAME.pem signed by CA.pem /
# CA.key, NAME-chain.pem (leaf, then CA); verified against CA.pem
dotl_leaf() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$1.key.tmp"
    openssl pkcs8 -topk8 -nocrypt -in "$1.key.tmp" -out "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$4"
        [ -n "${5:-}" ] && echo "subjectAltName=$5"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
    } >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days 2 -sha256 -extfile "$1.ext" -out "$1.pem"
    cat "$1.pem" "$2.pem" >"$1-chain.pem"
    openssl verify -CAfile "$2.pem" "$1.pem"
}

dotl_certs() {
    (
        set -e
        cd "$1"
        cp "$CA" ca.pem
        cp "$WORK/ca.key" ca.key
        dotl_leaf listener ca dot.proxy.test serverAuth "DNS:dot.proxy.test,IP:127.0.0.1"
        dotl_ca clientca "dotproxy peers client CA"
        dotl_leaf client clientca svc-a.clients.test clientAuth
        dotl_ca rogueca "dotproxy peers rogue CA"
        dotl_leaf rogue rogueca svc-a.clients.test clientAuth
        rm -f ./*.tmp
    )
}

# dotl_kdig PORT ARGS...: one kdig over TLS, bounded, never fails
dotl_kdig() {
    local port=$1
    shift
    timeout 10 kdig @127.0.0.1 -p "$port" +tls +time=2 +retry=0 "$@" 2>&1 || true
}
# dotl_kdig_ca PORT ARGS...: kdig verifying the listener (CA and name)
dotl_kdig_ca() {
    local port=$1
    shift
    dotl_kdig "$port" +tls-ca="$DOTL/ca.pem" +tls-hostname=dot.proxy.test "$@"
}

# dotl_s_client PORT ARGS...: openssl s_client to 127.0.0.1:PORT, name and
# CA of the listener checked; stdin closed after a second (so that a TLS 1.3
# alert sent after the client's Finished is still read); output on stdout
dotl_s_client() {
    local port=$1
    shift
    sleep 1 | timeout 10 openssl s_client -connect "127.0.0.1:$port" \
        -servername dot.proxy.test -verify_hostname dot.proxy.test \
        -CAfile "$DOTL/ca.pem" "$@" 2>&1 || true
}

# dotl_metric PORT NAME: one sample of the proxy's /metrics on PORT
dotl_metric() {
    timeout 5 curl -s -o "$WORK/dotl-metrics.txt" "http://127.0.0.1:$1/metrics" || true
    metric "$WORK/dotl-metrics.txt" "$2"
}

# dotl_show TEXT: TEXT indented, at most 25 lines
dotl_show() {
    printf '%s\n' "$1" | sed 's/^/      | /' | head -n 25 || true
}

# dotl_start NAME PLAIN_PORT TLS_PORT ARGS...: BIN with a plain and a TLS
# listener on loopback, log in $WORK/proxy-dotl-NAME.log; sets DOTL_PID.
# False unless both listen within 10 s.
dotl_start() {
    local name=$1 pport=$2 tport=$3
    shift 3
    "$BIN" --listen "127.0.0.1:$pport" --listen-tls "127.0.0.1:$tport" \
        --tls-cert "$DOTL/listener-chain.pem" --tls-key "$DOTL/listener.key" \
        --upstream "127.0.0.1:$DOT_PORT#dot.test" --ca-file "$CA" \
        --timeout 2000 --log-level info "$@" >"$WORK/proxy-dotl-$name.log" 2>&1 &
    DOTL_PID=$!
    track "$DOTL_PID"
    wait_listen "$pport" 10 "$DOTL_PID" && wait_until "$DOTL_PID" 10 0.1 tcp_listening "$tport"
}

# the query "a.ZONE A" (id 0x1234, RD) in DNS-over-TCP framing, as printf
# escapes, for openssl s_client; the answer 192.0.2.10 is c000020a in hex
dotl_wire_query() {
    local l out='' q
    for l in ${ZONE//./ }; do
        out+=$(printf '\\x%02x%s' "${#l}" "$l")
    done
    q="\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x01a$out\\x00\\x00\\x01\\x00\\x01"
    # 12 header bytes, 2 for "a", the other labels, the root, type and class
    printf '\\x00\\x%02x%s' $((12 + 2 + ${#ZONE} + 1 + 1 + 4)) "$q"
}

peer_dot_listener() {
    local pport tport mport mpport mtport mmport dpport dtport
    local stport sbport out rc t0 dt fds fd i closed maxdt minfd n ok0 ok1 f0 f1 idle0 idle1
    local pin q hex sb_pid sbw_pid v st want
    log "DoT listener (--listen-tls): kdig, openssl s_client, dnsperf -m dot, stubby, mutual TLS"

    DOTL=$WORK/dotl
    mkdir -p "$DOTL"
    if ! dotl_certs "$DOTL" >"$WORK/dotl-openssl.log" 2>&1; then
        fail "dot listener: certificates for dot.proxy.test and the client CAs"
        sed 's/^/      | /' "$WORK/dotl-openssl.log" | tail -n 20
        return 0
    fi

    for v in pport tport mport mpport mtport mmport dpport dtport stport sbport; do
        pick_port "$v"
    done

    # ------------------------------------------------------------ one-way TLS
    if ! dotl_start tls "$pport" "$tport" --metrics "127.0.0.1:$mport" --tcp-idle-timeout 1000; then
        fail "dot listener: proxy with --listen-tls 127.0.0.1:$tport listening within 10 s"
        sed 's/^/      | /' "$WORK/proxy-dotl-tls.log" | tail -n 20
        return 0
    fi
    local tls_pid=$DOTL_PID
    if grep -q "listening on tls 127.0.0.1:$tport\$" "$WORK/proxy-dotl-tls.log"; then
        pass "dot listener: log says 'listening on tls 127.0.0.1:$tport'"
    else
        fail "dot listener: log says 'listening on tls 127.0.0.1:$tport'"
        sed 's/^/      | /' "$WORK/proxy-dotl-tls.log" | head -n 10
    fi

    # kdig (GnuTLS)
    expect "dot listener: kdig +tls +tls-ca +tls-hostname=dot.proxy.test a.$ZONE A" \
        "$(dotl_kdig_ca "$tport" "a.$ZONE" A)" NOERROR "$A_RE"
    expect "dot listener: kdig +tls nx.$ZONE A" \
        "$(dotl_kdig_ca "$tport" "nx.$ZONE" A)" NXDOMAIN
    pin=$(spki_pin "$DOTL/listener.pem")
    expect "dot listener: kdig +tls-pin (SPKI of the listener, no name) a.$ZONE A" \
        "$(dotl_kdig "$tport" +tls-pin="$pin" "a.$ZONE" A)" NOERROR "$A_RE"
    out=$(dotl_kdig "$tport" +tls-ca="$DOTL/ca.pem" +tls-hostname=wrong.proxy.test "a.$ZONE" A)
    if [ -z "$(status_of "$out")" ]; then
        pass "dot listener: kdig +tls refuses the name wrong.proxy.test (the check is real)"
    else
        fail "dot listener: kdig +tls refuses the name wrong.proxy.test" "got an answer"
    fi
    # (kdig prints its "TLS session" line for every query: count the
    # handshakes the proxy completed instead)
    ok0=$(dotl_metric "$mport" 'dotproxy_tls_handshakes_total{result="ok"}')
    out=$(dotl_kdig_ca "$tport" +keepopen "a.$ZONE" A "nx.$ZONE" A "big.$ZONE" TXT "n7.$ZONE" A)
    ok1=$(dotl_metric "$mport" 'dotproxy_tls_handshakes_total{result="ok"}')
    st=$(grep -o 'status: [A-Z]*' <<<"$out" | cut -d' ' -f2 | tr '\n' ' ')
    if [ "$st" = "NOERROR NXDOMAIN NOERROR NOERROR " ] && grep -qE "$A_RE" <<<"$out" &&
        [ "$(txt_count "$out")" -eq "$TXT_RECORDS" ] && [ $((${ok1:-0} - ${ok0:-0})) = 1 ]; then
        pass "dot listener: kdig +tls +keepopen: 4 queries (one of ${TXT_RECORDS} TXT records) on one TLS connection (1 handshake)"
    else
        fail "dot listener: kdig +tls +keepopen: 4 queries on one TLS connection" \
            "statuses: $st; $(txt_count "$out") TXT; handshakes ${ok0:-?} -> ${ok1:-?}"
        dotl_show "$out"
    fi

    # openssl s_client: certificate, name, ALPN, protocol versions
    for v in 1.2 1.3; do
        out=$(dotl_s_client "$tport" -alpn dot "-tls1_${v#1.}")
        if grep -q 'Verify return code: 0 (ok)' <<<"$out" &&
            grep -q '^ALPN protocol: dot$' <<<"$out" &&
            grep -qE "Protocol *: TLSv$v\$" <<<"$out"; then
            pass "dot listener: openssl s_client -tls1_${v#1.} -alpn dot: verified (code 0), ALPN dot, TLSv$v"
        else
            fail "dot listener: openssl s_client -tls1_${v#1.} -alpn dot: verified, ALPN dot, TLSv$v"
            dotl_show "$(grep -E 'Verify|ALPN|Protocol|alert|error|New,' <<<"$out")"
        fi
    done
    out=$(dotl_s_client "$tport" -tls1_1 -cipher 'DEFAULT:@SECLEVEL=0')
    # (s_client prints "Protocol : TLSv1.1" even for a session never set up)
    if grep -q 'alert' <<<"$out" && grep -q 'New, (NONE), Cipher is (NONE)' <<<"$out"; then
        pass "dot listener: openssl s_client -tls1_1 refused by the server ($(grep -o 'alert [a-z ]*' <<<"$out" | head -n 1))"
    else
        fail "dot listener: openssl s_client -tls1_1 refused by the server"
        dotl_show "$(grep -E 'Protocol|alert|error|New,' <<<"$out")"
    fi
    # a client without ALPN is served: a real query through s_client
    q=$(dotl_wire_query)
    # shellcheck disable=SC2059
    hex=$({ printf "$q"; sleep 1; } | timeout 10 openssl s_client -connect "127.0.0.1:$tport" \
        -servername dot.proxy.test -verify_hostname dot.proxy.test -CAfile "$DOTL/ca.pem" \
        -verify_return_error -quiet 2>/dev/null | od -An -v -tx1 | tr -d ' \n' || true)
    if [[ $hex == ????1234* ]] && [[ $hex == *c000020a* ]]; then
        pass "dot listener: openssl s_client without ALPN: a.$ZONE A answered (192.0.2.10)"
    else
        fail "dot listener: openssl s_client without ALPN: a.$ZONE A answered" "got '${hex:0:80}'"
    fi

    # dnsperf -m dot (does not verify the certificate)
    out=$(timeout 30 dnsperf -m dot -s 127.0.0.1 -p "$tport" -d "$WORK/queries.txt" \
        -l 3 -c 2 -q 50 -Q "$QPS" -t 2 2>&1 || true)
    local sent done_ lost codes
    sent=$(sed -n 's/^ *Queries sent: *\([0-9]*\).*/\1/p' <<<"$out")
    done_=$(sed -n 's/^ *Queries completed: *\([0-9]*\).*/\1/p' <<<"$out")
    lost=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' <<<"$out")
    codes=$(sed -n 's/^ *Response codes: *//p' <<<"$out")
    if [ -n "$sent" ] && [ "$sent" -gt 0 ] && [ "$lost" = 0 ] && [ "$done_" = "$sent" ] &&
        grep -q "^NOERROR $sent " <<<"$codes"; then
        pass "dot listener: dnsperf -m dot -c 2 -q 50 -l 3: $sent/$sent completed, 0 lost"
    else
        fail "dot listener: dnsperf -m dot: all queries answered, none lost" \
            "sent=${sent:-?} completed=${done_:-?} lost=${lost:-?} rcodes: ${codes:-?}"
        dotl_show "$(tail -n 25 <<<"$out")"
    fi

    # stubby (getdns) as a DoT client of the listener, authentication required
    if ! command -v stubby >/dev/null 2>&1; then
        fail "dot listener: stubby -> dotproxy (TLS) -> unbound" "stubby not installed (Debian package stubby)"
        fail "dot listener: stubby with tls_auth_name wrong.proxy.test gets no answer" "stubby not installed"
    else
        dotl_stubby_conf "$sbport" dot.proxy.test "$tport" >"$WORK/dotl-stubby.yml"
        stubby -C "$WORK/dotl-stubby.yml" -l >"$WORK/dotl-stubby.log" 2>&1 &
        sb_pid=$!
        track "$sb_pid"
        dotl_stubby_conf "$stport" wrong.proxy.test "$tport" >"$WORK/dotl-stubby-wrong.yml"
        stubby -C "$WORK/dotl-stubby-wrong.yml" -l >"$WORK/dotl-stubby-wrong.log" 2>&1 &
        sbw_pid=$!
        track "$sbw_pid"
        if wait_listen "$sbport" 10 "$sb_pid" &&
            wait_until "$sb_pid" 10 0.25 dig_noerror "$sbport" "a.$ZONE"; then
            expect "dot listener: stubby (tls_auth_name dot.proxy.test, authentication required) -> dotproxy TLS -> unbound: a.$ZONE A" \
                "$(dig_at "$sbport" +time=3 "a.$ZONE" A)" NOERROR "$A_RE"
        else
            fail "dot listener: stubby -> dotproxy (TLS) -> unbound answers a.$ZONE within 10 s"
            sed 's/^/      | /' "$WORK/dotl-stubby.log" | tail -n 15
        fi
        if wait_listen "$stport" 10 "$sbw_pid"; then
            out=$(dig_at "$stport" +time=3 "a.$ZONE" A)
            if ! grep -qE "$A_RE" <<<"$out"; then
                pass "dot listener: stubby with tls_auth_name wrong.proxy.test gets no answer (${out:+status $(status_of "$out")})"
            else
                fail "dot listener: stubby with tls_auth_name wrong.proxy.test gets no answer" "it was answered"
            fi
        else
            fail "dot listener: stubby (wrong name) listening within 10 s"
        fi
        stop_pid "$sb_pid" 3
        stop_pid "$sbw_pid" 3
    fi

    # slowloris over TLS: 20 connections that send nothing are closed at the
    # 1000 ms idle timeout, while kdig keeps being answered
    idle0=$(dotl_metric "$mport" 'dotproxy_tcp_connections_closed_total{reason="idle"}')
    fds=()
    t0=$(now_ms)
    for ((i = 0; i < 20; i++)); do
        if exec {fd}<>"/dev/tcp/127.0.0.1/$tport"; then fds+=("$fd"); fi
    done
    sleep 0.3
    ok0=0
    for ((i = 0; i < 3; i++)); do
        out=$(dotl_kdig_ca "$tport" "a.$ZONE" A)
        grep -qE "$A_RE" <<<"$out" && ok0=$((ok0 + 1))
    done
    closed=0
    maxdt=0
    minfd=999999
    for fd in "${fds[@]}"; do
        rc=0
        read -r -t 5 -u "$fd" _ || rc=$?
        dt=$(($(now_ms) - t0))
        # EOF (or a reset) rather than the 5 s read timeout (> 128)
        [ "$rc" -le 128 ] && closed=$((closed + 1))
        [ "$dt" -gt "$maxdt" ] && maxdt=$dt
        [ "$dt" -lt "$minfd" ] && minfd=$dt
        exec {fd}<&-
    done
    out=$(dotl_kdig_ca "$tport" "a.$ZONE" A)
    grep -qE "$A_RE" <<<"$out" && ok0=$((ok0 + 1))
    idle1=$(dotl_metric "$mport" 'dotproxy_tcp_connections_closed_total{reason="idle"}')
    if [ "${#fds[@]}" = 20 ] && [ "$closed" = 20 ] && [ "$minfd" -ge 900 ] && [ "$maxdt" -lt 3000 ] &&
        [ "$ok0" = 4 ] && [ $((${idle1:-0} - ${idle0:-0})) -ge 20 ]; then
        pass "dot listener: slowloris: 20 silent TLS-port connections closed after ${minfd}..${maxdt} ms (--tcp-idle-timeout 1000), kdig answered 4/4 meanwhile, closed{reason=\"idle\"} +$((idle1 - idle0))"
    else
        fail "dot listener: slowloris: 20 silent connections closed at the idle timeout, kdig still answered" \
            "opened ${#fds[@]}, closed $closed after ${minfd}..${maxdt} ms, kdig $ok0/4, idle closes ${idle0:-?} -> ${idle1:-?}"
    fi
    # a client that completes the handshake, then stays silent
    sleep 4 | timeout 8 openssl s_client -connect "127.0.0.1:$tport" -servername dot.proxy.test \
        -CAfile "$DOTL/ca.pem" -alpn dot >"$WORK/dotl-idle-s_client.txt" 2>&1 &
    local sc_pid=$!
    sleep 0.5
    n=$(ss -Htn state established "( dport = :$tport )" 2>/dev/null | wc -l)
    sleep 2
    local n2
    n2=$(ss -Htn state established "( dport = :$tport )" 2>/dev/null | wc -l)
    wait "$sc_pid" 2>/dev/null || true
    if [ "$n" = 1 ] && [ "$n2" = 0 ] && grep -q 'Verify return code: 0' "$WORK/dotl-idle-s_client.txt"; then
        pass "dot listener: a client idle after its handshake is closed at the idle timeout (gone after 2.5 s)"
    else
        fail "dot listener: a client idle after its handshake is closed at the idle timeout" \
            "established at 0.5 s: $n, at 2.5 s: $n2"
    fi

    # SIGHUP: a new certificate is served; a broken one keeps the old
    local ser0 ser1 ser2 warn0 warn1
    dotl_serial() {
        dotl_s_client "$tport" | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2
    }
    ser0=$(dotl_serial)
    cp "$DOTL/listener-chain.pem" "$DOTL/listener-chain.pem.orig"
    (
        cd "$DOTL" &&
            openssl x509 -req -in listener.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days 2 -sha256 -extfile listener.ext -out listener2.pem &&
            cat listener2.pem ca.pem >listener-chain.pem.new &&
            mv listener-chain.pem.new listener-chain.pem
    ) >>"$WORK/dotl-openssl.log" 2>&1
    kill -HUP "$tls_pid"
    wait_log "$WORK/proxy-dotl-tls.log" 'configuration reloaded' 5 || true
    ser1=$(dotl_serial)
    want=$(openssl x509 -in "$DOTL/listener2.pem" -noout -serial 2>/dev/null | cut -d= -f2)
    if [ -n "$ser1" ] && [ "$ser1" != "$ser0" ] && [ "$ser1" = "$want" ]; then
        pass "dot listener: SIGHUP: the renewed certificate is served (serial $ser0 -> $ser1)"
    else
        fail "dot listener: SIGHUP: the renewed certificate is served" "serial ${ser0:-?} -> ${ser1:-?}, want ${want:-?}"
    fi
    warn0=$(grep -c 'keeping the TLS' "$WORK/proxy-dotl-tls.log" || true)
    echo "not a certificate" >"$DOTL/listener-chain.pem"
    n=$(grep -c 'configuration reloaded' "$WORK/proxy-dotl-tls.log" || true)
    kill -HUP "$tls_pid"
    for ((i = 0; i < 50; i++)); do
        [ "$(grep -c 'configuration reloaded' "$WORK/proxy-dotl-tls.log" || true)" -gt "$n" ] && break
        sleep 0.1
    done
    warn1=$(grep -c 'keeping the TLS' "$WORK/proxy-dotl-tls.log" || true)
    ser2=$(dotl_serial)
    out=$(dotl_kdig_ca "$tport" "a.$ZONE" A)
    if [ "$ser2" = "$ser1" ] && [ $((warn1 - warn0)) = 1 ] && grep -qE "$A_RE" <<<"$out" &&
        is_running "$tls_pid"; then
        pass "dot listener: SIGHUP with a broken --tls-cert: one warning, the old certificate still served and answering"
    else
        fail "dot listener: SIGHUP with a broken --tls-cert keeps the old certificate" \
            "serial ${ser1:-?} -> ${ser2:-?}, $((warn1 - warn0)) warnings"
        grep -iE 'warn|reload' "$WORK/proxy-dotl-tls.log" | sed 's/^/      | /' | tail -n 5
    fi
    mv "$DOTL/listener-chain.pem.orig" "$DOTL/listener-chain.pem"

    ok1=$(dotl_metric "$mport" 'dotproxy_tls_handshakes_total{result="ok"}')
    f1=$(dotl_metric "$mport" 'dotproxy_tls_handshakes_total{result="failed"}')
    # the TLS 1.1 attempt at least; kdig's wrong name and stubby's aborts too
    if [ "${ok1:-0}" -ge 10 ] && [ "${f1:-0}" -ge 1 ]; then
        pass "dot listener: /metrics dotproxy_tls_handshakes_total ok=$ok1 failed=$f1"
    else
        fail "dot listener: /metrics dotproxy_tls_handshakes_total ok >= 10, failed >= 1" "ok=${ok1:-none} failed=${f1:-none}"
    fi
    stop_pid "$tls_pid" 3

    # ------------------------------------------------------------ mutual TLS
    if ! dotl_start mtls "$mpport" "$mtport" --metrics "127.0.0.1:$mmport" \
        --client-ca "$DOTL/clientca.pem"; then
        fail "mutual TLS: proxy with --client-ca listening within 10 s"
        sed 's/^/      | /' "$WORK/proxy-dotl-mtls.log" | tail -n 20
        return 0
    fi
    local mtls_pid=$DOTL_PID
    f0=$(dotl_metric "$mmport" 'dotproxy_tls_handshakes_total{result="failed"}')
    expect "mutual TLS: kdig +tls-certfile +tls-keyfile (client CA's certificate) a.$ZONE A" \
        "$(dotl_kdig_ca "$mtport" +tls-certfile="$DOTL/client.pem" +tls-keyfile="$DOTL/client.key" "a.$ZONE" A)" \
        NOERROR "$A_RE"
    rc=0
    out=$(timeout 10 kdig @127.0.0.1 -p "$mtport" +tls +time=2 +retry=0 +tls-ca="$DOTL/ca.pem" \
        +tls-hostname=dot.proxy.test "a.$ZONE" A 2>&1) || rc=$?
    if [ "$rc" != 0 ] && [ -z "$(status_of "$out")" ]; then
        pass "mutual TLS: kdig without a client certificate gets no answer (exit $rc)"
    else
        fail "mutual TLS: kdig without a client certificate gets no answer" "exit $rc, status '$(status_of "$out")'"
        dotl_show "$out"
    fi
    out=$(dotl_kdig_ca "$mtport" +tls-certfile="$DOTL/rogue.pem" +tls-keyfile="$DOTL/rogue.key" "a.$ZONE" A)
    if [ -z "$(status_of "$out")" ]; then
        pass "mutual TLS: kdig with a certificate from another CA gets no answer"
    else
        fail "mutual TLS: kdig with a certificate from another CA gets no answer" "status '$(status_of "$out")'"
    fi
    for v in 1.2 1.3; do
        out=$(dotl_s_client "$mtport" -alpn dot "-tls1_${v#1.}" -cert "$DOTL/rogue.pem" -key "$DOTL/rogue.key")
        if grep -qE 'alert (unknown ca|bad certificate|certificate unknown|decrypt error|handshake failure)' <<<"$out"; then
            pass "mutual TLS: openssl s_client -tls1_${v#1.} with another CA's certificate fails ($(grep -oE 'alert [a-z ]*' <<<"$out" | head -n 1))"
        else
            fail "mutual TLS: openssl s_client -tls1_${v#1.} with another CA's certificate fails"
            dotl_show "$(grep -E 'Verify|alert|error|New,' <<<"$out")"
        fi
    done
    out=$(dotl_s_client "$mtport" -alpn dot -cert "$DOTL/client.pem" -key "$DOTL/client.key")
    if grep -q 'Verify return code: 0 (ok)' <<<"$out" && ! grep -q 'alert' <<<"$out" &&
        grep -A2 'Acceptable client certificate CA names' <<<"$out" | grep -q 'dotproxy peers client CA'; then
        pass "mutual TLS: openssl s_client with the client certificate: handshake ok, the server asks for 'dotproxy peers client CA'"
    else
        fail "mutual TLS: openssl s_client with the client certificate: handshake ok"
        dotl_show "$(grep -E 'Verify|alert|error|New,|Acceptable|CN' <<<"$out")"
    fi
    f1=$(dotl_metric "$mmport" 'dotproxy_tls_handshakes_total{result="failed"}')
    if [ -n "$f0" ] && [ -n "$f1" ] && [ $((f1 - f0)) -ge 4 ]; then
        pass "mutual TLS: dotproxy_tls_handshakes_total{result=\"failed\"} $f0 -> $f1 (4 refused clients)"
    else
        fail "mutual TLS: dotproxy_tls_handshakes_total{result=\"failed\"} up by >= 4" "${f0:-none} -> ${f1:-none}"
    fi
    if grep -qE 'WARN.*tls client 127\.0\.0\.1:[0-9]+: handshake failed' "$WORK/proxy-dotl-mtls.log"; then
        pass "mutual TLS: a refused client is logged ($(grep -m 1 -oE 'handshake failed: [^(]*' "$WORK/proxy-dotl-mtls.log"))"
    else
        fail "mutual TLS: a refused client is logged"
    fi
    # --client-ca is about the TLS listener only: plain --listen still serves
    expect "mutual TLS: the plain --listen of the same proxy still answers (not covered by --client-ca)" \
        "$(dig_at "$mpport" "a.$ZONE" A)" NOERROR "$A_RE"
    stop_pid "$mtls_pid" 3

    # --allow applies on top of a valid client certificate
    if dotl_start deny "$dpport" "$dtport" --client-ca "$DOTL/clientca.pem" --allow 192.0.2.0/24; then
        out=$(dotl_kdig_ca "$dtport" +tls-certfile="$DOTL/client.pem" +tls-keyfile="$DOTL/client.key" "a.$ZONE" A)
        if [ -z "$(status_of "$out")" ]; then
            pass "mutual TLS: --allow 192.0.2.0/24 still refuses 127.0.0.1 with a valid client certificate"
        else
            fail "mutual TLS: --allow still applies with a valid client certificate" "status '$(status_of "$out")'"
        fi
        stop_pid "$DOTL_PID" 3
    else
        fail "mutual TLS: proxy with --allow 192.0.2.0/24 listening within 10 s"
    fi
}

# dotl_stubby_conf LISTEN_PORT AUTH_NAME TLS_PORT: a stubby.yml (syntax as
# in benchmarks/bench.sh) with dotproxy's listener as its only upstream
dotl_stubby_conf() {
    mkdir -p "$WORK/dotl-stubby-$1"
    cat <<EOF
resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list:
  - GETDNS_TRANSPORT_TLS
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_ca_file: "$DOTL/ca.pem"
tls_query_padding_blocksize: 128
round_robin_upstreams: 0
idle_timeout: 10000
timeout: 3000
dnssec: GETDNS_EXTENSION_FALSE
appdata_dir: "$WORK/dotl-stubby-$1"
listen_addresses:
  - 127.0.0.1@$1
upstream_recursive_servers:
  - address_data: 127.0.0.1
    tls_port: $3
    tls_auth_name: "$2"
EOF
}
