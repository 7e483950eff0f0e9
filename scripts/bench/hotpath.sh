#!/usr/bin/env bash
# The single-database pipeline's hot paths (ship, snapshot, restore; age and
# signing on), from benches/pipeline.rs: time and CPU natively, and
# instruction counts under callgrind (exact and repeatable on this shared
# machine, where wall time is not). Not a test.
#
#   scripts/bench/hotpath.sh [--commits N (200)] [--cg-commits N (30)] [--runs N (3)] [--out FILE]
#
# Writes the markdown report to FILE (default docs/benchmarks/hotpath.md).
# Compare two commits by running it on each: instruction counts that differ
# are a change in the code, not in the machine's load.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMITS=200 CG_COMMITS=30 RUNS=3 OUT=docs/benchmarks/hotpath.md
while (($#)); do
    case $1 in
    --commits) COMMITS=$2; shift ;;
    --cg-commits) CG_COMMITS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "hotpath: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; } >&2
BIN=$(cargo bench --bench pipeline --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="pipeline" and m.get("executable"): print(m["executable"])' | tail -1)
[[ -x $BIN ]] || { echo "hotpath: could not build benches/pipeline.rs" >&2; exit 1; }
W=$(mktemp -d /tmp/offsite-hotpath.XXXXXX)
trap 'rm -rf "$W"' EXIT

for i in $(seq "$RUNS"); do
    echo "hotpath: native run $i of $RUNS ($COMMITS commits)" >&2
    "$BIN" --commits "$COMMITS" >"$W/native-$i.md"
done
echo "hotpath: callgrind run ($CG_COMMITS commits; a few minutes)" >&2
(cd "$W" && valgrind --tool=callgrind --callgrind-out-file=cg.out --dump-instr=no \
    --dump-before='*phase_ship' --dump-after='*phase_ship' \
    --dump-after='*phase_snapshot' --dump-after='*phase_restore' \
    "$BIN" --commits "$CG_COMMITS" >cg.md 2>cg.log)

mkdir -p "$(dirname "$OUT")"
python3 - "$W" "$RUNS" "$COMMITS" "$CG_COMMITS" "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +changes)" >"$OUT" <<'EOF'
import glob, os, re, statistics, sys
w, runs, commits, cg_commits, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = {}
head = None
for i in range(1, runs + 1):
    for line in open(f"{w}/native-{i}.md"):
        if line.startswith("cores"):
            head = line.strip()
        m = re.match(r"\| (ship|snapshot|restore)[^|]*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows.setdefault(m.group(1), []).append([float(x) for x in m.groups()[1:]])
# callgrind: the dump written at each phase's end holds that phase (all threads;
# callgrind honours one --dump-before, so the snapshot's and the restore's
# counts also hold the few statements between two phases: opening a store).
phase = {}
for f in sorted(glob.glob(f"{w}/cg.out*")):
    txt = open(f).read()
    trig = re.search(r"^desc: Trigger: (.*)$", txt, re.M)
    tot = re.search(r"^(?:totals|summary): (\d+)", txt, re.M)
    if trig and tot:
        m = re.search(r"--dump-after=\S*phase_(\w+)", trig.group(1))
        if m:
            phase[m.group(1)] = int(tot.group(1))
cg_bytes = {}
for line in open(f"{w}/cg.md"):
    m = re.match(r"\| (ship|snapshot|restore)[^|]*\| ([\d.]+) \|", line)
    if m:
        cg_bytes[m.group(1)] = float(m.group(2))
print(f"Produced by `scripts/bench/hotpath.sh --commits {commits} --cg-commits {cg_commits} --runs {runs}` "
      f"(benches/pipeline.rs) at {rev}. {head}.\n")
print("| phase | MB | wall s (median) | CPU s (median) | MB/s | CPU s per GiB | instructions per MB (callgrind) |")
print("|---|---|---|---|---|---|---|")
for k in ("ship", "snapshot", "restore"):
    r = rows.get(k)
    if not r:
        continue
    mb = r[0][0]
    wall = statistics.median(x[1] for x in r)
    cpu = statistics.median(x[2] for x in r)
    ipm = f"{phase[k] / cg_bytes[k] / 1e6:.1f} M" if k in phase and k in cg_bytes else "–"
    print(f"| {k} | {mb:.1f} | {wall:.2f} | {cpu:.2f} | {mb / wall:.0f} | {cpu / (mb * 1e6 / 2**30):.2f} | {ipm} |")
print()
print("Instructions (callgrind, all threads, " + cg_commits + " commits): " +
      ", ".join(f"{k} {phase[k]:,}" for k in ("ship", "snapshot", "restore") if k in phase) + ".")
EOF
cat "$OUT"
