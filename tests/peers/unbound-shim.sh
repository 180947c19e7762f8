#!/usr/bin/env bash
# Stand-in for dotproxy built from unbound as a DNS -> DoT forwarder (cache
# off). Takes dotproxy's command line, so tests/peers/run.sh can be checked,
# or compared against a known peer, without the real binary:
#
#   tests/peers/run.sh tests/peers/unbound-shim.sh
#
# Only --listen, --upstream ADDR:PORT#NAME and --ca-file are used; the rest
# is accepted and ignored. unbound is exec'd, so the PID and SIGTERM handling
# are unbound's own.
set -euo pipefail

listen=''
upstream=''
ca=''
while [ "$#" -gt 0 ]; do
    case $1 in
        --listen) listen=$2; shift 2 ;;
        --upstream) upstream=$2; shift 2 ;;
        --ca-file) ca=$2; shift 2 ;;
        --timeout | --log-level) shift 2 ;;
        *) echo "unbound-shim: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$listen" ] || [ -z "$upstream" ] || [ -z "$ca" ]; then
    echo "usage: $0 --listen IP:PORT --upstream IP:PORT#NAME --ca-file CA.pem" >&2
    exit 2
fi
ip=${listen%:*}
port=${listen##*:}
up_hostport=${upstream%%#*}
up_name=${upstream#*#}
up_ip=${up_hostport%:*}
up_port=${up_hostport##*:}

# the configuration is fed through stdin (here-document), so nothing is left
# behind when unbound is killed
exec unbound -d -c /dev/stdin <<EOF
server:
    username: ""
    chroot: ""
    directory: ""
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    interface: $ip@$port
    port: $port
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    access-control: 127.0.0.0/8 allow
    tls-cert-bundle: "$ca"
    module-config: "iterator"
    do-not-query-localhost: no
    local-zone: "test." nodefault
    outgoing-num-tcp: 16
    max-reuse-tcp-queries: 1000000
    prefetch: no
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: $up_ip@$up_port#$up_name
    forward-tls-upstream: yes
    forward-first: no
    forward-no-cache: yes
EOF
