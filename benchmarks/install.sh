#!/usr/bin/env bash
# Installs (Debian 12, as root) whatever benchmarks/bench.sh needs and is
# missing. Idempotent: does nothing when everything is already there.
#
#   unbound  stubby  dnsdist  dnsperf  gnuplot-nox  procps  iproute2
#   openssl  util-linux (unshare)  python3  coreutils
#
# Services shipped by these packages (unbound, stubby, dnsdist) are not
# started by the install: a temporary policy-rc.d forbids it (the benchmark
# starts its own instances inside a private network namespace).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "$(readlink -f "$0")")/../scripts/lib/common.sh"

[ "$(id -u)" = 0 ] || die "run as root (apt-get install)"

# package -> a command it provides (to tell whether it is installed)
declare -A CHECK=(
    [unbound]=unbound
    [stubby]=stubby
    [dnsdist]=dnsdist
    [dnsperf]=dnsperf
    [gnuplot-nox]=gnuplot
    [procps]=ps
    [iproute2]=ip
    [openssl]=openssl
    [util-linux]=unshare
    [python3]=python3
    [coreutils]=timeout
)

missing=()
for pkg in unbound stubby dnsdist dnsperf gnuplot-nox procps iproute2 openssl util-linux python3 coreutils; do
    cmd=${CHECK[$pkg]}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/usr/bin/$cmd" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: everything is installed"
    exit 0
fi

echo "install.sh: installing ${missing[*]}"
if [ ! -e /usr/sbin/policy-rc.d ]; then
    at_exit rm -f /usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi

apt_install -qq "${missing[@]}"
echo "install.sh: done"
