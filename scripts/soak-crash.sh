#!/usr/bin/env bash
# Crash loop: kill `offsite replicate` with SIGKILL at random moments for N
# cycles under a steady writer, then restore sampled commits of every lineage
# and compare each with what the writer committed (the test
# `soak_kill9_cycles` in tests/it/faults.rs; CI runs it with 5 cycles).
#
# Usage: scripts/soak-crash.sh [CYCLES] [SEED]
#   CYCLES  default 100
#   SEED    default random (printed, so a failing run can be repeated)
# Environment:
#   OFFSITE_SOAK_URL   replica base URL (default: the Garage test server; a
#                      fresh prefix/subdirectory is added), e.g. file:///tmp/soak
#   PROFILE=release    build and run optimised (default: the debug test build)
set -euo pipefail
cd "$(dirname "$0")/.."

cycles="${1:-100}"
seed="${2:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"

if [[ -z "${OFFSITE_SOAK_URL:-}" ]]; then
  scripts/test-servers.sh start >/dev/null
  # shellcheck disable=SC1091
  source "${OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}/env"
fi
profile_args=()
if [[ "${PROFILE:-}" == "release" ]]; then profile_args=(--release); fi

echo "soak-crash: $cycles kill -9 cycles, seed $seed" >&2
start=$(date +%s)
set +e
OFFSITE_SOAK_CYCLES="$cycles" OFFSITE_SOAK_SEED="$seed" \
  cargo test "${profile_args[@]}" --features testing --test it faults::soak_kill9_cycles -- --exact --nocapture \
  >/tmp/offsite-soak-crash.log 2>&1
status=$?
set -e
grep -E "SOAK RESULT|^soak:|panicked|test result" /tmp/offsite-soak-crash.log >&2
echo "soak-crash: finished in $(( $(date +%s) - start )) s, exit $status (full log: /tmp/offsite-soak-crash.log)" >&2
exit "$status"
