"""Offline validation of the deployment artifacts (issue 7). Run by scripts/validate-deploy.

Each test checks one artifact with a real tool where one exists here (hadolint,
kubectl's kustomize, kubernetes-validate's JSON schemas, parliament, cfn-lint, botocore's
ECS/S3 API shapes through moto in server mode) plus the project's own rules (non-root,
probes, grace periods, least privilege, ...).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import kustomize_lite  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
BIN = "/usr/local/bin/s3-sql-loader"
DEFAULT_GRACE_S = 25
ACCOUNT = "123456789012"
NAMESPACE = "S3SqlLoader"
K8S_VERSIONS = ["1.30.0", "1.37.0"]


def tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (scripts/validate-deploy installs it)"
    return found


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        assert m.start() == pos, f"bad duration {text!r}"
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    assert pos == len(text) and pos > 0, f"bad duration {text!r}"
    return total


# ----------------------------------------------------------------------------- config

# The configuration keys the binary accepts (the contract); anything else is a typo.
CONFIG_KEYS = {
    "source": {"url"},
    "database": {"url"},
    "schedule": {"interval", "max_files_per_tick"},
    "workers": {"concurrency", "files_per_second"},
    "http": {"listen"},
    "shutdown": {"grace"},
    "log": {"format", "level"},
    "cloudwatch": {"enabled", "namespace", "dimensions"},
}


def check_config_keys(cfg: dict, where: str) -> None:
    for section, table in cfg.items():
        assert section in CONFIG_KEYS, f"{where}: unknown section [{section}]"
        assert isinstance(table, dict), f"{where}: [{section}] must be a table"
        unknown = set(table) - CONFIG_KEYS[section]
        assert not unknown, f"{where}: unknown keys in [{section}]: {unknown}"
    dims = cfg.get("cloudwatch", {}).get("dimensions", {})
    assert isinstance(dims, dict) and all(isinstance(v, str) for v in dims.values())
    if "log" in cfg and "format" in cfg["log"]:
        assert cfg["log"]["format"] in ("text", "json")
    for section, key in (("schedule", "interval"), ("shutdown", "grace")):
        if key in cfg.get(section, {}):
            duration_s(cfg[section][key])


def check_env_names(names, where: str) -> None:
    for name in names:
        if name.startswith("LOADER_") and name != "LOADER_CONFIG":
            m = re.fullmatch(r"LOADER_([A-Z]+)__([A-Z_]+)", name)
            assert m, f"{where}: {name} is not LOADER_<SECTION>__<KEY>"
            section, key = m.group(1).lower(), m.group(2).lower()
            assert section in CONFIG_KEYS and key in CONFIG_KEYS[section], \
                f"{where}: {name} names no configuration key"


def test_container_config():
    cfg = tomllib.loads((ROOT / "config/container.toml").read_text())
    check_config_keys(cfg, "config/container.toml")
    assert cfg["http"]["listen"] == "0.0.0.0:8080"
    assert cfg["log"]["format"] == "json"
    assert cfg["source"]["url"] == "file:///data"
    assert cfg["database"]["url"] == "sqlite:///data/loader.db"
    assert duration_s(cfg["shutdown"]["grace"]) < 40


def k8s_config() -> dict:
    return tomllib.loads((ROOT / "k8s/base/config.toml").read_text())


def test_k8s_config():
    cfg = k8s_config()
    check_config_keys(cfg, "k8s/base/config.toml")
    assert cfg["source"]["url"].startswith("s3://")
    assert "database" not in cfg, "the database URL comes from the Secret, not the ConfigMap"
    assert cfg["http"]["listen"] == "0.0.0.0:8080"
    assert cfg["log"]["format"] == "json"
    assert cfg["cloudwatch"]["enabled"] is True
    assert cfg["cloudwatch"]["namespace"] == NAMESPACE
    assert "Pipeline" in cfg["cloudwatch"]["dimensions"]


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        inst, _, rest = buf.partition(" ")
        lines.append((inst.upper(), rest.strip()))
        buf = ""
    return lines


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for inst, rest in dockerfile_instructions():
        if inst == "FROM":
            out.append([])
        assert out, "instruction before the first FROM"
        out[-1].append((inst, rest))
    return out


def test_hadolint_clean():
    res = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_builder_caches_dependencies():
    st = stages()
    assert len(st) >= 2, "multi-stage build expected"
    builder = st[0]
    assert re.fullmatch(r"rust:1\.95-slim-bookworm AS builder", builder[0][1], re.I)
    copies = [i for i, (inst, _) in enumerate(builder) if inst == "COPY"]
    manifest = next(i for i in copies if "Cargo.toml" in builder[i][1] and "Cargo.lock" in builder[i][1])
    source = next(i for i in copies if builder[i][1].split()[0] == "src")
    builds = [i for i, (inst, rest) in enumerate(builder)
              if inst == "RUN" and "cargo build" in rest]
    assert any(manifest < i < source for i in builds), "no dependency-only build before COPY src"
    assert any(i > source for i in builds), "no build after COPY src"
    for i in builds:
        assert "--release" in builder[i][1] and "--locked" in builder[i][1]


def test_dockerfile_runtime_stage():
    runtime = stages()[-1]
    base = runtime[0][1].split()[0]
    assert base in ("debian:bookworm-slim", "gcr.io/distroless/cc-debian12",
                    "gcr.io/distroless/cc-debian12:nonroot"), base
    by = {}
    for inst, rest in runtime:
        by.setdefault(inst, []).append(rest)
    if base.startswith("debian"):
        assert any("ca-certificates" in r for r in by.get("RUN", []))
    user = by["USER"][-1].split(":")[0]
    assert user == "10001", f"USER must be the numeric non-root uid 10001, got {user}"
    assert f"--from=builder" in " ".join(by["COPY"]) and any(
        r.endswith(BIN) for r in by["COPY"]), "the binary must be installed at " + BIN
    assert "config/container.toml /etc/s3-sql-loader/config.toml" in by["COPY"]
    assert "LOADER_CONFIG=/etc/s3-sql-loader/config.toml" in by["ENV"]
    env_names = {e.split("=")[0] for r in by["ENV"] for e in r.split()}
    # ENV would override the config file mounted by Kubernetes/ECS (env wins over the file).
    assert not env_names & {"LOADER_SOURCE__URL", "LOADER_DATABASE__URL", "LOADER_HTTP__LISTEN"}
    assert "8080" in by["EXPOSE"][-1].split()
    assert json.loads(by["VOLUME"][-1]) == ["/data"] or by["VOLUME"][-1] == "/data"
    hc = by["HEALTHCHECK"][-1]
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert cmd == [BIN, "healthcheck"], f"HEALTHCHECK must exec the binary: {cmd}"
    assert json.loads(by["ENTRYPOINT"][-1]) == [BIN]


def dockerignore_excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    def rx(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        body = pat[1:] if neg else pat
        body = body.strip("/")
        if any(rx(body).match(c) for c in candidates):
            excluded = not neg
    return excluded


def test_dockerignore():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
    for path in ("target/release/s3-sql-loader", ".git/HEAD", "data/loader.db",
                 "data/incoming/a.csv", "tests/requirements.txt"):
        assert dockerignore_excluded(path, patterns), f"{path} would be sent to the build"
    needed = []
    for stage in stages():
        for inst, rest in stage:
            if inst == "COPY" and not rest.startswith("--from"):
                needed += [a for a in rest.split()[:-1] if not a.startswith("--")]
    assert needed
    for src in needed:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        probe = src + "/main.rs" if (ROOT / src).is_dir() else src
        assert not dockerignore_excluded(probe, patterns), f"COPY {src} is excluded by .dockerignore"


# ----------------------------------------------------------------------------- Kubernetes

def have_kubectl_kustomize() -> bool:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return False
    return subprocess.run([kubectl, "kustomize", "--help"], capture_output=True).returncode == 0


def render(path: str) -> list[dict]:
    if have_kubectl_kustomize():
        res = subprocess.run(["kubectl", "kustomize", str(ROOT / path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return [d for d in yaml.safe_load_all(res.stdout) if d]
    return kustomize_lite.build(ROOT / path)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render("k8s/base")


@pytest.fixture(scope="module")
def cron() -> list[dict]:
    return render("k8s/cronjob")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def test_kustomize_renders_base(base):
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "PodDisruptionBudget"]), kinds
    assert all(d["metadata"].get("namespace") == "s3-sql-loader" for d in base)


def test_kustomize_renders_cronjob_instead_of_deployment(cron):
    kinds = sorted(d["kind"] for d in cron)
    assert kinds == ["ConfigMap", "CronJob", "ServiceAccount"], kinds
    assert all(d["metadata"].get("namespace") == "s3-sql-loader" for d in cron)


@pytest.mark.parametrize("which", ["base", "cron"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_schemas_strict(which, version, request):
    import kubernetes_validate
    docs = request.getfixturevalue(which)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {e.message}")
    # The validator does catch a misplaced field.
    bad = json.loads(json.dumps(one(docs, "ServiceAccount")))
    bad["metadata"]["annotatons"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def check_pod(doc: dict, configmaps: list[dict], *, args: list[str]) -> dict:
    spec = kustomize_lite.pod_spec(doc)
    assert spec["serviceAccountName"] == "s3-sql-loader"
    grace = duration_s(k8s_config()["shutdown"]["grace"])
    assert grace == DEFAULT_GRACE_S
    assert spec["terminationGracePeriodSeconds"] > max(grace, DEFAULT_GRACE_S)
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = spec["containers"]
    assert c["args"] == args
    assert c["image"].endswith("/s3-sql-loader:0.1.0")
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    res = c["resources"]
    assert res["requests"]["cpu"] == "100m" and res["requests"]["memory"] == "128Mi"
    assert res["limits"]["cpu"] in ("1", 1) and res["limits"]["memory"] == "256Mi"
    env = {e["name"]: e for e in c["env"]}
    check_env_names(env, doc["kind"])
    db = env["LOADER_DATABASE__URL"]
    assert "value" not in db
    assert db["valueFrom"]["secretKeyRef"] == {"name": "s3-sql-loader-database", "key": "url"}
    for e in c["env"]:
        assert not re.match(r"(postgres|postgresql|mysql)://", str(e.get("value", ""))), \
            f"a database URL in plain env: {e['name']}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    cfg_mount = mounts["/etc/s3-sql-loader"]
    cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
    assert env["LOADER_CONFIG"]["value"] == "/etc/s3-sql-loader/config.toml"
    (cm,) = [m for m in configmaps if m["metadata"]["name"] == cm_name] or [None]
    assert cm is not None, f"the pod mounts ConfigMap {cm_name}, which is not rendered"
    assert tomllib.loads(cm["data"]["config.toml"]) == k8s_config()
    return c


def test_deployment(base):
    dep = one(base, "Deployment")
    assert dep["spec"]["replicas"] >= 2
    c = check_pod(dep, [d for d in base if d["kind"] == "ConfigMap"], args=["run"])
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 8080}
    probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for p in probes.values():
        assert port.get(p["httpGet"]["port"], p["httpGet"]["port"]) == 8080
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "8080"
    assert ann["prometheus.io/path"] == "/metrics"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_cronjob(cron):
    cj = one(cron, "CronJob")
    check_pod(cj, [d for d in cron if d["kind"] == "ConfigMap"], args=["once"])
    spec = kustomize_lite.pod_spec(cj)
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert re.fullmatch(r"\S+ \S+ \S+ \S+ \S+", cj["spec"]["schedule"])
    text = (ROOT / "k8s/cronjob/cronjob.yaml").read_text()
    assert re.search(r"#.*replica-safe", text), "say why concurrencyPolicy is not needed"


def test_service_pdb_and_serviceaccount(base):
    dep = one(base, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = one(base, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (p,) = svc["spec"]["ports"]
    assert p["port"] == 8080 and p["targetPort"] in ("http", 8080)
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    budget = pdb["spec"].get("maxUnavailable", 0)
    assert budget and budget < dep["spec"]["replicas"] or pdb["spec"].get("minAvailable")
    sa = one(base, "ServiceAccount")
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn
    assert not [d for d in base if d["kind"] == "Secret"], "no Secret value is shipped"


def _strip_hash(docs: list[dict]) -> list[str]:
    text = yaml.safe_dump_all(sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"])),
                              sort_keys=True)
    return re.sub(r"(s3-sql-loader-config)-[a-z0-9]{10}", r"\1-HASH", text)


@pytest.mark.parametrize("path", ["k8s/base", "k8s/cronjob"])
def test_fallback_renderer_matches_kustomize(path):
    if not have_kubectl_kustomize():
        pytest.skip("kubectl kustomize not installed: the fallback renderer is in use")
    assert _strip_hash(kustomize_lite.build(ROOT / path)) == _strip_hash(render(path))


# ----------------------------------------------------------------------------- AWS (moto)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    port = free_port()
    proc = subprocess.Popen([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, "moto_server exited"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            assert time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(service: str, endpoint: str):
    import boto3
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_ecs_task_definition(moto_endpoint):
    td = json.loads((ROOT / "deploy/aws/ecs-task-definition.json").read_text())
    ecs = client("ecs", moto_endpoint)
    # botocore validates every parameter against the ECS RegisterTaskDefinition shape.
    arn = ecs.register_task_definition(**td)["taskDefinition"]["taskDefinitionArn"]
    got = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]
    assert got["requiresCompatibilities"] == ["FARGATE"] and got["networkMode"] == "awsvpc"
    assert got["taskRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/s3-sql-loader-task"
    assert got["executionRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/s3-sql-loader-execution"
    (c,) = got["containerDefinitions"]
    assert c["user"] == "10001"
    assert c["readonlyRootFilesystem"] is True
    assert c["stopTimeout"] > DEFAULT_GRACE_S
    assert c["healthCheck"]["command"] == ["CMD", BIN, "healthcheck"]
    assert c["portMappings"][0]["containerPort"] == 8080
    assert c["logConfiguration"]["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(
        c["logConfiguration"]["options"])
    (secret,) = c["secrets"]
    assert secret["name"] == "LOADER_DATABASE__URL"
    assert re.fullmatch(rf"arn:aws:secretsmanager:[a-z0-9-]+:{ACCOUNT}:secret:[\w/+=.@-]+",
                        secret["valueFrom"])
    env = {e["name"]: e["value"] for e in c["environment"]}
    check_env_names(env, "ecs-task-definition.json")
    assert "LOADER_DATABASE__URL" not in env
    assert env["LOADER_SOURCE__URL"].startswith("s3://")
    assert env["LOADER_HTTP__LISTEN"] == "0.0.0.0:8080"
    assert env["LOADER_CLOUDWATCH__NAMESPACE"] == NAMESPACE
    tmp = [m for m in c["mountPoints"] if m["containerPath"] == "/tmp"]
    assert tmp and tmp[0]["sourceVolume"] in {v["name"] for v in got["volumes"]}


def test_ecs_task_definition_rejected_when_malformed(moto_endpoint):
    import botocore.exceptions
    td = json.loads((ROOT / "deploy/aws/ecs-task-definition.json").read_text())
    td["containerDefinitions"][0]["stopTimeOut"] = 40
    with pytest.raises(botocore.exceptions.ParamValidationError):
        client("ecs", moto_endpoint).register_task_definition(**td)


def test_s3_lifecycle(moto_endpoint):
    s3 = client("s3", moto_endpoint)
    s3.create_bucket(Bucket="lifecycle-check")
    cfg = json.loads((ROOT / "deploy/aws/s3-lifecycle.json").read_text())
    s3.put_bucket_lifecycle_configuration(Bucket="lifecycle-check", LifecycleConfiguration=cfg)
    rules = s3.get_bucket_lifecycle_configuration(Bucket="lifecycle-check")["Rules"]
    assert all(r["Status"] == "Enabled" for r in rules)
    expiring = [r for r in rules if "Expiration" in r]
    assert [r["Filter"]["Prefix"] for r in expiring] == ["processed/"], \
        "only processed/ may expire (never incoming/ or failed/)"
    assert 1 <= expiring[0]["Expiration"]["Days"] <= 365
    mpu = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert mpu and mpu[0]["Filter"].get("Prefix", "") == ""
    assert mpu[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1


# ----------------------------------------------------------------------------- IAM

def policy() -> dict:
    return json.loads((ROOT / "deploy/aws/iam-policy.json").read_text())


def test_parliament_no_findings():
    from parliament import analyze_policy_string
    text = (ROOT / "deploy/aws/iam-policy.json").read_text()
    findings = analyze_policy_string(text, include_community_auditors=True).findings
    assert not findings, [(f.issue, f.detail, f.location) for f in findings]
    typo = text.replace('"s3:prefix"', '"s3:prefx"')
    assert analyze_policy_string(typo).findings, "parliament should catch a wrong condition key"


def _list(x):
    return x if isinstance(x, list) else [x]


def allows(action: str, resource: str, context: dict | None = None) -> bool:
    """Evaluate the policy's Allow statements (it has no Deny) for one request."""
    context = context or {}
    for st in policy()["Statement"]:
        assert st["Effect"] == "Allow"
        if not any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), action)
                   for a in _list(st["Action"])):
            continue
        if not any(re.fullmatch(re.escape(r).replace(r"\*", ".*"), resource)
                   for r in _list(st["Resource"])):
            continue
        ok = True
        for op, conds in st.get("Condition", {}).items():
            for key, values in conds.items():
                have = context.get(key)
                if have is None:
                    ok = False
                elif op == "StringLike":
                    ok &= any(re.fullmatch(re.escape(v).replace(r"\*", ".*"), have)
                              for v in _list(values))
                elif op == "StringEquals":
                    ok &= have in _list(values)
                else:
                    pytest.fail(f"condition operator {op} not understood by this test")
        if ok:
            return True
    return False


def test_iam_least_privilege():
    for st in policy()["Statement"]:
        actions = _list(st["Action"])
        assert not any("*" in a for a in actions), f"wildcard action in {st.get('Sid')}"
        if any(a.startswith("s3:") for a in actions):
            assert "*" not in _list(st["Resource"]), f"s3 on Resource * in {st.get('Sid')}"
            for r in _list(st["Resource"]):
                assert r.startswith("arn:aws:s3:::") and r != "arn:aws:s3:::*"
    bucket = "arn:aws:s3:::my-loader-bucket"
    must = [
        ("s3:ListBucket", bucket, {"s3:prefix": "incoming/"}),
        ("s3:ListBucket", bucket, {"s3:prefix": "failed/"}),
        ("s3:GetObject", bucket + "/incoming/orders/a.csv", None),
        ("s3:DeleteObject", bucket + "/incoming/orders/a.csv", None),
        ("s3:PutObject", bucket + "/processed/orders/a.csv", None),
        ("s3:PutObject", bucket + "/failed/orders/a.csv.error.json", None),
        ("s3:PutObject", bucket + "/manifests/orders/m.json", None),
        ("s3:GetObject", bucket + "/failed/orders/a.csv", None),
        ("s3:DeleteObject", bucket + "/failed/orders/a.csv", None),
        ("s3:PutObject", bucket + "/incoming/orders/a.csv", None),
        ("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": NAMESPACE}),
    ]
    for action, res, ctx in must:
        assert allows(action, res, ctx), f"the loader needs {action} on {res} {ctx or ''}"
    must_not = [
        ("s3:ListBucket", bucket, {}),
        ("s3:ListBucket", bucket, {"s3:prefix": "processed/"}),
        ("s3:ListBucket", bucket, {"s3:prefix": ""}),
        ("s3:GetObject", bucket + "/processed/orders/a.csv", None),
        ("s3:DeleteObject", bucket + "/processed/orders/a.csv", None),
        ("s3:PutObject", bucket + "/other/x", None),
        ("s3:GetObject", "arn:aws:s3:::another-bucket/incoming/a.csv", None),
        ("s3:DeleteBucket", bucket, None),
        ("s3:PutBucketPolicy", bucket, None),
        ("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": "Other"}),
        ("cloudwatch:PutMetricData", "*", {}),
    ]
    for action, res, ctx in must_not:
        assert not allows(action, res, ctx), f"{action} on {res} {ctx} should be denied"


# ----------------------------------------------------------------------------- CloudWatch alarms

ALARMS = ROOT / "deploy/aws/cloudwatch-alarms.yaml"


def test_cfn_lint_clean():
    res = subprocess.run([tool("cfn-lint"), "--format", "parseable", str(ALARMS)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_alarm_template_structure():
    from cfnlint.decode import cfn_yaml
    tpl = cfn_yaml.load(str(ALARMS))
    params = tpl["Parameters"]
    assert {"SnsTopicArn", "Namespace", "Pipeline", "BacklogThreshold", "BacklogPeriods",
            "MaxOldestAgeSeconds"} <= set(params)
    assert params["Namespace"]["Default"] == NAMESPACE
    assert params["Pipeline"]["Default"] == k8s_config()["cloudwatch"]["dimensions"]["Pipeline"]
    alarms = {r["Properties"]["MetricName"]: r["Properties"]
              for r in tpl["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert set(alarms) == {"UnprocessedFiles", "OldestUnprocessedFileAge", "FilesFailed"}
    for name, a in alarms.items():
        assert a["Namespace"] == {"Ref": "Namespace"}, name
        assert a["Dimensions"] == [{"Name": "Pipeline", "Value": {"Ref": "Pipeline"}}], name
        assert a["TreatMissingData"] in ("breaching", "notBreaching", "ignore", "missing")
        assert a["AlarmActions"] == [{"Ref": "SnsTopicArn"}], name
        assert a["ComparisonOperator"] == "GreaterThanThreshold", name
    b = alarms["UnprocessedFiles"]
    assert b["Threshold"] == {"Ref": "BacklogThreshold"}
    assert b["EvaluationPeriods"] == {"Ref": "BacklogPeriods"}
    assert alarms["OldestUnprocessedFileAge"]["Threshold"] == {"Ref": "MaxOldestAgeSeconds"}
    f = alarms["FilesFailed"]
    assert f["Statistic"] == "Sum" and f["Threshold"] == 0
    text = ALARMS.read_text()
    assert len(re.findall(r"#[^\n]*\n\s*TreatMissingData", text)) == 3, \
        "each TreatMissingData choice is explained in a comment"


def resolve(node, params: dict):
    """Resolve the intrinsics the template uses (Ref to a parameter, Sub)."""
    if isinstance(node, list):
        return [resolve(n, params) for n in node]
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            return params[node["Ref"]]
        if set(node) == {"Fn::Sub"}:
            return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), node["Fn::Sub"])
        assert not any(k.startswith("Fn::") for k in node), f"unhandled intrinsic {node}"
        return {k: resolve(v, params) for k, v in node.items()}
    return node


def test_alarms_accepted_by_cloudwatch_api(moto_endpoint):
    """moto's CloudFormation has no AWS::CloudWatch::Alarm, so resolve the template with
    its parameters and send each alarm's properties as PutMetricAlarm (botocore checks
    them against the CloudWatch API shape), then read the alarms back."""
    from cfnlint.decode import cfn_yaml
    tpl = cfn_yaml.load(str(ALARMS))
    topic = client("sns", moto_endpoint).create_topic(Name="loader-alarms")["TopicArn"]
    assert re.fullmatch(tpl["Parameters"]["SnsTopicArn"]["AllowedPattern"], topic)
    params = {k: v.get("Default") for k, v in tpl["Parameters"].items()}
    params.update(SnsTopicArn=topic, BacklogThreshold="500", BacklogPeriods="4")
    cw = client("cloudwatch", moto_endpoint)
    numbers = {"Period": int, "EvaluationPeriods": int, "DatapointsToAlarm": int,
               "Threshold": float}
    for res in tpl["Resources"].values():
        if res["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = resolve(res["Properties"], params)
        props = {k: numbers[k](v) if k in numbers else v for k, v in props.items()}
        cw.put_metric_alarm(**props)
    alarms = {a["MetricName"]: a for a in cw.describe_alarms()["MetricAlarms"]}
    assert set(alarms) == {"UnprocessedFiles", "OldestUnprocessedFileAge", "FilesFailed"}
    backlog = alarms["UnprocessedFiles"]
    assert backlog["AlarmName"] == "s3-sql-loader-default-backlog"
    assert backlog["Threshold"] == 500 and backlog["EvaluationPeriods"] == 4
    assert backlog["Namespace"] == NAMESPACE
    assert backlog["Dimensions"] == [{"Name": "Pipeline", "Value": "default"}]
    assert backlog["AlarmActions"] == [topic] and backlog["OKActions"] == [topic]
    assert alarms["OldestUnprocessedFileAge"]["Threshold"] == 900
    assert alarms["OldestUnprocessedFileAge"]["TreatMissingData"] == "breaching"
    assert alarms["FilesFailed"]["Statistic"] == "Sum"


# ----------------------------------------------------------------------------- cross-file

def test_names_agree_across_artifacts():
    iam = [st for st in policy()["Statement"] if st["Action"] == "cloudwatch:PutMetricData"]
    assert iam[0]["Condition"]["StringEquals"]["cloudwatch:namespace"] == NAMESPACE
    bucket = k8s_config()["source"]["url"][len("s3://"):].split("/")[0]
    td = json.loads((ROOT / "deploy/aws/ecs-task-definition.json").read_text())
    env = {e["name"]: e["value"] for e in td["containerDefinitions"][0]["environment"]}
    assert env["LOADER_SOURCE__URL"] == f"s3://{bucket}"
    for st in policy()["Statement"]:
        for r in _list(st["Resource"]):
            if r.startswith("arn:aws:s3:::"):
                assert r.split(":::")[1].split("/")[0] == bucket


def test_deploy_readme():
    text = (ROOT / "deploy/README.md").read_text()
    for needle in ("docker build", "docker run", "LOADER_SOURCE__URL", "LOADER_DATABASE__URL",
                   "AWS_REGION", "kubectl apply -k k8s/base", "kubectl apply -k k8s/cronjob",
                   "create secret generic s3-sql-loader-database", "eks.amazonaws.com/role-arn",
                   "register-task-definition", "put-bucket-lifecycle-configuration",
                   "cloudwatch-alarms.yaml", "workers.concurrency", "--stop-timeout"):
        assert needle in text, f"deploy/README.md does not cover {needle!r}"
