"""Strict validation of KubeRay manifests against the CRDs' OpenAPI v3 schemas, as `kubectl apply --validate=strict`.

The schemas come from `$VRAY_KUBERAY_CRDS` (a folder a user fills with `kubectl get crd rayclusters.ray.io
rayjobs.ray.io rayservices.ray.io -o yaml`, one file each or a List) or vray's copy of KubeRay v1.7's CRDs
(vray/k8s/crds, gzipped). A field
the schema does not declare is an error (unless the schema preserves unknown fields), as are wrong types, missing
required fields, values outside an enum, and strings that miss a pattern or length. CEL rules
(`x-kubernetes-validations`) are the API server's to evaluate and are not checked here.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from vray.errors import VrayError

CRD_ENV = "VRAY_KUBERAY_CRDS"
KINDS = ("RayCluster", "RayJob", "RayService")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


PACKAGED = Path(__file__).resolve().parent / "crds"


def default_crd_folder() -> Path:
    """$VRAY_KUBERAY_CRDS, else vray's copy of KubeRay's CRDs."""
    if os.environ.get(CRD_ENV):
        folder = Path(os.environ[CRD_ENV]).expanduser()
        if not folder.is_dir():
            raise VrayError(f"{CRD_ENV}={folder} is not a folder; fill one with `kubectl get crd ... -o yaml > crds.yaml`")
        return folder
    return PACKAGED


def _documents(file: Path) -> list[Any]:
    text = gzip.decompress(file.read_bytes()).decode() if file.suffix == ".gz" else file.read_text()
    return list(yaml.safe_load_all(text))


@dataclass(frozen=True)
class CrdSchema:
    """The storage version's schema of one kind."""

    kind: str
    api_version: str
    schema: dict[str, Any]


@lru_cache(maxsize=4)
def load_crds(folder: str | None = None) -> dict[str, CrdSchema]:
    """Kind -> schema of every CRD document in the folder's YAML files (a `kind: List` of them works too)."""
    root = Path(folder) if folder else default_crd_folder()
    found: dict[str, CrdSchema] = {}
    files = sorted(p for p in root.iterdir() if p.name.endswith((".yaml", ".yml", ".yaml.gz")))
    for file in files:
        for doc in _documents(file):
            items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            for crd in items:
                if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                    continue
                spec = crd["spec"]
                for version in spec["versions"]:
                    if version.get("storage"):
                        kind = spec["names"]["kind"]
                        found[kind] = CrdSchema(kind, f"{spec['group']}/{version['name']}",
                                                version["schema"]["openAPIV3Schema"])
    missing = [k for k in KINDS if k not in found]
    if missing:
        raise VrayError(f"{root}: no CRD for {', '.join(missing)}; fill it with `kubectl get crd rayclusters.ray.io "
                        "rayjobs.ray.io rayservices.ray.io -o yaml`")
    return found


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if value is None:
        return bool(schema.get("nullable"))
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    kind = schema.get("type")
    return {
        None: True,
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }.get(kind, True)


def _check(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    if not _type_ok(value, schema):
        want = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        errors.append(f"{path}: expected {want}, got {type(value).__name__} ({value!r:.60})")
        return
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            sub = f"{path}.{key}"
            if props is not None and key in props:
                _check(item, props[key], sub, errors)
            elif isinstance(schema.get("additionalProperties"), dict):
                _check(item, schema["additionalProperties"], sub, errors)
            elif schema.get("x-kubernetes-preserve-unknown-fields") or (props is None and "additionalProperties" not in schema):
                continue
            else:
                errors.append(f"{sub}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", errors)


def _check_metadata(meta: Any, errors: list[str]) -> None:
    if not isinstance(meta, dict):
        errors.append("metadata: required (an object with a name)")
        return
    known = {"name", "namespace", "labels", "annotations", "generateName"}
    for key in meta:
        if key not in known:
            errors.append(f"metadata.{key}: unknown field (vray writes {', '.join(sorted(known))})")
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS1123.match(name) or len(name) > 63:
        errors.append(f"metadata.name: {name!r} must be a DNS-1123 label (lower-case letters, digits, '-'; at most 63)")
    for field in ("labels", "annotations"):
        if field in meta and not (isinstance(meta[field], dict) and all(isinstance(v, str) for v in meta[field].values())):
            errors.append(f"metadata.{field}: a map of strings is required")


def validate_manifest(manifest: dict[str, Any], crds: dict[str, CrdSchema] | None = None) -> list[str]:
    """Every problem of one manifest (empty when it is valid)."""
    crds = crds or load_crds()
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind not in crds:
        return [f"kind: {kind!r} is not one of {', '.join(crds)}"]
    crd = crds[kind]
    errors: list[str] = []
    if manifest.get("apiVersion") != crd.api_version:
        errors.append(f"apiVersion: {manifest.get('apiVersion')!r}; the CRD serves {crd.api_version}")
    _check_metadata(manifest.get("metadata"), errors)
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    schema = {**crd.schema, "properties": {k: v for k, v in crd.schema.get("properties", {}).items()
                                           if k not in ("apiVersion", "kind", "metadata")}}
    _check(body, schema, kind, errors)
    return errors


def check_manifest(manifest: dict[str, Any], where: str = "manifest") -> None:
    """A VrayError listing every problem, as `kubectl --validate=strict` would refuse it."""
    errors = validate_manifest(manifest)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors[:30])
        more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
        raise VrayError(f"{where} does not validate against the KubeRay CRD schema:\n{lines}{more}")
