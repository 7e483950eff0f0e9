#!/usr/bin/env python3
"""offsite vs pgBackRest vs Barman cloud on PostgreSQL 15, side by side, on this
machine (a benchmark, not a test: nothing here asserts a time).

Run through scripts/bench/pg_compare.sh, which installs what is missing
(PostgreSQL 15, pgbackrest, barman-cli-cloud, a venv with matplotlib), builds
the release binary and starts the S3 test servers. See docs/BENCHMARKS-postgres.md.

    scripts/bench/pg_compare.sh --quick           # small sizes, 1 repetition (~6 min)
    scripts/bench/pg_compare.sh                   # the full run behind the doc (~45 min)

Figures (each config gets a fresh cluster unless said otherwise):
  kill     data-loss window when the primary is lost (kill -9 + rm -rf + restore latest)
  tps      pgbench tps with each tool attached vs none
  big      one ~1 GB cluster, all tools attached at once (same history for all):
           base backup throughput + CPU, N minutes of pgbench, bytes stored,
           point-in-time restore to a moment back in that history.
"""

import argparse
import glob
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parents[2]
GB = 1e9
MB = 1e6
SEG = 16 << 20


def log(msg):
    print(f"pg-bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def sizes(quick):
    if quick:
        return dict(
            kill_runs=1, kill_min=3.0, kill_max=5.0, marker_interval=0.01, bg_rate=200,
            tps_reps=1, tps_secs=5, tps_scale=2,
            big_scale=4, backup_reps=1, history_secs=20, target_back_secs=8, restore_reps=1,
        )
    return dict(
        kill_runs=5, kill_min=5.0, kill_max=15.0, marker_interval=0.01, bg_rate=200,
        tps_reps=3, tps_secs=20, tps_scale=10,
        big_scale=60, backup_reps=3, history_secs=240, target_back_secs=60, restore_reps=3,
    )


# ------------------------------------------------------------------ processes
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
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


PROCS = Procs()


def run(args, check=True, env=None, timeout=None, user=None, cwd=None):
    args = [str(a) for a in args]
    if user:
        args = ["runuser", "-u", user, "--", *args]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(args[:6])} … failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_timed(args, env=None, user=None, timeout=None):
    """Run to completion under /usr/bin/time: (wall_s, cpu_s, maxrss_kb, proc).
    cpu = user+sys of the process and every descendant it waited for."""
    with tempfile.NamedTemporaryFile("r", prefix="pgbench-time.") as tf:
        os.chmod(tf.name, 0o666)
        args = ["/usr/bin/time", "-f", "%U %S %M", "-o", tf.name, *[str(a) for a in args]]
        if user:
            args = ["runuser", "-u", user, "--", *args]
        t0 = time.time()
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.time() - t0
        if p.returncode != 0:
            raise BenchError(f"{' '.join(args[6:12])} … failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        u, s_, m = tf.read().split()[-3:]
        return wall, float(u) + float(s_), int(m), p


def proc_cpu_s(pid, children=False):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def tree_size(path):
    tot = 0
    for dp, _, fns in os.walk(path):
        for fn in fns:
            try:
                tot += os.lstat(os.path.join(dp, fn)).st_size
            except FileNotFoundError:
                pass
    return tot


def iso(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pg_time(ts):
    """RFC 3339 with Z (iso()) -> PostgreSQL's recovery_target_time form
    (it rejects the Z suffix as a time zone abbreviation)."""
    return ts.replace("T", " ").replace("Z", "+00")


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------ environment
class Env:
    def __init__(self, args):
        self.args = args
        self.offsite = os.environ["OFFSITE_BIN"]
        cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not cands:
            raise BenchError("no /usr/lib/postgresql/*/bin")
        self.pgbin = Path(cands[-1])
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.root = Path(tempfile.mkdtemp(prefix="pgcmp-", dir=args.workdir))
        os.chmod(self.root, 0o755)
        self.port_base = args.port_base
        self.s3_endpoint = os.environ.get("PGCMP_S3_ENDPOINT", "http://127.0.0.1:39000")
        self.s3_bucket = os.environ.get("PGCMP_S3_BUCKET", "offsite-test")
        self.s3_region = os.environ.get("AWS_REGION", "garage")
        self.s3_prefixes = []
        self.clusters = []
        self._seq = 0
        self._keys()
        self._wrappers()

    def seq(self):
        self._seq += 1
        return self._seq

    def free_port(self):
        """The next port from --port-base that nothing listens on (the machine
        may be shared: other test clusters pick ports too)."""
        import socket
        while True:
            port = self.port_base + self.seq()
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue

    # keys: age identity + signing key (offsite); cipher pass (pgBackRest)
    def _keys(self):
        k = self.root / "keys"
        k.mkdir()
        os.chmod(k, 0o755)
        p = run([self.offsite, "keygen", "-o", k / "id.txt"])
        rcpt = [w for w in (p.stdout + p.stderr).split() if w.startswith("age1")]
        if not rcpt:
            raise BenchError(f"offsite keygen printed no recipient: {p.stdout} {p.stderr}")
        (k / "rcpt.txt").write_text(rcpt[-1] + "\n")
        os.chmod(k / "id.txt", 0o644)  # restore_command runs as postgres (benchmark only)
        p = run([self.offsite, "keygen", "--signing", "-o", k / "sign.key"])
        vk = [w for w in (p.stdout + p.stderr).split() if w.startswith("offsite-vk1-")]
        if not vk:
            raise BenchError(f"offsite keygen --signing printed no verifying key: {p.stdout} {p.stderr}")
        self.id_file, self.rcpt_file, self.sign_file, self.vk = k / "id.txt", k / "rcpt.txt", k / "sign.key", vk[-1]
        self.cipher_pass = secrets.token_urlsafe(32)
        self.offsite_env = dict(os.environ, OFFSITE_SIGNING_KEY_FILE=str(self.sign_file), OFFSITE_VERIFY_KEY=self.vk,
                                RUST_LOG=os.environ.get("RUST_LOG", "info"))
        # Readers get the verifying key only (a restore host has no signing key;
        # with OFFSITE_SIGNING_KEY_FILE set, the server's restore_command inherits
        # it and wal-fetch fails on the unreadable file: see the doc's findings).
        self.reader_env = {k: v for k, v in self.offsite_env.items() if k != "OFFSITE_SIGNING_KEY_FILE"}

    def _wrappers(self):
        """Barman's archive/restore commands with the S3 credentials in a script
        readable by postgres only (not in postgresql.conf)."""
        env = (f"export AWS_ACCESS_KEY_ID='{os.environ['AWS_ACCESS_KEY_ID']}' "
               f"AWS_SECRET_ACCESS_KEY='{os.environ['AWS_SECRET_ACCESS_KEY']}' "
               f"AWS_DEFAULT_REGION='{self.s3_region}'\n")
        b = self.root / "bin"
        b.mkdir()
        os.chmod(b, 0o755)
        for name, body in {
            "barman-archive": 'exec barman-cloud-wal-archive -z --endpoint-url "$1" "$2" "$3" "$4"\n',
            "barman-restore": 'exec barman-cloud-wal-restore --endpoint-url "$1" "$2" "$3" "$4" "$5"\n',
            # the big cluster's archive_command: pgBackRest and Barman side by side
            "both-archive": ('pgbackrest --config="$1" --stanza=bench archive-push "$2" & p=$!\n'
                             'barman-cloud-wal-archive -z --endpoint-url "$3" "$4" bench "$2"; b=$?\n'
                             'wait $p && exit $b\n'),
        }.items():
            f = b / f"{name}.sh"
            f.write_text("#!/bin/sh\n" + env + body)
            shutil.chown(f, "root", "postgres")
            os.chmod(f, 0o750)
        self.barman_archive, self.barman_restore, self.both_archive = (b / "barman-archive.sh", b / "barman-restore.sh",
                                                                       b / "both-archive.sh")

    def s3_url(self, prefix):
        return f"s3://{self.s3_bucket}/{prefix}"

    def new_prefix(self, what):
        p = f"pgcmp-{self.run_id}/{what}"
        self.s3_prefixes.append(p)
        return p

    def offsite_url_s3(self, prefix):
        return (f"s3://{self.s3_bucket}/{prefix}?endpoint={self.s3_endpoint}&region={self.s3_region}"
                "&force-path-style=true")

    def file_archive(self, name):
        d = self.root / name
        d.mkdir()
        shutil.chown(d, "root", "postgres")
        os.chmod(d, 0o2750)
        return d, f"file://{d}?file-mode=0640"

    def s3(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=self.s3_region)

    def s3_bytes(self, prefix):
        """{key: size} under prefix."""
        c = self.s3()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.s3_bucket, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) + 1:]] = o["Size"]
        return out

    def s3_delete(self, prefix):
        c = self.s3()
        keys = list(self.s3_bytes(prefix))
        for i in range(0, len(keys), 500):
            c.delete_objects(Bucket=self.s3_bucket,
                             Delete={"Objects": [{"Key": f"{prefix}/{k}"} for k in keys[i:i + 500]]})

    def cleanup(self):
        for c in self.clusters:
            c.stop(mode="immediate", check=False)
        PROCS.cleanup()
        if not self.args.keep:
            for p in self.s3_prefixes:
                try:
                    self.s3_delete(p)
                except Exception as e:  # noqa: BLE001
                    log(f"could not delete s3 prefix {p}: {e}")
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            log(f"kept {self.root} and s3 prefixes {self.s3_prefixes}")


# ------------------------------------------------------------------ clusters
class Cluster:
    def __init__(self, env, name, conf=None):
        self.env = env
        self.name = name
        self.dir = env.root / name
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.logf = self.dir / "postgres.log"
        self.port = env.free_port()
        self.conf = conf or {}
        env.clusters.append(self)

    def pg(self, tool):
        return self.env.pgbin / tool

    def init(self):
        self.dir.mkdir()
        self.sock.mkdir()
        shutil.chown(self.dir, "postgres", "postgres")
        shutil.chown(self.sock, "postgres", "postgres")
        run([self.pg("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            user="postgres")
        self.write_conf(self.data)
        return self

    def write_conf(self, data, port=None):
        base = {
            "listen_addresses": "'127.0.0.1'", "port": str(port or self.port),
            "unix_socket_directories": f"'{self.sock}'", "wal_level": "replica",
            "max_wal_senders": "10", "max_replication_slots": "10", "max_slot_wal_keep_size": "'4GB'",
            "max_wal_size": "'2GB'", "log_line_prefix": "'%m [%p] '",
        }
        base.update(self.conf)
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n# pg_compare\n")
            for k, v in base.items():
                f.write(f"{k} = {v}\n")

    def start(self, data=None, port=None):
        data = data or self.data
        o = f"-p {port}" if port else ""
        try:
            run([self.pg("pg_ctl"), "-D", data, "-l", self.logf, "-w", "-t", "600", "-o", o, "start"],
                user="postgres")
        except BenchError as e:
            raise BenchError(f"{e}\n--- {self.logf}:\n{tail(self.logf, 25)}") from None

    def stop(self, data=None, mode="fast", check=True):
        data = data or self.data
        if not (Path(data) / "postmaster.pid").exists():
            return
        run([self.pg("pg_ctl"), "-D", data, "-m", mode, "-w", "-t", "120", "stop"], user="postgres", check=check)

    def postmaster_pid(self, data=None):
        with open((data or self.data) / "postmaster.pid") as f:
            return int(f.readline())

    def kill9(self):
        """SIGKILL the postmaster and every child at once (archiver and its
        archive_command included): the primary is lost."""
        pid = self.postmaster_pid()
        pids = [pid] + children_of(pid)
        for c in list(pids[1:]):
            pids += children_of(c)  # archive_command shells and their children
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(200):
            if not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
                break
            time.sleep(0.02)

    def dsn(self, port=None):
        return f"postgres://postgres@127.0.0.1:{port or self.port}/postgres"

    def conn(self, port=None):
        c = psycopg2.connect(host="127.0.0.1", port=port or self.port, user="postgres", dbname="postgres")
        c.autocommit = True
        return c

    def sql(self, q, port=None):
        c = self.conn(port)
        try:
            cur = c.cursor()
            cur.execute(q)
            return cur.fetchall() if cur.description else None
        finally:
            c.close()

    def one(self, q, port=None):
        r = self.sql(q, port)
        return r[0][0] if r else None

    def pgbench(self, *a, port=None):
        return run([self.pg("pgbench"), "-h", "127.0.0.1", "-p", port or self.port, "-U", "postgres", *a, "postgres"])

    def wait_recovered(self, port, timeout=1800, data=None):
        """Until the server accepts connections and is out of recovery."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            try:
                if self.one("select pg_is_in_recovery()", port=port) is False:
                    return
            except psycopg2.OperationalError:
                pass
            if data is not None and not (Path(data) / "postmaster.pid").exists():
                raise BenchError(f"server on {data} died during recovery: {tail(self.logf)}")
            time.sleep(0.05)
        raise BenchError(f"recovery on port {port} did not finish in {timeout}s: {tail(self.logf)}")

    def wait_archived(self, timeout=600):
        """Until archive_command has taken every .ready segment."""
        st = self.data / "pg_wal" / "archive_status"
        t_end = time.time() + timeout
        while time.time() < t_end:
            if not any(n.endswith(".ready") for n in os.listdir(st)):
                return
            time.sleep(0.1)
        raise BenchError(f"archiving did not catch up in {timeout}s: {tail(self.logf)}")

    def wait_streamed(self, app="offsite", timeout=600):
        """Until the client named app has flushed up to the current insert LSN."""
        lsn = self.one("select pg_current_wal_lsn()")
        t_end = time.time() + timeout
        while time.time() < t_end:
            r = self.sql(f"select flush_lsn >= '{lsn}'::pg_lsn from pg_stat_replication where application_name = '{app}'")
            if r and any(x[0] for x in r):
                return
            time.sleep(0.1)
        raise BenchError(f"{app} did not flush up to {lsn} in {timeout}s")

    def server_cpu_s(self, data=None):
        """CPU of every postgres process of this server so far (live ones +
        the postmaster's reaped children), with what they reaped themselves:
        the archiver's archive_command processes count here."""
        pid = self.postmaster_pid(data)
        return proc_cpu_s(pid, children=True) + sum(proc_cpu_s(c, children=True) for c in children_of(pid))

    def remove(self):
        if not self.env.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self in self.env.clusters:
            self.env.clusters.remove(self)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def tail(path, n=15):
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except FileNotFoundError:
        return f"({path} missing)"


def mkdata(path):
    path.mkdir(mode=0o700)
    shutil.chown(path, "postgres", "postgres")


# ------------------------------------------------------------------ tools
class Offsite:
    """offsite pg stream as the sidecar; offsite pg backup; offsite restore."""

    def __init__(self, env, cl, target, synchronous=False, slot="offsite", app="offsite"):
        self.env, self.cl, self.target, self.synchronous, self.slot = env, cl, target, synchronous, slot
        tag = f"{cl.name}-{slot}"
        if target == "file":
            self.path, self.url = env.file_archive(f"arch-offsite-{tag}")
            self.prefix = None
        else:
            self.prefix = env.new_prefix(f"offsite-{tag}")
            self.url = env.offsite_url_s3(self.prefix)
            self.path = None
        self.spool = env.root / f"spool-{tag}"
        self.logf = env.root / f"stream-{tag}.log"
        self.proc = None

    def label(self):
        return f"offsite {'synchronous' if self.synchronous else 'defaults (250 ms)'} {self.target}"

    def start_stream(self, wait_backup=True, timeout=1200):
        args = [self.env.offsite, "pg", "stream", "--dsn", self.cl.dsn(), "--replica", self.url,
                "--age-recipients-file", self.env.rcpt_file, "--slot", self.slot, "--spool-dir", self.spool]
        if self.synchronous:
            args.append("--synchronous")
        self.logfh = open(self.logf, "ab")
        self.proc = PROCS.popen(args, stdout=self.logfh, stderr=subprocess.STDOUT, env=self.env.offsite_env)
        if wait_backup:
            t_end = time.time() + timeout
            while time.time() < t_end:
                if "scheduled base backup complete" in self.logf.read_text(errors="replace"):
                    break
                if self.proc.poll() is not None:
                    raise BenchError(f"offsite pg stream exited {self.proc.returncode}: {tail(self.logf)}")
                time.sleep(0.1)
            else:
                raise BenchError(f"offsite pg stream: no base backup after {timeout}s: {tail(self.logf)}")
        if self.synchronous:
            self.cl.sql("alter system set synchronous_standby_names = 'offsite'")
            self.cl.sql("select pg_reload_conf()")
            t_end = time.time() + 60
            while time.time() < t_end:
                r = self.cl.sql("select sync_state from pg_stat_replication where application_name = 'offsite'")
                if r and r[0][0] == "sync":
                    break
                time.sleep(0.1)
            else:
                raise BenchError("offsite never became the synchronous standby")

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid) if self.proc else 0.0

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log(f"offsite pg stream did not stop on SIGTERM within 60 s: {tail(self.logf)}")
                self.proc.kill()
                self.proc.wait()

    def backup(self):
        return run_timed([self.env.offsite, "pg", "backup", "--dsn", self.cl.dsn(), "--replica", self.url,
                          "--age-recipients-file", self.env.rcpt_file], env=self.env.offsite_env)

    def restore(self, data, port, timestamp=None):
        """offsite restore … --start: returns when recovery reached its target."""
        args = [self.env.offsite, "restore", self.url, "-o", data, "--age-identity", self.env.id_file,
                "--start", "--port", port]
        if timestamp:
            # offsite writes --timestamp verbatim into recovery_target_time, and
            # PostgreSQL rejects RFC 3339's "Z" there (a finding in the doc):
            # give the same instant as +00:00.
            args += ["--timestamp", timestamp.replace("Z", "+00:00")]
        p = run(args, env=self.env.reader_env, timeout=3600)
        return p.stderr

    def stored(self):
        """{'wal': bytes, 'backups': bytes, 'other': bytes, 'backup_sizes': [...]}"""
        if self.path:
            files = {}
            for dp, _, fns in os.walk(self.path):
                for fn in fns:
                    full = os.path.join(dp, fn)
                    files[os.path.relpath(full, self.path)] = os.lstat(full).st_size
        else:
            files = self.env.s3_bytes(self.prefix)
        out = {"wal": 0, "backups": 0, "other": 0}
        per_backup = {}
        for k, s in files.items():
            if "pg/wal/" in k or "pg/files/" in k:
                out["wal"] += s
            elif "pg/backups/" in k:
                out["backups"] += s
                bid = k.split("pg/backups/", 1)[1].split("/", 1)[0]
                per_backup[bid] = per_backup.get(bid, 0) + s
            else:
                out["other"] += s
        out["backup_sizes"] = sorted(per_backup.values())
        out["objects"] = len(files)
        return out


class PgBackRest:
    """pgBackRest 2.45, posix repository on the same disk, aes-256-cbc."""

    def __init__(self, env, cl, archive_timeout="0", compress=None):
        self.env, self.cl = env, cl
        self.archive_timeout = archive_timeout
        d = env.root / f"pgbr-{cl.name}"
        for sub in ("repo", "log", "lock", "spool"):
            (d / sub).mkdir(parents=True)
            shutil.chown(d / sub, "postgres", "postgres")
        self.repo = d / "repo"
        self.conf = d / "pgbackrest.conf"
        lines = ["[global]", f"repo1-path={self.repo}", "repo1-cipher-type=aes-256-cbc",
                 f"repo1-cipher-pass={env.cipher_pass}", f"log-path={d / 'log'}", f"lock-path={d / 'lock'}",
                 f"spool-path={d / 'spool'}", "log-level-console=warn", "log-level-file=info", "start-fast=y",
                 "repo1-retention-full=100"]
        if compress:
            lines += [f"compress-type={compress[0]}", f"compress-level={compress[1]}"]
        lines += ["", "[bench]", f"pg1-path={cl.data}", f"pg1-port={cl.port}", f"pg1-socket-path={cl.sock}", ""]
        self.conf.write_text("\n".join(lines))
        shutil.chown(self.conf, "root", "postgres")
        os.chmod(self.conf, 0o640)

    def archive_command(self):
        return f"'pgbackrest --config={self.conf} --stanza=bench archive-push %p'"

    def cmd(self, *a, timed=False):
        args = ["pgbackrest", f"--config={self.conf}", "--stanza=bench", *a]
        if timed:
            return run_timed(args, user="postgres", timeout=3600)
        return run(args, user="postgres", timeout=3600)

    def stanza_create(self):
        self.cmd("stanza-create")

    def backup(self):
        return self.cmd("--type=full", "backup", timed=True)

    def restore(self, data, port, timestamp=None):
        a = [f"--pg1-path={data}", "--archive-mode=off"]
        if timestamp:
            a += ["--type=time", f"--target={pg_time(timestamp)}",
                  "--target-action=promote"]
        self.cmd(*a, "restore")
        self.cl.start(data=data, port=port)
        self.cl.wait_recovered(port, data=data)

    def stored(self):
        arch = tree_size(self.repo / "archive")
        per_backup = []
        bdir = self.repo / "backup" / "bench"
        other = 0
        if bdir.exists():
            for e in bdir.iterdir():
                if e.is_dir() and re.match(r"^\d{8}-\d{6}F", e.name):
                    per_backup.append(tree_size(e))
                elif e.is_file():
                    other += e.stat().st_size
        return {"wal": arch, "backups": sum(per_backup), "other": other, "backup_sizes": sorted(per_backup),
                "objects": sum(len(f) for _, _, f in os.walk(self.repo))}


class Barman:
    """barman-cloud-wal-archive / -backup / -restore 3.4 against Garage (S3)."""

    def __init__(self, env, cl, archive_timeout="0"):
        self.env, self.cl = env, cl
        self.archive_timeout = archive_timeout
        self.prefix = env.new_prefix(f"barman-{cl.name}")
        self.url = env.s3_url(self.prefix)
        self.aws_env = dict(os.environ, AWS_DEFAULT_REGION=env.s3_region)

    def archive_command(self):
        return f"'{self.env.barman_archive} {self.env.s3_endpoint} {self.url} bench %p'"

    def backup(self):
        return run_timed(["barman-cloud-backup", "-z", "--immediate-checkpoint", "--endpoint-url",
                          self.env.s3_endpoint, "-h", "127.0.0.1", "-p", self.cl.port, "-U", "postgres",
                          self.url, "bench"], env=self.aws_env, timeout=3600)

    def latest_backup(self):
        p = run(["barman-cloud-backup-list", "--format", "json", "--endpoint-url", self.env.s3_endpoint,
                 self.url, "bench"], env=self.aws_env)
        bl = json.loads(p.stdout)["backups_list"]
        done = [b for b in bl if b.get("status") == "DONE"]
        if not done:
            raise BenchError(f"barman-cloud-backup-list: no DONE backup: {p.stdout[:500]}")
        return sorted(done, key=lambda b: b["backup_id"])[-1]["backup_id"]

    def restore(self, data, port, timestamp=None):
        bid = self.latest_backup()
        # barman-cloud-restore wants a missing or empty directory; then the
        # recovery configuration is ours to write (barman-cloud has no recover step).
        run(["barman-cloud-restore", "--endpoint-url", self.env.s3_endpoint, self.url, "bench", bid, data],
            env=self.aws_env, timeout=3600)
        run(["chown", "-R", "postgres:postgres", data])
        os.chmod(data, 0o700)
        (Path(data) / "pg_wal").mkdir(exist_ok=True)
        shutil.chown(Path(data) / "pg_wal", "postgres", "postgres")
        with open(Path(data) / "postgresql.auto.conf", "a") as f:
            f.write(f"restore_command = '{self.env.barman_restore} {self.env.s3_endpoint} {self.url} bench %f %p'\n")
            f.write("archive_mode = off\n")
            if timestamp:
                f.write(f"recovery_target_time = '{pg_time(timestamp)}'\n")
                f.write("recovery_target_action = 'promote'\n")
        sig = Path(data) / "recovery.signal"
        sig.touch()
        shutil.chown(sig, "postgres", "postgres")
        self.cl.start(data=data, port=port)
        self.cl.wait_recovered(port, data=data)

    def stored(self):
        files = self.env.s3_bytes(self.prefix)
        out = {"wal": 0, "backups": 0, "other": 0}
        per_backup = {}
        for k, s in files.items():
            if k.startswith("bench/wals/"):
                out["wal"] += s
            elif k.startswith("bench/base/"):
                out["backups"] += s
                bid = k.split("/")[2]
                per_backup[bid] = per_backup.get(bid, 0) + s
            else:
                out["other"] += s
        out["backup_sizes"] = sorted(per_backup.values())
        out["objects"] = len(files)
        return out


# ------------------------------------------------------------------ marker writer
class Markers:
    """Commits numbered marker rows (one per interval) and records the time
    each commit was acknowledged."""

    def __init__(self, cl, interval):
        self.cl, self.interval = cl, interval
        self.acks = []  # (id, ack_time)
        self.stop_flag = threading.Event()
        self.error = None
        cl.sql("create table if not exists marker (id bigint primary key, at timestamptz default clock_timestamp())")
        self.start_t = None

    def _run(self):
        try:
            c = self.cl.conn()
            cur = c.cursor()
            i = 0
            nxt = time.time()
            while not self.stop_flag.is_set():
                i += 1
                cur.execute("insert into marker (id) values (%s)", (i,))
                self.acks.append((i, time.time()))
                nxt += self.interval
                d = nxt - time.time()
                if d > 0:
                    time.sleep(d)
                else:
                    nxt = time.time()
        except Exception as e:  # noqa: BLE001 - the primary was killed
            self.error = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)

    def start(self):
        self.start_t = time.time()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def stop(self):
        self.stop_flag.set()
        self.th.join(30)

    def acked_at(self, mid):
        if mid is None or mid < 1:
            return self.start_t
        # a commit can be durable (and restored) while its acknowledgement
        # was lost with the server: newer than the last acknowledged one
        return self.acks[min(mid, len(self.acks)) - 1][1]

    def newest_before(self, t):
        best = 0
        for i, a in self.acks:
            if a <= t:
                best = i
        return best


# ------------------------------------------------------------------ figure 1: kill
KILL_CONFIGS = [
    # (key, tool, target, synchronous / archive_timeout)
    ("offsite-default-file", "offsite", "file", False),
    ("offsite-sync-file", "offsite", "file", True),
    ("offsite-default-s3", "offsite", "s3", False),
    ("pgbackrest-at0", "pgbackrest", "file", "0"),
    ("pgbackrest-at1s", "pgbackrest", "file", "1s"),
    ("barman-at0", "barman", "s3", "0"),
    ("barman-at1s", "barman", "s3", "1s"),
]


def attach(env, cl, tool, target, opt):
    """Start the tool and take its first base backup. Returns the tool."""
    if tool == "offsite":
        t = Offsite(env, cl, target, synchronous=opt is True)
        t.start_stream()
    elif tool == "pgbackrest":
        t = cl.tool
        t.stanza_create()
        t.backup()
    else:
        t = cl.tool
        t.backup()
    return t


def new_cluster(env, name, tool, opt, scale):
    cl = Cluster(env, name)
    if tool == "pgbackrest":
        cl.tool = PgBackRest(env, cl, archive_timeout=opt)
    elif tool == "barman":
        cl.tool = Barman(env, cl, archive_timeout=opt)
    else:
        cl.tool = None
    if cl.tool is not None:
        cl.conf.update(archive_mode="on", archive_command=cl.tool.archive_command(), archive_timeout=f"'{opt}'")
    cl.init()
    cl.start()
    cl.pgbench("-i", "-q", "-s", scale)
    return cl


def fig_kill(env, S, results):
    out = results.setdefault("kill", {"runs": []})
    configs = [c for c in KILL_CONFIGS if not env.args.only or c[0] in env.args.only]
    order = [(c, r) for r in range(S["kill_runs"]) for c in configs]
    for n, ((key, tool, target, opt), rep) in enumerate(order):
        log(f"kill {n + 1}/{len(order)}: {key} rep {rep + 1}")
        name = f"k{n}-{key}"
        cl = new_cluster(env, name, tool, opt, 1)
        try:
            kill_run(env, S, out, cl, key, tool, target, opt, rep)
        except BenchError as e:
            # one failed restore must not end the run: record it with the server's log
            log(f"  FAILED: {e}\n{tail(cl.logf, 25)}")
            out.setdefault("failures", []).append(dict(config=key, rep=rep, error=str(e)[-3000:],
                                                       postgres_log=tail(cl.logf, 25)))
        finally:
            cl.stop(mode="immediate", check=False)
            cl.remove()
        env.save(results)


def kill_run(env, S, out, cl, key, tool, target, opt, rep):
    t = None
    if True:
        try:
            mk = Markers(cl, S["marker_interval"])  # the table is in the base backup
            t = attach(env, cl, tool, target, opt)
            bg = PROCS.popen([env.pgbin / "pgbench", "-h", "127.0.0.1", "-p", cl.port, "-U", "postgres", "-n",
                              "-c", "2", "-j", "1", "-R", S["bg_rate"], "-T", "600", "postgres"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mk.start()
            delay = random.uniform(S["kill_min"], S["kill_max"])
            time.sleep(delay)
            t_kill = time.time()
            if tool == "offsite":
                # the sidecar shares the primary's fate (same host): both at once
                t.kill9()
            cl.kill9()
            mk.stop()
            bg.wait(30)
            acked = len(mk.acks)
            last_ack = mk.acks[-1][1] if mk.acks else mk.start_t
            shutil.rmtree(cl.data)
            for f in cl.sock.iterdir():
                f.unlink()
            t0 = time.time()
            if tool == "offsite":
                t.restore(cl.data, cl.port)
                cl.wait_recovered(cl.port, data=cl.data)
            else:
                mkdata(cl.data)
                t.restore(cl.data, cl.port)
            restore_s = time.time() - t0
            newest, count = cl.sql("select coalesce(max(id), 0), count(*) from marker")[0]
            lost = max(0, acked - newest)
            holes = newest - count
            window = last_ack - mk.acked_at(newest)
            run_ = dict(config=key, tool=tool, target=target, setting=str(opt), rep=rep, kill_after_s=round(delay, 3),
                        acked=acked, newest_restored=newest, lost=lost, holes=holes, window_s=round(window, 4),
                        restore_latest_s=round(restore_s, 3), writer_error=mk.error,
                        restored_newer_than_acked=max(0, newest - acked))
            out["runs"].append(run_)
            log(f"  {key}: acked {acked}, restored up to {newest}, lost {lost}, window {window:.3f} s, "
                f"restore {restore_s:.1f} s")
            if holes:
                log(f"  WARNING: {holes} markers below the newest restored one are missing")
            cl.stop(mode="fast", check=False)
        finally:
            if tool == "offsite" and t is not None:
                t.stop()


# ------------------------------------------------------------------ figure 2: tps
TPS_CONFIGS = [
    ("none", None, None, None),
    ("offsite-default-file", "offsite", "file", False),
    ("offsite-sync-file", "offsite", "file", True),
    ("pgbackrest-at0", "pgbackrest", "file", "0"),
    ("barman-at0", "barman", "s3", "0"),
    ("pgbackrest-at1s", "pgbackrest", "file", "1s"),
    ("barman-at1s", "barman", "s3", "1s"),
]


def fig_tps(env, S, results):
    out = results.setdefault("tps", {"runs": []})
    configs = [c for c in TPS_CONFIGS if not env.args.only or c[0] in env.args.only or c[0] == "none"]
    for rep in range(S["tps_reps"]):
        for key, tool, target, opt in configs:
            log(f"tps rep {rep + 1}: {key}")
            cl = new_cluster(env, f"t{rep}-{key}", tool, opt or "0", S["tps_scale"])
            t = None
            try:
                if tool == "offsite":
                    t = Offsite(env, cl, target, synchronous=opt is True)
                    t.start_stream()
                elif tool == "pgbackrest":
                    t = cl.tool
                    t.stanza_create()
                elif tool == "barman":
                    t = cl.tool
                cl.sql("checkpoint")
                if tool == "offsite":
                    cl.wait_streamed()
                elif tool:
                    cl.sql("select pg_switch_wal()")
                    cl.wait_archived()
                cpu0 = t.cpu_s() if tool == "offsite" else 0.0
                scpu0 = cl.server_cpu_s()
                p = cl.pgbench("-n", "-c", "4", "-j", "2", "-T", S["tps_secs"])
                m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", p.stdout)
                tps = float(m.group(1))
                lat = re.search(r"latency average = ([\d.]+) ms", p.stdout)
                row = dict(config=key, rep=rep, tps=tps, latency_ms=float(lat.group(1)) if lat else None,
                           server_cpu_s=round(cl.server_cpu_s() - scpu0, 2))
                if tool == "offsite":
                    row["sidecar_cpu_s"] = round(t.cpu_s() - cpu0, 2)
                out["runs"].append(row)
                log(f"  {key}: {tps:.0f} tps")
            finally:
                cl.stop(mode="immediate", check=False)
                if tool == "offsite" and t:
                    t.stop()
                cl.remove()
            env.save(results)


# ------------------------------------------------------------------ figures 3-5: the ~1 GB cluster
def fig_big(env, S, results):
    out = results.setdefault("big", {"backups": [], "restores": []})
    cl = Cluster(env, "big")
    pgbr = PgBackRest(env, cl)
    bar = Barman(env, cl)
    cl.conf.update(archive_mode="on", archive_command="'/bin/true'", archive_timeout="'0'")
    cl.init()
    cl.start()
    t0 = time.time()
    cl.pgbench("-i", "-q", "-s", S["big_scale"])
    cl.sql("vacuum analyze")
    cl.sql("checkpoint")
    db_bytes = cl.one("select pg_database_size('postgres')")
    out["db_bytes"] = db_bytes
    out["cluster_bytes"] = tree_size(cl.data)
    out["cluster_bytes_without_wal"] = out["cluster_bytes"] - tree_size(cl.data / "pg_wal")
    log(f"big: pgbench -i -s {S['big_scale']} in {time.time() - t0:.0f} s, database {db_bytes / MB:.0f} MB, "
        f"data directory {out['cluster_bytes'] / MB:.0f} MB")
    # every tool attached from here on: the same history for all
    cl.sql(f"alter system set archive_command = $${env.both_archive} {pgbr.conf} %p {env.s3_endpoint} {bar.url}$$")
    cl.sql("select pg_reload_conf()")
    pgbr.stanza_create()
    off_f = Offsite(env, cl, "file", slot="offsite_file")
    off_s = Offsite(env, cl, "s3", slot="offsite_s3")
    t_attach = time.time()
    for o in (off_f, off_s):
        o.start_stream(wait_backup=False)
    for o in (off_f, off_s):
        t_end = time.time() + 1800
        while "scheduled base backup complete" not in o.logf.read_text(errors="replace"):
            if o.proc.poll() is not None or time.time() > t_end:
                raise BenchError(f"offsite stream ({o.target}) gave no base backup: {tail(o.logf)}")
            time.sleep(0.2)
    out["offsite_initial_backups_s"] = round(time.time() - t_attach, 1)
    # figure 3: base backups
    tools = [("offsite", "file", off_f), ("offsite", "s3", off_s), ("pgbackrest", "file", pgbr), ("barman", "s3", bar)]
    for rep in range(S["backup_reps"]):
        for name, target, t in tools:
            log(f"big: backup rep {rep + 1}: {name} {target}")
            cl.wait_archived()
            cl.sql("checkpoint")
            scpu0 = cl.server_cpu_s()
            wall, cpu, rss, _ = t.backup()
            out["backups"].append(dict(tool=name, target=target, rep=rep, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                                       peak_rss_kb=rss, server_cpu_s=round(cl.server_cpu_s() - scpu0, 2)))
            log(f"  {wall:.1f} s wall, {cpu:.1f} s CPU")
            env.save(results)
    # history: pgbench with markers, all tools attached
    mk = Markers(cl, 0.05)
    mk.start()
    t_hist = time.time()
    log(f"big: {S['history_secs']} s of pgbench -c 4 -j 2 with every tool attached")
    p = cl.pgbench("-n", "-c", "4", "-j", "2", "-T", S["history_secs"])
    mk.stop()
    t_end_hist = time.time()
    m = re.search(r"tps = ([\d.]+)", p.stdout)
    out["history"] = dict(secs=S["history_secs"], tps=float(m.group(1)) if m else None,
                          wal_bytes=None, start=iso(t_hist), end=iso(t_end_hist))
    target_t = t_end_hist - S["target_back_secs"]
    target = iso(target_t)
    expected = mk.newest_before(target_t)
    out["target"] = dict(timestamp=target, expected_marker=expected, back_s=S["target_back_secs"],
                         replay_s=round(target_t - t_hist, 1))
    cl.sql("select pg_switch_wal()")
    cl.wait_archived()
    cl.wait_streamed("offsite")  # both streamers carry application_name offsite
    time.sleep(3)  # the 1 s sync interval
    wal_total = cl.one("select pg_current_wal_lsn() - '0/0'::pg_lsn")
    out["history"]["wal_lsn_bytes"] = int(wal_total)
    # figure 5: bytes stored
    out["stored"] = {f"{n} {tg}": t.stored() for n, tg, t in tools}
    for k, v in out["stored"].items():
        log(f"big: stored {k}: WAL {v['wal'] / MB:.1f} MB, backups {v['backups'] / MB:.1f} MB ({len(v['backup_sizes'])})")
    for o in (off_f, off_s):
        o.stop()
    cl.stop()
    env.save(results)
    # figure 4: restores to target
    rdir = env.root / "big" / "restore"
    rport = cl.port + 500
    for rep in range(S["restore_reps"]):
        for name, target_kind, t in tools:
            log(f"big: restore rep {rep + 1}: {name} {target_kind} to {target}")
            shutil.rmtree(rdir, ignore_errors=True)
            t0 = time.time()
            try:
                if name == "offsite":
                    t.restore(rdir, rport, timestamp=target)
                    cl.wait_recovered(rport, data=rdir)
                else:
                    if name == "pgbackrest":
                        mkdata(rdir)
                    t.restore(rdir, rport, timestamp=target)
            except BenchError as e:
                log(f"  FAILED: {e}")
                out.setdefault("failures", []).append(dict(what=f"restore {name} {target_kind}", rep=rep,
                                                           error=str(e)[-3000:]))
                cl.stop(data=rdir, mode="immediate", check=False)
                env.save(results)
                continue
            wall = time.time() - t0
            got = cl.one("select coalesce(max(id), 0) from marker", port=rport)
            out["restores"].append(dict(tool=name, target=target_kind, rep=rep, wall_s=round(wall, 2),
                                        restored_marker=got, expected_marker=expected))
            log(f"  {wall:.1f} s, marker {got} (expected {expected})")
            cl.stop(data=rdir, mode="fast", check=False)
            env.save(results)
    shutil.rmtree(rdir, ignore_errors=True)
    cl.stop(mode="immediate", check=False)


# ------------------------------------------------------------------ main
def versions(env):
    v = {}
    v["postgres"] = run([env.pgbin / "postgres", "--version"]).stdout.strip()
    v["offsite"] = run([env.offsite, "--version"], check=False).stdout.strip()
    v["pgbackrest"] = run(["pgbackrest", "version"]).stdout.strip()
    v["barman-cloud"] = run(["barman-cloud-backup", "--version"], check=False).stdout.strip() or \
        run(["barman-cloud-backup", "--version"], check=False).stderr.strip()
    v["kernel"] = os.uname().release
    v["cpus"] = os.cpu_count()
    try:
        v["cpu_model"] = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except AttributeError:
        v["cpu_model"] = "?"
    v["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    ap.add_argument("--out", type=Path, help="write results.json here (default: a temp file)")
    ap.add_argument("--figures", default="kill,tps,big", help="comma list of kill,tps,big")
    ap.add_argument("--only", nargs="*", help="kill/tps config keys to run (default all)")
    ap.add_argument("--kill-runs", type=int, help="kills per configuration")
    ap.add_argument("--workdir", default="/tmp", help="where the clusters and file archives live")
    ap.add_argument("--port-base", type=int, default=56100)
    ap.add_argument("--keep", action="store_true", help="keep the work dir and S3 prefixes")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    S = sizes(args.quick)
    if args.kill_runs:
        S["kill_runs"] = args.kill_runs
    random.seed(args.seed)
    env = Env(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="pgcmp-out-")) / "pg-results.json"

    def save(results):
        results["finished"] = iso(time.time())
        tmp = Path(str(out) + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)

    env.save = save
    results = dict(run_id=f"pgcmp-{env.run_id}", started=iso(time.time()), quick=args.quick, sizes=S,
                   versions=versions(env), settings=settings_doc(env))
    log(f"run {results['run_id']}: work dir {env.root}, results {out}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for fig in args.figures.split(","):
            t0 = time.time()
            {"kill": fig_kill, "tps": fig_tps, "big": fig_big}[fig](env, S, results)
            results.setdefault("durations_s", {})[fig] = round(time.time() - t0)
            save(results)
    finally:
        env.cleanup()
    log(f"results: {out}")


def settings_doc(env):
    return {
        "postgres": "initdb --auth=trust; wal_level=replica, max_wal_senders=10, max_replication_slots=10, "
                    "max_slot_wal_keep_size=4GB, max_wal_size=2GB, fsync on, everything else default",
        "offsite": "offsite pg stream --dsn … --replica file:///…?file-mode=0640 | s3://… --age-recipients-file … "
                   "(sync interval 1 s, flush-after store, zstd + age + signed); synchronous: --synchronous plus "
                   "synchronous_standby_names = 'offsite'",
        "pgbackrest": "posix repo on the same disk, repo1-cipher-type=aes-256-cbc, compress-type default (gz level 6), "
                      "process-max=1, archive-async=n (archive_command = pgbackrest archive-push %p), start-fast=y, "
                      "full backups",
        "barman": "barman-cloud-wal-archive -z (gzip) as archive_command, barman-cloud-backup -z --immediate-checkpoint "
                  "(-J 2 default), against Garage S3 (http://127.0.0.1:39000); no client-side encryption exists in "
                  "barman-cloud (only S3 server-side -e AES256|aws:kms)",
    }


if __name__ == "__main__":
    main()
