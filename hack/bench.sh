#!/usr/bin/env bash
# Runs every benchmark and writes their reports into one Markdown file: BENCHMARKS.md at the
# top of the repository, or, with QUICK=1 (a two-minute smoke run that `make test` also does,
# so the benches cannot rot), target/BENCHMARKS-quick.md, leaving the real figures alone.
# Each bench prints its tables and "- aim: ...: **met**/**missed**" lines on stdout; progress
# goes to stderr. The API server's write ceiling, measured first, is handed to the freshness
# bench, whose 1,000-device aim is stated relative to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo="${CARGO:-cargo}"
profile=()
if [[ "${QUICK:-0}" != "0" ]]; then
    export EDGESYNC_BENCH_QUICK=1
    # The smoke run's harness is built with the tests' profile, reusing the dependencies
    # `make test` has just compiled instead of compiling all of them again optimized (minutes
    # on a cold machine). What it measures (agent, controller) is a release build either way.
    profile=(--profile dev)
    out=target/BENCHMARKS-quick.md
    title="edgesync benchmarks (smoke run: small and short, figures not representative)"
else
    out=BENCHMARKS.md
    title="edgesync benchmarks"
fi
mkdir -p target
benches=(apiserver_ceiling agent_ingest sparkplug_ingest arm_agent broker_attacks controller_ingest controller_attacks freshness idle_freshness rollout fleet_scale)
# Build them all first, so build time is not mistaken for a slow bench.
"$cargo" bench "${profile[@]}" -p edgesync-e2e --no-run $(printf -- '--bench %s ' "${benches[@]}") >&2
body="$(mktemp)"
trap 'rm -f "$body"' EXIT
for b in "${benches[@]}"; do
    started=$SECONDS
    report="$("$cargo" bench "${profile[@]}" -q -p edgesync-e2e --bench "$b")"
    if [[ "$b" == apiserver_ceiling ]]; then
        ceiling="$(sed -n 's/^write ceiling (the controller.s path): \([0-9]*\) writes\/s$/\1/p' <<<"$report")"
        [[ -n "$ceiling" ]] && export EDGESYNC_WRITE_CEILING="$ceiling"
    fi
    {
        printf '\n## %s\n\n' "$b"
        printf 'Command: `%scargo bench %s-p edgesync-e2e --bench %s` (%d s)\n\n' \
            "${EDGESYNC_BENCH_QUICK:+EDGESYNC_BENCH_QUICK=1 }" "${profile[*]:+${profile[*]} }" "$b" $((SECONDS - started))
        printf '%s\n' "$report"
    } >>"$body"
done
{
    printf '# %s\n\n' "$title"
    printf 'Written by `make bench%s` (`hack/bench.sh`) on %s.\n\n' "${EDGESYNC_BENCH_QUICK:+ QUICK=1}" "$(date -u +%Y-%m-%d)"
    printf 'Machine: %s, %s cores (%s), %s GiB memory, %s.\n' \
        "$(uname -m)" "$(nproc)" \
        "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
        "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" \
        "$(uname -sr)"
    printf '\nEverything runs on this one machine at once (brokers, agent, controller, kube-apiserver,\n'
    printf 'etcd and the load generators), so figures are ratios to limits measured in the same run\n'
    printf '(broker alone, SQLite alone, the API server write ceiling) as well as absolute.\n\n'
    printf 'Aims:\n\n'
    grep -h '^- aim' "$body" || printf -- '- (none stated)\n'
    cat "$body"
} >"$out"
echo "wrote $out" >&2
