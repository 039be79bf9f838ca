#!/usr/bin/env python3
"""The s3-sql-loader benchmark: the loader next to the fastest plain tool for the same job.

Run it through bench/run (which generates the data, checks the tools and picks the Python
venv that has boto3 and moto). Directly:

    python bench/bench.py --scale small|full [--only CASE,...] [--list] [--sling-bin PATH]

Every case measures the loader (`s3-sql-loader once`, `status` or the `run` daemon) and a
"ceiling": the database's own bulk path or a bare S3 client doing the same requests, on the
same data, in the same run, and prints wall time, rows/s, MB/s, files/s, the loader's peak
RSS and loader/ceiling (the loader's throughput divided by the ceiling's: 1.00 means as fast
as the ceiling). Results go to bench/results/<timestamp>.json and bench/results/latest.json.

Standard library only, except boto3 (S3 cases), imported when first needed. Servers started
here listen on 127.0.0.1 only and are stopped at the end, as are the databases created here.
"""

import argparse
import concurrent.futures
import csv
import datetime
import fnmatch
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "s3-sql-loader")
PG = dict(host=os.environ.get("BENCH_PGHOST", "127.0.0.1"), port=os.environ.get("BENCH_PGPORT", "5432"), user="postgres")
MY = dict(host=os.environ.get("BENCH_MYSQL_HOST", "127.0.0.1"), port=os.environ.get("BENCH_MYSQL_PORT", "3306"), user="root")
TABLE = "events"          # the big files' table
SMALL_TABLE = "small"     # the many-small-files table
LATENCY_TABLE = "latency"
CONCURRENCY = 4           # the loader's default workers.concurrency, used for the small files
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
COMMAND_TIMEOUT = 4 * 3600
MB = 1_000_000


# ------------------------------------------------------------------------------------------
# Processes: everything started here is registered and stopped at exit.

class Cleanup:
    procs = []
    actions = []   # (description, callable), run in reverse order


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_process(p, grace=5.0):
    if p.poll() is not None:
        return
    try:
        p.terminate()
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except ProcessLookupError:
        pass


def popen(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    Cleanup.procs.append(p)
    return p


class Timed:
    """A finished command: wall seconds, exit code, output, peak RSS in kB (when measured)."""

    def __init__(self, wall, rc, out, err, rss_kb):
        self.wall, self.rc, self.out, self.err, self.rss_kb = wall, rc, out, err, rss_kb

    def tail(self, n=400):
        text = (self.err or "").strip() or (self.out or "").strip()
        return text[-n:]


class RssPoller:
    """Peak RSS from /proc/PID/status (VmHWM) when /usr/bin/time is missing."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, None, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak or 0, int(line.split()[1]))
            except OSError:
                return
            self.done.wait(0.02)


def rss_from_time_file(path):
    try:
        with open(path) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    return int(line.rsplit(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def timed(cmd, env=None, rss=False, timeout=COMMAND_TIMEOUT, shell=False, cwd=None, stdin=subprocess.DEVNULL):
    """Runs `cmd` to the end; with rss=True its peak RSS is measured (/usr/bin/time -v)."""
    time_file = None
    if rss and TIME_BIN and not shell:
        time_file = os.path.join(CTX.work, f"time-{time.monotonic_ns()}.txt")
        cmd = [TIME_BIN, "-v", "-o", time_file] + list(cmd)
    start = time.monotonic()
    p = popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, shell=shell, cwd=cwd,
              stdin=stdin)
    poller = RssPoller(p.pid) if rss and not time_file else None
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(p)
        out, err = p.communicate()
        err = (err or "") + f"\n(timed out after {timeout} s)"
    wall = time.monotonic() - start
    rss_kb = None
    if time_file:
        rss_kb = rss_from_time_file(time_file)
    elif poller:
        poller.done.set()
        rss_kb = poller.peak
    return Timed(wall, p.returncode, out, err, rss_kb)


def run(cmd, env=None, check=True, input=None, timeout=600):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def link(src, dest):
    """Puts `src` at `dest` without copying its bytes (a hard link; a copy across devices)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def warm(path):
    """Reads a file once so that both sides of a case find it in the page cache."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


# ------------------------------------------------------------------------------------------
# The run's context: data, work folder, the loader binary, moto.

class Context:
    pass


CTX = Context()


def data(name):
    return os.path.join(CTX.data, name)


def rows_of(name):
    return CTX.manifest["rows"][name]


def size_of(name):
    return CTX.manifest["sizes"][name]


def newdir(name):
    path = os.path.join(CTX.work, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


# ------------------------------------------------------------------------------------------
# The loader.

SUMMARY = re.compile(r"listed (\d+) \| loaded (\d+) \((\d+) rows\) \| already loaded (\d+) \| failed (\d+) \| "
                     r"to retry (\d+) \| held elsewhere (\d+)")


def loader_env(source, db, **settings):
    """The loader's environment: nothing inherited from LOADER_*/AWS_*/RUST_LOG, then ours.
    settings: WORKERS__CONCURRENCY=2 etc. (become LOADER_WORKERS__CONCURRENCY)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "AWS_")) and k != "RUST_LOG"}
    env.update({
        "LOADER_SOURCE__URL": source,
        "LOADER_DATABASE__URL": db,
        "LOADER_SOURCE__SETTLE_TIME": "0s",
        "LOADER_LOG__LEVEL": "warn",
        "LOADER_LOG__FORMAT": "text",
        "LOADER_HTTP__ENABLED": "false",
    })
    if source.startswith("s3://"):
        env.update(moto().loader_env())
    env.update({f"LOADER_{k}": str(v) for k, v in settings.items()})
    return env


class Once:
    def __init__(self, t):
        self.t = t
        m = SUMMARY.search(t.out or "")
        self.summary = dict(zip(["listed", "loaded", "rows", "already_loaded", "failed", "retry", "busy"],
                                map(int, m.groups()))) if m else None

    def problem(self, files, rows):
        """None when the run loaded exactly `files` files with `rows` rows, else what differs."""
        s = self.summary
        if s is None:
            return f"no summary line (exit {self.t.rc}): {self.t.tail()}"
        if s["loaded"] != files or s["rows"] != rows or s["failed"] or s["retry"]:
            return f"expected {files} file(s) / {rows} rows, got {s} (exit {self.t.rc}): {self.t.tail(200)}"
        return None


def loader_once(env, rss=True):
    return Once(timed([CTX.loader, "once"], env=env, rss=rss))


# ------------------------------------------------------------------------------------------
# Databases through their command-line clients.

def psql_cmd(db, *extra):
    return ["psql", "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "-d", db, "-X", "-q", "-At",
            "-v", "ON_ERROR_STOP=1", *extra]


def psql(db, sql):
    return run(psql_cmd(db, "-c", sql)).strip()


def pg_url(db):
    return f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{db}"


def pg_reachable():
    try:
        psql("postgres", "SELECT 1")
        return True
    except Exception:
        return False


def pg_count(db, table):
    return int(psql(db, f"SELECT count(*) FROM {table}"))


def pg_reset(db, table):
    psql(db, f"TRUNCATE {table}")
    psql(db, "CHECKPOINT")


class PgDatabase:
    """A fresh database for one case, dropped afterwards."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        psql("postgres", f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        psql("postgres", f"CREATE DATABASE {self.name}")
        Cleanup.actions.append((f"drop database {self.name}", self.drop))
        return self.name

    def drop(self):
        try:
            psql("postgres", f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        except Exception as e:
            print(f"  warning: could not drop {self.name}: {e}", file=sys.stderr)

    def __exit__(self, *exc):
        self.drop()
        Cleanup.actions = [a for a in Cleanup.actions if a[1] != self.drop]


def pg_columns(db, table):
    return psql(db, "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) "
                    f"FROM information_schema.columns WHERE table_name = '{table}'")


def create_table_with_loader(db_url, table, sample, name):
    """Lets the loader create `table` from the sample (the first 1,000 rows of the big file, so
    its inferred types are the big file's), for the ceiling and the loader alike."""
    src = newdir(f"{name}-sample")
    link(sample, os.path.join(src, "incoming", table, os.path.basename(sample)))
    r = loader_once(loader_env(f"file://{src}", db_url), rss=False)
    problem = r.problem(1, rows_of("sample.csv"))
    if problem:
        raise RuntimeError(f"creating {table} with the loader from {sample}: {problem}")


def pg_prepare(db, table, name):
    create_table_with_loader(pg_url(db), table, data("sample.csv"), name)
    pg_reset(db, table)
    return pg_columns(db, table)


def pg_copy_cmd(db, table, source):
    """psql's \\copy of a CSV with a header from a file, or from psql's standard input."""
    src = "pstdin" if source == "-" else "'" + source.replace("'", "''") + "'"
    return psql_cmd(db, "-c", f"\\copy {table} FROM {src} WITH (FORMAT csv, HEADER true)")


def mysql_cmd(db=None, *extra):
    cmd = ["mysql", "-h", MY["host"], "-P", MY["port"], "-u", MY["user"], "--batch", "--skip-column-names"]
    return cmd + list(extra) + ([db] if db else [])


def mysql(db, sql):
    return run(mysql_cmd(db, "-e", sql)).strip()


def mysql_reachable():
    try:
        mysql(None, "SELECT 1")
        return True
    except Exception:
        return False


def sqlite(path, *commands):
    return run(["sqlite3", path, *commands]).strip()


# ------------------------------------------------------------------------------------------
# moto, the S3-protocol server.

class Moto:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(CTX.work, "moto.log")
        self.log = open(self.log_path, "w")
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(exe):
            exe = shutil.which("moto_server") or exe
        self.proc = popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=self.log)
        if not wait_for_port(self.port, 60, self.proc):
            raise RuntimeError(f"moto_server did not start on port {self.port}: see {self.log_path}")
        import boto3
        import botocore.config
        self._boto3, self._cfg = boto3, botocore.config
        self.s3 = self.client()

    def client(self, pool=32):
        cfg = self._cfg.Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                               retries={"max_attempts": 3, "mode": "standard"})
        return self._boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                  aws_access_key_id="test", aws_secret_access_key="test", config=cfg)

    def loader_env(self):
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "LOADER_SOURCE__FORCE_PATH_STYLE": "true",
        }

    def bucket(self, name):
        self.s3.create_bucket(Bucket=name)
        Cleanup.actions.append((f"empty bucket {name}", lambda: self.drop_bucket(name)))
        return name

    def drop_bucket(self, name):
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            self.s3.delete_bucket(Bucket=name)
        except Exception:
            pass   # moto is stopped at the end anyway

    def upload(self, path, bucket, key):
        """One PutObject up to 64 MiB, multipart (64 MiB parts) above. Returns seconds."""
        from boto3.s3.transfer import TransferConfig
        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
        start = time.monotonic()
        self.s3.upload_file(path, bucket, key, Config=cfg)
        return time.monotonic() - start

    def put_many(self, bucket, items, threads=16):
        """items: (key, path). Returns seconds."""
        client = self.client(pool=threads)

        def put(item):
            key, path = item
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f.read())

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, items))
        return time.monotonic() - start

    def keys(self, bucket, prefix):
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def log_mark(self):
        self.log.flush()
        return os.path.getsize(self.log_path)

    REQUEST = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/1\.[01]')

    def requests_since(self, mark, bucket):
        """Requests to `bucket` logged since `mark`: {'LIST incoming/': n, 'GET': n, ...}."""
        time.sleep(0.3)   # the server logs a request after answering it
        with open(self.log_path, errors="replace") as f:
            f.seek(mark)
            text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())   # werkzeug colours non-200 lines
        counts = {}
        for method, path in self.REQUEST.findall(text):
            bare, _, query = path.partition("?")
            if bare.strip("/").split("/")[0] != bucket:
                continue
            if method == "GET" and bare.strip("/") == bucket and "list-type=2" in query:
                prefix = urllib.parse.unquote(re.search(r"prefix=([^&]*)", query).group(1)) \
                    if "prefix=" in query else ""
                what = f"LIST {prefix}"
            elif method == "PUT" and ("x-id=CopyObject" in query or "/processed/" in bare):
                # The SDK marks its copies; boto3 does not, but nothing else writes to processed/.
                what = "COPY"
            else:
                what = method
            counts[what] = counts.get(what, 0) + 1
        return counts

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def moto():
    if getattr(CTX, "moto", None) is None:
        CTX.moto = Moto()
        Cleanup.actions.append(("stop moto", CTX.moto.stop))
    return CTX.moto


def s3cat_main(argv):
    """`bench.py _s3cat ENDPOINT BUCKET KEY`: one streamed GetObject to standard output."""
    import boto3
    import botocore.config
    endpoint, bucket, key = argv
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test", config=botocore.config.Config(s3={"addressing_style": "path"}))
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    out = sys.stdout.buffer
    for chunk in body.iter_chunks(1 << 20):
        out.write(chunk)
    out.flush()


# ------------------------------------------------------------------------------------------
# Results.

def measurement(side, what, t=None, wall=None, rows=None, nbytes=None, files=None, status="ok", note=None,
                rss=None, **extra):
    """One line of the table. `t` (a Timed) supplies wall time and peak RSS."""
    if t is not None:
        wall = t.wall if wall is None else wall
        rss = t.rss_kb if rss is None else rss
    m = {"side": side, "what": what, "status": status, "wall_s": round(wall, 3) if wall is not None else None,
         "rows": rows, "bytes": nbytes, "files": files}
    ok = status == "ok" and wall
    m["rows_per_s"] = round(rows / wall) if ok and rows else None
    m["mb_per_s"] = round(nbytes / MB / wall, 1) if ok and nbytes else None
    m["files_per_s"] = round(files / wall, 1) if ok and files else None
    m["peak_rss_mb"] = round(rss / 1024, 1) if rss else None
    if note:
        m["note"] = note
    m.update(extra)
    return m


def checked(status_problem):
    return "ok" if not status_problem else f"error: {status_problem}"


def count_problem(got, want):
    return None if got == want else f"table has {got:,} rows, expected {want:,}"


def ratio(case):
    """loader throughput / ceiling throughput for the case's first loader and ceiling lines."""
    loader = next((m for m in case["measurements"] if m["side"] == "loader"), None)
    ceiling = next((m for m in case["measurements"] if m["side"] == "ceiling"), None)
    if not loader or not ceiling or loader["status"] != "ok" or ceiling["status"] != "ok":
        return None
    for key in ("rows_per_s", "files_per_s", "mb_per_s"):
        if loader.get(key) and ceiling.get(key):
            return round(loader[key] / ceiling[key], 3)
    if loader["wall_s"] and ceiling["wall_s"]:
        return round(ceiling["wall_s"] / loader["wall_s"], 3)
    return None


def make_case(name, title, compares, measurements, notes=(), **extra):
    case = {"case": name, "title": title, "compares": compares, "measurements": measurements,
            "notes": list(notes)}
    case["loader_over_ceiling"] = ratio(case)
    case.update(extra)
    return case


def not_measured(name, title, why):
    return make_case(name, title, "", [measurement("-", "not measured", status=f"not measured: {why}")])


# ------------------------------------------------------------------------------------------
# Cases: PostgreSQL, one big file.

def case_pg_local(which):
    file = f"{which}.csv"
    name = f"pg_local_{which}"
    path, rows, size = data(file), rows_of(file), size_of(file)
    warm(path)
    with PgDatabase(f"bench_{name}") as db:
        columns = pg_prepare(db, TABLE, name)
        c = timed(pg_copy_cmd(db, TABLE, path))
        ceiling = measurement("ceiling", "psql \\copy FROM file (one COPY)", c, rows=rows, nbytes=size,
                              status=checked(c.rc and c.tail() or count_problem(pg_count(db, TABLE), rows)))
        pg_reset(db, TABLE)
        src = newdir(name)
        link(path, os.path.join(src, "incoming", TABLE, file))
        r = loader_once(loader_env(f"file://{src}", pg_url(db)))
        loader = measurement("loader", "s3-sql-loader once, file://", r.t, rows=rows, nbytes=size,
                             status=checked(r.problem(1, rows) or count_problem(pg_count(db, TABLE), rows)))
    return make_case(name, f"PostgreSQL, one {size / MB:,.0f} MB CSV from a local folder",
                     "loader (file://) vs psql \\copy of the same file into an identical table",
                     [loader, ceiling], table_columns=columns)


def case_pg_s3(which):
    file = f"{which}.csv"
    name = f"pg_s3_{which}"
    path, rows, size = data(file), rows_of(file), size_of(file)
    m = moto()
    bucket = m.bucket(f"bench-{name.replace('_', '-')}")
    key = f"incoming/{TABLE}/{file}"
    upload_s = m.upload(path, bucket, key)
    notes = [f"setup: uploaded {size / MB:,.1f} MB to moto in {upload_s:.1f} s "
             f"({'multipart, 64 MiB parts' if size > 64 << 20 else 'one PutObject'})"]
    with PgDatabase(f"bench_{name}") as db:
        columns = pg_prepare(db, TABLE, name)
        cat = [sys.executable, os.path.abspath(__file__), "_s3cat", m.endpoint, bucket, key]
        pipeline = f"set -o pipefail; {shlex.join(cat)} | {shlex.join(pg_copy_cmd(db, TABLE, '-'))}"
        c = timed(["bash", "-c", pipeline])
        ceiling = measurement("ceiling", "boto3 GetObject stream | psql \\copy FROM STDIN", c, rows=rows,
                              nbytes=size,
                              status=checked(c.rc and c.tail() or count_problem(pg_count(db, TABLE), rows)))
        pg_reset(db, TABLE)
        # What moto spends moving the object (CopyObject + DeleteObject), which the loader's
        # wall time includes and the ceiling's does not.
        start = time.monotonic()
        m.s3.copy_object(Bucket=bucket, Key="scratch/copy", CopySource={"Bucket": bucket, "Key": key})
        m.s3.delete_object(Bucket=bucket, Key="scratch/copy")
        move_s = time.monotonic() - start
        mark = m.log_mark()
        r = loader_once(loader_env(f"s3://{bucket}", pg_url(db)))
        requests = m.requests_since(mark, bucket)
        problem = r.problem(1, rows) or count_problem(pg_count(db, TABLE), rows)
        if not problem and m.keys(bucket, "processed/") != [f"processed/{TABLE}/{file}"]:
            problem = "the object is not in processed/"
        loader = measurement("loader", "s3-sql-loader once, s3:// (moto)", r.t, rows=rows, nbytes=size,
                             status=checked(problem), s3_requests=requests)
        info = measurement("info", "moto CopyObject+DeleteObject of it (in loader's time)", wall=move_s)
    notes.append(f"loader's S3 requests: {fmt_requests(requests)}")
    m.drop_bucket(bucket)
    return make_case(name, f"PostgreSQL, one {size / MB:,.0f} MB CSV from S3 (moto)",
                     "loader (s3://) vs one streamed GetObject piped into psql \\copy",
                     [loader, ceiling, info], notes, table_columns=columns)


def case_pg_local_two():
    name = "pg_local_2big"
    path, rows, size = data("big.csv"), rows_of("big.csv"), size_of("big.csv")
    warm(path)
    with PgDatabase(f"bench_{name}") as db:
        pg_prepare(db, TABLE, name)
        start = time.monotonic()
        procs = [popen(pg_copy_cmd(db, TABLE, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate() for p in procs]
        wall = time.monotonic() - start
        bad = [err for p, (_, err) in zip(procs, outs) if p.returncode]
        ceiling = measurement("ceiling", "2 x psql \\copy FROM file, in parallel", wall=wall, rows=2 * rows,
                              nbytes=2 * size,
                              status=checked(bad and bad[0][-300:] or count_problem(pg_count(db, TABLE), 2 * rows)))
        pg_reset(db, TABLE)
        src = newdir(name)
        for part in ("a", "b"):
            link(path, os.path.join(src, "incoming", TABLE, f"big-{part}.csv"))
        r = loader_once(loader_env(f"file://{src}", pg_url(db), WORKERS__CONCURRENCY=2))
        loader = measurement("loader", "s3-sql-loader once, file://, concurrency 2", r.t, rows=2 * rows,
                             nbytes=2 * size,
                             status=checked(r.problem(2, 2 * rows) or count_problem(pg_count(db, TABLE), 2 * rows)))
    return make_case(name, f"PostgreSQL, two {size / MB:,.0f} MB CSVs at once from a local folder",
                     "loader with workers.concurrency=2 vs two psql \\copy in parallel", [loader, ceiling])


def case_pg_local_gz():
    name = "pg_local_gz"
    gz, rows, size = data("big.csv.gz"), rows_of("big.csv"), size_of("big.csv")
    warm(gz)
    with PgDatabase(f"bench_{name}") as db:
        pg_prepare(db, TABLE, name)
        pipeline = f"set -o pipefail; zcat {shlex.quote(gz)} | {shlex.join(pg_copy_cmd(db, TABLE, '-'))}"
        c = timed(["bash", "-c", pipeline])
        ceiling = measurement("ceiling", "zcat file.gz | psql \\copy FROM STDIN", c, rows=rows, nbytes=size,
                              status=checked(c.rc and c.tail() or count_problem(pg_count(db, TABLE), rows)))
        pg_reset(db, TABLE)
        src = newdir(name)
        link(gz, os.path.join(src, "incoming", TABLE, "big.csv.gz"))
        r = loader_once(loader_env(f"file://{src}", pg_url(db)))
        loader = measurement("loader", "s3-sql-loader once, file://, .csv.gz", r.t, rows=rows, nbytes=size,
                             status=checked(r.problem(1, rows) or count_problem(pg_count(db, TABLE), rows)))
    return make_case(name, f"PostgreSQL, the big CSV gzipped ({size_of('big.csv.gz') / MB:,.0f} MB) from a local folder",
                     "loader on .csv.gz vs zcat | psql \\copy", [loader, ceiling],
                     ["MB/s counts the uncompressed CSV bytes"])


def failure_reason(src):
    """The error of the first failed/*.error.json under a local source folder."""
    for root, _, names in os.walk(os.path.join(src, "failed")):
        for n in names:
            if n.endswith(".error.json"):
                with open(os.path.join(root, n)) as f:
                    return json.dumps(json.load(f).get("error"))[:300]
    return None


def case_pg_jsonl():
    name = "pg_jsonl"
    path, rows, size = data("big.jsonl"), rows_of("big.csv"), size_of("big.jsonl")
    warm(path)
    with PgDatabase(f"bench_{name}") as db:
        pg_prepare(db, TABLE, name)
        # The ceiling: COPY each line into a jsonb column (CSV format with quote and delimiter
        # bytes that never occur, so the JSON is taken verbatim), then one INSERT ... SELECT
        # through jsonb_populate_record into the typed table. One psql session.
        script = os.path.join(newdir(f"{name}-script"), "load.sql")
        with open(script, "w") as f:
            f.write("CREATE TEMP TABLE stage (doc jsonb);\n"
                    f"\\copy stage FROM '{path}' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')\n"
                    f"INSERT INTO {TABLE} SELECT r.* FROM stage, jsonb_populate_record(NULL::{TABLE}, doc) r;\n")
        c = timed(psql_cmd(db, "-f", script))
        ceiling = measurement("ceiling", "psql \\copy into jsonb + INSERT SELECT", c, rows=rows, nbytes=size,
                              status=checked(c.rc and c.tail() or count_problem(pg_count(db, TABLE), rows)))
        pg_reset(db, TABLE)
        # Does the loader read JSON lines? Try the 1,000-row sample first.
        src = newdir(f"{name}-probe")
        link(data("sample.jsonl"), os.path.join(src, "incoming", TABLE, "sample.jsonl"))
        probe = loader_once(loader_env(f"file://{src}", pg_url(db)), rss=False)
        supported = probe.problem(1, rows_of("sample.csv")) is None and pg_count(db, TABLE) == rows_of("sample.csv")
        if supported:
            pg_reset(db, TABLE)
            src = newdir(name)
            link(path, os.path.join(src, "incoming", TABLE, "big.jsonl"))
            r = loader_once(loader_env(f"file://{src}", pg_url(db)))
            loader = measurement("loader", "s3-sql-loader once, file://, .jsonl", r.t, rows=rows, nbytes=size,
                                 status=checked(r.problem(1, rows) or count_problem(pg_count(db, TABLE), rows)))
        else:
            why = failure_reason(src) or (probe.summary and str(probe.summary)) or probe.t.tail(200)
            loader = measurement("loader", "s3-sql-loader once, file://, .jsonl", status="not supported yet",
                                 note=f"the 1,000-row JSON-lines sample did not load: {why}")
    return make_case(name, f"PostgreSQL, the same rows as JSON lines ({size / MB:,.0f} MB)",
                     "loader on .jsonl (when supported) vs COPY into jsonb + INSERT SELECT jsonb_populate_record",
                     [loader, ceiling])


# ------------------------------------------------------------------------------------------
# SQLite and MariaDB, one big file.

def case_sqlite():
    name = "sqlite_local_big"
    path, rows, size = data("big.csv"), rows_of("big.csv"), size_of("big.csv")
    warm(path)
    work = newdir(name)
    template = os.path.join(work, "template.db")
    create_table_with_loader(f"sqlite://{template}", TABLE, data("sample.csv"), name)
    sqlite(template, f"DELETE FROM {TABLE}", "PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM")
    columns = sqlite(template, f"SELECT group_concat(name || ' ' || type, ', ') FROM pragma_table_info('{TABLE}')")
    ceiling_db, loader_db = os.path.join(work, "ceiling.db"), os.path.join(work, "loader.db")
    shutil.copyfile(template, ceiling_db)
    shutil.copyfile(template, loader_db)
    # The same journal and sync settings as the loader's connections (WAL, synchronous=NORMAL).
    c = timed(["sqlite3", ceiling_db, "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
               f'.import --csv --skip 1 "{path}" {TABLE}'])
    got = int(sqlite(ceiling_db, f"SELECT count(*) FROM {TABLE}"))
    ceiling = measurement("ceiling", "sqlite3 .import --csv (one transaction)", c, rows=rows, nbytes=size,
                          status=checked(c.rc and c.tail() or count_problem(got, rows)))
    src = os.path.join(work, "src")
    link(path, os.path.join(src, "incoming", TABLE, "big.csv"))
    r = loader_once(loader_env(f"file://{src}", f"sqlite://{loader_db}"))
    got = int(sqlite(loader_db, f"SELECT count(*) FROM {TABLE}"))
    loader = measurement("loader", "s3-sql-loader once, file://, sqlite://", r.t, rows=rows, nbytes=size,
                         status=checked(r.problem(1, rows) or count_problem(got, rows)))
    return make_case(name, f"SQLite, one {size / MB:,.0f} MB CSV from a local folder",
                     "loader (prepared multi-row INSERTs) vs sqlite3 .import into an identical table",
                     [loader, ceiling],
                     ["sqlite3 .import stores empty fields as '' (no NULLs) and booleans as text: "
                      "it does less than the loader, which is what a ceiling should"],
                     table_columns=columns)


MARIADB_TABLE = f"""CREATE TABLE {TABLE} (
  id BIGINT, customer_id BIGINT, name TEXT, comment TEXT, amount DOUBLE, score DOUBLE,
  is_active BOOLEAN, is_verified BOOLEAN, signup_date DATE, created_at DATETIME(6),
  updated_at DATETIME(6), note TEXT) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""


def mariadb_load_sql(path):
    # Empty fields become NULL through NULLIF (LOAD DATA would store '' or 0), the booleans
    # are compared as text; quoted fields with doubled quotes and newlines are read as CSV.
    quoted = "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return (f"LOAD DATA LOCAL INFILE {quoted} INTO TABLE {TABLE} CHARACTER SET utf8mb4 "
            "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
            "LINES TERMINATED BY '\\n' IGNORE 1 LINES "
            "(id, @customer_id, name, comment, amount, @score, @is_active, @is_verified, signup_date, "
            "created_at, @updated_at, @note) "
            "SET customer_id = NULLIF(@customer_id, ''), score = NULLIF(@score, ''), "
            "is_active = (@is_active = 'true'), is_verified = IF(@is_verified = '', NULL, @is_verified = 'true'), "
            "updated_at = NULLIF(@updated_at, ''), note = NULLIF(@note, '')")


def loader_mysql_support(db):
    """(supported, why): `s3-sql-loader check` against a mysql:// URL."""
    src = newdir("mariadb-check")
    env = loader_env(f"file://{src}", f"mysql://{MY['user']}@{MY['host']}:{MY['port']}/{db}")
    t = timed([CTX.loader, "check"], env=env)
    text = re.sub(r"\x1b\[[0-9;]*m", "", (t.out or "") + (t.err or ""))
    if t.rc == 0:
        return True, "check passed"
    if "not supported" in text.lower():
        lines = [l.strip() for l in text.splitlines() if "not supported" in l.lower()]
        return False, next((l for l in lines if l.startswith("error:")), lines[0])
    return False, f"check failed (exit {t.rc}): {text.strip()[-300:]}"


def case_mariadb():
    name = "mariadb_local_big"
    path, rows, size = data("big.csv"), rows_of("big.csv"), size_of("big.csv")
    if not mysql_reachable():
        return not_measured(name, "MariaDB", f"MariaDB not reachable at {MY['host']}:{MY['port']} as {MY['user']}")
    warm(path)
    db = "bench_mariadb"
    mysql(None, f"DROP DATABASE IF EXISTS {db}")
    mysql(None, f"CREATE DATABASE {db} CHARACTER SET utf8mb4")
    drop = lambda: run(mysql_cmd(None, "-e", f"DROP DATABASE IF EXISTS {db}"), check=False)
    Cleanup.actions.append((f"drop MariaDB database {db}", drop))
    try:
        supported, why = loader_mysql_support(db)
        url = f"mysql://{MY['user']}@{MY['host']}:{MY['port']}/{db}"
        if supported:
            create_table_with_loader(url, TABLE, data("sample.csv"), name)
            mysql(db, f"TRUNCATE TABLE {TABLE}")
        else:
            mysql(db, MARIADB_TABLE)
        c = timed(mysql_cmd(db, "--local-infile=1", "-e", mariadb_load_sql(path)))
        got = int(mysql(db, f"SELECT count(*) FROM {TABLE}"))
        sanity = mysql(db, f"SELECT sum(comment LIKE '%\"%'), sum(comment LIKE '%\\n%'), sum(note IS NULL), "
                           f"sum(is_verified IS NULL) FROM {TABLE}")
        ceiling = measurement("ceiling", "mysql LOAD DATA LOCAL INFILE", c, rows=rows, nbytes=size,
                              status=checked(c.rc and c.tail() or count_problem(got, rows)),
                              note=f"rows with a quote / a newline in comment, NULL note, NULL is_verified: "
                                   f"{sanity.split()}")
        if supported:
            mysql(db, f"TRUNCATE TABLE {TABLE}")
            src = newdir(name)
            link(path, os.path.join(src, "incoming", TABLE, "big.csv"))
            r = loader_once(loader_env(f"file://{src}", url))
            got = int(mysql(db, f"SELECT count(*) FROM {TABLE}"))
            loader = measurement("loader", "s3-sql-loader once, file://, mysql://", r.t, rows=rows, nbytes=size,
                                 status=checked(r.problem(1, rows) or count_problem(got, rows)))
        else:
            loader = measurement("loader", "s3-sql-loader once, file://, mysql://", status="not supported yet",
                                 note=why)
    finally:
        drop()
        Cleanup.actions = [a for a in Cleanup.actions if a[1] is not drop]
    return make_case(name, f"MariaDB, one {size / MB:,.0f} MB CSV from a local folder",
                     "loader (mysql://, when supported) vs LOAD DATA LOCAL INFILE", [loader, ceiling])


# ------------------------------------------------------------------------------------------
# Many small files.

def small_files():
    folder = data("small")
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]


def fmt_requests(counts):
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none logged"


def case_small_local():
    name = "small_files_local"
    files = small_files()
    n, rows, size = len(files), rows_of("small/"), size_of("small/")
    for f in files:
        warm(f)
    with PgDatabase(f"bench_{name}") as db:
        pg_prepare(db, SMALL_TABLE, name)
        script = os.path.join(newdir(f"{name}-script"), "copies.sql")
        with open(script, "w") as f:
            for path in files:
                f.write(f"\\copy {SMALL_TABLE} FROM '{path}' WITH (FORMAT csv, HEADER true)\n")
        c = timed(psql_cmd(db, "-f", script))
        ceiling = measurement("ceiling", f"one psql session, {n:,} \\copy", c, rows=rows, nbytes=size, files=n,
                              status=checked(c.rc and c.tail() or count_problem(pg_count(db, SMALL_TABLE), rows)))
        pg_reset(db, SMALL_TABLE)
        src = newdir(name)
        for path in files:
            link(path, os.path.join(src, "incoming", SMALL_TABLE, os.path.basename(path)))
        env = loader_env(f"file://{src}", pg_url(db), SCHEDULE__MAX_FILES_PER_TICK=n,
                         WORKERS__FILES_PER_SECOND=1_000_000, WORKERS__CONCURRENCY=CONCURRENCY)
        r = loader_once(env)
        loader = measurement("loader", f"s3-sql-loader once, file://, concurrency {CONCURRENCY}", r.t, rows=rows,
                             nbytes=size, files=n,
                             status=checked(r.problem(n, rows) or count_problem(pg_count(db, SMALL_TABLE), rows)))
        # The same without group commit: one transaction (and one commit) per file.
        pg_reset(db, SMALL_TABLE)
        src = newdir(f"{name}-per-file")
        for path in files:
            link(path, os.path.join(src, "incoming", SMALL_TABLE, os.path.basename(path)))
        env = loader_env(f"file://{src}", pg_url(db), SCHEDULE__MAX_FILES_PER_TICK=n,
                         WORKERS__FILES_PER_SECOND=1_000_000, WORKERS__CONCURRENCY=CONCURRENCY,
                         WORKERS__GROUP_FILES=1, DATABASE__LEDGER_TABLE="per_file_ledger")
        r = loader_once(env)
        per_file = measurement("loader", "the same, workers.group_files = 1 (a transaction per file)", r.t,
                               rows=rows, nbytes=size, files=n,
                               status=checked(r.problem(n, rows) or count_problem(pg_count(db, SMALL_TABLE), rows)))
    return make_case(name, f"PostgreSQL, {n:,} CSV files of {rows // n} rows from a local folder",
                     "loader (one tick, all files) vs one psql session running a \\copy per file",
                     [loader, ceiling, per_file], [defaults_note()])


def defaults_note():
    return ("run with max_files_per_tick = the file count and files_per_second unlimited; with the defaults "
            "(100 files per 15 s tick, 50 files/s) a daemon moves at most 100/15 = 6.7 files/s")


def bare_s3_moves(m, bucket, threads):
    """What the loader does in S3 for each file, with nothing else: list incoming/ (all pages),
    then GetObject (read it all), CopyObject to processed/, DeleteObject, `threads` at a time."""
    client = m.client(pool=threads)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="incoming/"):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def move(key):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        n = len(body.read())
        dest = "processed/" + key[len("incoming/"):]
        client.copy_object(Bucket=bucket, Key=dest, CopySource={"Bucket": bucket, "Key": key})
        client.delete_object(Bucket=bucket, Key=key)
        return n

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(move, keys))
    return len(keys), total


def case_small_s3():
    name = "small_files_s3"
    files = small_files()
    n, rows, size = len(files), rows_of("small/"), size_of("small/")
    m = moto()
    items = [(f"incoming/{SMALL_TABLE}/{os.path.basename(p)}", p) for p in files]
    b_ceiling, b_loader = m.bucket("bench-small-ceiling"), m.bucket("bench-small-loader")
    up = m.put_many(b_ceiling, items) + m.put_many(b_loader, items)
    notes = [f"setup: {2 * n:,} PutObject to moto in {up:.1f} s", defaults_note()]
    mark = m.log_mark()
    start = time.monotonic()
    moved, nbytes = bare_s3_moves(m, b_ceiling, CONCURRENCY)
    wall = time.monotonic() - start
    ceiling_requests = m.requests_since(mark, b_ceiling)
    problem = None if moved == n and nbytes == size else f"moved {moved} files / {nbytes} bytes"
    ceiling = measurement("ceiling", f"boto3 list+get+copy+delete, {CONCURRENCY} threads (no database)",
                          wall=wall, rows=rows, nbytes=size, files=n, status=checked(problem),
                          s3_requests=ceiling_requests)
    with PgDatabase(f"bench_{name}") as db:
        pg_prepare(db, SMALL_TABLE, name)
        env = loader_env(f"s3://{b_loader}", pg_url(db), SCHEDULE__MAX_FILES_PER_TICK=n,
                         WORKERS__FILES_PER_SECOND=1_000_000, WORKERS__CONCURRENCY=CONCURRENCY)
        mark = m.log_mark()
        r = loader_once(env)
        requests = m.requests_since(mark, b_loader)
        problem = r.problem(n, rows) or count_problem(pg_count(db, SMALL_TABLE), rows)
        if not problem and len(m.keys(b_loader, "processed/")) != n:
            problem = "not every file is in processed/"
        loader = measurement("loader", f"s3-sql-loader once, s3:// (moto), concurrency {CONCURRENCY}", r.t,
                             rows=rows, nbytes=size, files=n, status=checked(problem), s3_requests=requests)
    notes.append(f"loader's S3 requests: {fmt_requests(requests)}")
    notes.append(f"bare client's S3 requests: {fmt_requests(ceiling_requests)}")
    m.drop_bucket(b_ceiling)
    m.drop_bucket(b_loader)
    return make_case(name, f"PostgreSQL, {n:,} CSV files of {rows // n} rows from S3 (moto)",
                     "loader (S3 + database) vs a bare boto3 client doing the same S3 requests at the same "
                     "concurrency (S3 only)", [loader, ceiling], notes)


# ------------------------------------------------------------------------------------------
# Listing.

def tiny_keys():
    base = data(os.path.join("tiny", "incoming"))
    for root, _, names in os.walk(base):
        for n in names:
            path = os.path.join(root, n)
            yield "incoming/" + os.path.relpath(path, base), path


STATUS_BACKLOG = re.compile(r"backlog:\s+(\d+) file")


def case_listing_local():
    name = "listing_local"
    n = CTX.manifest["params"]["tiny_files"]
    root = data("tiny")
    env = loader_env(f"file://{root}", f"sqlite://{os.path.join(newdir(name), 'unused.db')}")
    t = timed([CTX.loader, "status"], env=env, rss=True)
    m = STATUS_BACKLOG.search(t.out or "")
    got = int(m.group(1)) if m else None
    loader = measurement("loader", "s3-sql-loader status, file://", t, files=n,
                         status=checked(t.rc and t.tail() or (got != n and f"backlog {got}, expected {n}")))
    start = time.monotonic()
    count = 0
    for r, _, names in os.walk(os.path.join(root, "incoming")):
        for x in names:
            os.stat(os.path.join(r, x))
            count += 1
    ceiling = measurement("ceiling", "Python os.walk + stat", wall=time.monotonic() - start, files=n,
                          status=checked(count != n and f"walked {count}"))
    return make_case(name, f"Listing {n:,} files in a local folder", "loader status vs a bare walk", [loader, ceiling])


def case_listing_s3():
    name = "listing_s3"
    n = CTX.manifest["params"]["tiny_files"]
    m = moto()
    bucket = m.bucket("bench-listing")
    up = m.put_many(bucket, list(tiny_keys()))
    env = loader_env(f"s3://{bucket}", f"sqlite://{os.path.join(newdir(name), 'unused.db')}")
    mark = m.log_mark()
    t = timed([CTX.loader, "status"], env=env, rss=True)
    requests = m.requests_since(mark, bucket)
    got = STATUS_BACKLOG.search(t.out or "")
    got = int(got.group(1)) if got else None
    lists = requests.get("LIST incoming/", 0)
    expected = math.ceil(n / 1000)
    problem = (t.rc and t.tail()) or (got != n and f"backlog {got}, expected {n}") or \
        (lists != expected and f"{lists} LIST calls on incoming/, expected ceil({n}/1000) = {expected}")
    loader = measurement("loader", "s3-sql-loader status, s3:// (moto)", t, files=n, status=checked(problem),
                         list_calls_incoming=lists, list_calls_expected=expected, s3_requests=requests)
    client = m.client()
    start = time.monotonic()
    pages = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="incoming/"):
        pages += 1
        count += len(page.get("Contents", []))
    ceiling = measurement("ceiling", "boto3 ListObjectsV2 paginator", wall=time.monotonic() - start, files=n,
                          status=checked(count != n and f"listed {count}"), list_calls=pages)
    m.drop_bucket(bucket)
    return make_case(name, f"Listing {n:,} keys under incoming/ in S3 (moto)",
                     "loader status (LIST calls counted in moto's log) vs a bare paginated listing",
                     [loader, ceiling],
                     [f"setup: {n:,} PutObject to moto in {up:.1f} s",
                      f"LIST calls on incoming/: {lists} (expected ceil(N/1000) = {expected}); "
                      f"all requests during status: {fmt_requests(requests)}"])


# ------------------------------------------------------------------------------------------
# Latency: the daemon, a file dropped in, the time until its rows are visible.

class PgPoller:
    """One psql session kept open, asked `SELECT count(*) ... WHERE id = X` every 50 ms."""

    def __init__(self, db):
        self.p = popen(psql_cmd(db)[:-2] + ["-v", "ON_ERROR_STOP=0"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def count(self, sql):
        """The query's single number, or None (an error: its lines are read up to the marker)."""
        self.p.stdin.write(sql.rstrip(";") + ";\n\\echo __end__\n")
        self.p.stdin.flush()
        value = None
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("the polling psql session ended")
            line = line.strip()
            if line == "__end__":
                return value
            if line.isdigit():
                value = int(line)

    def wait_for(self, sql, timeout, period=0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.count(sql) or 0) > 0:
                return time.monotonic()
            time.sleep(period)
        return None

    def close(self):
        self.p.stdin.close()
        stop_process(self.p)


def first_record():
    with open(data("sample.csv"), newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        return next(r), next(r)


def one_row_csv(row_id):
    header, row = first_record()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerow([str(row_id)] + row[1:])
    return buf.getvalue().encode("utf-8")


def get_json(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def daemon_child(proc):
    """The loader's pid when it runs under /usr/bin/time (signals go to it, not to time)."""
    if not TIME_BIN:
        return proc.pid
    for _ in range(100):
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.05)
    return proc.pid


def case_latency(source_kind, interval_s):
    name = f"latency_{source_kind}_{interval_s}s"
    samples_n = CTX.latency_samples
    rng = random.Random(f"{name}")
    with PgDatabase(f"bench_{name}") as db:
        if source_kind == "s3":
            m = moto()
            bucket = m.bucket(f"bench-latency-{interval_s}s")
            source = f"s3://{bucket}"

            def drop(key, body):
                m.s3.put_object(Bucket=bucket, Key=key, Body=body)
        else:
            src = newdir(name)
            source = f"file://{src}"

            def drop(key, body):
                # Written under a temporary name, then renamed: the documented producer pattern.
                path = os.path.join(src, key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "wb") as f:
                    f.write(body)
                os.replace(path + ".tmp", path)

        port = free_port()
        env = loader_env(source, pg_url(db), SCHEDULE__INTERVAL=f"{interval_s}s", HTTP__ENABLED="true",
                         HTTP__LISTEN=f"127.0.0.1:{port}")
        cmd = [CTX.loader, "run"]
        time_file = os.path.join(CTX.work, f"time-{name}.txt")
        if TIME_BIN:
            cmd = [TIME_BIN, "-v", "-o", time_file] + cmd
        log = open(os.path.join(CTX.work, f"{name}.log"), "w")
        proc = popen(cmd, env=env, stdout=log, stderr=log)
        poller = RssPoller(proc.pid) if not TIME_BIN else None
        pg = None
        try:
            if not wait_for_port(port, 60, proc):
                raise RuntimeError(f"the daemon did not serve HTTP on {port}: see {log.name}")
            pg = PgPoller(db)
            # Warm-up: the 1,000-row sample creates the table with the big file's types.
            with open(data("sample.csv"), "rb") as f:
                drop(f"incoming/{LATENCY_TABLE}/warmup.csv", f.read())
            if pg.wait_for(f"SELECT count(*) FROM pg_tables WHERE tablename = '{LATENCY_TABLE}'",
                           3 * interval_s + 60) is None:
                raise RuntimeError(f"the warm-up file did not load: see {log.name}")
            pg.wait_for(f"SELECT count(*) FROM {LATENCY_TABLE}", 30)
            samples = []
            for k in range(samples_n):
                time.sleep(rng.uniform(0, interval_s))   # a random phase against the ticks
                row_id = 9_000_000_000 + k
                drop(f"incoming/{LATENCY_TABLE}/sample-{k}.csv", one_row_csv(row_id))
                t0 = time.monotonic()
                t1 = pg.wait_for(f"SELECT count(*) FROM {LATENCY_TABLE} WHERE id = {row_id}", 3 * interval_s + 60)
                samples.append(round(t1 - t0, 3) if t1 else None)
            # Rows are visible at the commit; the move and the counters come just after it.
            deadline = time.monotonic() + 30
            while True:
                status = get_json(f"http://127.0.0.1:{port}/status")
                if status.get("totals", {}).get("files_loaded") == samples_n + 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            if pg:
                pg.close()
            if proc.poll() is None:
                os.kill(daemon_child(proc), signal.SIGTERM)
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    stop_process(proc)
            log.close()
        rss = rss_from_time_file(time_file) if TIME_BIN else poller.peak
        ok = [s for s in samples if s is not None]
        loaded = status.get("totals", {}).get("files_loaded")
        problem = (len(ok) != samples_n and f"{samples_n - len(ok)} sample(s) never became visible") or \
            (loaded != samples_n + 1 and f"/status totals.files_loaded = {loaded}, expected {samples_n + 1}")
        if source_kind == "s3":
            m.drop_bucket(bucket)
    summary = dict(n=len(ok), min_s=min(ok) if ok else None, median_s=statistics.median(ok) if ok else None,
                   mean_s=round(statistics.mean(ok), 3) if ok else None, max_s=max(ok) if ok else None)
    loader = measurement("loader", f"daemon run, interval {interval_s}s, {source_kind}: upload -> rows visible",
                         wall=summary["median_s"], rss=rss, status=checked(problem), samples_s=samples,
                         latency=summary)
    where = "a local folder (temp name + rename)" if source_kind == "local" else "moto (PutObject)"
    return make_case(name, f"Latency, {where}, schedule.interval = {interval_s}s",
                     "time from the upload's end to the row being visible in PostgreSQL (polled every 50 ms); "
                     "wall_s is the median", [loader],
                     [f"expected on average about interval/2 + one load = {interval_s / 2:.1f} s + load "
                      "(source.settle_time = 0s: the file appears complete, by rename or PutObject)"])


# ------------------------------------------------------------------------------------------
# sling (optional).

def case_sling():
    name = "sling_s3_big"
    if not CTX.sling:
        return not_measured(name, "sling, the big CSV from S3 into PostgreSQL", "pass --with-sling to bench/run")
    path, rows, size = data("big.csv"), rows_of("big.csv"), size_of("big.csv")
    m = moto()
    bucket = m.bucket("bench-sling")
    key = f"incoming/{TABLE}/big.csv"
    m.upload(path, bucket, key)
    home = newdir("sling-home")
    with PgDatabase(f"bench_{name}") as db:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "SLING_HOME_DIR": home,
            "SLING_DISABLE_TELEMETRY": "true",
            "DISABLE_TELEMETRY": "true",
            "SLING_LOADED_AT_COLUMN": "false",
            "BENCH_S3": json.dumps({"type": "s3", "bucket": bucket, "access_key_id": "test",
                                    "secret_access_key": "test", "endpoint": m.endpoint, "region": "us-east-1"}),
            "BENCH_PG": f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{db}?sslmode=disable",
        })
        cmd = [CTX.sling, "run", "--src-conn", "BENCH_S3", "--src-stream", f"s3://{bucket}/{key}",
               "--tgt-conn", "BENCH_PG", "--tgt-object", f"public.{TABLE}", "--mode", "full-refresh"]
        mark = m.log_mark()
        t = timed(cmd, env=env, rss=True)
        requests = m.requests_since(mark, bucket)
        got = columns = None
        try:
            got = pg_count(db, TABLE)
            columns = pg_columns(db, TABLE)
        except Exception:
            pass
        problem = (t.rc and f"exit {t.rc}: {t.tail(300)}") or count_problem(got, rows)
        sling = measurement("other", f"sling run (s3 -> postgres), {sling_version()}", t, rows=rows, nbytes=size,
                            status=checked(problem), command=shlex.join(cmd), s3_requests=requests,
                            table_columns=columns)
    m.drop_bucket(bucket)
    ref = next((c for c in CTX.cases if c["case"] == "pg_s3_big"), None)
    measurements = [sling]
    if ref:
        for mm in ref["measurements"]:
            if mm["side"] in ("loader", "ceiling"):
                measurements.append(dict(mm, what=mm["what"] + " (from pg_s3_big)"))
    notes = ["sling creates its own table (its own type inference) and loads through a temporary table "
             "(full-refresh mode)", f"sling's S3 requests: {fmt_requests(requests)}",
             f"sling's table: {columns}"]
    loader = next((x for x in measurements if x["side"] == "loader"), None)
    if loader and loader.get("rows_per_s") and sling.get("rows_per_s"):
        notes.append(f"loader throughput / sling throughput: {loader['rows_per_s'] / sling['rows_per_s']:.2f}")
    return make_case(name, f"sling, the same {size / MB:,.0f} MB CSV from S3 (moto) into PostgreSQL",
                     "sling's wall time on the file of pg_s3_big, next to that case's loader and ceiling "
                     "(run pg_s3_big in the same run to see them)", measurements, notes)


def sling_version():
    try:
        return run([CTX.sling, "--version"], check=False).strip().splitlines()[0]
    except Exception:
        return "sling"


# ------------------------------------------------------------------------------------------
# The run.

CASES = [
    # (name, needs, function)
    ("pg_local_big", {"pg"}, lambda: case_pg_local("big")),
    ("pg_local_mid", {"pg"}, lambda: case_pg_local("mid")),
    ("pg_s3_big", {"pg", "s3"}, lambda: case_pg_s3("big")),
    ("pg_s3_mid", {"pg", "s3"}, lambda: case_pg_s3("mid")),
    ("pg_local_2big", {"pg"}, case_pg_local_two),
    ("pg_local_gz", {"pg"}, case_pg_local_gz),
    ("pg_jsonl", {"pg"}, case_pg_jsonl),
    ("sqlite_local_big", set(), case_sqlite),
    ("mariadb_local_big", set(), case_mariadb),
    ("small_files_local", {"pg"}, case_small_local),
    ("small_files_s3", {"pg", "s3"}, case_small_s3),
    ("listing_local", set(), case_listing_local),
    ("listing_s3", {"s3"}, case_listing_s3),
    ("latency_local_15s", {"pg"}, lambda: case_latency("local", 15)),
    ("latency_s3_15s", {"pg", "s3"}, lambda: case_latency("s3", 15)),
    ("latency_local_1s", {"pg"}, lambda: case_latency("local", 1)),
    ("latency_s3_1s", {"pg", "s3"}, lambda: case_latency("s3", 1)),
    ("sling_s3_big", {"pg", "s3"}, case_sling),
]


def version_of(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except Exception as e:
        return f"unavailable ({e.__class__.__name__})"


def machine_info():
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    try:
        import moto as moto_pkg
        moto_version = moto_pkg.__version__
    except Exception:
        moto_version = "unavailable"
    info = {
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "os": version_of(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "versions": {
            "loader": version_of([CTX.loader, "--version"]),
            "loader_binary": CTX.loader,
            "loader_build": "debug" if "/debug/" in CTX.loader else "release" if "/release/" in CTX.loader else "?",
            "psql": version_of(["psql", "--version"]),
            "sqlite3": version_of(["sqlite3", "--version"]),
            "mysql": version_of(["mysql", "--version"]),
            "moto": moto_version,
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
    }
    if CTX.pg_ok:
        info["versions"]["postgresql_server"] = psql("postgres", "SHOW server_version")
    if mysql_reachable():
        info["versions"]["mariadb_server"] = mysql(None, "SELECT version()")
    if CTX.sling:
        info["versions"]["sling"] = sling_version()
    return info


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def print_table(result):
    cols = [("case", 19), ("side", 7), ("what", 56), ("wall s", 8), ("rows/s", 10), ("MB/s", 7),
            ("files/s", 8), ("RSS MB", 7), ("ldr/ceil", 8), ("status", 0)]
    lines = []
    header = " ".join(f"{n:<{w}}" if i < 3 else f"{n:>{w}}" for i, (n, w) in enumerate(cols[:-1])) + "  status"
    lines += [header, "-" * len(header)]
    for case in result["cases"]:
        first = True
        for m in case["measurements"]:
            r = case["loader_over_ceiling"] if m["side"] == "loader" else None
            status = m["status"]
            if m.get("latency") and m["latency"]["n"]:
                lat = m["latency"]
                status = f"{status}; latency min {lat['min_s']:.2f} / median {lat['median_s']:.2f} / max {lat['max_s']:.2f} s"
            if m.get("note") and not status.startswith("ok"):
                status += f" ({m['note']})"
            what = m["what"] if len(m["what"]) <= 56 else m["what"][:55] + "…"
            lines.append(" ".join([
                f"{case['case'] if first else '':<19}", f"{m['side']:<7}", f"{what:<56}",
                f"{fmt(m['wall_s'], ',.2f'):>8}", f"{fmt(m['rows_per_s']):>10}", f"{fmt(m['mb_per_s'], ',.1f'):>7}",
                f"{fmt(m['files_per_s'], ',.1f'):>8}", f"{fmt(m['peak_rss_mb'], ',.1f'):>7}",
                f"{fmt(r, '.2f'):>8}"]) + "  " + status)
            first = False
    print("\n".join(lines))
    notes = [(c["case"], n) for c in result["cases"] for n in c.get("notes", [])]
    if notes:
        print("\nnotes:")
        for case, n in notes:
            print(f"  {case}: {n}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_s3cat":
        return s3cat_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["small", "full"], default="full")
    ap.add_argument("--data", default=os.path.join(CACHE, "bench-data"))
    ap.add_argument("--loader", default=os.environ.get("LOADER_BIN",
                                                       os.path.join(CACHE, "target", "release", "s3-sql-loader")))
    ap.add_argument("--only", help="comma-separated case names or globs (e.g. 'pg_*,listing_s3')")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--sling-bin", help="the sling binary (bench/run --with-sling installs one)")
    ap.add_argument("--latency-samples", type=int, help="samples per latency case (default 5, small scale 3)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (hard links, logs)")
    args = ap.parse_args()
    if args.list:
        for name, needs, _ in CASES:
            print(f"{name:<20} needs: {', '.join(sorted(needs)) or '-'}")
        return 0
    selected = [c for c in CASES if not args.only or
                any(fnmatch.fnmatch(c[0], p.strip()) for p in args.only.split(","))]
    if not selected:
        raise SystemExit(f"no case matches --only {args.only!r} (see --list)")
    if not os.access(args.loader, os.X_OK):
        raise SystemExit(f"no loader binary at {args.loader}: run `cargo build --release` first "
                         "(or bench/run --build), or set LOADER_BIN")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    CTX.loader = os.path.abspath(args.loader)
    CTX.data = os.path.join(args.data, args.scale)
    with open(os.path.join(CTX.data, "manifest.json")) as f:
        CTX.manifest = json.load(f)
    CTX.sling = args.sling_bin
    CTX.latency_samples = args.latency_samples or (3 if args.scale == "small" else 5)
    CTX.moto = None
    CTX.cases = []
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    CTX.work = os.path.join(CACHE, "bench-work", f"{stamp}-{os.getpid()}")
    os.makedirs(CTX.work)
    CTX.pg_ok = pg_reachable()
    started = time.monotonic()
    print(f"bench: scale {args.scale}, loader {CTX.loader}, {len(selected)} case(s), work folder {CTX.work}")
    if "/debug/" in CTX.loader:
        print("bench: NOTE this is a debug build of the loader: its numbers are not representative")
    interrupted = False
    try:
        info = machine_info()
        for name, needs, fn in selected:
            print(f"[{name}] ...", flush=True)
            t0 = time.monotonic()
            try:
                if "pg" in needs and not CTX.pg_ok:
                    case = not_measured(name, name, f"PostgreSQL not reachable at {PG['host']}:{PG['port']}")
                else:
                    case = fn()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                traceback.print_exc()
                case = make_case(name, name, "", [measurement("-", "case failed",
                                                              status=f"error: {e.__class__.__name__}: {e}"[:500])])
            case["case_seconds"] = round(time.monotonic() - t0, 1)
            CTX.cases.append(case)
            for m in case["measurements"]:
                print(f"[{name}] {m['side']}: {m['what']}: {fmt(m['wall_s'], ',.2f')} s, {m['status']}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; cleaning up", file=sys.stderr)
    finally:
        for p in Cleanup.procs:
            stop_process(p, grace=3)
        for desc, action in reversed(Cleanup.actions):
            try:
                action()
            except Exception as e:
                print(f"  cleanup ({desc}) failed: {e}", file=sys.stderr)
        if not args.keep_work:
            shutil.rmtree(CTX.work, ignore_errors=True)
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scale": args.scale,
        "interrupted": interrupted,
        "total_seconds": round(time.monotonic() - started, 1),
        "machine": info if "info" in locals() else None,
        "data": {"folder": CTX.data, "params": CTX.manifest["params"], "sizes": CTX.manifest["sizes"],
                 "rows": CTX.manifest["rows"]},
        "loader_over_ceiling_means": "the loader's throughput divided by the ceiling's (1.00 = as fast)",
        "cases": CTX.cases,
    }
    print()
    m = result["machine"] or {}
    print(f"s3-sql-loader benchmark, scale {args.scale}: {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
          f"kernel {m.get('kernel')}, loader {m.get('versions', {}).get('loader')} "
          f"({m.get('versions', {}).get('loader_build')} build), total {result['total_seconds']} s")
    print("ldr/ceil = loader throughput / ceiling throughput (1.00 = as fast as the ceiling); "
          "RSS = peak resident memory of the loader process\n")
    print_table(result)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"{stamp}-{args.scale}.json")
    # An interrupted run is kept under its timestamp but does not replace latest.json.
    for p in [path] + ([] if interrupted else [os.path.join(args.results, "latest.json")]):
        with open(p, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\nresults: {path}" + ("" if interrupted else f" (and {os.path.join(args.results, 'latest.json')})"))
    failed = [c["case"] for c in CTX.cases for mm in c["measurements"] if mm["status"].startswith("error")]
    if failed:
        print(f"bench: errors in {', '.join(sorted(set(failed)))}", file=sys.stderr)
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
