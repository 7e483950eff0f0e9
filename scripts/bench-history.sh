#!/usr/bin/env bash
# Restore cost in a replica with a day of steady writes, with and without
# compaction, and the request counts of such a day (not a test). Runs
# benches/restore_history.rs (in-process replicators on a manual clock; see
# the top of that file) and writes docs/BENCHMARKS-history.md.
#
#   scripts/bench-history.sh                 # full run: 24 h, 5 restore runs, file:// (~5 min here)
#   scripts/bench-history.sh --quick         # 2 h, 1 run, file:// (~20 s); report to stdout only
#   scripts/bench-history.sh --garage 6      # also a 6-hour run against the local Garage S3 server
#
# Options:
#   --quick          2 simulated hours, 1 restore run; does not touch docs/ unless --out is given
#   --hours H        simulated hours of the file:// run (default 24)
#   --runs N         restore repetitions (default 5; median, min and max are reported)
#   --garage H       also run H simulated hours against Garage (scripts/test-servers.sh; started if
#                    not running), under a unique prefix that is deleted afterwards (python3 + boto3)
#   --garage-runs N  restore repetitions on Garage (default 3)
#   --out FILE       where to write the report (default docs/BENCHMARKS-history.md; --quick: none)
#
# Environment: CARGO_TARGET_DIR is honoured (the bench is built with `cargo bench`, bench profile).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
CMDLINE="scripts/bench-history.sh $*"

QUICK=0 HOURS=24 RUNS=5 GARAGE_HOURS= GARAGE_RUNS=3 OUT=
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --hours) HOURS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --garage) GARAGE_HOURS=$2; shift ;;
    --garage-runs) GARAGE_RUNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-history: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((QUICK)); then
    HOURS=2 RUNS=1
elif [[ -z $OUT ]]; then
    OUT=$REPO/docs/BENCHMARKS-history.md
fi

log() { echo "bench-history: $*" >&2; }
die() { echo "bench-history: ERROR: $*" >&2; exit 1; }

WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/offsite-bench-history.XXXXXX")
S3_PREFIX= S3_ENDPOINT= S3_BUCKET= STARTED_SERVERS=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $S3_PREFIX ]]; then s3_delete_prefix "$S3_PREFIX" || true; fi
    if ((STARTED_SERVERS)); then scripts/test-servers.sh stop >&2 || true; fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# s3_delete_prefix PREFIX : delete every object under s3://BUCKET/PREFIX/ on Garage.
s3_delete_prefix() {
    python3 - "$S3_ENDPOINT" "$S3_BUCKET" "$1" <<'EOF' >&2 || log "could not delete the S3 objects under $1 (no boto3?)"
import os, sys
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
import boto3
from botocore.config import Config
endpoint, bucket, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "garage"),
                  config=Config(s3={"addressing_style": "path"}))
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
    if keys:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        n += len(keys)
print(f"bench-history: deleted {n} S3 objects under {prefix}")
EOF
}

# bench NAME ARGS... : run the bench, its markdown into $WORK/NAME/restore_history.md
bench() {
    local name=$1; shift
    log "$name: cargo bench --bench restore_history -- $*"
    cargo bench --bench restore_history -- --out-dir "$WORK/$name" "$@" >"$WORK/$name.stdout"
}

ARGS=(--hours "$HOURS" --runs "$RUNS")
((QUICK)) && ARGS=(--quick)
T0=$SECONDS
bench file "${ARGS[@]}"
FILE_S=$((SECONDS - T0))

GARAGE_S=
if [[ -n $GARAGE_HOURS ]]; then
    if ! scripts/test-servers.sh status >/dev/null 2>&1; then
        log "test servers not running: starting them"
        scripts/test-servers.sh start >&2
        STARTED_SERVERS=1
    fi
    ENV_FILE=$(scripts/test-servers.sh env)
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    base=
    for t in ${OFFSITE_TEST_S3_TARGETS//;/ }; do
        [[ $t == garage=* ]] && base=${t#garage=}
    done
    [[ -n $base ]] || die "no garage entry in OFFSITE_TEST_S3_TARGETS ($ENV_FILE)"
    query=${base#*\?}
    S3_BUCKET=${base%%\?*}; S3_BUCKET=${S3_BUCKET#s3://}; S3_BUCKET=${S3_BUCKET%%/*}
    S3_ENDPOINT=$(sed -n 's/.*endpoint=\([^&]*\).*/\1/p' <<<"$query")
    S3_PREFIX=bench-history-$(date +%Y%m%d-%H%M%S)-$RANDOM$RANDOM
    T0=$SECONDS
    bench garage --hours "$GARAGE_HOURS" --runs "$GARAGE_RUNS" --replica-url "s3://$S3_BUCKET/$S3_PREFIX?$query"
    GARAGE_S=$((SECONDS - T0))
fi

# ------------------------------------------------------------------ report
{
    echo "# Benchmark: restoring from a day of history, with and without compaction"
    echo
    echo "Produced by \`$CMDLINE\` (benches/restore_history.rs) on $(date -u +%Y-%m-%dT%H:%MZ),"
    echo "commit \`$(git rev-parse --short HEAD)\`$([[ -z $(git status --porcelain -- src benches Cargo.toml) ]] || echo ' + uncommitted changes'),"
    echo "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GB RAM", $2 / 1e6 }' /proc/meminfo)."
    echo
    cat <<'EOF'
Question: how many objects does a restore read, and how long does it take, to get back a point
1 hour ago in a replica that has received a commit every second for 24 hours, with the default
compaction levels and without compaction? And what does such a day cost in requests?

Method: one real SQLite database (`offsite::workload`: each commit inserts a row of 50–2000 B,
every 3rd updates the previous row, every 10th deletes one, every 500th inserts ~200 KB). Two
`Replicator`s ship it in-process, one with the default compaction levels (1 min / 15 min / 4 h),
one with `compaction_levels = []`. Both use the default 24 h snapshot interval and retention
24 h + 2 snapshots, pruned by the daemon's own logic (prune interval 1 h). A manual clock advances
one simulated second per iteration, with one commit and one `step(true)` per second, so the day
takes minutes of real time. Restores call `offsite::restore::restore` in-process (as
`offsite restore` does: `--parallel 8`, integrity check on). Wall time covers the LIST, downloads,
decoding, applying and the integrity check. Object and byte counts are deterministic; wall times
are the median and range of the runs. Request counts come from the stores' own counters
(`Storage::request_counts`). file:// counts one request per operation; S3 counts HTTP requests.
The database starts empty and grows by ~5.4 MB per simulated hour.

Restore targets:
* **latest**: the newest commit. After exactly 24 h the periodic snapshot (due 24 h after the
  first) has just been taken, so both replicas restore "latest" from that snapshot alone.
* **1 h back**: `Target::Time(end of the day − 1 h)`.
* **last commit before the newest snapshot**: the point with the longest chain after a snapshot
  (the first snapshot plus a whole day of segments), which is the worst case for the plain
  replica. Without a periodic snapshot (runs shorter than 24 h) this is the latest commit.
EOF
    echo
    echo "## file://"
    echo
    echo "Run time of the whole benchmark (build included): ${FILE_S} s."
    echo
    cat "$WORK/file/restore_history.md"
    if [[ -n $GARAGE_HOURS ]]; then
        echo
        echo "## Garage S3 (local server, scripts/test-servers.sh), ${GARAGE_HOURS} simulated hours"
        echo
        echo "Run time: ${GARAGE_S} s."
        echo
        cat "$WORK/garage/restore_history.md"
    fi
} >"$WORK/report.md"

cat "$WORK/report.md"
if [[ -n $OUT ]]; then
    if [[ -f $OUT ]] && grep -q '^## Reading the numbers' "$OUT"; then
        # Keep the hand-written analysis at the end of an existing report.
        sed -n '/^## Reading the numbers/,$p' "$OUT" >"$WORK/notes.md"
        { cat "$WORK/report.md"; echo; cat "$WORK/notes.md"; } >"$OUT"
    else
        cp "$WORK/report.md" "$OUT"
    fi
    log "wrote $OUT"
fi
