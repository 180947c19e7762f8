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
LIB=$(dirname "$(readlink -f "$0")")/../../scripts/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
# shellcheck source=scripts/lib/unbound.sh
. "$LIB/unbound.sh"

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

# the configuration is fed through stdin (a here-string), so nothing is left
# behind when unbound is killed
conf=$(unbound_conf --plain "$ip@$port" --forward "$up_ip@$up_port#$up_name" "$ca")
exec unbound -d -c /dev/stdin <<<"$conf"
