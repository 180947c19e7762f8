# shellcheck shell=bash
# dig helpers for the end-to-end checks: tests/peers/run.sh (and features.sh)
# and scripts/image-test.sh. Needs common.sh (pass, fail). Every dig is
# bounded by timeout(1) and never fails the caller.
#
#   DIG_NETNS=NAME          run dig inside the network namespace NAME
#                           (ip netns exec); unset: in this one
#   dig_at PORT ARG...      one dig to 127.0.0.1:PORT (+time=2 +tries=1, at
#                           most 10 s; a later +time= wins); prints its output
#   dig_noerror PORT NAME   true when `NAME A` gets a NOERROR answer (a
#                           readiness probe: +time=1, at most 3 s)
#   status_of TEXT          the first rcode in dig, kdig or mdig output
#   rr_re NAME TYPE DATA    an ERE for that record in an answer section
#   expect CHECK OUTPUT STATUS [ERE]
#                           pass CHECK if OUTPUT has rcode STATUS (and a line
#                           matching ERE); else fail it and show OUTPUT
#   expect_zone PREFIX PORT ZONE
#                           over UDP and over TCP: a.ZONE A is 192.0.2.10,
#                           aaaa.ZONE AAAA is 2001:db8::10, nx.ZONE NXDOMAIN
#                           (the records of the scripts' unbound upstream)

_dig() {
    if [ -n "${DIG_NETNS:-}" ]; then
        ip netns exec "$DIG_NETNS" "$@"
    else
        "$@"
    fi
}

dig_at() {
    local port=$1
    shift
    _dig timeout 10 dig @127.0.0.1 -p "$port" +time=2 +tries=1 "$@" 2>&1 || true
}

dig_noerror() {
    [ "$(status_of "$(_dig timeout 3 dig @127.0.0.1 -p "$1" +time=1 +tries=1 \
        "$2" A 2>/dev/null || true)")" = NOERROR ]
}

status_of() {
    grep -o 'status: [A-Z]*' <<<"$1" | head -n 1 | cut -d' ' -f2
}

rr_re() {
    local s='[[:space:]]+'
    printf '%s\\.%s[0-9]+%sIN%s%s%s%s' "${1//./\\.}" "$s" "$s" "$s" "$2" "$s" "${3//./\\.}"
}

expect() {
    local name=$1 out=$2 want=$3 re=${4:-} got
    got=$(status_of "$out")
    if [ "$got" != "$want" ]; then
        fail "$name" "status '${got:-none}', want $want"
    elif [ -n "$re" ] && ! grep -qE "$re" <<<"$out"; then
        fail "$name" "answer does not match /$re/"
    else
        pass "$name"
        return 0
    fi
    printf '%s\n' "$out" | sed 's/^/      | /' | head -n 40 || true
}

expect_zone() {
    local prefix=$1 port=$2 zone=$3 mode opt a_re aaaa_re
    a_re=$(rr_re "a.$zone" A 192.0.2.10)
    aaaa_re=$(rr_re "aaaa.$zone" AAAA 2001:db8::10)
    for mode in udp tcp; do
        opt=+notcp
        [ "$mode" = tcp ] && opt=+tcp
        expect "${prefix}dig $mode: a.$zone A" "$(dig_at "$port" "$opt" "a.$zone" A)" NOERROR "$a_re"
        expect "${prefix}dig $mode: aaaa.$zone AAAA" "$(dig_at "$port" "$opt" "aaaa.$zone" AAAA)" NOERROR "$aaaa_re"
        expect "${prefix}dig $mode: nx.$zone A" "$(dig_at "$port" "$opt" "nx.$zone" A)" NXDOMAIN
    done
}
