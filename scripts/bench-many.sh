#!/usr/bin/env bash
# Peak RSS of one offsite daemon replicating N databases found in a directory
# (dir + pattern), to a file:// replica, while a writer commits to random
# databases. Usage: scripts/bench-many.sh [N ...]   (default: 1 100 1000)
#
# For each N: creates N small databases, starts `offsite replicate --config`,
# waits until every database has its snapshot in the replica, then writes
# WRITES_PER_S commits/s spread over random databases for HOLD_S seconds and
# reads VmHWM (peak RSS) and VmRSS from /proc. Prints a Markdown table row per N.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=("$@")
[[ ${#COUNTS[@]} -gt 0 ]] || COUNTS=(1 100 1000)
HOLD_S=${HOLD_S:-30}
WRITES_PER_S=${WRITES_PER_S:-200}
cargo build --release --bins --quiet
BIN=$PWD/target/release
WORK=$(mktemp -d /tmp/offsite-bench-many.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "| databases | peak RSS (VmHWM) | RSS at end | startup until all shipped | commits written | offsite CPU s |"
echo "|---:|---:|---:|---:|---:|---:|"
for n in "${COUNTS[@]}"; do
    dir=$WORK/n$n
    mkdir -p "$dir/tenants" "$dir/backups"
    "$BIN/offsite-workload" "$dir/seed.db" --count 20 >/dev/null
    sqlite3_checkpoint() { python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()" "$1"; }
    sqlite3_checkpoint "$dir/seed.db"
    for i in $(seq 1 "$n"); do cp "$dir/seed.db" "$dir/tenants/t$i.db"; done
    cat >"$dir/offsite.toml" <<EOF
sync-interval = "1s"
[[database]]
dir = "$dir/tenants"
pattern = "*.db"
  [[database.replica]]
  url = "file://$dir/backups"
  encryption = "none"
EOF
    t0=$(date +%s.%N)
    OFFSITE_LOG=warn "$BIN/offsite" replicate --config "$dir/offsite.toml" 2>"$dir/log" &
    pid=$!
    # Every database has its lineage directory once its snapshot is uploaded.
    until [[ $(find "$dir/backups" -maxdepth 3 -name 'lineages' -type d 2>/dev/null | wc -l) -ge $n ]]; do
        kill -0 $pid || { cat "$dir/log"; exit 1; }
        sleep 0.5
    done
    t1=$(date +%s.%N)
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
    sleep 3
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    cpu=$(awk '{printf "%.1f", ($14 + $15) / 100}' /proc/$pid/stat)
    kill -TERM $pid
    wait $pid || { echo "offsite exited non-zero for N=$n" >&2; tail -20 "$dir/log" >&2; exit 1; }
    printf "| %d | %.1f MiB | %.1f MiB | %.1f s | %d | %s |\n" "$n" "$(echo "$hwm/1024" | bc -l)" \
        "$(echo "$rss/1024" | bc -l)" "$(echo "$t1 - $t0" | bc -l)" "$commits" "$cpu"
    rm -rf "$dir"
done
