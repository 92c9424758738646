"""deploy/kubernetes: valid against the Kubernetes schemas, and consistent with the image,
the configuration reference and each other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from coalmine.policyfile import load_policies
from coalmine.settings import load_settings

from ..support import ROOT

FOLDER = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = FOLDER / "kustomization.yaml"
CONFIGURATION = ROOT / "docs" / "configuration.md"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # not in the Kubernetes schemas
# Prometheus Operator's Duration pattern (ServiceMonitor CRD).
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
# The ServiceMonitor CRD's fields the manifest may use (a subset: a typo is not among them).
SERVICEMONITOR_SPEC = {
    "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
    "sampleLimit", "scrapeProtocols", "attachMetadata", "labelLimit",
}  # fmt: skip
SERVICEMONITOR_ENDPOINT = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "relabelings", "metricRelabelings", "authorization", "tlsConfig",
    "followRedirects", "enableHttp2", "filterRunning",
}  # fmt: skip

Doc = dict[str, Any]


def manifests() -> dict[str, list[Doc]]:
    """Every resource file of the folder (not the kustomization), by file name."""
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        for path in sorted(FOLDER.glob("*.yaml"))
        if path != KUSTOMIZATION
    }


def kustomization() -> Doc:
    """kustomization.yaml."""
    loaded: Doc = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    return loaded


def the(kind: str) -> Doc:
    """The one resource of a kind among the manifests."""
    found = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def container() -> Doc:
    """The Deployment's coalmine container."""
    [only] = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def documented() -> dict[str, bool]:
    """docs/configuration.md's variables, each with whether it is a secret."""
    rows = re.findall(
        r"^\| `(COALMINE_\w+)` \|.*\|(.*)\|$", CONFIGURATION.read_text(encoding="utf-8"), re.M
    )
    assert rows, "no variables found in docs/configuration.md"
    return {name: "(secret)" in meaning for name, meaning in rows}


@pytest.fixture
def validator() -> ModuleType:
    """kubernetes-validate (the Kubernetes JSON schemas, offline), or a skip."""
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (`pip install kubernetes-validate`, "
        "in the test extra)",
    )


def validate(validator: ModuleType, doc: Doc, where: str) -> None:
    """Strict validation (unknown fields fail) against the oldest and newest bundled schemas."""
    versions = validator.utils.all_versions()
    for version in (versions[0], versions[-1]):
        try:
            validator.validate(doc, version, strict=True)
        except validator.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']} invalid for Kubernetes {version}: {path}: {exc}")


def test_every_manifest_validates_against_the_kubernetes_schemas(validator: ModuleType) -> None:
    """Each resource file passes the Kubernetes schemas in strict mode (CRDs checked below)."""
    found = manifests()
    assert found
    for name, docs in found.items():
        assert docs, f"{name} is empty"
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) not in CRDS:
                validate(validator, doc, name)


def test_the_validator_rejects_a_misspelt_field(validator: ModuleType) -> None:
    """A misspelt securityContext field fails: the strict check really looks."""
    bad = the("Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = 1
    with pytest.raises(validator.ValidationError):
        validator.validate(bad, validator.utils.latest_version(), strict=True)


def kustomize_build() -> list[Doc]:
    """`kubectl kustomize` (or `kustomize build`) of the folder, or a skip."""
    if kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(FOLDER)]
    elif kustomize := shutil.which("kustomize"):
        argv = [kustomize, "build", str(FOLDER)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_kustomize_build_is_valid_and_wires_the_generated_policies(validator: ModuleType) -> None:
    """What `kubectl apply -k` would send validates, and mounts the generated policy ConfigMap."""
    built = kustomize_build()
    written = [d["kind"] for docs in manifests().values() for d in docs]
    assert sorted(d["kind"] for d in built) == sorted([*written, "ConfigMap"])
    for doc in built:
        if (doc["apiVersion"], doc["kind"]) not in CRDS:
            validate(validator, doc, "kustomize build")
    [config_map] = [d for d in built if d["kind"] == "ConfigMap"]
    runbook = (ROOT / "policies" / "runbook.yaml").read_text(encoding="utf-8")
    assert config_map["data"] == {"runbook.yaml": runbook}
    [deployment] = [d for d in built if d["kind"] == "Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policies"]["configMap"]["name"] == config_map["metadata"]["name"]


def test_kustomization_lists_every_manifest_and_policy() -> None:
    """resources are exactly the manifest files; the generator takes every file in policies/."""
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == sorted(manifests())
    [generator] = k["configMapGenerator"]
    volumes = the("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert generator["name"] in {v.get("configMap", {}).get("name") for v in volumes}
    listed = sorted(generator["files"])
    on_disk = sorted(p.relative_to(FOLDER).as_posix() for p in (FOLDER / "policies").iterdir())
    assert listed == on_disk
    assert [i["name"] for i in k["images"]] == [container()["image"]]


def test_the_policies_are_the_runbook_and_load() -> None:
    """deploy/kubernetes/policies/runbook.yaml is policies/runbook.yaml, and coalmine loads it."""
    copy = FOLDER / "policies" / "runbook.yaml"
    assert copy.read_bytes() == (ROOT / "policies" / "runbook.yaml").read_bytes(), (
        "copy policies/runbook.yaml to deploy/kubernetes/policies/ again"
    )
    assert load_policies([FOLDER / "policies"])


def test_deployment_runs_one_locked_down_writer() -> None:
    """One replica, Recreate, non-root as the image's user, read-only root, no privileges."""
    deployment = the("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    uid, gid = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    assert pod["securityContext"]["fsGroup"] == int(gid), "the state volume must be writable"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    c = container()
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys(), kind
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["COALMINE_LISTEN"] == f"0.0.0.0:{port['http-metrics']}"


def test_volumes_hold_state_policies_and_tmp_where_the_settings_say() -> None:
    """The PVC at the state database's folder, the policies ConfigMap at COALMINE_POLICIES, /tmp."""
    pod = the("Deployment")["spec"]["template"]["spec"]
    c = container()
    settings = load_settings({e["name"]: e["value"] for e in c["env"] if "value" in e})
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    state = str(PurePosixPath(settings.state_path).parent)
    assert (
        mounts[state]["persistentVolumeClaim"]["claimName"]
        == the("PersistentVolumeClaim")["metadata"]["name"]
    )
    assert "configMap" in mounts[str(settings.policies)]
    assert "emptyDir" in mounts["/tmp"]
    read_only = {m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly")}
    assert str(settings.policies) in read_only and state not in read_only
    claim = the("PersistentVolumeClaim")["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"]


def test_deployment_env_matches_the_configuration_reference() -> None:
    """Every variable is documented; every secret comes from a secretKeyRef, none has a value."""
    variables = documented()
    env = {e["name"]: e for e in container()["env"]}
    assert env.keys() <= variables.keys(), f"undocumented: {env.keys() - variables.keys()}"
    secrets = {name for name, secret in variables.items() if secret}
    assert secrets, "docs/configuration.md marks no secret"
    for name in secrets:
        assert name in env, f"{name} is not passed to the pod"
        assert "value" not in env[name], f"{name} has a value committed"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {
            "name": "coalmine",
            "key": name,
            **({"optional": True} if "optional" in ref else {}),
        }
    required = {"COALMINE_CLOUDFLARE_ACCOUNT_ID", "COALMINE_CLOUDFLARE_API_TOKEN"}
    for name in required:
        assert not env[name]["valueFrom"]["secretKeyRef"].get("optional"), f"{name} is required"
    assert not any(d["kind"] == "Secret" for docs in manifests().values() for d in docs)


def test_service_and_servicemonitor_reach_the_pods() -> None:
    """The Service selects the pods on port 9300 `http-metrics`; the ServiceMonitor scrapes it."""
    service = the("Service")
    pod_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["name"] == "http-metrics" and port["port"] == 9300
    assert port["targetPort"] in {p["name"] for p in container()["ports"]}
    monitor = the("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert spec.keys() <= SERVICEMONITOR_SPEC, spec.keys() - SERVICEMONITOR_SPEC
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["endpoints"], "a ServiceMonitor needs an endpoint"
    for endpoint in spec["endpoints"]:
        assert endpoint.keys() <= SERVICEMONITOR_ENDPOINT, endpoint.keys() - SERVICEMONITOR_ENDPOINT
        assert endpoint["port"] == port["name"]
        assert endpoint.get("path", "/metrics") == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert DURATION.match(endpoint.get(key, "0")), f"{key}: {endpoint.get(key)!r}"


def test_the_fd_limit_is_documented_for_kubernetes() -> None:
    """Pods have no fd-limit field: the manifest and docs/deploy.md say what applies instead."""
    manifest = (FOLDER / "deployment.yaml").read_text()
    assert "File descriptors" in manifest and "ulimit -n" in manifest
    kubernetes = (ROOT / "docs" / "deploy.md").read_text().split("## Kubernetes", 1)[1]
    assert "ulimit -n" in kubernetes.split("\n## ", 1)[0]
