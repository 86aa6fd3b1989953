"""Validation of built manifests: built-in kinds strictly against Kubernetes' schemas (kubernetes-validate),
custom resources against their CRD's openAPIV3Schema with unknown fields made errors (as the API server's
strict field validation does)."""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from mistral_ray.config import PROJECT_ROOT
from tests.conftest import IN_CI

SCHEMAS = PROJECT_ROOT.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.33.0"
KUBECTL = Path(sys.executable).parent / "kubectl"


def require_schemas() -> None:
    if not SCHEMAS.is_dir():
        if IN_CI:
            pytest.fail(f"{SCHEMAS} is missing: CI must validate manifests against the CRDs")
        pytest.skip(f"CRD schemas not found at {SCHEMAS} (a checkout without ../shared)")


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _closed(schema):
    """Unknown fields become errors: every object schema listing properties admits no others."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern:  # Go allows inline flags anywhere; Python at the start
            schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    return schema


@lru_cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    found = {}
    for path in SCHEMAS.rglob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"].pop("metadata", None)  # checked by the API server's ObjectMeta rules
            found[(f"{group}/{version['name']}", kind)] = _closed(schema)
    return found


def validate(obj: dict) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas():
        body = {k: v for k, v in obj.items() if k != "metadata"}
        jsonschema.validate(body, crd_schemas()[key])
        assert obj["metadata"].get("name"), "custom resource without a name"
    else:
        import kubernetes_validate

        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
