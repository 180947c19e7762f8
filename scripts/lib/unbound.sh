# shellcheck shell=bash
# The one unbound configuration of the test and benchmark scripts
# (tests/peers/run.sh and features.sh, tests/peers/unbound-shim.sh,
# benchmarks/bench.sh, benchmarks/soak.sh, scripts/image-test.sh), adapted
# from the reference peer configurations. Needs common.sh (die).
#
#   unbound_conf OPTION...   print an unbound.conf (see below)
#   unbound_checkconf FILE [DIR]
#                            die unless unbound-checkconf accepts FILE (run in
#                            DIR, for a file with relative paths)
#   unbound_version          e.g. 1.17.1
#
# unbound_conf writes a server for `unbound -d -c FILE` on loopback: in the
# foreground, no chroot, pidfile, syslog or remote control, one thread, IPv4
# over UDP and TCP, clients from 127.0.0.0/8. It is one of two kinds:
#
#   a local-data server (the default): answers only from local data, with a
#   static empty zone at "." so it never sends a query anywhere; tuned not to
#   be the bottleneck (TCP slots, idle timeouts, edns-tcp-keepalive
#   advertised, no rate limits, EDNS buffer 1232)
#
#   a plain DNS -> DoT forwarder (--forward): everything to one upstream over
#   TLS, its certificate verified; the RFC 6761 default zone "test." is
#   turned off (it would answer *.test itself), connections are reused
#
# Options:
#   --comment TEXT            a first line "# TEXT"
#   --dir DIR                 directory: (default "": relative paths are from
#                             where unbound is started)
#   --plain [IP@]PORT         plain DNS on IP (127.0.0.1):PORT, UDP and TCP
#   --dot PORT KEY CHAIN      DNS over TLS on 127.0.0.1:PORT with this key and
#                             certificate chain
#   --zone NAME               local-zone: "NAME." static
#   --data RR                 local-data: 'RR' (repeatable)
#   --include FILE            include: "FILE", e.g. generated local-data
#   --forward IP@PORT#NAME CA forward everything to that DoT upstream,
#                             verified against the bundle CA
#   --forward-no-cache yes|no forward-no-cache (default yes: no cache)
#   --set 'NAME: VALUE'       a server: option, replacing the default of NAME
#                             or added after the others (repeatable)

_unbound_opt() {
    [ -n "${_uc_val[$1]+set}" ] || _uc_order+=("$1")
    _uc_val[$1]=$2
}

unbound_conf() {
    local comment="" dir="" plain="" dot="" key="" chain="" fwd="" ca="" no_cache=yes s k
    local -a zones=() data=() includes=() sets=() _uc_order=()
    local -A _uc_val=()
    while [ "$#" -gt 0 ]; do
        case $1 in
            --comment) comment=$2; shift 2 ;;
            --dir) dir=$2; shift 2 ;;
            --plain) plain=$2; shift 2 ;;
            --dot) dot=$2 key=$3 chain=$4; shift 4 ;;
            --zone) zones+=("$2"); shift 2 ;;
            --data) data+=("$2"); shift 2 ;;
            --include) includes+=("$2"); shift 2 ;;
            --forward) fwd=$2 ca=$3; shift 3 ;;
            --forward-no-cache) no_cache=$2; shift 2 ;;
            --set) sets+=("$2"); shift 2 ;;
            *)
                echo "unbound_conf: unknown option '$1'" >&2
                return 2
                ;;
        esac
    done
    case $plain in *@*) ;; ?*) plain=127.0.0.1@$plain ;; esac

    _unbound_opt username '""'
    _unbound_opt chroot '""'
    _unbound_opt directory "\"$dir\""
    _unbound_opt pidfile '""'
    _unbound_opt use-syslog no
    _unbound_opt logfile '""'
    _unbound_opt verbosity 1
    _unbound_opt log-queries no
    _unbound_opt num-threads 1
    _unbound_opt do-ip4 yes
    _unbound_opt do-ip6 no
    _unbound_opt do-udp yes
    _unbound_opt do-tcp yes
    _unbound_opt access-control '127.0.0.0/8 allow'
    if [ -n "$fwd" ]; then
        _unbound_opt tls-cert-bundle "\"$ca\""
        _unbound_opt module-config '"iterator"'
        _unbound_opt do-not-query-localhost no
        _unbound_opt outgoing-num-tcp 16
        _unbound_opt max-reuse-tcp-queries 1000000
        _unbound_opt prefetch no
    else
        _unbound_opt incoming-num-tcp 200
        _unbound_opt tcp-idle-timeout 30000
        _unbound_opt edns-tcp-keepalive yes
        _unbound_opt edns-tcp-keepalive-timeout 30000
        _unbound_opt ratelimit 0
        _unbound_opt ip-ratelimit 0
        _unbound_opt max-udp-size 1232
        _unbound_opt edns-buffer-size 1232
        _unbound_opt module-config '"iterator"'
        _unbound_opt outgoing-range 16
        _unbound_opt outgoing-num-tcp 0
        _unbound_opt do-not-query-localhost yes
        _unbound_opt statistics-interval 0
    fi
    for s in "${sets[@]}"; do
        k=${s#*:}
        _unbound_opt "${s%%:*}" "${k#"${k%%[![:space:]]*}"}"
    done

    [ -z "$comment" ] || printf '# %s\n' "$comment"
    echo "server:"
    for k in "${_uc_order[@]}"; do
        printf '    %s: %s\n' "$k" "${_uc_val[$k]}"
        [ "$k" = num-threads ] || continue
        # the listeners, after the process settings
        [ -z "$plain" ] || printf '    interface: %s\n' "$plain"
        [ -z "$dot" ] || printf '    interface: 127.0.0.1@%s\n' "$dot"
        [ -z "$plain" ] || printf '    port: %s\n' "${plain##*@}"
        if [ -n "$dot" ]; then
            printf '    tls-port: %s\n' "$dot"
            printf '    tls-service-key: "%s"\n' "$key"
            printf '    tls-service-pem: "%s"\n' "$chain"
        fi
    done
    if [ -n "$fwd" ]; then
        printf '    local-zone: "test." nodefault\n'
    else
        printf '    local-zone: "." static\n'
    fi
    for s in "${zones[@]}"; do printf '    local-zone: "%s." static\n' "$s"; done
    for s in "${data[@]}"; do printf "    local-data: '%s'\n" "$s"; done
    for s in "${includes[@]}"; do printf '    include: "%s"\n' "$s"; done
    printf 'remote-control:\n    control-enable: no\n'
    if [ -n "$fwd" ]; then
        printf 'forward-zone:\n    name: "."\n    forward-addr: %s\n' "$fwd"
        printf '    forward-tls-upstream: yes\n    forward-first: no\n'
        printf '    forward-no-cache: %s\n' "$no_cache"
    fi
}

unbound_checkconf() {
    local out
    if ! out=$(cd "${2:-.}" && unbound-checkconf "$1" 2>&1); then
        printf '%s\n' "$out" >&2
        die "unbound-checkconf rejected $1"
    fi
}

unbound_version() {
    unbound -V 2>/dev/null | sed -n 's/^Version //p'
}
