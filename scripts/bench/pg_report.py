#!/usr/bin/env python3
"""Tables (Markdown) and the picture for docs/BENCHMARKS-postgres.md from the
results pg_compare.py writes.

    python scripts/bench/pg_report.py docs/benchmarks/pg-results.json \
        --md docs/benchmarks/pg-report.md --png docs/benchmarks/pg-loss-window.png \
        --csv docs/benchmarks/pg-kill-runs.csv
"""

import argparse
import csv
import json
import statistics
from pathlib import Path

MB = 1e6
GB = 1e9

KILL_LABELS = {
    "offsite-default-file": "offsite defaults (1 s), file",
    "offsite-sync-file": "offsite --synchronous, file",
    "offsite-default-s3": "offsite defaults (1 s), S3",
    "pgbackrest-at0": "pgBackRest, archive_timeout=0",
    "pgbackrest-at1s": "pgBackRest, archive_timeout=1s",
    "barman-at0": "Barman cloud, archive_timeout=0, S3",
    "barman-at1s": "Barman cloud, archive_timeout=1s, S3",
}
TPS_LABELS = {
    "none": "no backup tool",
    "offsite-default-file": "offsite defaults (1 s), file",
    "offsite-sync-file": "offsite --synchronous (+ synchronous_standby_names), file",
    "pgbackrest-at0": "pgBackRest archive-push (aes-256-cbc, gz)",
    "barman-at0": "barman-cloud-wal-archive -z, S3",
    "pgbackrest-at1s": "pgBackRest archive-push, archive_timeout=1s",
    "barman-at1s": "barman-cloud-wal-archive -z, archive_timeout=1s, S3",
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def f(x, d=2):
    if x is None:
        return "–"
    return f"{x:.{d}f}"


def ratio(a, b, d=2):
    if a is None or b is None:
        return "–"
    if b == 0:
        return "0/0" if a == 0 else "∞"
    return f"{a / b:.{d}f}"


def kill_stats(R):
    runs = R.get("kill", {}).get("runs", [])
    by = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    st = {}
    for k, rs in by.items():
        w = [r["window_s"] for r in rs]
        lost = [r["lost"] for r in rs]
        st[k] = dict(n=len(rs), w50=med(w), w99=pct(w, 0.99), wmax=max(w), lost50=med(lost), lostmax=max(lost),
                     lost_all=lost, w_all=w, holes=sum(r["holes"] for r in rs),
                     zero_restored=sum(1 for r in rs if r["newest_restored"] == 0),
                     restore50=med([r["restore_latest_s"] for r in rs]))
    return st


def md_kill(R):
    st = kill_stats(R)
    if not st:
        return []
    base = st.get("offsite-default-file")
    out = ["#### 1. Data-loss window when the primary is lost (kill -9 of every PostgreSQL process, rm -rf of the data "
           "directory, restore latest, start)", "",
           "| configuration | kills | markers lost p50 | lost max | window p50 s | window p99 s | window max s | "
           "restore latest p50 s | offsite defaults ÷ this, window p50 | ÷ window p99 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for k in KILL_LABELS:
        if k not in st:
            continue
        s = st[k]
        zr = f" ({s['zero_restored']}× none restored: ≥)" if s["zero_restored"] else ""
        out.append(f"| {KILL_LABELS[k]} | {s['n']} | {f(s['lost50'], 0)} | {s['lostmax']} | {f(s['w50'], 3)}{zr} | "
                   f"{f(s['w99'], 3)} | {f(s['wmax'], 3)} | {f(s['restore50'], 1)} | "
                   f"{ratio(base['w50'], s['w50']) if base else '–'} | {ratio(base['w99'], s['w99']) if base else '–'} |")
    holes = sum(s["holes"] for s in st.values())
    out += ["", f"Markers missing below the newest restored one (a hole in the restored history): {holes}.", ""]
    return out


def goals(R):
    st = kill_stats(R)
    out = []
    d = st.get("offsite-default-file")
    if d:
        ok = d["w99"] <= 0.6
        out.append(f"* offsite at defaults, window p99 ≤ 0.6 s: **{'met' if ok else 'missed'}** — p99 "
                   f"{d['w99']:.3f} s over {d['n']} kills ({'margin' if ok else 'over by'} "
                   f"{abs(0.6 - d['w99']):.3f} s; max {d['wmax']:.3f} s).")
    d3 = st.get("offsite-default-s3")
    if d3:
        ok = d3["w99"] <= 0.6
        out.append(f"* (same goal on S3) p99 {d3['w99']:.3f} s over {d3['n']} kills: "
                   f"**{'met' if ok else 'missed'}** by {abs(0.6 - d3['w99']):.3f} s.")
    s = st.get("offsite-sync-file")
    if s:
        ok = s["lostmax"] == 0
        out.append(f"* offsite --synchronous, 0 acknowledged commits lost: **{'met' if ok else 'missed'}** — "
                   f"lost {s['lost_all']} in {s['n']} kills.")
    return out


def md_tps(R):
    runs = R.get("tps", {}).get("runs", [])
    if not runs:
        return []
    by = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    none = med([r["tps"] for r in by.get("none", [])])
    out = ["#### 2. pgbench tps with the tool attached (pgbench -i -s 10, then -c 4 -j 2 -T 20; fresh cluster each)", "",
           "| configuration | runs | tps p50 | latency p50 ms | ÷ no tool (p50 of per-round ratios) | "
           "offsite defaults ÷ this (p50 of per-round ratios) | sidecar CPU s | PostgreSQL + archive_command CPU s |",
           "|---|---|---|---|---|---|---|---|"]
    rounds = {}
    for r in runs:
        rounds.setdefault((r.get("src", 0), r["rep"]), {})[r["config"]] = r["tps"]

    def paired(a, b):
        xs = [v[a] / v[b] for v in rounds.values() if a in v and b in v and v[b]]
        return f"{med(xs):.2f}" if xs else "–"

    off = med([r["tps"] for r in by.get("offsite-default-file", [])])
    rows = []
    for k in TPS_LABELS:
        if k not in by:
            continue
        srcs = sorted({r.get("src", 0) for r in by[k]})
        if k == "none" and len(srcs) > 1:  # one baseline per results file (run)
            rows += [(k, [r for r in by[k] if r.get("src", 0) == s_], f" (results file {s_ + 1})") for s_ in srcs]
        else:
            rows.append((k, by[k], f" (results file {srcs[0] + 1})" if len(by.get("none", [])) > len(by[k]) else ""))
    for k, rs, suffix in rows:
        t = med([r["tps"] for r in rs])
        cpu = med([r.get("sidecar_cpu_s") for r in rs])
        out.append(f"| {TPS_LABELS[k]}{suffix} | {len(rs)} | {f(t, 0)} | {f(med([r['latency_ms'] for r in rs]), 2)} | "
                   f"{paired(k, 'none')} | {paired('offsite-default-file', k) if k != 'none' else '–'} | {f(cpu, 1)} | "
                   f"{f(med([r.get('server_cpu_s') for r in rs]), 1)} |")
    return out + [""]


def md_big(R):
    B = R.get("big")
    if not B:
        return []
    out = []
    # what a base backup copies: the data directory without pg_wal (older results: the database size)
    cb = B.get("cluster_bytes_without_wal") or B["db_bytes"]
    what = "data directory without pg_wal" if "cluster_bytes_without_wal" in B else "database"
    out += [f"#### 3. Base backup of a {cb / GB:.2f} GB {what} (pgbench -i -s " + str(R["sizes"]["big_scale"]) +
            "), encryption on where the tool has it; MB/s and per GB are of that size", "",
            "| tool | target | runs | wall p50 s | MB/s | tool CPU s | CPU s per GB | PostgreSQL CPU s "
            "| peak RSS MB | stored per backup MB | offsite (same target) ÷ this, wall | ÷ CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in B["backups"]:
        by.setdefault((r["tool"], r["target"]), []).append(r)
    stored = B.get("stored", {})

    def key_off(target):
        return ("offsite", target)

    for (tool, target), rs in by.items():
        w = med([r["wall_s"] for r in rs])
        c = med([r["cpu_s"] for r in rs])
        sc = med([r["server_cpu_s"] for r in rs])
        rss = med([r["peak_rss_kb"] for r in rs]) / 1024
        sz = stored.get(f"{tool} {target}", {}).get("backup_sizes") or []
        ob = by.get(key_off(target))
        ow = med([r["wall_s"] for r in ob]) if ob else None
        oc = med([r["cpu_s"] for r in ob]) if ob else None
        out.append(f"| {tool} | {target} | {len(rs)} | {f(w, 1)} | {f(cb / MB / w, 0)} | {f(c, 1)} | "
                   f"{f(c / (cb / GB), 1)} | {f(sc, 1)} | {f(rss, 0)} | {f(med(sz) / MB if sz else None, 0)} | "
                   f"{ratio(ow, w) if tool != 'offsite' else '–'} | {ratio(oc, c) if tool != 'offsite' else '–'} |")
    out.append("")
    T = B.get("target", {})
    H = B.get("history", {})
    out += [f"#### 4. Point-in-time restore of that cluster to {T.get('back_s')} s before the end of "
            f"{H.get('secs')} s of pgbench (≈{T.get('replay_s')} s of pgbench WAL to replay after the newest base "
            "backup), wall time to a running, promoted server", "",
            "| tool | target | runs | wall p50 s | wall min–max s | restored marker (wanted) | "
            "offsite (same target) ÷ this |", "|---|---|---|---|---|---|---|"]
    by = {}
    for r in B["restores"]:
        by.setdefault((r["tool"], r["target"]), []).append(r)
    for (tool, target), rs in by.items():
        w = [r["wall_s"] for r in rs]
        ob = by.get(("offsite", target))
        ow = med([r["wall_s"] for r in ob]) if ob else None
        marks = ", ".join(str(r["restored_marker"]) for r in rs)
        out.append(f"| {tool} | {target} | {len(rs)} | {f(med(w), 1)} | {f(min(w), 1)}–{f(max(w), 1)} | "
                   f"{marks} ({rs[0]['expected_marker']}) | {ratio(ow, med(w)) if tool != 'offsite' else '–'} |")
    out.append("")
    out += [f"#### 5. Bytes stored for the same history (the same cluster, all tools attached at once: "
            f"{H.get('secs')} s of pgbench at {f(H.get('tps'), 0)} tps, "
            f"{f(H.get('wal_lsn_bytes', 0) / MB, 0)} MB of WAL generated since initdb)", "",
            "| tool | target | WAL archive MB | base backups | one backup MB (p50) | all backups MB | other MB | "
            "objects/files | one backup + WAL MB | offsite (same target) ÷ this |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in stored.items():
        tool, target = k.split()
        one = (med(v["backup_sizes"]) or 0) + v["wal"]
        o = stored.get(f"offsite {target}")
        oone = (med(o["backup_sizes"]) or 0) + o["wal"] if o else None
        out.append(f"| {tool} | {target} | {f(v['wal'] / MB, 1)} | {len(v['backup_sizes'])} | "
                   f"{f((med(v['backup_sizes']) or 0) / MB, 1)} | {f(v['backups'] / MB, 1)} | {f(v['other'] / MB, 2)} | "
                   f"{v['objects']} | {f(one / MB, 1)} | {ratio(oone, one) if tool != 'offsite' else '–'} |")
    out.append("")
    return out


def picture(R, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = kill_stats(R)
    keys = [k for k in KILL_LABELS if k in st]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw=dict(width_ratios=[3, 2]))
    colors = {"offsite": "#1f77b4", "pgbackrest": "#d62728", "barman": "#2ca02c"}
    for i, k in enumerate(keys):
        tool = k.split("-")[0]
        w = st[k]["w_all"]
        xs = [i + (j - (len(w) - 1) / 2) * 0.06 for j in range(len(w))]
        a1.scatter(xs, [max(x, 1e-3) for x in w], color=colors[tool], alpha=0.75, s=28, zorder=3)
        a1.hlines(max(st[k]["w50"], 1e-3), i - 0.3, i + 0.3, color="black", lw=2, zorder=4)
        lost = st[k]["lost_all"]
        a2.scatter([i] * len(lost), [max(x, 0.5) for x in lost], color=colors[tool], alpha=0.75, s=28, zorder=3)
    a1.axhline(0.6, color="gray", ls="--", lw=1)
    a1.text(len(keys) - 0.5, 0.63, "goal: offsite defaults p99 ≤ 0.6 s", ha="right", va="bottom", fontsize=8,
            color="gray")
    a1.set_yscale("log")
    a1.set_ylim(5e-4, None)
    a1.set_ylabel("data-loss window, s (log; 0 drawn at 0.001)")
    a2.set_yscale("log")
    a2.set_ylabel("acknowledged markers lost (log; 0 drawn at 0.5)")
    for a in (a1, a2):
        a.set_xticks(range(len(keys)))
        a.set_xticklabels([KILL_LABELS[k].replace(", ", "\n", 1) for k in keys], rotation=35, ha="right",
                          fontsize=7.5)
        a.grid(axis="y", alpha=0.3)
    a1.set_title("Window lost when the primary dies (dots: kills; bar: median)", fontsize=10)
    a2.set_title("Commits acknowledged but not restored (100 markers/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def kill_csv(R, path):
    runs = R.get("kill", {}).get("runs", [])
    if not runs:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(runs[0].keys()))
        w.writeheader()
        w.writerows(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, nargs="+", help="results JSON (later files add figures)")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--csv", type=Path)
    a = ap.parse_args()
    R = {}
    for i, p in enumerate(a.results):
        r = json.loads(p.read_text())
        for x in r.get("tps", {}).get("runs", []):
            x["src"] = i  # a repetition's "none" belongs to the same file's run
        for k, v in r.items():
            if k in ("kill", "tps") and k in R:
                R[k]["runs"] += v["runs"]
            elif k == "durations_s" and k in R:
                R[k].update(v)
            elif k in ("run_id",) and k in R:
                R[k] += " + " + v
            else:
                R.setdefault(k, v) if k in ("started", "versions", "settings") else R.__setitem__(k, v)
    lines = [f"Run {R.get('run_id')}: {R.get('started')} → {R.get('finished')}"
             f"{' (quick sizes)' if R.get('quick') else ''}; durations {R.get('durations_s')}.", ""]
    lines += md_kill(R) + ["Goals:", ""] + goals(R) + [""] + md_tps(R) + md_big(R)
    text = "\n".join(lines) + "\n"
    if a.md:
        a.md.write_text(text)
    else:
        print(text)
    if a.png:
        picture(R, a.png)
    if a.csv:
        kill_csv(R, a.csv)


if __name__ == "__main__":
    main()
