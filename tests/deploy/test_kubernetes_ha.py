"""deploy/kubernetes-ha: three replicas on PostgreSQL, valid as the base is, and safe to roll."""

from __future__ import annotations

import shutil
import subprocess
from types import ModuleType
from typing import Any

import pytest
import yaml

from ..support import ROOT
from .test_kubernetes import CRDS, documented, validate, validator

__all__ = ["validator"]  # the fixture, shared with the base's tests

FOLDER = ROOT / "deploy" / "kubernetes-ha"
Doc = dict[str, Any]


def built() -> list[Doc]:
    """`kubectl kustomize` (or `kustomize build`) of the overlay, or a skip."""
    if kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(FOLDER)]
    elif kustomize := shutil.which("kustomize"):
        argv = [kustomize, "build", str(FOLDER)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[Doc], kind: str) -> Doc:
    """The one resource of ``kind``."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def test_the_overlay_builds_and_validates(validator: ModuleType) -> None:
    """Everything `kubectl apply -k deploy/kubernetes-ha` sends passes the strict schemas."""
    docs = built()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRDS:
            validate(validator, doc, "kustomize build deploy/kubernetes-ha")
    kinds = sorted(d["kind"] for d in docs)
    assert "PersistentVolumeClaim" not in kinds, "replicas keep no state on a volume"
    assert {"Deployment", "PodDisruptionBudget", "Service", "ConfigMap"} <= set(kinds)


def test_three_replicas_roll_one_at_a_time_under_a_disruption_budget() -> None:
    """3 replicas, RollingUpdate losing at most one, and a PDB keeping two through drains."""
    docs = built()
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert 1 <= budget["minAvailable"] < spec["replicas"]
    labels = spec["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    [spread] = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_state_comes_from_postgresql_in_the_secret_and_each_pod_names_itself() -> None:
    """COALMINE_STATE_URL is the Secret's (no value, no volume); the replica id is the pod name."""
    deployment = one(built(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env.keys() <= documented().keys(), env.keys() - documented().keys()
    state = env["COALMINE_STATE_URL"]
    assert "value" not in state
    assert state["valueFrom"]["secretKeyRef"] == {"name": "coalmine", "key": "COALMINE_STATE_URL"}
    assert env["COALMINE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["COALMINE_LEASE_TTL"]["value"]
    assert "/var/lib/coalmine" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert "state" not in {v["name"] for v in pod["volumes"]}


def test_probes_take_a_replica_that_lost_its_store_out_of_service() -> None:
    """Readiness is /readyz (it fails while the store cannot be reached); liveness /healthz."""
    [container] = one(built(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 15, "out within one lease TTL"
