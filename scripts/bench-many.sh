#!/usr/bin/env bash
# Peak RSS and idle CPU of one offsite daemon replicating N databases found in
# a directory (dir + pattern), while a writer commits to random databases.
# Usage: scripts/bench-many.sh [N ...]   (default: 1 100 1000)
#
# For each N: creates N small databases, starts `offsite replicate --config`
# with a `dir` + `pattern` entry, waits until every database's snapshot is
# uploaded (from the daemon's /metrics), waits SETTLE_S seconds, measures the
# CPU the daemon uses over IDLE_S seconds with no writes at all, then writes WRITES_PER_S commits/s
# spread over random databases for HOLD_S seconds and reads VmHWM (peak RSS)
# and VmRSS from /proc. Prints a Markdown table row per N.
#
# TARGET=file (default) ships to a file:// directory; TARGET=s3 to the first
# Garage of OFFSITE_TEST_S3_TARGETS (source /tmp/offsite-test-servers/env, or
# scripts/test-servers.sh), under a fresh prefix. ENCRYPTION=age (default) or
# none. OFFSITE_BIN=dir uses the binaries there instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=("$@")
[[ ${#COUNTS[@]} -gt 0 ]] || COUNTS=(1 100 1000)
HOLD_S=${HOLD_S:-30}
IDLE_S=${IDLE_S:-30}
SETTLE_S=${SETTLE_S:-30}
WRITES_PER_S=${WRITES_PER_S:-200}
TARGET=${TARGET:-file}
ENCRYPTION=${ENCRYPTION:-age}
PORT=${PORT:-41890}
if [[ -n ${OFFSITE_BIN:-} ]]; then
    BIN=$OFFSITE_BIN
else
    cargo build --release --bins --quiet
    BIN=$PWD/target/release
fi
WORK=$(mktemp -d /tmp/offsite-bench-many.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

s3_base() {
    local t=${OFFSITE_TEST_S3_TARGETS:-}
    local g
    g=$(tr ';' '\n' <<<"$t" | grep '^garage=' | head -1 | cut -d= -f2-)
    [[ -n $g ]] || { echo "TARGET=s3 needs OFFSITE_TEST_S3_TARGETS with a garage= entry (source /tmp/offsite-test-servers/env)" >&2; exit 2; }
    echo "$g"
}

# Sum of one counter over every replica in the daemon's /metrics (lines
# that also contain $2, e.g. a label).
metric_sum() {
    python3 - "$PORT" "$1" "${2:-}" <<'PY'
import sys, urllib.request
port, name, having = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
except Exception:
    print(0); sys.exit()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
              if (l.startswith(name + "{") or l.startswith(name + " ")) and having in l)))
PY
}

# Requests made so far by every replica, by kind: "put get list delete head other".
requests_now() {
    local out=()
    for k in put get list delete head other; do
        out+=("$(metric_sum offsite_requests_total "kind=\"$k\"")")
    done
    echo "${out[@]}"
}

# "a b c" - "x y z" per position, as put=…/get=…/….
requests_diff() {
    python3 - "$1" "$2" <<'PY'
import sys
a, b = [list(map(int, x.split())) for x in sys.argv[1:3]]
print(" ".join(f"{k}={y - x}" for k, x, y in zip("put get list delete head other".split(), b, a)))
PY
}

# Seconds until every replica is caught up (replication lag 0 on three
# scrapes in a row, one second apart), at most 300.
drain_s() {
    python3 - "$PORT" <<'PY'
import sys, time, urllib.request
port = sys.argv[1]
t0, ok = time.time(), 0
while ok < 3 and time.time() - t0 < 300:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    lag = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("offsite_replication_lag_seconds{"))
    ok = ok + 1 if lag == 0 else 0
    time.sleep(1)
print(f"{max(0.0, time.time() - t0 - 3):.0f}")
PY
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

REQS=()
echo "target: $TARGET, encryption: $ENCRYPTION, idle window ${IDLE_S} s, then ${WRITES_PER_S} commits/s for ${HOLD_S} s"
echo
echo "| databases | peak RSS (VmHWM) | RSS at end | startup until all shipped | idle CPU (% of a core) | commits written | caught up after the writes | offsite CPU s |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in "${COUNTS[@]}"; do
    dir=$WORK/n$n
    mkdir -p "$dir/tenants" "$dir/backups"
    "$BIN/offsite-workload" "$dir/seed.db" --count 20 >/dev/null
    python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()" "$dir/seed.db"
    for i in $(seq 1 "$n"); do cp "$dir/seed.db" "$dir/tenants/t$i.db"; done
    if [[ $TARGET == s3 ]]; then
        base=$(s3_base)
        # s3://bucket?query → s3://bucket/bench-many-…?query
        url="${base%%\?*}/bench-many-$$-$n-$RANDOM?${base#*\?}"
    else
        url="file://$dir/backups"
    fi
    if [[ $ENCRYPTION == age ]]; then
        rcpt=$("$BIN/offsite" keygen -o "$dir/key.txt" 2>/dev/null)
        enc="age-recipients = [\"$rcpt\"]"
    else
        enc='encryption = "none"'
    fi
    "$BIN/offsite" keygen --signing -o "$dir/signing.key" >/dev/null 2>&1
    cat >"$dir/offsite.toml" <<EOF
sync-interval = "1s"
signing-key-file = "$dir/signing.key"
listen = "127.0.0.1:$PORT"
[[database]]
dir = "$dir/tenants"
pattern = "*.db"
  [[database.replica]]
  url = "$url"
  $enc
EOF
    t0=$(date +%s.%N)
    OFFSITE_LOG=warn "$BIN/offsite" replicate --config "$dir/offsite.toml" 2>"$dir/log" &
    pid=$!
    until [[ $(metric_sum offsite_snapshots_total) -ge $n ]]; do
        kill -0 $pid || { cat "$dir/log"; exit 1; }
        sleep 0.5
    done
    t1=$(date +%s.%N)
    # Let start-up work settle (lease writes, first heads, the blocking
    # threads of the snapshots), then idle.
    sleep "$SETTLE_S"
    r0=$(requests_now)
    c0=$(cpu_ticks $pid)
    sleep "$IDLE_S"
    c1=$(cpu_ticks $pid)
    r1=$(requests_now)
    s1=$(metric_sum offsite_segments_shipped_total)
    x1=$(metric_sum offsite_shipped_txid)
    idle_pct=$(echo "($c1 - $c0) / $IDLE_S" | bc -l)
    commits=$(python3 - "$dir/tenants" "$n" "$HOLD_S" "$WRITES_PER_S" <<'PY'
import random, sqlite3, sys, time
d, n, hold, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.time() + hold
k = 0
while time.time() < end:
    i = random.randint(1, n)
    c = sqlite3.connect(f"{d}/t{i}.db", timeout=30)
    c.execute("INSERT INTO t(id, version, payload) VALUES (?, 0, randomblob(200))", (1_000_000 + k,))
    c.commit()
    c.close()
    k += 1
    time.sleep(1 / rate)
print(k)
PY
)
    drained=$(drain_s)
    r2=$(requests_now)
    s2=$(metric_sum offsite_segments_shipped_total)
    x2=$(metric_sum offsite_shipped_txid)
    REQS+=("| $n | $(requests_diff "$r1" "$r0") | $commits | $((x2 - x1)) | $((s2 - s1)) | $(requests_diff "$r2" "$r1") |")
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    cpu=$(awk '{printf "%.1f", ($14 + $15) / 100}' /proc/$pid/stat)
    kill -TERM $pid
    wait $pid || { echo "offsite exited non-zero for N=$n" >&2; tail -20 "$dir/log" >&2; exit 1; }
    printf "| %d | %.1f MiB | %.1f MiB | %.1f s | %.1f %% | %d | %s s | %s |\n" "$n" "$(echo "$hwm/1024" | bc -l)" \
        "$(echo "$rss/1024" | bc -l)" "$(echo "$t1 - $t0" | bc -l)" "$idle_pct" "$commits" "$drained" "$cpu"
    rm -rf "$dir"
done
echo
echo "Requests to the store (all replicas together), from /metrics:"
echo
echo "| databases | idle ${IDLE_S} s | commits in ${HOLD_S} s | txids shipped | segments shipped | requests for them, until caught up |"
echo "|---:|---|---:|---:|---:|---|"
printf '%s\n' "${REQS[@]}"
