#!/usr/bin/env bash
# Supply-chain, manifest and coverage checks (.ci/run runs each part as a
# step of its own):
#
#   scripts/supply-check.sh deny       cargo deny check licenses bans sources
#                                      (deny.toml; advisories: see README)
#   scripts/supply-check.sh manifests  every YAML file under deploy/kubernetes/,
#                                      recursively: kubernetes-validate --strict
#                                      for KUBERNETES_VERSION (each kustomization
#                                      rendered by kubectl kustomize and its
#                                      output validated too); checkov over those
#                                      files and the Dockerfile
#   scripts/supply-check.sh coverage   cargo llvm-cov over `cargo test --release`
#                                      (unit tests and the integration suite,
#                                      with the binary it starts instrumented);
#                                      fails under COVERAGE_FLOOR % of lines
#   scripts/supply-check.sh            all three
#
# Every tool is installed at the pinned version when it is missing (or at
# another version): cargo-deny and cargo-llvm-cov with cargo install --locked,
# llvm-tools-preview with rustup, kubernetes-validate and checkov with pip
# into a virtualenv of their own ($SUPPLY_VENV, default
# ~/.cache/dotproxy/supply-venv), from scripts/supply-requirements.txt (every
# package pinned with its hash). Nothing is skipped: a check that cannot run
# fails. Ends with "supply-check: N passed, N failed"; exits 1 if one failed.
set -euo pipefail

LIB=$(dirname "$(readlink -f "$0")")/lib
# shellcheck source=scripts/lib/common.sh
. "$LIB/common.sh"
cd "$LIB/../.."

# The Kubernetes version the manifests are validated for (README says which)
KUBERNETES_VERSION=1.35.0
# Line coverage of src/ must not fall under this (README has today's figure)
COVERAGE_FLOOR=92

CARGO_DENY_VERSION=0.20.2
CARGO_LLVM_COV_VERSION=0.9.1
REQUIREMENTS=scripts/supply-requirements.txt
VENV=${SUPPLY_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/dotproxy/supply-venv}
MANIFESTS=deploy/kubernetes

T=$(mktemp -d "${TMPDIR:-/tmp}/dotproxy-supply-check.XXXXXX")
at_exit rm -rf "$T"

# ---------------------------------------------------------------- tools
# cargo_tool SUBCOMMAND CRATE VERSION: `cargo SUBCOMMAND` at VERSION
cargo_tool() {
    local have
    have=$(cargo "$1" --version 2>/dev/null | awk '{ print $2 }' || true)
    if [ "$have" != "$3" ]; then
        echo "installing $2 $3 (found: ${have:-none})"
        cargo install "$2" --locked --version "$3"
    fi
    cargo "$1" --version
}

llvm_tools() {
    if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
        echo "installing llvm-tools-preview"
        rustup component add llvm-tools-preview
    fi
}

# the virtualenv with exactly the packages of $REQUIREMENTS
python_tools() {
    local stamp="$VENV/.requirements.sha256" want
    want=$(sha256sum "$REQUIREMENTS" | awk '{ print $1 }')
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null \
        && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        :
    else
        echo "installing $REQUIREMENTS into $VENV"
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        # Debian's own python3 makes virtualenvs only with python3-venv
        if ! python3 -m venv "$VENV"; then
            echo "installing python3-venv"
            apt_install python3-venv
            rm -rf "$VENV"
            python3 -m venv "$VENV"
        fi
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
            --require-hashes --only-binary :all: -r "$REQUIREMENTS"
        echo "$want" >"$stamp"
    fi
    echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"
    echo "checkov $("$VENV/bin/checkov" --version)"
}

# ---------------------------------------------------------------- deny
check_deny() {
    log "cargo deny check licenses bans sources"
    cargo_tool deny cargo-deny "$CARGO_DENY_VERSION"
    if cargo deny --locked check licenses bans sources 2>&1 | tee "$T/deny.log"; then
        pass "cargo deny: $(tail -n 1 "$T/deny.log")"
    else
        fail "cargo deny check licenses bans sources"
    fi
}

# ---------------------------------------------------------------- manifests
# kubernetes-validate prints one line per object; an object of a kind it has
# no schema for is only a WARN with exit 0, so anything but "passed" fails
kv_lines_ok() {
    local what=$1 log=$2 rc=$3 n
    n=$(grep -c ' passed for resource ' "$log" || true)
    if [ "$rc" = 0 ] && [ "$n" -gt 0 ] && ! grep -v ' passed for resource ' "$log" | grep -q .; then
        pass "kubernetes-validate $KUBERNETES_VERSION: $what ($n objects)"
    else
        cat "$log"
        fail "kubernetes-validate $KUBERNETES_VERSION: $what" "exit $rc; every object must pass, a warning fails"
    fi
}

# checkov's cli output, less the passed checks
checkov_report() {
    awk '/^Check: /      { check = $0; next }
         /FAILED for|SKIPPED for/ { print check; shown = 1 }
         /PASSED for/   { shown = 0; next }
         shown && /^\t/ { print; next }
         /checks: /     { print; shown = 0 }' "$1"
}

run_checkov() {
    local what=$1 log=$2 rc=0
    shift 2
    "$VENV/bin/checkov" --skip-download --compact "$@" >"$log" 2>&1 || rc=$?
    checkov_report "$log"
    if [ "$rc" = 0 ] && grep -q 'Failed checks: 0,' "$log"; then
        pass "checkov $what: $(grep -o 'Passed checks: .*' "$log" | head -n 1)"
    else
        [ -s "$log" ] && grep -vE 'PASSED for|^Check: ' "$log" | tail -n 20
        fail "checkov $what" "exit $rc"
    fi
}

check_manifests() {
    local -a files objects kustomizations
    local f rc i=0
    log "Kubernetes manifests ($MANIFESTS, Kubernetes $KUBERNETES_VERSION)"
    python_tools
    mapfile -t files < <(find "$MANIFESTS" -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
    if [ "${#files[@]}" -eq 0 ]; then
        fail "manifests: YAML files under $MANIFESTS" "none found"
        return 0
    fi
    # A kustomization.yaml is no Kubernetes object (kustomize's own input):
    # it is rendered with kubectl kustomize, and the output validated.
    objects=()
    kustomizations=()
    for f in "${files[@]}"; do
        case $(basename "$f") in
            kustomization.yaml | kustomization.yml | Kustomization) kustomizations+=("$f") ;;
            *) objects+=("$f") ;;
        esac
    done
    echo "objects: ${objects[*]}"
    echo "kustomizations: ${kustomizations[*]:-none}"

    rc=0
    "$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "${objects[@]}" \
        >"$T/kv.log" 2>&1 || rc=$?
    kv_lines_ok "${#objects[@]} files" "$T/kv.log" "$rc"

    if [ "${#kustomizations[@]}" -gt 0 ]; then
        # kubectl comes with this kind of machine's image (no Debian package
        # brings it back); without it, scripts/lib/kustomize-lite.py renders
        # the subset of kustomize these files use, and fails on anything else
        local render=(kubectl kustomize)
        if ! command -v kubectl >/dev/null 2>&1; then
            echo "kubectl not found: rendering with scripts/lib/kustomize-lite.py"
            render=("$VENV/bin/python" "$LIB/kustomize-lite.py")
        fi
        for f in "${kustomizations[@]}"; do
            i=$((i + 1))
            rc=0
            "${render[@]}" "$(dirname "$f")" >"$T/rendered-$i.yaml" 2>"$T/kustomize-$i.log" || rc=$?
            if [ "$rc" != 0 ]; then
                cat "$T/kustomize-$i.log"
                fail "kubectl kustomize $(dirname "$f")" "exit $rc"
                continue
            fi
            rc=0
            "$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "$T/rendered-$i.yaml" \
                >"$T/kv-$i.log" 2>&1 || rc=$?
            sed -i "s#$T/rendered-$i.yaml#kustomize($(dirname "$f"))#" "$T/kv-$i.log"
            kv_lines_ok "kubectl kustomize $(dirname "$f")" "$T/kv-$i.log" "$rc"
        done
    fi

    # checkov reads suppressions from checkov.io/skipN annotations (Kubernetes)
    # and "# checkov:skip=" comments (Dockerfile), each with its reason
    run_checkov "kubernetes ($MANIFESTS)" "$T/checkov-k8s.log" \
        -d "$MANIFESTS" --framework kubernetes
    run_checkov "dockerfile (Dockerfile)" "$T/checkov-docker.log" \
        -f Dockerfile --framework dockerfile
}

# ---------------------------------------------------------------- coverage
check_coverage() {
    local rc=0 total
    log "line coverage: cargo llvm-cov over cargo test --release (floor $COVERAGE_FLOOR%)"
    llvm_tools
    cargo_tool llvm-cov cargo-llvm-cov "$CARGO_LLVM_COV_VERSION"
    # Most integration tests stop the proxy with SIGKILL (tests/util/proxy.rs
    # drops it so), and a killed process never writes its profile at exit:
    # continuous mode (%c) keeps the counters in the mmapped profile file as
    # they change, which on Linux needs runtime counter relocation. %p: one
    # file per process.
    # --ignore-run-fail: the report is made even when a test fails. A test
    # failing here only is reported, not fatal: the instrumented binaries
    # run several times slower, which a few timing-bound fault tests feel,
    # and the README's test command (its own CI step) is the gate on the
    # tests; this step is the gate on coverage.
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C llvm-args=-runtime-counter-relocation" \
        LLVM_PROFILE_FILE_NAME="dotproxy-%p%c.profraw" \
        cargo llvm-cov --release --locked --ignore-run-fail --summary-only \
        --ignore-filename-regex '/(tests|fuzz|benchmarks)/' \
        --fail-under-lines "$COVERAGE_FLOOR" >"$T/cov.log" 2>&1 || rc=$?
    # the tests' own output only where one failed; the report in full
    grep -E '^(test result|     Running|failures:|    [a-z_:]+$)' "$T/cov.log" || true
    sed -n '/^Filename /,$p' "$T/cov.log"
    # TOTAL's columns: regions, missed, cover, functions, missed, executed,
    # lines, missed, cover, branches, missed, cover
    total=$(awk '$1 == "TOTAL" { print $10 }' "$T/cov.log")
    if grep -q '^test result: FAILED' "$T/cov.log"; then
        sed -n '/^failures:$/,/^test result: FAILED/p' "$T/cov.log" | grep -vE '^(DEBUG|INFO|TRACE) ' | tail -n 60
        log "note: a test failed under llvm-cov (instrumented, slower); see the test step for the gate"
    else
        pass "cargo test --release under llvm-cov: every test passed"
    fi
    if [ "$rc" = 0 ] && [ -n "$total" ]; then
        pass "line coverage $total (floor $COVERAGE_FLOOR%)"
    else
        tail -n 20 "$T/cov.log"
        fail "line coverage >= $COVERAGE_FLOOR%" "got ${total:-no report}, exit $rc"
    fi
}

# ---------------------------------------------------------------- main
case ${1:-all} in
    deny) check_deny ;;
    manifests) check_manifests ;;
    coverage) check_coverage ;;
    all)
        check_deny
        check_manifests
        check_coverage
        ;;
    *) die "usage: $0 [deny|manifests|coverage|all]" ;;
esac

checks_done supply-check
