#!/usr/bin/env bash
# Run offsite's whole test suite against real servers: builds the S3 test
# servers if they are missing, starts them on 127.0.0.1, then runs every test.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-servers.sh install
scripts/test-servers.sh start
# Three more Garage processes (replication factor 3) for the test that stops
# a node while shipping and restoring (tests/it/fleet.rs); ~2 s, no build.
scripts/test-servers.sh start-cluster
# shellcheck disable=SC1091
source "${OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}/env"
# The suite must not skip S3: fail if the servers' targets are missing.
unset OFFSITE_TEST_ALLOW_NO_S3
test -n "${OFFSITE_TEST_S3_TARGETS:-}" || { echo "no S3 test targets" >&2; exit 1; }
test -n "${OFFSITE_TEST_S3_LOCK_TARGET:-}" || { echo "no S3 Object Lock test target (moto)" >&2; exit 1; }
test -n "${OFFSITE_TEST_GARAGE_CLUSTER:-}" || { echo "no Garage cluster test target" >&2; exit 1; }
export OFFSITE_TEST_REQUIRE_CLUSTER=1

# PostgreSQL 15 (Debian's packages) for the PostgreSQL tests: server
# binaries in /usr/lib/postgresql/15/bin and the postgres OS user the tests
# run initdb/pg_ctl as (clusters are started per test on free ports).
# Installed only when missing; the suite must not skip them.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! id postgres >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15
fi
export OFFSITE_TEST_REQUIRE_PG=1

cargo test --features testing --no-fail-fast "$@"
scripts/bench/run.sh --quick # offsite vs Litestream 0.5, small sizes (~1 min): keeps the benchmark working
