"""A small Kustomize renderer for the subset deploy/kubernetes uses.

No kustomize implementation installs from the registries this project uses (kubectl from
Debian embeds a kustomize too old for ``labels``), so the tests render the base themselves.
Supported, with kustomize's semantics:

* ``resources``: YAML files (multi-document) relative to the kustomization;
* ``namespace``: set on every namespaced object (not on Namespace or other cluster objects);
* ``labels`` (``pairs``, ``includeSelectors``, ``includeTemplates``) and ``commonLabels``
  (labels on metadata, selectors and pod templates);
* ``images``: ``newName``/``newTag``/``digest`` for containers whose image name matches;
* ``configMapGenerator`` with ``files`` (``key=path`` or the file name) and ``literals``,
  per-generator ``options`` and ``generatorOptions`` (``disableNameSuffixHash``, ``labels``),
  the content-hash name suffix (kustomize's algorithm), and rewriting of references to a
  generated ConfigMap in pod specs (volumes, ``envFrom``, ``env[].valueFrom``).

Any other key in the kustomization is an error, so the base cannot silently grow beyond what
the tests render.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "commonLabels",
    "images",
    "configMapGenerator",
    "generatorOptions",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "Node",
}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}

Obj = dict[str, Any]


class KustomizeError(ValueError):
    pass


def load_yaml_documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise KustomizeError(f"{path}: every document must be an object with apiVersion/kind")
    return docs


def config_map_hash(cm: Obj) -> str:
    """kustomize's ConfigMap name suffix (api/hasher): sha256 over the encoded ConfigMap."""
    encoded = json.dumps(
        {
            "kind": "ConfigMap",
            "name": cm["metadata"]["name"],
            "data": cm.get("data", {}),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    if cm.get("binaryData"):
        raise KustomizeError("binaryData is not supported")
    digest = hashlib.sha256(encoded.encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] == "Pod":
        return [obj.setdefault("spec", {})]
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"].setdefault("spec", {})]
    if obj["kind"] == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"].setdefault("spec", {})]
    return []


def _templates(obj: Obj) -> list[Obj]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]]
    return []


def _apply_labels(objs: list[Obj], pairs: dict[str, str], selectors: bool, templates: bool) -> None:
    for obj in objs:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if templates or selectors:
            for t in _templates(obj):
                t.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if selectors:
            if obj["kind"] in WORKLOADS:
                obj["spec"].setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
            elif obj["kind"] == "Service":
                obj["spec"].setdefault("selector", {}).update(pairs)


def _apply_images(objs: list[Obj], images: list[Obj]) -> None:
    for obj in objs:
        for spec in _pod_specs(obj):
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                image: str = c["image"]
                name = image.split("@", 1)[0]
                if ":" in name.rsplit("/", 1)[-1]:
                    name = name.rsplit(":", 1)[0]
                for rule in images:
                    if rule["name"] != name:
                        continue
                    new = rule.get("newName", name)
                    if "digest" in rule:
                        c["image"] = f"{new}@{rule['digest']}"
                    elif "newTag" in rule:
                        c["image"] = f"{new}:{rule['newTag']}"
                    else:
                        c["image"] = new + image[len(name) :]


def _rename_config_map_refs(objs: list[Obj], renames: dict[str, str]) -> None:
    for obj in objs:
        for spec in _pod_specs(obj):
            for vol in spec.get("volumes", []):
                cm = vol.get("configMap")
                if cm and cm.get("name") in renames:
                    cm["name"] = renames[cm["name"]]
                for src in (vol.get("projected") or {}).get("sources", []):
                    pcm = src.get("configMap")
                    if pcm and pcm.get("name") in renames:
                        pcm["name"] = renames[pcm["name"]]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for ef in c.get("envFrom", []):
                    ref = ef.get("configMapRef")
                    if ref and ref.get("name") in renames:
                        ref["name"] = renames[ref["name"]]
                for env in c.get("env", []):
                    ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref and ref.get("name") in renames:
                        ref["name"] = renames[ref["name"]]


def _generate_config_maps(
    base: Path, gens: list[Obj], global_opts: Obj
) -> tuple[list[Obj], dict[str, str]]:
    out: list[Obj] = []
    renames: dict[str, str] = {}
    for gen in gens:
        unknown = set(gen) - {"name", "files", "literals", "options"}
        if unknown:
            raise KustomizeError(f"configMapGenerator: unsupported keys {sorted(unknown)}")
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, _, rel = entry.rpartition("=")
            path = base / rel
            data[key or path.name] = path.read_text()
        for lit in gen.get("literals", []):
            key, sep, value = lit.partition("=")
            if not sep:
                raise KustomizeError(f"configMapGenerator literal without '=': {lit!r}")
            data[key] = value
        opts = {**global_opts, **gen.get("options", {})}
        cm: Obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"]},
            "data": data,
        }
        if opts.get("labels"):
            cm["metadata"]["labels"] = dict(opts["labels"])
        if not opts.get("disableNameSuffixHash", False):
            hashed = f"{gen['name']}-{config_map_hash(cm)}"
            cm["metadata"]["name"] = hashed
            renames[gen["name"]] = hashed
        out.append(cm)
    return out, renames


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would output (in resource order)."""
    kpath = directory / "kustomization.yaml"
    k = yaml.safe_load(kpath.read_text())
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kpath}: unsupported by the test renderer: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kpath}: kind must be Kustomization")
    objs: list[Obj] = []
    for res in k.get("resources", []):
        path = directory / res
        if path.is_dir():
            objs.extend(render(path))
        else:
            objs.extend(copy.deepcopy(load_yaml_documents(path)))
    generated, renames = _generate_config_maps(
        directory, k.get("configMapGenerator", []), k.get("generatorOptions", {})
    )
    objs = generated + objs
    _rename_config_map_refs(objs, renames)
    if "namespace" in k:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    if k.get("commonLabels"):
        _apply_labels(objs, k["commonLabels"], selectors=True, templates=True)
    for rule in k.get("labels", []):
        _apply_labels(
            objs,
            rule["pairs"],
            selectors=bool(rule.get("includeSelectors", False)),
            templates=bool(rule.get("includeTemplates", False)),
        )
    _apply_images(objs, k.get("images", []))
    seen: set[tuple[str, str, str]] = set()
    for obj in objs:
        ident = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"duplicate object {ident}")
        seen.add(ident)
    return objs
