#!/usr/bin/env bash
# offsite's main job on the embedded default, end to end, no S3 needed:
# a SQLite database with a live writer is replicated (zstd + age) to a
# file:// replica, then restored and checked.
#
#   scripts/demo.sh [WORKDIR]        (default: ./offsite-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${1:-offsite-demo}")
mkdir -p "$WORK"

cargo build --release --bins --quiet
OFFSITE=target/release/offsite
WORKLOAD=target/release/offsite-workload

# 1. Keys. The shipper gets the public age recipient (it cannot read its own
#    backups) and a signing key (so a restore can tell its objects from
#    anything else written into the bucket); the restore side gets the age
#    identity, which pins the shipper's verifying key.
[ -f "$WORK/signing.key" ] || "$OFFSITE" keygen --signing -o "$WORK/signing.key" > "$WORK/verify-key.txt"
VERIFY_KEY=$(cat "$WORK/verify-key.txt")
[ -f "$WORK/identity.txt" ] || "$OFFSITE" keygen -o "$WORK/identity.txt" --pin "$VERIFY_KEY" > "$WORK/recipient.txt"
RECIPIENT=$(grep -o 'age1[0-9a-z]*' "$WORK/identity.txt" | head -1)

# 2. A database in WAL mode with some data.
"$WORKLOAD" "$WORK/app.db" --count 100

# 3. Replicate while the application keeps writing.
"$OFFSITE" replicate "$WORK/app.db" "file://$WORK/replica" --age-recipient "$RECIPIENT" \
    --signing-key-file "$WORK/signing.key" --log-format text &
SHIPPER=$!
trap 'kill $SHIPPER 2>/dev/null || true' EXIT
"$WORKLOAD" "$WORK/app.db" --count 200 --rate 100
kill -TERM $SHIPPER
wait $SHIPPER
trap - EXIT

# 4. What the replica holds, and a restore to the latest commit and to txid 50.
"$OFFSITE" list "file://$WORK/replica" --verify-key "$VERIFY_KEY"
"$OFFSITE" restore "file://$WORK/replica" -o "$WORK/restored.db" --age-identity "$WORK/identity.txt" --force
"$OFFSITE" restore "file://$WORK/replica" -o "$WORK/restored-50.db" --txid 50 --age-identity "$WORK/identity.txt" --force
python3 - "$WORK" <<'PY' 2>/dev/null || true
import sqlite3, sys
w = sys.argv[1]
for f in ("app.db", "restored.db", "restored-50.db"):
    n = sqlite3.connect(f"{w}/{f}").execute("select count(*), max(id) from t").fetchone()
    print(f"{f:16} rows={n[0]} last_commit={n[1]}")
PY
echo "demo finished: files in $WORK"
