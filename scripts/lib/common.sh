# shellcheck shell=bash
# Helpers shared by the shell scripts: tests/peers/run.sh (and features.sh),
# benchmarks/bench.sh, benchmarks/soak.sh, benchmarks/install.sh,
# scripts/image-test.sh, scripts/deploy-check.sh and .ci/run. Sourced, never
# run; safe under `set -euo pipefail`. Sourcing it installs the EXIT trap
# (and INT -> exit 130, TERM -> exit 143) that runs the at_exit commands.
#
# Messages
#   log TEXT...              "==> TEXT" on stdout ("==> [HH:MM:SS] TEXT" when
#                            LOG_TIMES=1)
#   die TEXT...              "${DIE_PREFIX}error: TEXT" on stderr, exit 2
#   require_tools TOOL...    die naming the first TOOL not on PATH (with
#                            "; $REQUIRE_HINT" appended when that is set)
#   run_or_die LOG WHAT CMD...  run CMD with its output in LOG; if it fails,
#                            show LOG on stderr and die "WHAT"
#   show_logs LINES FILE...  the last LINES lines of each non-empty FILE
# Ports
#   pick_port VAR            a free TCP/UDP port in 20000..32767 into VAR, not
#                            yet handed out by this script
# Checks (counters PASSES FAILS SKIPS, names of the failed ones in FAILED)
#   pass NAME | fail NAME [WHY] | skip NAME [WHY]   one "PASS  NAME" line etc.
#   checks_done LABEL        blank line, "LABEL: N passed, N failed[, N
#                            skipped]", the failed names; false if any failed
# Processes and exit
#   at_exit CMD [ARG...]     run CMD ARG... from the EXIT trap, in the order
#                            registered (arguments are taken as they are now);
#                            EXIT_RC holds the exit status meanwhile
#   track PID | untrack PID  add to / remove from PIDS, the processes started
#                            here
#   stop_tracked [SECS]      stop_pid every PID in PIDS, then reap them
#   is_running PID           true while PID exists and is not a zombie
#   is_ours PID              running and a child of this shell
#   stop_pid PID [SECS]      SIGTERM, wait up to SECS (3), then SIGKILL; only
#                            ever signals a child of this shell (no PID reuse)
# Waiting
#   now_ms                   wall clock in milliseconds
#   wait_until PID SECS DELAY CMD...  run CMD every DELAY seconds until it
#                            succeeds (true) or SECS have passed or PID is no
#                            longer running (false)
#   tcp_listening PORT | udp_listening PORT   something listens on PORT
#   wait_listen PORT SECS PID  until PORT is listened on over UDP and TCP
# /proc
#   proc_status PID FIELD    number in FIELD of /proc/PID/status (kB for Vm*),
#                            empty when PID is gone
#   cpu_ticks PID            utime + stime of PID (all threads), in clock ticks
# Packages (Debian)
#   as_root CMD...           CMD as root: directly, or through sudo
#   missing_packages VAR PKG...  set array VAR to the PKGs dpkg does not have
#                            installed
#   apt_install [-qq] PKG... apt-get update, then install PKGs (no
#                            recommends, keep changed config files; waits up
#                            to 10 min for a concurrent apt or dpkg)

[ -n "${_DOTPROXY_COMMON_SH:-}" ] && return 0
_DOTPROXY_COMMON_SH=1

PASSES=0
FAILS=0
SKIPS=0
FAILED=()
PIDS=()
EXIT_RC=0
_AT_EXIT=()

# ---------------------------------------------------------------- messages
log() {
    if [ "${LOG_TIMES:-0}" = 1 ]; then
        printf '==> [%s] %s\n' "$(date +%T)" "$*"
    else
        printf '==> %s\n' "$*"
    fi
}

die() {
    echo "${DIE_PREFIX:-}error: $*" >&2
    exit 2
}

require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 ||
            die "required tool '$tool' not found${REQUIRE_HINT:+; $REQUIRE_HINT}"
    done
}

run_or_die() {
    local logf=$1 what=$2
    shift 2
    if ! "$@" >"$logf" 2>&1; then
        cat "$logf" >&2
        die "$what"
    fi
}

show_logs() {
    local lines=$1 f
    shift
    for f in "$@"; do
        [ -s "$f" ] || continue
        printf -- '----- %s (last %s lines) -----\n' "$(basename "$f")" "$lines"
        tail -n "$lines" "$f"
    done
    printf -- '----- end of logs -----\n'
}

# ---------------------------------------------------------------- checks
pass() {
    printf 'PASS  %s\n' "$1"
    PASSES=$((PASSES + 1))
}

skip() {
    printf 'SKIP  %s%s\n' "$1" "${2:+  ($2)}"
    SKIPS=$((SKIPS + 1))
}

fail() {
    printf 'FAIL  %s%s\n' "$1" "${2:+  ($2)}"
    FAILS=$((FAILS + 1))
    FAILED+=("$1")
}

checks_done() {
    echo
    if [ "$SKIPS" -gt 0 ]; then
        echo "$1: $PASSES passed, $FAILS failed, $SKIPS skipped"
    else
        echo "$1: $PASSES passed, $FAILS failed"
    fi
    if [ "$FAILS" -ne 0 ]; then
        printf '  failed: %s\n' "${FAILED[@]}"
        return 1
    fi
}

# ---------------------------------------------------------------- exit
at_exit() {
    _AT_EXIT+=("$(printf '%q ' "$@")")
}

_run_at_exit() {
    EXIT_RC=$?
    trap - EXIT INT TERM
    local cmd
    for cmd in "${_AT_EXIT[@]}"; do
        eval "$cmd" || true
    done
    exit "$EXIT_RC"
}
trap _run_at_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- processes
track() { PIDS+=("$1"); }

untrack() {
    local -a keep=()
    local p
    for p in "${PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

is_running() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case $st in
        Z*) return 1 ;;
        *) return 0 ;;
    esac
}

is_ours() {
    is_running "$1" || return 1
    [ "$(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ')" = "$$" ]
}

stop_pid() {
    local pid=$1 secs=${2:-3} i
    is_ours "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        is_running "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop_tracked() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid" "${1:-3}"
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}

# ---------------------------------------------------------------- waiting
now_ms() {
    local t=${EPOCHREALTIME/./}
    echo $((t / 1000))
}

wait_until() {
    local pid=$1 deadline delay=$3
    deadline=$(($(now_ms) + $2 * 1000))
    shift 3
    while is_running "$pid"; do
        "$@" && return 0
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep "$delay"
    done
    return 1
}

tcp_listening() { [ -n "$(ss -Hltn "( sport = :$1 )" 2>/dev/null)" ]; }
udp_listening() { [ -n "$(ss -Hlun "( sport = :$1 )" 2>/dev/null)" ]; }
_udp_tcp_listening() { udp_listening "$1" && tcp_listening "$1"; }

wait_listen() {
    wait_until "$3" "$2" 0.1 _udp_tcp_listening "$1"
}

# ---------------------------------------------------------------- /proc
proc_status() {
    sed -n "s/^$2:[[:space:]]*\([0-9]*\).*/\1/p" "/proc/$1/status" 2>/dev/null || true
}

cpu_ticks() {
    local stat
    local -a fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || {
        echo 0
        return
    }
    # the fields after "PID (comm) ": state first, utime 12th, stime 13th
    read -r -a fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
}

# ---------------------------------------------------------------- packages
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

missing_packages() {
    local -n _missing=$1
    local p
    shift
    _missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || _missing+=("$p")
    done
}

apt_install() {
    local q=-q
    if [ "${1:-}" = -qq ]; then
        q=-qq
        shift
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "$q" -o DPkg::Lock::Timeout=600 update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "$q" -y -o DPkg::Lock::Timeout=600 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        install --no-install-recommends "$@"
}

# ---------------------------------------------------------------- ports
USED_PORTS=" "
port_in_use() {
    [ -n "$(ss -Htuan "( sport = :$1 )" 2>/dev/null)" ]
}
# pick_port VAR: a free port in 20000..32767 (below Linux's default
# ephemeral range, so an outgoing connection cannot take it between the check
# and the bind), not yet handed out here
pick_port() {
    local p i
    for ((i = 0; i < 100; i++)); do
        p=$((20000 + RANDOM % 12768))
        case $USED_PORTS in *" $p "*) continue ;; esac
        if ! port_in_use "$p"; then
            USED_PORTS="$USED_PORTS$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}
