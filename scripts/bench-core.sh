#!/usr/bin/env bash
# Core benchmarks of offsite on this machine (not a test): restore time of a
# ~100 MB database and shipping throughput of `offsite replicate` with
# zstd + age, to a file:// replica and to the local Garage S3 server.
#
#   scripts/bench-core.sh            # full run, 3 repetitions (~2 min here)
#   scripts/bench-core.sh --quick    # small sizes, 1 repetition (~10 s)
#
# Options:
#   --quick          small sizes (10 MB database, 50 MB of WAL), 1 repetition
#   --reps N         repetitions per measurement (default 3; medians are reported)
#   --targets LIST   comma-separated subset of: file,garage   (default file,garage)
#   --out FILE       also write the markdown report to FILE
#   --keep           keep the work directory and the S3 objects (for inspection)
#
# Environment:
#   OFFSITE_BIN, WORKLOAD_BIN   binaries to measure [target/release/offsite, target/release/offsite-workload];
#                               built with `cargo build --release --bins` if missing
#   BENCH_DIR                   parent of the work directory [/tmp]
#   SHIPPER_ARGS                extra `offsite replicate` arguments, e.g. "--compaction-levels off"
#   RESTORE_BASE_COMMITS, RESTORE_TAIL_COMMITS, RESTORE_BIG_BYTES, RESTORE_TAIL_RATE,
#   SHIP_COMMITS, SHIP_BIG_BYTES  override the sizes (see "sizes" below)
#
# S3: the Garage server of scripts/test-servers.sh. If it is not running the
# script starts the test servers (and stops them again at the end). Objects are
# written under a unique prefix s3://offsite-test/bench-<random>/ and deleted at
# the end (with python3 + boto3 if available; otherwise they are left behind).
#
# Everything the script starts is killed on exit (trap); its temp dir is removed.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)

QUICK=0
REPS=3
TARGETS=file,garage
OUT=
KEEP=0
while (($#)); do
    case $1 in
    --quick) QUICK=1 REPS=1 ;;
    --reps) REPS=$2; shift ;;
    --targets) TARGETS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-core: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# ------------------------------------------------------------------ sizes
# Restore: a database of RESTORE_BASE_COMMITS commits (each inserts one row of
# RESTORE_BIG_BYTES; every 3rd commit shrinks the previous row, every 10th
# deletes one) is written first; then the shipper starts (-> one snapshot) and
# RESTORE_TAIL_COMMITS more commits are written at RESTORE_TAIL_RATE commits/s
# (-> segments, with --sync-interval 100ms).
# Shipping: SHIP_COMMITS commits of ~SHIP_BIG_BYTES each, as fast as possible.
if ((QUICK)); then
    : "${RESTORE_BASE_COMMITS:=30}" "${RESTORE_TAIL_COMMITS:=10}" "${RESTORE_BIG_BYTES:=500000}" "${RESTORE_TAIL_RATE:=20}"
    : "${SHIP_COMMITS:=50}" "${SHIP_BIG_BYTES:=1000000}"
else
    : "${RESTORE_BASE_COMMITS:=280}" "${RESTORE_TAIL_COMMITS:=60}" "${RESTORE_BIG_BYTES:=500000}" "${RESTORE_TAIL_RATE:=20}"
    : "${SHIP_COMMITS:=500}" "${SHIP_BIG_BYTES:=1000000}"
fi
SYNC=100ms
POLL=0.1 # seconds between `offsite list` polls while waiting for the shipper

log() { echo "bench-core: $*" >&2; }
die() { echo "bench-core: ERROR: $*" >&2; exit 1; }

# ------------------------------------------------------------------ binaries
OFFSITE_BIN=${OFFSITE_BIN:-$REPO/target/release/offsite}
WORKLOAD_BIN=${WORKLOAD_BIN:-$REPO/target/release/offsite-workload}
if [[ ! -x $OFFSITE_BIN || ! -x $WORKLOAD_BIN ]]; then
    log "building release binaries (cargo build --release --bins)"
    cargo build --release --bins >&2
    [[ -x $OFFSITE_BIN && -x $WORKLOAD_BIN ]] || die "binaries not found after the build: $OFFSITE_BIN $WORKLOAD_BIN"
fi
# Tools the measurements use, from Debian's packages: installed when missing
# (a fresh machine has none of them).
missing=()
for t in sqlite3:sqlite3 jq:jq /usr/bin/time:time zstd:zstd; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >&2 ||
        die "could not install ${missing[*]}; install them and run again"
fi
command -v python3 >/dev/null || die "python3 is needed (to compute the report)"

# ------------------------------------------------------------------ cleanup
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/offsite-bench.XXXXXX")
RUN_ID=bench-$(date +%Y%m%d-%H%M%S)-$RANDOM$RANDOM
PIDS=()
S3_PREFIXES=()
STARTED_SERVERS=0

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    trap '' PIPE # stderr may be a closed pipe (… | tail): finish cleaning up anyway
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if ((rc != 0)) && ((!KEEP)); then
        mkdir -p "$WORK.logs" && find "$WORK" -name '*.log' -exec cp --parents {} "$WORK.logs" \; 2>/dev/null || true
        log "failed (status $rc); shipper logs kept in $WORK.logs"
    fi
    if ((KEEP)); then
        log "kept $WORK and S3 prefixes: ${S3_PREFIXES[*]:-none}"
    else
        if ((${#S3_PREFIXES[@]})); then s3_delete_prefixes "${S3_PREFIXES[@]}" || true; fi
        rm -rf "$WORK"
    fi
    if ((STARTED_SERVERS)); then scripts/test-servers.sh stop >&2 || true; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# s3_delete_prefixes PREFIX... : delete every object under s3://BUCKET/PREFIX/ on Garage.
s3_delete_prefixes() {
    python3 - "$S3_ENDPOINT" "$S3_BUCKET" "$@" <<'EOF' >&2 || log "could not delete the S3 objects (no boto3?): prefixes $*"
import os, sys
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
import boto3
from botocore.config import Config
endpoint, bucket, prefixes = sys.argv[1], sys.argv[2], sys.argv[3:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "garage"),
                  config=Config(s3={"addressing_style": "path"}))
n = 0
for p in prefixes:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p.rstrip("/") + "/"):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
            n += 1
print(f"bench-core: deleted {n} S3 objects under {', '.join(prefixes)}")
EOF
}

# ------------------------------------------------------------------ S3 setup
S3_BASE= S3_ENDPOINT= S3_BUCKET= S3_QUERY=
if [[ ,$TARGETS, == *,garage,* ]]; then
    if ! scripts/test-servers.sh status >/dev/null 2>&1; then
        log "test servers not running: starting them (scripts/test-servers.sh start)"
        scripts/test-servers.sh start >&2
        STARTED_SERVERS=1
    fi
    ENV_FILE=$(scripts/test-servers.sh env)
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    for t in ${OFFSITE_TEST_S3_TARGETS//;/ }; do
        [[ $t == garage=* ]] && S3_BASE=${t#garage=}
    done
    [[ -n $S3_BASE ]] || die "no garage entry in OFFSITE_TEST_S3_TARGETS ($ENV_FILE)"
    S3_QUERY=${S3_BASE#*\?}
    S3_BUCKET=${S3_BASE%%\?*}
    S3_BUCKET=${S3_BUCKET#s3://}
    S3_BUCKET=${S3_BUCKET%%/*}
    S3_ENDPOINT=$(sed -n 's/.*endpoint=\([^&]*\).*/\1/p' <<<"$S3_QUERY")
    GARAGE_PID=$(cat "$(dirname "$ENV_FILE")/garage.pid" 2>/dev/null || true)
fi

# replica_url TARGET NAME -> sets URL to a fresh, unique replica URL
replica_url() {
    case $1 in
    file) mkdir -p "$WORK/replicas/$2"; URL="file://$WORK/replicas/$2" ;;
    garage)
        S3_PREFIXES+=("$RUN_ID/$2")
        URL="s3://$S3_BUCKET/$RUN_ID/$2?$S3_QUERY"
        ;;
    *) die "unknown target $1" ;;
    esac
}

# ------------------------------------------------------------------ helpers
now() { date +%s.%N; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a - b }'; }
RESULTS=$WORK/results.jsonl
record() { echo "$1" >>"$RESULTS"; }

# latest_txid URL -> latest txid of the replica (0 if empty)
latest_txid() {
    local j
    j=$("$OFFSITE_BIN" list "$1" --json 2>/dev/null) || { echo 0; return; }
    jq -r '.latest.txid // 0' <<<"$j"
}

# wait_txid URL TXID TIMEOUT_S SHIPPER_PID SHIPPER_LOG -> waits until latest txid >= TXID.
# A second lineage (a continuity break: the new snapshot holds the remaining
# commits, so TXID is never reached) makes the measurement invalid: stop.
wait_txid() {
    local url=$1 want=$2 deadline=$((SECONDS + $3)) pid=$4 slog=$5 got n
    while :; do
        got=$(latest_txid "$url")
        ((got >= want)) && return 0
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$slog" >&2; die "the shipper (pid $pid) exited while waiting for txid $want (log: $slog)"; }
        n=$(grep -c '"starting a new lineage' "$slog" || true)
        if ((n > 1)); then
            grep '"starting a new lineage' "$slog" >&2
            die "the shipper started $n lineages (continuity break) while waiting for txid $want on $url (latest $got); log: $slog"
        fi
        ((SECONDS < deadline)) || die "timeout waiting for txid $want on $url (latest $got)"
        sleep "$POLL"
    done
}

# cpu_ticks PID -> utime+stime (all threads) in clock ticks
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
vm_hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# start_shipper DB URL LOG -> sets SHIPPER_PID
start_shipper() {
    OFFSITE_LOG=${OFFSITE_LOG:-info,offsite=debug,aws_config=warn,aws_smithy_runtime=warn} \
        "$OFFSITE_BIN" --log-format json replicate "$1" "$2" --age-recipient "$RECIPIENT" \
        --sync-interval "$SYNC" --spool-dir "$WORK/spool" ${SHIPPER_ARGS:-} >"$3" 2>&1 &
    SHIPPER_PID=$!
    PIDS+=("$SHIPPER_PID")
}

# stop_shipper PID LOG -> SIGTERM, wait, check exit 0
stop_shipper() {
    local rc=0
    kill -TERM "$1"
    wait "$1" || rc=$?
    ((rc == 0)) || { tail -n 20 "$2" >&2; die "the shipper exited with status $rc (log $2)"; }
}

db_commit() { sqlite3 "$1" 'SELECT coalesce(max(id), 0) FROM t'; }

mkdir -p "$WORK/spool"
"$OFFSITE_BIN" keygen -o "$WORK/key.txt" >"$WORK/recipient.txt" 2>/dev/null
RECIPIENT=$(cat "$WORK/recipient.txt")
[[ $RECIPIENT == age1* ]] || die "keygen printed no recipient"

IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
log "work dir $WORK, run id $RUN_ID, targets ${TARGET_LIST[*]}, reps $REPS$( ((QUICK)) && echo ' (quick)')"

# ================================================================== 1. restore
log "restore: writing the base database ($RESTORE_BASE_COMMITS commits of ${RESTORE_BIG_BYTES} B)"
BASE=$WORK/base.db
"$WORKLOAD_BIN" "$BASE" --count "$RESTORE_BASE_COMMITS" --big-every 1 --big-bytes "$RESTORE_BIG_BYTES"
[[ ! -e $BASE-wal ]] || die "base database still has a WAL"

for T in "${TARGET_LIST[@]}"; do
    d=$WORK/restore-$T
    mkdir -p "$d"
    cp "$BASE" "$d/db"
    replica_url "$T" restore; url=$URL
    log "restore/$T: shipping snapshot + tail to $url"
    start_shipper "$d/db" "$url" "$d/shipper.log"
    wait_txid "$url" 1 600 "$SHIPPER_PID" "$d/shipper.log"
    snap_txid=$(latest_txid "$url")
    "$WORKLOAD_BIN" "$d/db" --count "$RESTORE_TAIL_COMMITS" --rate "$RESTORE_TAIL_RATE" \
        --big-every 1 --big-bytes "$RESTORE_BIG_BYTES"
    wait_txid "$url" $((snap_txid + RESTORE_TAIL_COMMITS)) 600 "$SHIPPER_PID" "$d/shipper.log"
    stop_shipper "$SHIPPER_PID" "$d/shipper.log"
    "$OFFSITE_BIN" list "$url" --json >"$d/list.json"
    earliest=$(jq -r '.earliest.txid' "$d/list.json")
    latest=$(jq -r '.latest.txid' "$d/list.json")
    lineages=$(jq -r '.lineages | length' "$d/list.json")
    objects=$(jq -r '[.lineages[].objects] | add' "$d/list.json")
    stored=$(jq -r '[.lineages[].bytes] | add' "$d/list.json")
    snap_bytes=$(wc -c <"$d/db") # not the replica's: the source database size
    ((lineages == 1)) || log "WARNING: restore/$T: $lineages lineages (expected 1)"
    mid=$(((earliest + latest) / 2))
    record "$(jq -cn --arg t "$T" --argjson e "$earliest" --argjson l "$latest" --argjson m "$mid" \
        --argjson o "$objects" --argjson b "$stored" --argjson n "$lineages" --argjson s "$snap_bytes" \
        '{kind:"replica", target:$t, earliest:$e, latest:$l, mid:$m, objects:$o, stored_bytes:$b, lineages:$n, source_db_bytes:$s}')"
    for case in latest mid; do
        if [[ $case == latest ]]; then txid=$latest; targ=(); else txid=$mid; targ=(--txid "$mid"); fi
        want_commit=$((RESTORE_BASE_COMMITS + txid - earliest))
        for rep in $(seq "$REPS"); do
            out=$d/out-$case.db
            rm -f "$out"
            t0=$(now)
            /usr/bin/time -f '%M %U %S' -o "$d/time.txt" \
                "$OFFSITE_BIN" restore "$url" -o "$out" "${targ[@]}" --age-identity "$WORK/key.txt" \
                2>"$d/restore.err" || { cat "$d/restore.err" >&2; die "restore/$T/$case failed"; }
            t1=$(now)
            line=$(grep '^restored ' "$d/restore.err" | tail -n 1)
            got_txid=$(sed -n 's/.* to txid \([0-9]*\) .*/\1/p' <<<"$line")
            objs=$(sed -n 's/.*: \([0-9]*\) objects, .*/\1/p' <<<"$line")
            bytes=$(sed -n 's/.* objects, \([0-9]*\) bytes, .*/\1/p' <<<"$line")
            self=$(sed -n 's/.* bytes, \(.*\)$/\1/p' <<<"$line")
            size=$(wc -c <"$out")
            commit=$(db_commit "$out")
            [[ $got_txid == "$txid" ]] || die "restore/$T/$case: restored txid $got_txid, wanted $txid ($line)"
            [[ $commit == "$want_commit" ]] || die "restore/$T/$case: restored database is at commit $commit, expected $want_commit"
            read -r rss utime stime <"$d/time.txt"
            wall=$(fsub "$t1" "$t0")
            log "restore/$T/$case #$rep: ${wall}s, $objs objects, $bytes B downloaded, $size B db ($line)"
            record "$(jq -cn --arg t "$T" --arg c "$case" --argjson r "$rep" --argjson w "$wall" \
                --argjson o "$objs" --argjson b "$bytes" --argjson s "$size" --argjson x "$txid" \
                --arg self "$self" --argjson rss "$rss" --argjson cpu "$(awk -v u="$utime" -v s="$stime" 'BEGIN{print u+s}')" \
                '{kind:"restore", target:$t, case:$c, rep:$r, wall:$w, objects:$o, bytes:$b, db_bytes:$s, txid:$x, self_reported:$self, rss_kb:$rss, cpu_s:$cpu}')"
        done
    done
    cp "$d/out-latest.db" "$WORK/sample.db" 2>/dev/null || true
    rm -f "$d"/out-*.db "$d/db" "$d/db-wal" "$d/db-shm"
done
rm -f "$BASE"

# ================================================================== 2. shipping
SHIP_ARGS=(--count "$SHIP_COMMITS" --big-every 1 --big-bytes "$SHIP_BIG_BYTES")

# WAL volume of the workload: write it with autocheckpoint off while another
# connection keeps the database open (so the writer's close does not checkpoint
# and delete the WAL), then measure the -wal file. Frames per commit do not
# depend on checkpoints, so this is the WAL volume of every run below.
log "shipping: measuring the WAL volume of $SHIP_COMMITS commits of ${SHIP_BIG_BYTES} B"
v=$WORK/walvol
mkdir -p "$v"
"$WORKLOAD_BIN" "$v/db" --count 0
python3 -c 'import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1]); c.execute("SELECT count(*) FROM sqlite_master").fetchall()
time.sleep(3600)' "$v/db" &
HOLDER=$!
PIDS+=("$HOLDER")
sleep 0.5
t0=$(now)
"$WORKLOAD_BIN" "$v/db" "${SHIP_ARGS[@]}" --no-autocheckpoint
t1=$(now)
WAL_BYTES=$(wc -c <"$v/db-wal")
kill -KILL "$HOLDER"; wait "$HOLDER" 2>/dev/null || true
log "WAL volume: $WAL_BYTES bytes (writer alone, no checkpoints: $(fsub "$t1" "$t0")s)"
record "$(jq -cn --argjson b "$WAL_BYTES" --argjson w "$(fsub "$t1" "$t0")" '{kind:"walvol", wal_bytes:$b, wall:$w}')"
rm -rf "$v"

for rep in $(seq "$REPS"); do
    d=$WORK/writer-$rep
    mkdir -p "$d"
    "$WORKLOAD_BIN" "$d/db" --count 0
    t0=$(now)
    "$WORKLOAD_BIN" "$d/db" "${SHIP_ARGS[@]}"
    t1=$(now)
    log "writer alone #$rep: $(fsub "$t1" "$t0")s"
    record "$(jq -cn --argjson r "$rep" --argjson w "$(fsub "$t1" "$t0")" '{kind:"writer", rep:$r, wall:$w}')"
    rm -rf "$d"
done

for T in "${TARGET_LIST[@]}"; do
    for rep in $(seq "$REPS"); do
        d=$WORK/ship-$T-$rep
        mkdir -p "$d"
        "$WORKLOAD_BIN" "$d/db" --count 0
        replica_url "$T" "ship-$rep"; url=$URL
        start_shipper "$d/db" "$url" "$d/shipper.log"
        wait_txid "$url" 1 120 "$SHIPPER_PID" "$d/shipper.log"
        base_txid=$(latest_txid "$url")
        c0=$(cpu_ticks "$SHIPPER_PID")
        g0=0
        [[ $T == garage && -n ${GARAGE_PID:-} ]] && g0=$(cpu_ticks "$GARAGE_PID")
        t0=$(now)
        "$WORKLOAD_BIN" "$d/db" "${SHIP_ARGS[@]}"
        tw=$(now)
        wait_txid "$url" $((base_txid + SHIP_COMMITS)) 900 "$SHIPPER_PID" "$d/shipper.log"
        t1=$(now)
        c1=$(cpu_ticks "$SHIPPER_PID")
        g1=0
        [[ $T == garage && -n ${GARAGE_PID:-} ]] && g1=$(cpu_ticks "$GARAGE_PID")
        hwm=$(vm_hwm_kb "$SHIPPER_PID")
        stop_shipper "$SHIPPER_PID" "$d/shipper.log"
        "$OFFSITE_BIN" list "$url" --json >"$d/list.json"
        lineages=$(jq -r '.lineages | length' "$d/list.json")
        objects=$(jq -r '[.lineages[].objects] | add' "$d/list.json")
        stored=$(jq -r '[.lineages[].bytes] | add' "$d/list.json")
        latest=$(jq -r '.latest.txid' "$d/list.json")
        ((lineages == 1)) || log "WARNING: ship/$T #$rep: $lineages lineages (expected 1); see $d/shipper.log"
        # Per-segment stats from the shipper's JSON log (debug level).
        seglog=$(grep '^{' "$d/shipper.log" | jq -c 'select(.fields.message == "segment uploaded")')
        raw=$(jq -s 'map(.fields.raw_bytes) | add // 0' <<<"$seglog")
        segs=$(jq -s 'length' <<<"$seglog")
        last_ts=$(jq -rs 'last | .timestamp // empty' <<<"$seglog")
        logwall=0
        [[ -z $last_ts ]] || logwall=$(fsub "$(date -d "$last_ts" +%s.%N)" "$t0")
        wall=$(fsub "$t1" "$t0")
        wwall=$(fsub "$tw" "$t0")
        cpu=$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / h }')
        gcpu=$(awk -v a="$g0" -v b="$g1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / h }')
        log "ship/$T #$rep: all shipped after ${wall}s (last upload logged at ${logwall}s; writer ${wwall}s), shipper CPU ${cpu}s, VmHWM ${hwm} kB, $segs segments, $objects objects, $stored B stored, latest txid $latest"
        record "$(jq -cn --arg t "$T" --argjson r "$rep" --argjson w "$wall" --argjson ww "$wwall" \
            --argjson cpu "$cpu" --argjson gcpu "$gcpu" --argjson hwm "$hwm" --argjson o "$objects" \
            --argjson b "$stored" --argjson raw "$raw" --argjson segs "$segs" --argjson n "$lineages" --argjson lw "$logwall" \
            '{kind:"ship", target:$t, rep:$r, wall:$w, log_wall:$lw, writer_wall:$ww, cpu_s:$cpu, server_cpu_s:$gcpu, hwm_kb:$hwm, objects:$o, stored_bytes:$b, raw_bytes:$raw, segments:$segs, lineages:$n}')"
        rm -rf "$d"
    done
done

# ================================================================== 3. codec limit (CLI)
if command -v zstd >/dev/null && [[ -f $WORK/sample.db ]]; then
    for rep in $(seq "$REPS"); do
        t0=$(now)
        zstd -3 -T1 -q -c "$WORK/sample.db" >"$WORK/sample.zst"
        t1=$(now)
        zstd -d -q -c "$WORK/sample.zst" >/dev/null
        t2=$(now)
        record "$(jq -cn --argjson r "$rep" --argjson s "$(wc -c <"$WORK/sample.db")" --argjson z "$(wc -c <"$WORK/sample.zst")" \
            --argjson c "$(fsub "$t1" "$t0")" --argjson d "$(fsub "$t2" "$t1")" \
            '{kind:"zstd", rep:$r, bytes:$s, zbytes:$z, comp_s:$c, decomp_s:$d}')"
    done
fi

# ================================================================== report
REPORT=$WORK/report.md
python3 - "$RESULTS" "$REPS" "$SYNC" "$RESTORE_BASE_COMMITS" "$RESTORE_TAIL_COMMITS" "$RESTORE_BIG_BYTES" \
    "$RESTORE_TAIL_RATE" "$SHIP_COMMITS" "$SHIP_BIG_BYTES" "$QUICK" >"$REPORT" <<'EOF'
import json, statistics, sys
path, reps, sync, rbase, rtail, rbig, rrate, scount, sbig, quick = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
MB = 1e6
def med(xs): return statistics.median(xs)
def rng(xs): return f"{min(xs):.2f}–{max(xs):.2f}" if len(xs) > 1 else ""
def sel(**kw): return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
targets = []
for r in rows:
    if "target" in r and r["target"] not in targets: targets.append(r["target"])
name = {"file": "file://", "garage": "Garage S3"}
print(f"Medians of {reps} run(s){' (--quick sizes)' if quick == '1' else ''}; ranges are min–max.\n")

print("### Restore (age + zstd, `offsite restore`, default --parallel 8, integrity_check on)\n")
for t in targets:
    for rp in sel(kind="replica", target=t):
        print(f"- {name[t]} replica: 1 snapshot (txid {rp['earliest']}) + segments up to txid {rp['latest']}: "
              f"{rp['objects']} objects, {rp['stored_bytes']/MB:.1f} MB stored, source database file after the run {rp['source_db_bytes']/MB:.1f} MB, lineages {rp['lineages']}")
print()
print("| replica | target | wall time s (median, range) | objects read | MB downloaded | restored DB MB | MB/s of DB restored | restore CPU s | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
for t in targets:
    for c in ("latest", "mid"):
        rs = sel(kind="restore", target=t, case=c)
        if not rs: continue
        w = [r["wall"] for r in rs]
        label = f"latest (txid {rs[0]['txid']})" if c == "latest" else f"middle (--txid {rs[0]['txid']})"
        size = rs[0]["db_bytes"]
        print(f"| {name[t]} | {label} | {med(w):.2f} ({rng(w)}) | {rs[0]['objects']} | {med([r['bytes'] for r in rs])/MB:.1f} | "
              f"{size/MB:.1f} | {size/MB/med(w):.0f} | {med([r['cpu_s'] for r in rs]):.2f} | {med([r['rss_kb'] for r in rs])/1024:.0f} |")
print()

wv = sel(kind="walvol")
wal = wv[0]["wal_bytes"] if wv else None
print("### Shipping throughput (`offsite replicate --age-recipient … --sync-interval " + sync + "`, zstd -3 + age)\n")
print(f"Workload: {scount} commits of one ~{int(sbig)//1000} kB row each (`offsite-workload --count {scount} --big-every 1 --big-bytes {sbig}`), "
      f"as fast as possible = **{wal/MB:.1f} MB of WAL** ({wal/4120:.0f} frames of 4 KiB pages).\n")
print("| what | time s (median, range) | MB/s of WAL | shipper CPU s | shipper CPU s per GiB of WAL | shipper peak RSS (VmHWM) MB | Garage CPU s | objects | stored MB |")
print("|---|---|---|---|---|---|---|---|---|")
ws = sel(kind="writer")
if ws:
    w = [r["wall"] for r in ws]
    print(f"| writer alone (SQLite autocheckpoint on) | {med(w):.2f} ({rng(w)}) | {wal/MB/med(w):.0f} | – | – | – | – | – | – |")
if wv:
    print(f"| writer alone, no checkpoints (1 run) | {wv[0]['wall']:.2f} | {wal/MB/wv[0]['wall']:.0f} | – | – | – | – | – | – |")
for t in targets:
    ss = sel(kind="ship", target=t)
    if not ss: continue
    w = [r["wall"] for r in ss]; ww = [r["writer_wall"] for r in ss]; cpu = [r["cpu_s"] for r in ss]
    g = [r["server_cpu_s"] for r in ss]
    gs = f"{med(g):.1f}" if t == "garage" else "–"
    lw = [r["log_wall"] for r in ss]
    print(f"| writer + shipper → {name[t]}: first commit → last segment upload logged by the shipper | {med(lw):.2f} ({rng(lw)}) | {wal/MB/med(lw):.0f} | | | | | | |")
    print(f"| writer + shipper → {name[t]}: writer's run | {med(ww):.2f} ({rng(ww)}) | {wal/MB/med(ww):.0f} | | | | | | |")
    print(f"| writer + shipper → {name[t]}: **first commit → all shipped** | **{med(w):.2f}** ({rng(w)}) | **{wal/MB/med(w):.0f}** | "
          f"{med(cpu):.2f} | {med(cpu)/(wal/2**30):.1f} | {med([r['hwm_kb'] for r in ss])/1024:.0f} | {gs} | "
          f"{med([r['objects'] for r in ss]):.0f} | {med([r['stored_bytes'] for r in ss])/MB:.1f} |")
print()
for t in targets:
    ss = sel(kind="ship", target=t)
    if ss:
        print(f"- {name[t]}: page bytes shipped (sum of segments' raw_bytes) {med([r['raw_bytes'] for r in ss])/MB:.1f} MB in "
              f"{med([r['segments'] for r in ss]):.0f} segments; lineages per run: {sorted(set(r['lineages'] for r in ss))}")
zs = sel(kind="zstd")
if zs:
    b = zs[0]["bytes"]
    c = [r["comp_s"] for r in zs]; d = [r["decomp_s"] for r in zs]
    print(f"\n### Codec limit, one core (zstd CLI {'' }on the restored database, {b/MB:.1f} MB → {zs[0]['zbytes']/MB:.1f} MB)\n")
    print("| | MB/s |\n|---|---|")
    print(f"| `zstd -3 -T1` compress | {b/MB/med(c):.0f} |")
    print(f"| `zstd -d` decompress | {b/MB/med(d):.0f} |")
EOF
cat "$REPORT"
if [[ -n $OUT ]]; then
    cp "$REPORT" "$OUT"
    cp "$RESULTS" "$OUT.jsonl"
fi
