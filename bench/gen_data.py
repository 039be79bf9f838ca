#!/usr/bin/env python3
"""Deterministic benchmark data for bench/run (Python 3 standard library only).

    python3 bench/gen_data.py --scale full|small [--out DIR]

Writes into DIR/<scale>/ (default DIR: $HOME/.cache/s3-sql-loader/bench-data):

    big.csv        the large CSV: 12 mixed-type columns, ~1 GB / 2.15 M rows at full scale
    big.csv.gz     the same bytes, gzipped (gzip -n -6, or Python's gzip when gzip is missing)
    big.jsonl      the same rows as JSON lines
    mid.csv        the first ~10 % of big.csv's rows (~100 MB at full scale): memory vs size
    sample.csv     the first 1,000 rows of big.csv: the loader creates tables from it (it infers
                   types from a file's first 1,000 rows, so the types match big.csv's)
    sample.jsonl   the same 1,000 rows as JSON lines
    small/         2,000 CSV files of 200 rows (part-00001.csv ...)
    tiny/incoming/tiny/NNN/fNNNNNN.csv   100,000 two-line files for the listing test
    manifest.json  what was generated, with sizes and row counts; written last

Everything comes from one seeded generator, so two runs produce the same bytes. When
manifest.json exists, matches the wanted parameters and every file has its recorded size,
nothing is regenerated. `--scale small` is about 50 times smaller everywhere.

The CSV is RFC 4180 with a header: fields with commas, double quotes or newlines are quoted
(quotes doubled); a NULL is an empty unquoted field, and no text value is ever empty, so the
loader (empty field = NULL) and PostgreSQL's CSV COPY read the same values.
"""

import argparse
import csv
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time

# Bump when the bytes generated change: a manifest of another version is regenerated.
GENERATOR_VERSION = 2
SEED = 20261126

SCALES = {
    "full": dict(big_rows=2_150_000, mid_rows=215_000, sample_rows=1_000,
                 small_files=2_000, small_rows=200, tiny_files=100_000),
    "small": dict(big_rows=43_000, mid_rows=4_300, sample_rows=1_000,
                  small_files=40, small_rows=200, tiny_files=2_000),
}

# (name, type the loader infers for it, share of NULLs)
COLUMNS = [
    ("id", "bigint", 0.0),
    ("customer_id", "bigint", 0.05),
    ("name", "text", 0.0),
    ("comment", "text", 0.0),
    ("amount", "double precision", 0.0),
    ("score", "double precision", 0.10),
    ("is_active", "boolean", 0.0),
    ("is_verified", "boolean", 0.10),
    ("signup_date", "date", 0.0),
    ("created_at", "timestamp", 0.0),
    ("updated_at", "timestamp", 0.15),
    ("note", "text", 0.20),
]
HEADER = [c[0] for c in COLUMNS]


class RowGenerator:
    """Rows as (csv_fields, json_object); every value comes from one seeded `random.Random`."""

    def __init__(self, seed, first_id=1):
        self.rng = random.Random(seed)
        rng = self.rng
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
        words = set()
        while len(words) < 400:
            words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
        self.words = sorted(words) + ["café", "naïve", "Zürich", "São", "東京", "ünïcödé"]
        self.next_id = first_id
        # 10 years of dates and every second of a day, precomputed as strings (fast to pick).
        import datetime
        base = datetime.date(2016, 1, 1)
        self.dates = [(base + datetime.timedelta(days=d)).isoformat() for d in range(3653)]

    def _words(self, k):
        return " ".join(self.rng.choices(self.words, k=k))

    def _comment(self):
        rng = self.rng
        parts = [self._words(rng.randint(10, 20))]
        r = rng.random()
        if r < 0.30:
            parts.append(", " + self._words(rng.randint(2, 6)))
        if rng.random() < 0.12:
            parts.append(' and said "' + self._words(rng.randint(1, 3)) + '", twice')
        if rng.random() < 0.06:
            parts.append("\n" + self._words(rng.randint(3, 8)))
        if rng.random() < 0.02:
            parts.append("\r\nlast line, with \"quotes\"")
        parts.append(". " + self._words(rng.randint(8, 16)))
        return "".join(parts)

    def _timestamp(self, micro):
        rng = self.rng
        s = rng.randrange(86_400)
        t = "%s %02d:%02d:%02d" % (rng.choice(self.dates), s // 3600, s // 60 % 60, s % 60)
        if micro:
            t += ".%06d" % rng.randrange(1_000_000)
        return t

    def row(self):
        rng = self.rng
        rid = self.next_id
        self.next_id += 1
        rnd = rng.random
        customer_id = None if rnd() < 0.05 else rng.randrange(1, 5_000_000)
        name = self._words(2).title()
        comment = self._comment()
        cents = rng.randrange(-100_000, 10_000_000)
        score = None if rnd() < 0.10 else round(rnd() * 100, 3)
        is_active = rnd() < 0.7
        is_verified = None if rnd() < 0.10 else rnd() < 0.5
        signup_date = rng.choice(self.dates)
        created_at = self._timestamp(False)
        updated_at = None if rnd() < 0.15 else self._timestamp(True)
        note = None if rnd() < 0.20 else self._words(rng.randint(22, 45))
        amount = "%s%d.%02d" % ("-" if cents < 0 else "", abs(cents) // 100, abs(cents) % 100)
        fields = [
            rid,
            customer_id,
            name,
            comment,
            amount,
            None if score is None else "%.3f" % score,
            "true" if is_active else "false",
            None if is_verified is None else ("true" if is_verified else "false"),
            signup_date,
            created_at,
            updated_at,
            note,
        ]
        obj = {
            "id": rid,
            "customer_id": customer_id,
            "name": name,
            "comment": comment,
            "amount": cents / 100,
            "score": score,
            "is_active": is_active,
            "is_verified": is_verified,
            "signup_date": signup_date,
            "created_at": created_at,
            "updated_at": updated_at,
            "note": note,
        }
        return fields, obj


def csv_writer(f):
    return csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def json_line(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


class GzipSink:
    """`gzip -n -6` in a subprocess (compresses on another core, deterministic bytes), or
    Python's gzip with mtime=0 when the gzip program is missing."""

    def __init__(self, path):
        self.path = path
        self.out = open(path, "wb")
        exe = shutil.which("gzip")
        if exe:
            self.proc = subprocess.Popen([exe, "-n", "-6", "-c"], stdin=subprocess.PIPE, stdout=self.out)
            self.write = self.proc.stdin.write
        else:
            self.proc = None
            self.gz = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=self.out, mtime=0)
            self.write = self.gz.write

    def close(self):
        if self.proc:
            self.proc.stdin.close()
            if self.proc.wait() != 0:
                raise SystemExit("gzip failed")
        else:
            self.gz.close()
        self.out.close()


def generate_big(dest, p):
    """big.csv, big.csv.gz, big.jsonl, mid.csv, sample.csv, sample.jsonl in one pass."""
    gen = RowGenerator(SEED)
    tmp = {n: os.path.join(dest, n + ".tmp") for n in
           ["big.csv", "big.csv.gz", "big.jsonl", "mid.csv", "sample.csv", "sample.jsonl"]}
    big = open(tmp["big.csv"], "w", encoding="utf-8", newline="")
    jsonl = open(tmp["big.jsonl"], "w", encoding="utf-8", newline="")
    mid = open(tmp["mid.csv"], "w", encoding="utf-8", newline="")
    sample = open(tmp["sample.csv"], "w", encoding="utf-8", newline="")
    sample_json = open(tmp["sample.jsonl"], "w", encoding="utf-8", newline="")
    gz = GzipSink(tmp["big.csv.gz"])
    buf = io.StringIO()
    w = csv_writer(buf)
    w.writerow(HEADER)
    head = buf.getvalue()
    for f in (big, mid, sample):
        f.write(head)
    gz.write(head.encode("utf-8"))
    chunk = 5_000
    started = time.monotonic()
    done = 0
    while done < p["big_rows"]:
        n = min(chunk, p["big_rows"] - done)
        buf = io.StringIO()
        w = csv_writer(buf)
        jbuf = []
        # mid.csv and sample.csv are prefixes of big.csv: write their share row by row.
        for i in range(n):
            fields, obj = gen.row()
            idx = done + i
            if idx < p["mid_rows"] or idx < p["sample_rows"]:
                one = io.StringIO()
                csv_writer(one).writerow(fields)
                line = one.getvalue()
                buf.write(line)
                if idx < p["mid_rows"]:
                    mid.write(line)
                if idx < p["sample_rows"]:
                    sample.write(line)
                    sample_json.write(json_line(obj))
            else:
                w.writerow(fields)
            jbuf.append(json_line(obj))
        text = buf.getvalue()
        big.write(text)
        gz.write(text.encode("utf-8"))
        jsonl.write("".join(jbuf))
        done += n
        if done % 200_000 < chunk or done == p["big_rows"]:
            rate = done / max(time.monotonic() - started, 1e-9)
            print(f"  big: {done:,}/{p['big_rows']:,} rows ({rate:,.0f} rows/s)", flush=True)
    for f in (big, jsonl, mid, sample, sample_json):
        f.close()
    gz.close()
    for name, path in tmp.items():
        os.replace(path, os.path.join(dest, name))


def generate_small(dest, p):
    folder = os.path.join(dest, "small")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    gen = RowGenerator(SEED + 1)
    for k in range(1, p["small_files"] + 1):
        with open(os.path.join(folder, "part-%05d.csv" % k), "w", encoding="utf-8", newline="") as f:
            w = csv_writer(f)
            w.writerow(HEADER)
            for _ in range(p["small_rows"]):
                w.writerow(gen.row()[0])


def generate_tiny(dest, p):
    root = os.path.join(dest, "tiny")
    shutil.rmtree(root, ignore_errors=True)
    base = os.path.join(root, "incoming", "tiny")
    rng = random.Random(SEED + 2)
    for k in range(p["tiny_files"]):
        folder = os.path.join(base, "%03d" % (k // 1000))
        if k % 1000 == 0:
            os.makedirs(folder)
        with open(os.path.join(folder, "f%06d.csv" % k), "w") as f:
            f.write("id,value\n%d,%08x\n" % (k, rng.getrandbits(32)))


def file_sizes(dest):
    sizes = {}
    for name in ["big.csv", "big.csv.gz", "big.jsonl", "mid.csv", "sample.csv", "sample.jsonl"]:
        sizes[name] = os.path.getsize(os.path.join(dest, name))
    small = os.path.join(dest, "small")
    sizes["small/"] = sum(os.path.getsize(os.path.join(small, n)) for n in os.listdir(small))
    return sizes


def wanted_params(scale):
    return dict(SCALES[scale], scale=scale, seed=SEED, generator_version=GENERATOR_VERSION)


def manifest_ok(dest, params):
    path = os.path.join(dest, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if m.get("params") != params:
        return None
    try:
        if file_sizes(dest) != m.get("sizes"):
            return None
        tiny = os.path.join(dest, "tiny", "incoming", "tiny")
        count = sum(len(os.listdir(os.path.join(tiny, d))) for d in os.listdir(tiny))
        if count != params["tiny_files"]:
            return None
    except OSError:
        return None
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "s3-sql-loader", "bench-data"))
    ap.add_argument("--force", action="store_true", help="regenerate even when the manifest matches")
    args = ap.parse_args()
    dest = os.path.join(args.out, args.scale)
    params = wanted_params(args.scale)
    if not args.force and manifest_ok(dest, params):
        print(f"bench data: reusing {dest} (manifest matches)")
        return
    print(f"bench data: generating {args.scale} scale into {dest}", flush=True)
    os.makedirs(dest, exist_ok=True)
    try:
        os.remove(os.path.join(dest, "manifest.json"))
    except FileNotFoundError:
        pass
    started = time.monotonic()
    generate_big(dest, params)
    print("  small files ...", flush=True)
    generate_small(dest, params)
    print("  tiny files ...", flush=True)
    generate_tiny(dest, params)
    manifest = {
        "params": params,
        "columns": [{"name": n, "type": t, "null_share": s} for n, t, s in COLUMNS],
        "rows": {
            "big.csv": params["big_rows"],
            "mid.csv": params["mid_rows"],
            "sample.csv": params["sample_rows"],
            "small/": params["small_files"] * params["small_rows"],
        },
        "sizes": file_sizes(dest),
        "generated_in_s": round(time.monotonic() - started, 1),
    }
    tmp = os.path.join(dest, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(dest, "manifest.json"))
    print(f"bench data: done in {manifest['generated_in_s']} s: "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in manifest["sizes"].items()))


if __name__ == "__main__":
    sys.exit(main())
