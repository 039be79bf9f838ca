"""A small stand-in for `kustomize build`, used only when no kustomize is installed.

It implements exactly the kustomization features that k8s/ uses (resources, namespace,
labels without selectors, images, configMapGenerator with a content-hash suffix and the
references to it from pod specs, inline `$patch: delete` patches) and refuses anything
else, so a new feature in k8s/ makes the validation fail instead of silently rendering
something else. When kubectl (with its built-in kustomize) is present, the tests use it
and also check that this renderer agrees with it (up to the hash suffix).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
             "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass"}


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec.get("template", {}).get("spec")
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind == "Pod":
        return spec
    return None


def _containers(spec: dict):
    yield from spec.get("initContainers", []) or []
    yield from spec.get("containers", []) or []


def _hash(data: dict, name: str) -> str:
    blob = json.dumps({"kind": "ConfigMap", "name": name, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def build(path: str | Path) -> list[dict]:
    docs, _ = _build(Path(path))
    return docs


def _build(root: Path) -> tuple[list[dict], dict[str, str]]:
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{root}: kustomization fields not supported here: {unknown}")
    docs: list[dict] = []
    renames: dict[str, str] = {}
    for res in kust.get("resources", []):
        p = (root / res).resolve()
        if p.is_dir():
            sub, sub_renames = _build(p)
            docs += sub
            renames.update(sub_renames)
        else:
            docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        if set(gen) - {"name", "files", "literals"}:
            raise NotImplementedError(f"configMapGenerator fields: {set(gen)}")
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (root / src).read_text()
        for lit in gen.get("literals", []):
            k, _, v = lit.partition("=")
            data[k] = v
        new = f"{gen['name']}-{_hash(data, gen['name'])}"
        renames[gen["name"]] = new
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": new}, "data": data})
    for patch in kust.get("patches", []):
        if set(patch) != {"patch"}:
            raise NotImplementedError(f"only inline patches are supported: {patch}")
        body = yaml.safe_load(patch["patch"])
        if body.get("$patch") != "delete":
            raise NotImplementedError("only `$patch: delete` patches are supported")
        key = (body["apiVersion"], body["kind"], body["metadata"]["name"])
        before = len(docs)
        docs = [d for d in docs
                if (d["apiVersion"], d["kind"], d["metadata"]["name"]) != key]
        if len(docs) == before:
            raise ValueError(f"delete patch matches nothing: {key}")
    docs = [copy.deepcopy(d) for d in docs]
    for d in docs:
        meta = d.setdefault("metadata", {})
        if kust.get("namespace") and d["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for lab in kust.get("labels", []):
            if lab.get("includeSelectors") or lab.get("includeTemplates") or set(lab) - {
                    "pairs", "includeSelectors", "includeTemplates"}:
                raise NotImplementedError(f"labels: {lab}")
            meta.setdefault("labels", {}).update(lab["pairs"])
        spec = pod_spec(d)
        if spec is None:
            continue
        for vol in spec.get("volumes", []) or []:
            cm = vol.get("configMap")
            if cm and cm.get("name") in renames:
                cm["name"] = renames[cm["name"]]
        for c in _containers(spec):
            for img in kust.get("images", []):
                if c.get("image", "").split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
            for env in c.get("env", []) or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]
            for src in c.get("envFrom", []) or []:
                ref = src.get("configMapRef")
                if ref and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]
    return docs, renames
