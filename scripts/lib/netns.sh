# shellcheck shell=bash
# Private network namespaces with only loopback, for benchmarks/bench.sh,
# benchmarks/soak.sh and scripts/image-test.sh. Needs common.sh (die and
# require_tools). Root only.
#
#   netns_reexec NAME VAR... -- ARG...
#       Unless NAME_IN_NETNS=1: re-run this script ("$0" ARG...) in a new
#       network namespace (unshare --net), with NAME_IN_NETNS=1 and, exported,
#       NAME_CMDLINE (the command line, prefixed with those VARs that are set)
#       and NAME_T0 (start time, epoch seconds); does not return.
#       In the re-run: bring loopback up, die unless it is the only link,
#       return.
#   netns_add NS      a named namespace (ip netns add) with loopback up, for
#                     tools that want a path (podman --network ns:...)
#   netns_delete NS   kill what is left in NS, delete it

netns_reexec() {
    local name=$1 v a cmdline="" nlinks
    local -a vars=()
    shift
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
        vars+=("$1")
        shift
    done
    [ "$#" -eq 0 ] || shift
    local flag=${name}_IN_NETNS
    if [ "${!flag:-}" != 1 ]; then
        [ "$(id -u)" = 0 ] || die "run as root (needs unshare -n)"
        require_tools unshare ip
        # the exact command, for the report
        for v in "${vars[@]}"; do
            if [ -n "${!v:-}" ]; then cmdline+="$v=${!v} "; fi
        done
        cmdline+=$0
        for a in "$@"; do cmdline+=" $a"; done
        export "${name}_CMDLINE=$cmdline" "${name}_T0=$(date +%s)"
        exec unshare --net env "$flag=1" bash "$0" "$@"
    fi
    # only loopback in here, and it must be up
    ip link set lo up
    nlinks=$(ip -o link show | wc -l)
    [ "$nlinks" = 1 ] || die "expected only loopback in the private namespace, found $nlinks links"
}

netns_add() {
    ip netns add "$1"
    ip -n "$1" link set lo up
}

netns_delete() {
    local pid
    # anything still left in the namespace was started in it by the caller
    for pid in $(ip netns pids "$1" 2>/dev/null); do
        echo "warning: killing leftover PID $pid in $1" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns delete "$1" 2>/dev/null || true
}
