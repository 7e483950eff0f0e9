#!/usr/bin/env bash
# What authenticating objects costs a restore (issue 11): instructions of one
# `offsite restore` under callgrind (exact and repeatable here, unlike wall
# time on a shared machine), and the share spent in codec::authenticate (the
# payload hash pass and the signature check before anything is parsed).
#
#   scripts/bench/auth_cost.sh [COMMITS]     (default 30 commits of ~1-3 MB)
# Results: docs/benchmarks/trust.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-30}
cargo build --bins --quiet
B=$PWD/target/debug
W=$(mktemp -d /tmp/offsite-auth-cost.XXXXXX)
trap 'pkill -TERM -f "offsite replicate $W" 2>/dev/null || true; rm -rf "$W"' EXIT
cd "$W"
VK=$("$B/offsite" keygen --signing -o sign.key 2>/dev/null)
RCPT=$("$B/offsite" keygen -o id.txt --pin "$VK" 2>/dev/null)
"$B/offsite-workload" app.db --count "$N" --big-every 3 >/dev/null 2>&1
"$B/offsite" replicate "$W/app.db" "file://$W/replica" --age-recipient "$RCPT" \
    --signing-key-file sign.key --sync-interval 200ms >ship.log 2>&1 &
SHIP=$!
sleep 3
"$B/offsite-workload" app.db --count "$N" --big-every 3 --rate 20 >/dev/null 2>&1
sleep 2
kill -TERM $SHIP; wait $SHIP || true
valgrind --tool=callgrind --callgrind-out-file=cg.out "$B/offsite" restore "file://$W/replica" \
    -o r.db --age-identity id.txt --no-integrity-check >cg.log 2>&1
tail -1 cg.log
callgrind_annotate --inclusive=yes cg.out 2>/dev/null |
    grep -E "PROGRAM TOTALS|offsite::codec::authenticate \[|blake3::Hasher::update \[|zstd_safe::DCtx::decompress_stream \[|StreamReader<R>::decrypt_chunk \[|offsite::record::open::|offsite::trusted::envelope"
