"""The container's entrypoint, run as the image and the manifests run it.

What this proves about the container, without a Docker engine (there is none on the
machines this project runs on, so the image cannot be built or started here):

- the image's ENTRYPOINT + CMD (`run`, which is also the Deployment's `args` and the ECS
  `command`) starts the daemon as the image's USER (uid/gid 10001, no supplementary groups,
  and, as the pod's securityContext asks, no new privileges and no capabilities), with the
  image's ENV only (LOADER_CONFIG -> the config file the Dockerfile COPYs), in the image's
  WORKDIR, with everything of the image read-only: it answers the probes' paths, loads a
  file dropped in the volume, reports it in /status and /metrics, passes the Dockerfile's
  HEALTHCHECK command (which is also the ECS healthCheck), and exits 0 on SIGTERM within
  terminationGracePeriodSeconds / stopTimeout; the HEALTHCHECK fails once it is gone;
- the CronJob's `args` (`once`) loads a further file in one run and exits 0;
- `check` with the image's config exits 0.

Everything about the invocation is read from the Dockerfile, the rendered k8s/base and
k8s/cronjob and deploy/aws/ecs-task-definition.json, so these tests fail when those drift
apart or from what the binary does.

How the container is simulated: an "image root" temp folder holds the binary (copied from
LOADER_BIN, default $CARGO_TARGET_DIR or ~/.cache/s3-sql-loader/target, debug build) and the
COPYed config at the paths the Dockerfile gives them; every folder of it is root-owned and
without write bits, like a read-only root filesystem (readOnlyRootFilesystem /
readonlyRootFilesystem in the manifests). The processes run as the image's USER through
setpriv, so the permissions are enforced; the host's /tmp stands in for the /tmp emptyDir.

Two layouts, because the config names absolute paths (file:///data, sqlite:///data/loader.db):

- `pod` (the Deployment and CronJob tests): the volume is a temp folder owned by 10001; of the
  config, exactly the two keys that name /data are overridden with the same paths rebased on
  that folder (LOADER_SOURCE__URL, and LOADER_DATABASE__URL, which the manifests take from the
  Secret anyway). The working directory is the image's WORKDIR inside the read-only image
  root, so nothing may be written relative to it.
- `docker run -v loader-data:/data` (test_docker_run_with_the_config_s_own_paths): a real
  /data on this machine, created for the test and removed afterwards (the test is skipped,
  saying so, when /data already exists or cannot be created); no override but the port.

In both, http.listen (0.0.0.0:8080) becomes a free port on 127.0.0.1 via LOADER_HTTP__LISTEN,
for the daemon and for its HEALTHCHECK alike (a Docker/ECS health check inherits the
container's environment), after checking that 8080 is the port every file agrees on.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import kustomize_lite  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The PATH of debian:bookworm-slim (docker image inspect): the image sets no other.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A `once` that hangs would run into the CronJob's activeDeadlineSeconds (30 min): cap it.
ONCE_TIMEOUT_S = 120
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
# The one Secret the manifests read (the database URL); the tests supply a SQLite URL.
DB_SECRET = ("s3-sql-loader-database", "url")
# Marks a /data made by this test, with the pid of the pytest that made it.
MARKER = ".s3-sql-loader-test-entrypoint"


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:ms|s|m|h))+)", text.replace(" ", ""))
    assert parts, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


# ----------------------------------------------------------------------------- the sources

def binary_path() -> Path:
    if os.environ.get("LOADER_BIN"):
        path = Path(os.environ["LOADER_BIN"])
    else:
        target = os.environ.get("CARGO_TARGET_DIR") or str(
            Path.home() / ".cache/s3-sql-loader/target")
        path = Path(target) / "debug/s3-sql-loader"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"the loader binary {path} does not exist: build it first (scripts/test "
                    "does; or `cargo build`), or point LOADER_BIN at it")
    return path


@dataclass
class Dockerfile:
    """The runtime (last) stage, as the image it produces."""
    entrypoint: list[str]
    cmd: list[str]
    uid: int
    gid: int
    workdir: str
    env: dict[str, str]
    volumes: list[str]
    copies: dict[str, str]                 # build-context source -> image path
    healthcheck: list[str]
    healthcheck_timeout_s: float
    home: str                              # the USER's home, from its useradd
    runs: list[str] = field(default_factory=list)


def parse_dockerfile() -> Dockerfile:
    stages: list[list[tuple[str, str]]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        inst, _, rest = (buf + line).partition(" ")
        buf = ""
        if inst.upper() == "FROM":
            stages.append([])
        stages[-1].append((inst.upper(), rest.strip()))
    by: dict[str, list[str]] = {}
    for inst, rest in stages[-1]:
        by.setdefault(inst, []).append(rest)

    def exec_form(text: str, what: str) -> list[str]:
        assert text.startswith("["), f"{what} must be in exec (JSON) form: {text}"
        return json.loads(text)

    env: dict[str, str] = {}
    for rest in by.get("ENV", []):
        words = shlex.split(rest)
        if "=" not in words[0]:                # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(w.split("=", 1) for w in words)
    user = by["USER"][-1]
    assert re.fullmatch(r"\d+:\d+", user), f"USER must be numeric uid:gid, got {user}"
    uid, gid = map(int, user.split(":"))
    copies = {}
    for rest in by["COPY"]:
        words = rest.split()
        if not any(w.startswith("--from") for w in words):
            (src, dst) = [w for w in words if not w.startswith("--")]
            copies[src] = dst
    hc = by["HEALTHCHECK"][-1]
    opts, _, cmd = hc.partition("CMD")
    timeout = re.search(r"--timeout=(\S+)", opts)
    volume = by["VOLUME"][-1]
    useradd = [r[r.index("useradd"):] for r in by.get("RUN", [])
               if "useradd" in r and f"--uid {uid} " in r]
    home = re.search(r"--home-dir (\S+)", useradd[0]) if useradd else None
    assert home, f"no `useradd --uid {uid} --home-dir ...` in the runtime stage"
    return Dockerfile(
        entrypoint=exec_form(by["ENTRYPOINT"][-1], "ENTRYPOINT"),
        cmd=exec_form(by["CMD"][-1], "CMD"),
        uid=uid, gid=gid,
        workdir=by["WORKDIR"][-1],
        env=env,
        volumes=json.loads(volume) if volume.startswith("[") else volume.split(),
        copies=copies,
        healthcheck=exec_form(cmd.strip(), "HEALTHCHECK CMD"),
        healthcheck_timeout_s=duration_s(timeout.group(1)) if timeout else 30.0,
        home=home.group(1),
        runs=by.get("RUN", []),
    )


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl and subprocess.run([kubectl, "kustomize", "--help"],
                                  capture_output=True).returncode == 0:
        res = subprocess.run([kubectl, "kustomize", str(ROOT / path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return [d for d in yaml.safe_load_all(res.stdout) if d]
    return kustomize_lite.build(ROOT / path)


@dataclass
class Pod:
    """The one container of a rendered Deployment or CronJob."""
    kind: str
    doc: dict
    spec: dict
    container: dict

    @property
    def args(self) -> list[str]:
        assert "command" not in self.container, \
            f"{self.kind} overrides the ENTRYPOINT: this test expects args only"
        return self.container["args"]

    @property
    def grace_s(self) -> int:
        return self.spec["terminationGracePeriodSeconds"]

    def env(self, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
        out = {}
        for e in self.container.get("env", []):
            if "value" in e:
                out[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                key = (ref["name"], ref["key"])
                assert key in secrets, f"{self.kind}: env {e['name']} from Secret {key}: " \
                    "this test has no stand-in value for it"
                out[e["name"]] = secrets[key]
        return out

    def probe(self, name: str) -> tuple[str, int]:
        get = self.container[name]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        return get["path"], ports.get(get["port"], get["port"])


def pod(docs: list[dict], kind: str) -> Pod:
    (doc,) = [d for d in docs if d["kind"] == kind]
    spec = kustomize_lite.pod_spec(doc)
    (c,) = spec["containers"]
    return Pod(kind, doc, spec, c)


@dataclass
class Sources:
    df: Dockerfile
    config: dict
    config_src: str                        # build-context path of the COPYed config
    config_dst: str                        # its path in the image
    deployment: Pod
    cronjob: Pod
    prometheus_path: str
    ecs: dict


def load_sources() -> Sources:
    df = parse_dockerfile()
    config_dst = df.env["LOADER_CONFIG"]
    (config_src,) = [s for s, d in df.copies.items() if d == config_dst] or [None]
    assert config_src, f"the Dockerfile COPYs nothing to LOADER_CONFIG={config_dst}"
    base, cron = render("k8s/base"), render("k8s/cronjob")
    (dep_doc,) = [d for d in base if d["kind"] == "Deployment"]
    (ecs,) = json.loads((ROOT / "deploy/aws/ecs-task-definition.json").read_text())[
        "containerDefinitions"]
    return Sources(
        df=df,
        config=tomllib.loads((ROOT / config_src).read_text()),
        config_src=config_src,
        config_dst=config_dst,
        deployment=pod(base, "Deployment"),
        cronjob=pod(cron, "CronJob"),
        prometheus_path=dep_doc["spec"]["template"]["metadata"]["annotations"][
            "prometheus.io/path"],
        ecs=ecs,
    )


@pytest.fixture(scope="module")
def src() -> Sources:
    return load_sources()


def test_the_files_agree_on_the_invocation(src):
    """What the simulation below relies on: one binary, one user, one port, one config."""
    df, ecs = src.df, src.ecs
    assert df.entrypoint[0].startswith("/") and len(df.entrypoint) == 1
    # The daemon: Dockerfile CMD == Deployment args == ECS command.
    assert src.deployment.args == df.cmd == ecs["command"], \
        (src.deployment.args, df.cmd, ecs["command"])
    assert src.cronjob.args == ["once"]
    # The health check: the Dockerfile's is the ECS one, and it runs the image's binary.
    assert ecs["healthCheck"]["command"] == ["CMD", *df.healthcheck]
    assert df.healthcheck[0] == df.entrypoint[0]
    # Who: USER == runAsUser/runAsGroup == ECS user; the volume belongs to that user.
    for p in (src.deployment, src.cronjob):
        for sc in (p.spec["securityContext"], p.container["securityContext"]):
            assert (sc["runAsUser"], sc["runAsGroup"]) == (df.uid, df.gid), p.kind
        assert p.container["securityContext"]["readOnlyRootFilesystem"] is True
        # Where: the config's folder is where k8s mounts its ConfigMap, read-only, and
        # LOADER_CONFIG names the same file; /tmp is the only writable mount.
        mounts = {m["mountPath"]: m for m in p.container["volumeMounts"]}
        assert mounts[str(Path(src.config_dst).parent)].get("readOnly") is True, p.kind
        assert [m for m, v in mounts.items() if not v.get("readOnly")] == ["/tmp"], p.kind
        assert p.env({DB_SECRET: "x"})["LOADER_CONFIG"] == src.config_dst, p.kind
    assert int(ecs["user"]) == df.uid and ecs["readonlyRootFilesystem"] is True
    # Port: the config's http.listen, EXPOSE, containerPort, probes and ECS agree on one.
    port = int(src.config["http"]["listen"].rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert src.deployment.probe(probe)[1] == port, probe
    assert [m["containerPort"] for m in ecs["portMappings"]] == [port]
    ecs_env = {e["name"]: e["value"] for e in ecs["environment"]}
    assert int(ecs_env["LOADER_HTTP__LISTEN"].rsplit(":", 1)[1]) == port
    # The image's data live in its VOLUME, which is also its WORKDIR and belongs to USER.
    assert df.volumes == [df.workdir]
    assert any(re.search(rf"chown {df.uid}:{df.gid} {re.escape(df.workdir)}\b", r)
               for r in df.runs), "the Dockerfile must chown the volume to USER"
    for path in data_paths(src.config).values():
        assert Path(path).is_relative_to(df.workdir), f"{path} is outside the volume"
    # SIGTERM: shutdown.grace fits in every stop timeout.
    grace = duration_s(src.config["shutdown"]["grace"])
    stops = {"Deployment terminationGracePeriodSeconds": src.deployment.grace_s,
             "CronJob terminationGracePeriodSeconds": src.cronjob.grace_s,
             "ECS stopTimeout": ecs["stopTimeout"]}
    assert all(grace < s for s in stops.values()), f"shutdown.grace {grace}s vs {stops}"


def data_paths(config: dict) -> dict[str, str]:
    """The config keys that name paths, as env variable -> absolute path in the image."""
    source, db = config["source"]["url"], config["database"]["url"]
    assert source.startswith("file:///") and db.startswith("sqlite:///"), (source, db)
    return {"LOADER_SOURCE__URL": source[len("file://"):],
            "LOADER_DATABASE__URL": db[len("sqlite://"):]}


# ----------------------------------------------------------------------------- the container

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """The image unpacked into `root`, run as its USER with its ENV and WORKDIR.

    `volume` is where the image's VOLUME is (the real /data, or a stand-in folder);
    `cwd` is the working directory (the WORKDIR: the volume, or the read-only folder
    of that name inside the image root).
    """

    def __init__(self, src: Sources, root: Path, volume: Path, cwd: Path):
        self.src, self.df, self.root, self.volume, self.cwd = src, src.df, root, volume, cwd
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs = root.parent / f"logs-{volume.name}"
        self.logs.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self.uid, self.gid = self.df.uid, self.df.gid
        else:   # cannot switch users: run as ourselves, also non-root (the image dirs are a-w)
            self.uid, self.gid = os.getuid(), os.getgid()

    def image_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def volume_path(self, path: str) -> Path:
        return self.volume / Path(path).relative_to(self.df.workdir)

    def env(self, pod: Pod | None = None, overrides: dict[str, str] | None = None) -> dict:
        """Image ENV, then the pod's env (if any), then overrides; paths mapped to the host."""
        env = {"PATH": IMAGE_PATH, "HOME": self.df.home}
        env.update(self.df.env)
        if pod is not None:
            db_in_secret = data_paths(self.src.config)["LOADER_DATABASE__URL"]
            env.update(pod.env({DB_SECRET: f"sqlite://{self.volume_path(db_in_secret)}"}))
        env.update(overrides or {})
        env["LOADER_HTTP__LISTEN"] = f"127.0.0.1:{self.port}"
        assert env["LOADER_CONFIG"] == self.src.config_dst
        env["LOADER_CONFIG"] = str(self.image_path(env["LOADER_CONFIG"]))
        return env

    def argv(self, args: list[str], pod: Pod | None) -> list[str]:
        """setpriv as the image's USER (+ the pod's securityContext), then the ENTRYPOINT."""
        entry = [str(self.image_path(self.df.entrypoint[0])), *self.df.entrypoint[1:]]
        if os.geteuid() != 0:
            return [*entry, *args]
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run as the image's USER"
        cmd = [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        sc = pod.container["securityContext"] if pod else {}
        if sc.get("allowPrivilegeEscalation") is False:
            cmd.append("--no-new-privs")
        if "ALL" in sc.get("capabilities", {}).get("drop", []):
            cmd += ["--inh-caps=-all", "--bounding-set=-all"]
        return [*cmd, *entry, *args]

    def run(self, args, env, pod=None, timeout=60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args, pod), env=env, cwd=self.cwd, timeout=timeout,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def healthcheck(self, env) -> subprocess.CompletedProcess:
        """The Dockerfile's HEALTHCHECK CMD, verbatim, in the container's environment."""
        (binary, *args) = self.df.healthcheck
        assert binary == self.df.entrypoint[0]
        return self.run(args, env, timeout=self.df.healthcheck_timeout_s + 5)

    def start(self, args, env, pod=None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{'-'.join(args)}-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.argv(args, pod), env=env, cwd=self.cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def drop_csv(self, name: str, rows: int) -> Path:
        """A producer's file in incoming/orders/, its mtime well past source.settle_time."""
        incoming = self.volume / "incoming"
        folder = incoming / "orders"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text("id,customer,amount\n" + "".join(
            f"{i},customer-{i},{i}.50\n" for i in range(1, rows + 1)))
        old = time.time() - 3600
        os.utime(path, (old, old))
        for p in (incoming, folder, path):
            os.chown(p, self.uid, self.gid)
        return path

    def processed(self, name: str) -> Path:
        return self.volume / "processed" / "orders" / name


def get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with HTTP.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check, deadline_s: float, proc=None, log: Path | None = None):
    end = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(OSError):
            result = check()
            if result:
                return result
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the loader exited ({proc.returncode}) before {what}:\n"
                        + (log.read_text() if log else ""))
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {deadline_s:.0f}s"
                        + (":\n" + log.read_text() if log else ""))
        time.sleep(0.2)


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_size,
                                       p.lstat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def process_identity(pid: int) -> dict[str, list[str]]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return {k: v.split() for k, v in fields.items()
            if k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs")}


def ledger(db: Path) -> tuple[set[str], int]:
    """(names of the files the ledger says are loaded, rows in the orders table), read from a
    copy so that nothing of root's is left on the volume (SQLite may create -shm/-wal files
    next to a database it opens)."""
    with tempfile.TemporaryDirectory() as scratch:
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copy(f"{db}{suffix}", f"{scratch}/copy.db{suffix}")
        con = sqlite3.connect(f"{scratch}/copy.db")
        try:
            keys = {Path(k).name for (k,) in con.execute(
                "SELECT object_key FROM s3_sql_loader_files WHERE state = 'loaded'")}
            (rows,) = con.execute('SELECT count(*) FROM "orders"').fetchone()
            return keys, rows
        finally:
            con.close()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def image_root(src):
    """The image's files at their image paths, read-only, traversable by anyone."""
    binary = binary_path()
    top = Path(tempfile.mkdtemp(prefix="s3-sql-loader-image-"))
    top.chmod(0o755)   # the image user must traverse it
    root = top / "root"
    installed = root / src.df.entrypoint[0].lstrip("/")
    installed.parent.mkdir(parents=True)
    shutil.copy(binary, installed)
    installed.chmod(0o755)
    config = root / src.config_dst.lstrip("/")
    config.parent.mkdir(parents=True)
    shutil.copy(ROOT / src.config_src, config)
    config.chmod(0o644)
    (root / src.df.workdir.lstrip("/")).mkdir(parents=True)   # WORKDIR, as docker creates it
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        d.chmod(0o555)     # read-only for everyone (root aside: the processes are not root)
    try:
        yield root
    finally:
        for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
        shutil.rmtree(top)


@pytest.fixture(scope="module")
def pod_container(src, image_root):
    """The `pod` layout: a stand-in volume, the WORKDIR read-only inside the image root."""
    volume = image_root.parent / "volume"
    volume.mkdir(mode=0o755)
    c = Container(src, image_root, volume, cwd=image_root / src.df.workdir.lstrip("/"))
    os.chown(volume, c.uid, c.gid)
    before = snapshot(image_root)
    try:
        yield c
    finally:
        c.stop_all()
    assert snapshot(image_root) == before, "something in the read-only image root changed"


def pod_overrides(c: Container) -> dict[str, str]:
    """Exactly the config keys naming /data, rebased on the stand-in volume."""
    paths = data_paths(c.src.config)
    return {"LOADER_SOURCE__URL": f"file://{c.volume_path(paths['LOADER_SOURCE__URL'])}",
            "LOADER_DATABASE__URL": f"sqlite://{c.volume_path(paths['LOADER_DATABASE__URL'])}"}


# ----------------------------------------------------------------------------- the tests

def test_check_with_the_image_config(src, pod_container):
    c = pod_container
    res = c.run(["check"], c.env(overrides=pod_overrides(c)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "configuration: ok" in res.stdout
    assert not [l for l in res.stdout.splitlines() if "FAILED" in l], res.stdout


def daemon_lifecycle(c: Container, env: dict, name: str, *, pod: Pod | None,
                     dropped_before: bool = False) -> float:
    """The daemon from start to SIGTERM: the probes, one file loaded, the HEALTHCHECK, a clean
    exit within the stop timeout, then a failing HEALTHCHECK. `pod` None: `docker run` (the
    Dockerfile's CMD); else that pod's args and securityContext. The probes' paths are the
    Deployment's either way. Returns how long the daemon took to stop."""
    probes = c.src.deployment
    args = pod.args if pod else c.df.cmd
    interval = duration_s(c.src.config["schedule"]["interval"])
    http = f"http://127.0.0.1:{c.port}"
    startup_path, _ = probes.probe("startupProbe")
    startup = probes.container["startupProbe"]
    proc, log = c.start(args, env, pod)

    def answers(path: str, timeout: float):
        return lambda: get(http + path, timeout)[0] == 200

    wait_for(f"200 on {startup_path} (startupProbe)",
             answers(startup_path, startup["timeoutSeconds"]),
             startup["periodSeconds"] * startup["failureThreshold"], proc, log)
    who = process_identity(proc.pid)
    assert who["Uid"] == [str(c.uid)] * 4 and who["Gid"] == [str(c.gid)] * 4, who
    if os.geteuid() == 0:
        assert who.get("Groups", []) == [], who
        assert int(who["CapEff"][0], 16) == 0 and int(who["CapPrm"][0], 16) == 0, who
        if pod:
            assert int(who["CapBnd"][0], 16) == 0 and who["NoNewPrivs"] == ["1"], who

    if not dropped_before:
        c.drop_csv(name, rows=3)
    # Taken by the first tick after the drop: at most one interval, plus the load.
    wait_for(f"{name} in processed/", lambda: c.processed(name).exists(), interval + 20,
             proc, log)
    assert not (c.volume / "incoming/orders" / name).exists()

    for probe in ("livenessProbe", "readinessProbe"):
        path, _ = probes.probe(probe)
        code, body = get(http + path, probes.container[probe]["timeoutSeconds"])
        assert code == 200, f"{probe} {path}: {code} {body!r}"
    _, ready = get(http + probes.probe("readinessProbe")[0], 5)
    assert json.loads(ready)["ready"] is True, ready
    code, body = get(http + "/status", 5)
    status = json.loads(body)
    assert code == 200 and status["totals"]["files_loaded"] == 1, status
    assert status["totals"]["rows_loaded"] == 3 and status["totals"]["files_failed"] == 0
    assert status["backlog"]["files"] == 0, status
    code, metrics = get(http + c.src.prometheus_path, 5)
    assert code == 200 and re.search(rb"^s3_sql_loader_files_loaded_total 1$", metrics, re.M)

    hc = c.healthcheck(env)
    assert hc.returncode == 0, f"HEALTHCHECK {c.df.healthcheck}: {hc.stdout}{hc.stderr}"

    grace = min(probes.grace_s, c.src.ecs["stopTimeout"])
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace}s after SIGTERM (terminationGracePeriodSeconds, "
                    "stopTimeout)")
    took = time.monotonic() - started
    assert code == 0, f"exit {code} on SIGTERM:\n{log.read_text()}"

    hc = c.healthcheck(env)
    assert hc.returncode != 0, "the HEALTHCHECK passes with no daemon"
    assert "unhealthy" in hc.stderr, hc.stderr

    # log.format = "json": every line the daemon wrote is one JSON object.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(isinstance(line, dict) for line in lines), lines[:5]
    assert any(line.get("message") == "loader stopped" for line in lines), lines[-3:]
    keys, _ = ledger(c.volume_path(data_paths(c.src.config)["LOADER_DATABASE__URL"]))
    assert name in keys
    return took


def test_deployment_runs_the_daemon(src, pod_container):
    c = pod_container
    env = c.env(src.deployment, overrides=pod_overrides(c))
    took = daemon_lifecycle(c, env, "orders-1.csv", pod=src.deployment)
    assert took < duration_s(src.config["shutdown"]["grace"]) + 5


def test_cronjob_runs_one_tick(src, pod_container):
    c = pod_container
    env = c.env(src.cronjob, overrides=pod_overrides(c))
    name = "orders-2.csv"
    c.drop_csv(name, rows=2)
    deadline = src.cronjob.doc["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    res = c.run(src.cronjob.args, env, src.cronjob, timeout=min(ONCE_TIMEOUT_S, deadline))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = re.search(r"listed (\d+) \| loaded (\d+) \((\d+) rows\)", res.stdout)
    assert summary and summary.groups() == ("1", "1", "2"), res.stdout
    assert c.processed(name).exists()
    assert not list((c.volume / "incoming").rglob("*.csv"))
    keys, rows = ledger(c.volume_path(data_paths(src.config)["LOADER_DATABASE__URL"]))
    processed = {p.name for p in (c.volume / "processed/orders").iterdir()}
    assert name in keys and keys == processed, (keys, processed)
    # After the Deployment's test (3 rows) this is the second file on the same volume.
    assert rows == 2 + (3 if "orders-1.csv" in keys else 0), rows


@pytest.fixture
def real_data(src, image_root):
    """`docker run -v loader-data:/data`: the config's own absolute paths, for real."""
    volume = Path(src.df.workdir)
    if (volume / MARKER).exists():     # left by an interrupted run of this test?
        with contextlib.suppress(ValueError, OSError):
            os.kill(int((volume / MARKER).read_text()), 0)
            pytest.skip(f"{volume} is in use by another run of this test")
        shutil.rmtree(volume)
    try:
        volume.mkdir()     # atomic: only a /data this test created is used and removed
    except FileExistsError:
        pytest.skip(f"{volume} already exists on this machine: not touching it")
    except PermissionError:
        pytest.skip(f"cannot create {volume} (not root)")
    try:
        (volume / MARKER).write_text(str(os.getpid()))
        c = Container(src, image_root, volume, cwd=volume)
        for p in (volume, volume / MARKER):
            os.chown(p, c.uid, c.gid)
        volume.chmod(0o755)
        try:
            yield c
        finally:
            c.stop_all()
    finally:
        shutil.rmtree(volume)


def test_docker_run_with_the_config_s_own_paths(src, real_data):
    """No override but the port: check, once, then the daemon, all on the real /data."""
    c = real_data
    env = c.env()   # the image's ENV only, as `docker run` gives it
    assert not set(env) & set(data_paths(src.config)), "nothing overrides the config's paths"
    res = c.run(["check"], env)
    assert res.returncode == 0 and f"file://{c.volume}" in res.stdout, res.stdout + res.stderr
    c.drop_csv("orders-1.csv", rows=3)
    res = c.run(["once"], env, timeout=ONCE_TIMEOUT_S)
    assert res.returncode == 0 and "loaded 1 (3 rows)" in res.stdout, res.stdout + res.stderr
    assert c.processed("orders-1.csv").exists()
    assert (c.volume / Path(data_paths(src.config)["LOADER_DATABASE__URL"]).name).exists()
    # The daemon, its file already waiting so that its first tick takes it.
    c.drop_csv("orders-2.csv", rows=3)
    daemon_lifecycle(c, env, "orders-2.csv", pod=None, dropped_before=True)
    owners = {p.stat().st_uid for p in c.volume.rglob("*")}
    assert owners == {c.uid}, f"files on the volume not owned by the image user: {owners}"
