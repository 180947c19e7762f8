#!/usr/bin/env bash
# Static checks of the systemd unit in deploy/: no systemd as PID 1 needed.
# (The Kubernetes manifests are checked by scripts/supply-check.sh manifests:
# kubernetes-validate and checkov; `just deploy-check` runs both.)
#
#   1. systemd-analyze verify, both ways the service runs: deploy/dotproxy.service
#      alone, and with deploy/dotproxy.socket and the drop-in
#      deploy/dotproxy.service.d/socket.conf; ExecStart pointed at a stand-in
#      executable (the unit names /usr/local/bin/dotproxy, which need not be
#      installed here)
#   2. systemd-analyze security --offline, both ways: exposure score, must stay
#      <= 2.0
#
# Usage: scripts/deploy-check.sh      (CI: bash scripts/deploy-check.sh)
# Both steps are skipped, with a note, where systemd-analyze is missing or
# too old. Ends with "deploy-check: N passed, N failed"; exits 1 if a step
# failed.
set -euo pipefail

LIB=$(dirname "$(readlink -f "$0")")/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
cd "$LIB/../.."

UNIT=deploy/dotproxy.service
SOCKET=deploy/dotproxy.socket
DROPIN=deploy/dotproxy.service.d/socket.conf
MAX_EXPOSURE=2.0
T=$(mktemp -d "${TMPDIR:-/tmp}/dotproxy-deploy-check.XXXXXX")
at_exit rm -rf "$T"

log "systemd unit"
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "note: systemd-analyze not found, unit checks skipped"
else
    # a stand-in for the binary: verify checks that ExecStart is executable
    printf '#!/bin/sh\nexit 0\n' >"$T/dotproxy"
    chmod 0755 "$T/dotproxy"
    # one directory per way of running; verify and security read the
    # drop-in directory next to the unit
    mkdir -p "$T/alone" "$T/socket/dotproxy.service.d"
    sed "s#/usr/local/bin/dotproxy#$T/dotproxy#g" "$UNIT" >"$T/alone/dotproxy.service"
    cp "$T/alone/dotproxy.service" "$T/socket/dotproxy.service"
    cp "$SOCKET" "$T/socket/dotproxy.socket"
    cp "$DROPIN" "$T/socket/dotproxy.service.d/socket.conf"
    for way in alone socket; do
        units=("$T/$way/dotproxy.service")
        what=$UNIT
        if [ "$way" = socket ]; then
            units=("$T/socket/dotproxy.socket" "${units[@]}")
            what="$SOCKET + $UNIT + $DROPIN"
        fi
        if out=$(systemd-analyze verify "${units[@]}" 2>&1) && [ -z "$out" ]; then
            pass "systemd-analyze verify $what"
        else
            printf '%s\n' "$out" | sed "s#$T/##g"
            fail "systemd-analyze verify $what"
        fi
        if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
            out=$(systemd-analyze security --offline=yes --no-pager "$T/$way/dotproxy.service" 2>&1 || true)
            score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
            if [ -n "$score" ] && awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
                pass "systemd-analyze security ($way): exposure $score (<= $MAX_EXPOSURE)"
            else
                printf '%s\n' "$out" | grep -E '✗|Overall' || printf '%s\n' "$out" | tail -n 20
                fail "systemd-analyze security ($way): exposure <= $MAX_EXPOSURE" "got '${score:-none}'"
            fi
        else
            echo "note: systemd-analyze security has no --offline here, skipped"
        fi
    done
fi

checks_done deploy-check
