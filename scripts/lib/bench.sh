# shellcheck shell=bash
# The prelude of benchmarks/bench.sh and benchmarks/soak.sh: sources
# common.sh, netns.sh, unbound.sh and dot-certs.sh, and adds what both
# benchmarks do with the binary under test and in their reports. ROOT is the
# repository's top folder (set by the caller).
#
#   abs_path VAR            make the path in VAR absolute (a relative one is
#                           taken from ROOT)
#   dotproxy_under_test     DOTPROXY (default target/release/dotproxy) as an
#                           absolute path; die unless it is executable
#   private_dotproxy DIR    copy DOTPROXY into DIR and run the copy from now
#                           on (other people may rebuild target/release during
#                           a run); DOTPROXY_SRC keeps the original path
#   git_state               "REV", plus " (with uncommitted changes in src/
#                           or Cargo.*)" when there are some
#   dnsperf_version         e.g. 2.10.0
#   cpu_model               the first CPU's model name

_BENCH_LIB=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
. "$_BENCH_LIB/common.sh"
# shellcheck source=scripts/lib/netns.sh
. "$_BENCH_LIB/netns.sh"
# shellcheck source=scripts/lib/unbound.sh
. "$_BENCH_LIB/unbound.sh"
# shellcheck source=scripts/lib/dot-certs.sh
. "$_BENCH_LIB/dot-certs.sh"

abs_path() {
    case ${!1} in
        /*) ;;
        *) printf -v "$1" '%s' "$ROOT/${!1}" ;;
    esac
}

dotproxy_under_test() {
    DOTPROXY=${DOTPROXY:-target/release/dotproxy}
    abs_path DOTPROXY
    [ -x "$DOTPROXY" ] || die "$DOTPROXY is not an executable (cargo build --release, or set DOTPROXY)"
}

private_dotproxy() {
    DOTPROXY_SRC=$DOTPROXY
    DOTPROXY=$1/dotproxy
    cp "$DOTPROXY_SRC" "$DOTPROXY"
}

git_state() {
    local rev dirty
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
    dirty=$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true)
    echo "$rev${dirty:+ (with uncommitted changes in src/ or Cargo.*)}"
}

dnsperf_version() {
    dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -n 1
}

cpu_model() {
    sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1
}

sys_busy_ticks() { # busy ticks of all CPUs, from /proc/stat
    local _cpu user nice system _idle _iowait irq softirq steal _rest
    read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# children_cpu_ms VAR: user+sys CPU (ms) of the waited-for children of this
# shell, through $WORK/times.txt. `times` must run in this shell, not in a
# $(...) subshell (a forked subshell has no children's times of its own).
children_cpu_ms() {
    times >"$WORK/times.txt"
    local line m1 s1 m2 s2
    line=$(tail -n 1 "$WORK/times.txt")
    # shellcheck disable=SC2001
    read -r m1 s1 m2 s2 <<<"$(sed 's/\([0-9]*\)m\([0-9]*\)\.\([0-9]*\)s/\1 \2\3/g' <<<"$line")"
    # each field is minutes, then seconds*1000 (three decimals in bash's format)
    printf -v "$1" '%s' $(((10#$m1 + 10#$m2) * 60000 + 10#$s1 + 10#$s2))
}
