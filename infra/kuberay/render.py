"""Render a kustomization as `kubectl kustomize DIR` does, for the features infra/kuberay uses.

Why: the manifests a user applies are the overlay's output, not the files in base/. The tests
(tests/unit/infra/test_kuberay.py) render the overlays with this module, with no kubectl or
network, and validate the result against the KubeRay CRD schemas in schemas/.

Supported, with kustomize's semantics:
- resources: relative paths of YAML files in the folder, and of folders with a kustomization.yaml
  (rendered first, recursively);
- configMapGenerator (+ generatorOptions): literals; behavior create / merge / replace; options
  labels, annotations and disableNameSuffixHash, which must be true (no name hashing here);
- patches: strategic-merge patches (inline `patch:` or `path:`) matched by kind and name: maps
  merge, `null` deletes a key, a list replaces the list (kustomize has no schema for KubeRay's
  CRDs, so `containers` or `workerGroupSpecs` are not merged by name); a patch that reaches a
  list of a built-in kind, which kustomize would merge by key, raises;
- namespace: on every namespaced object;
- labels: `pairs` on metadata.labels (includeSelectors / includeTemplates not supported);
- images: every `image` of a `containers` / `initContainers` list, at any depth (newName,
  newTag, digest), like kustomize's images transformer.
Anything else raises NotImplementedError, so a test never passes on a key that was ignored.
Objects come out in resource order (kustomize sorts them by kind). Checked against kustomize
v5.5 (`kubectl kustomize`) by tests/unit/infra/test_kuberay.py where kubectl is installed.

    python infra/kuberay/render.py infra/kuberay/overlays/example
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "labels",
                  "configMapGenerator", "generatorOptions", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "ClusterQueue", "ResourceFlavor"}


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints, as dicts."""
    directory = Path(directory)
    kfile = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
    if kfile is None:
        raise FileNotFoundError(f"no kustomization file in {directory}")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise NotImplementedError(f"{kfile}: {sorted(unknown)} not supported by render.py")

    objs: list[dict] = []
    for entry in k.get("resources", []):
        path = directory / entry
        if Path(entry).is_absolute() or "://" in entry:
            raise ValueError(f"{kfile}: resource {entry!r}: kustomize takes relative paths only")
        if path.is_dir():
            objs += render(path)
        elif path.resolve().is_relative_to(directory.resolve()):   # kustomize's load restrictor
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise ValueError(f"{kfile}: file {entry!r} is outside the kustomization's folder")
    for gen in k.get("configMapGenerator", []):
        _generate_configmap(objs, gen, k.get("generatorOptions", {}), kfile)
    for entry in k.get("patches", []):
        _apply_patch(objs, entry, directory)
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates") or "fields" in entry:
            raise NotImplementedError(f"{kfile}: labels only as plain pairs")
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        for o in objs:
            _set_images(o, image)
    return objs


def _generate_configmap(objs: list[dict], gen: dict, defaults: dict, kfile: Path) -> None:
    if set(gen) - {"name", "behavior", "literals", "options"}:
        raise NotImplementedError(f"{kfile}: configMapGenerator {gen['name']}: only literals")
    options = {**defaults, **gen.get("options", {})}
    if options.get("disableNameSuffixHash") is not True:
        raise NotImplementedError(f"{kfile}: {gen['name']}: name hashing is not implemented; "
                                  "set options.disableNameSuffixHash: true")
    data = {}
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]      # kustomize drops one pair of surrounding quotes
        data[key] = value
    meta = {"name": gen["name"]}
    for field in ("labels", "annotations"):
        if options.get(field):
            meta[field] = dict(options[field])
    new = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
    behavior = gen.get("behavior", "create")
    existing = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
    if behavior == "create":
        if existing:
            raise ValueError(f"{kfile}: ConfigMap {gen['name']} exists already (use behavior: merge)")
        objs.append(new)
    elif behavior in ("merge", "replace") and len(existing) == 1:
        old = existing[0]
        if behavior == "replace":
            old["data"] = {}
        old["data"] = {**old.get("data", {}), **data}
        for field in ("labels", "annotations"):
            if field in meta:
                old["metadata"].setdefault(field, {}).update(meta[field])
    else:
        raise ValueError(f"{kfile}: {behavior} of ConfigMap {gen['name']}: {len(existing)} to act on")


def _apply_patch(objs: list[dict], entry: dict, directory: Path) -> None:
    if set(entry) - {"patch", "path"}:
        raise NotImplementedError(f"patch {entry}: only `patch` or `path` (no target, no options)")
    text = entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text()
    patch = yaml.safe_load(text)
    if not isinstance(patch, dict) or "kind" not in patch:
        raise NotImplementedError("only strategic-merge patches (JSON 6902 lists are not supported)")
    meta = patch.get("metadata", {})
    matches = [o for o in objs if o["kind"] == patch["kind"]
               and o["metadata"]["name"] == meta.get("name")
               and meta.get("namespace") in (None, o["metadata"].get("namespace"))]
    if len(matches) != 1:
        raise ValueError(f"patch for {patch['kind']}/{meta.get('name')}: {len(matches)} objects match")
    group = patch.get("apiVersion", "").rpartition("/")[0]
    built_in = "." not in group or group.endswith(".k8s.io")
    merged = _merge(matches[0], patch, keyed_lists=built_in)
    matches[0].clear()
    matches[0].update(merged)


def _merge(base, patch, keyed_lists: bool = False):
    """A strategic merge as kustomize does it for a kind it has no schema of (a CRD)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise NotImplementedError(f"patch directives {list(patch)} are not supported")
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(out[key], value, keyed_lists) if key in out else copy.deepcopy(value)
        return out
    if isinstance(patch, list) and keyed_lists:
        raise NotImplementedError("a patch on a list of a built-in kind (merged by key in kustomize)")
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry port is part of the name."""
    name, _, digest = image.partition("@")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1:], digest
    return name, "", digest


def _set_images(node, rule: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, rule)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                if isinstance(c, dict) and isinstance(c.get("image"), str):
                    c["image"] = _new_image(c["image"], rule)
        _set_images(value, rule)


def _new_image(image: str, rule: dict) -> str:
    name, tag, digest = split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python infra/kuberay/render.py KUSTOMIZATION_DIR")
    yaml.safe_dump_all(render(sys.argv[1]), sys.stdout, sort_keys=False)
