#!/usr/bin/env bash
# offsite vs pgBackRest 2.45 vs Barman cloud 3.4 on PostgreSQL 15, on this
# machine (see docs/BENCHMARKS-postgres.md).
#
#   scripts/bench/pg_compare.sh --quick                    # small sizes, 1 repetition (~6 min)
#   scripts/bench/pg_compare.sh --out docs/benchmarks/pg-results.json   # the full run (~45 min)
#   scripts/bench/pg_compare.sh --figures kill --only offsite-default-file --kill-runs 10
#   scripts/bench/pg_compare.sh --help                     # every option of pg_compare.py
#
# Prepares what the bench needs, then runs scripts/bench/pg_compare.py:
# * Debian packages postgresql (15), pgbackrest, barman-cli-cloud (with
#   python3-psycopg2 and python3-boto3) and time, installed only when missing;
# * a virtual environment $PG_BENCH_VENV [/opt/offsite-test-servers/pg-bench-venv]
#   on the system Python (for psycopg2/boto3) with matplotlib, created when missing;
# * the release binary (OFFSITE_BIN [$CARGO_TARGET_DIR or target]/release/offsite),
#   built with `cargo build --release --bin offsite` when missing;
# * the S3 test servers (scripts/test-servers.sh start, only when Garage is not
#   already running: `start` wipes the servers' data).
# Everything the run creates (clusters under /tmp/pgcmp-*, file archives,
# pgBackRest repositories, S3 prefixes pgcmp-<run>/ in the test bucket, its
# processes) is removed at the end, also on Ctrl-C (--keep keeps the files).
# Then scripts/bench/pg_report.py turns results into the tables and picture.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $(id -u) != 0 ]]; then
    echo "pg_compare: run as root (clusters run as the postgres user through runuser)" >&2
    exit 1
fi

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v pgbackrest >/dev/null || need+=(pgbackrest)
command -v barman-cloud-backup >/dev/null || need+=(barman-cli-cloud)
[[ -x /usr/bin/time ]] || need+=(time)
/usr/bin/python3 -c 'import psycopg2, boto3' 2>/dev/null || need+=(python3-psycopg2 python3-boto3)
if ((${#need[@]})); then
    echo "pg_compare: apt-get install ${need[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >&2
fi

VENV=${PG_BENCH_VENV:-/opt/offsite-test-servers/pg-bench-venv}
if ! "$VENV/bin/python" -c 'import matplotlib, psycopg2, boto3' 2>/dev/null; then
    echo "pg_compare: preparing $VENV (system site packages + matplotlib)" >&2
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q 'matplotlib>=3.6' >&2
fi

TARGET_DIR=${CARGO_TARGET_DIR:-target}
export OFFSITE_BIN=${OFFSITE_BIN:-$TARGET_DIR/release/offsite}
if [[ ! -x $OFFSITE_BIN ]]; then
    echo "pg_compare: building $OFFSITE_BIN (cargo build --release --bin offsite)" >&2
    cargo build --release --bin offsite >&2
fi
OFFSITE_BIN=$(realpath "$OFFSITE_BIN")
echo "pg_compare: offsite binary $OFFSITE_BIN" >&2

if ! scripts/test-servers.sh status 2>/dev/null | grep -q '^garage: running'; then
    scripts/test-servers.sh start >&2
fi
# shellcheck disable=SC1090
source "$(scripts/test-servers.sh env)"

exec "$VENV/bin/python" scripts/bench/pg_compare.py "$@"
