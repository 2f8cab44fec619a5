"""The example Kubernetes manifests in deploy/k8s (docs/deployment.md) parse and agree with the config.

The queue names are not copied into the test: the ConfigMap's gateway.yaml is loaded with the
gateway's own settings model and the expected scoring queues come from
:class:`gateway.bus.Topology`, so a route added to the config without its ScaledObject (or a
renamed prefix) fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.bus import Topology
from gateway.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ROLES = ("api", "sources", "relay", "scorer")

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def docs() -> Docs:
    out: Docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                out.append(doc)
    return out


@pytest.fixture
def settings(docs: Docs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "legacy-gateway-config"]
    config = tmp_path / "gateway.yaml"
    config.write_text(cm["data"]["gateway.yaml"])
    for var in ("POSTGRES_PASSWORD", "RABBITMQ_PASSWORD"):
        monkeypatch.setenv(var, "test-only")
    monkeypatch.setenv("GATEWAY_API_KEY_SECRET", "k" * 40)
    return load_settings(config)


def _kind(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _role(dep: dict[str, Any]) -> str:
    args = _container(dep)["args"]
    return args[2] if args[:2] == ["worker", "--role"] else args[0]


def _route_of(dep: dict[str, Any]) -> str | None:
    """The one --route of a scorer Deployment; None when it serves every route."""
    args = _container(dep)["args"]
    routes = [args[i + 1] for i, a in enumerate(args) if a == "--route"]
    assert len(routes) <= 1, f"{dep['metadata']['name']}: one route per Deployment, so one queue per autoscaler"
    return routes[0] if routes else None


def scaling_problems(docs: Docs, topology: Topology) -> list[str]:
    """What is wrong with the KEDA scaling of the scorers against ``topology`` (empty: nothing)."""
    problems: list[str] = []
    deployments = _kind(docs, "Deployment")
    auths = _kind(docs, "TriggerAuthentication")
    expected = {("default" if route is None else route): queue for route, queue in topology.scoring_queues()}
    scaled: dict[str, str] = {}
    for name, so in _kind(docs, "ScaledObject").items():
        if so["apiVersion"] != "keda.sh/v1alpha1":
            problems.append(f"{name}: apiVersion {so['apiVersion']}")
        target = so["spec"]["scaleTargetRef"]["name"]
        dep = deployments.get(target)
        if dep is None or _role(dep) != "scorer":
            problems.append(f"{name}: scales {target}, which is no scorer Deployment")
            continue
        route = _route_of(dep)
        if route is None:
            problems.append(f"{name}: {target} serves every route; give it one --route")
            continue
        triggers = so["spec"]["triggers"]
        if [t["type"] for t in triggers] != ["rabbitmq"]:
            problems.append(f"{name}: expected one rabbitmq trigger, got {[t['type'] for t in triggers]}")
            continue
        meta = triggers[0]["metadata"]
        if meta.get("queueName") != expected.get(route):
            problems.append(f"{name}: scales route {route!r} on {meta.get('queueName')!r}, its queue is {expected.get(route)!r}")
        if meta.get("mode") != "QueueLength" or int(meta.get("value", 0)) <= 0:
            problems.append(f"{name}: expected mode QueueLength with a positive value, got {meta}")
        if "host" in meta or "hostFromEnv" in meta:
            problems.append(f"{name}: the broker URL belongs in the TriggerAuthentication's Secret")
        if triggers[0].get("authenticationRef", {}).get("name") not in auths:
            problems.append(f"{name}: authenticationRef names no TriggerAuthentication")
        if so["spec"].get("minReplicaCount", 0) < 1:
            problems.append(f"{name}: minReplicaCount < 1 (the scorer's model warms up per process)")
        if route in scaled:
            problems.append(f"{name}: route {route!r} already scaled by {scaled[route]}")
        scaled[route] = name
    missing = sorted(set(expected) - set(scaled))
    if missing:
        problems.append(f"routes without a ScaledObject: {[expected[r] for r in missing]}")
    return problems


# ------------------------------------------------------------------------------- structure
def test_every_manifest_parses_and_kustomization_lists_them(docs: Docs) -> None:
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d["__file__"]
        assert d["kind"] == "Kustomization" or d["metadata"].get("name"), d["__file__"]
    (kust,) = [d for d in docs if d["kind"] == "Kustomization"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created with kubectl, never committed"


def test_the_configmap_is_a_valid_gateway_config(settings: Settings) -> None:
    assert settings.profile == "prod"
    assert settings.store.auto_migrate is False, "the migrate Job migrates; roles must not race Alembic"
    assert settings.bus.url is not None
    assert settings.resilience.metrics_port


def test_one_deployment_per_role_with_matching_selectors(docs: Docs) -> None:
    deployments = _kind(docs, "Deployment")
    roles = {_role(d) for d in deployments.values()}
    assert roles == set(ROLES)
    for name, dep in deployments.items():
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        c = _container(dep)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert ":" in c["image"] and not c["image"].endswith(":latest"), name
        assert {"secretRef": {"name": "legacy-gateway"}} in c["envFrom"], name
        assert {"name": "config", "mountPath": "/etc/gateway", "readOnly": True} in c["volumeMounts"], name
        assert {"name": "GATEWAY_CONFIG", "value": "/etc/gateway/gateway.yaml"} in c["env"], name
        for env in c["env"]:
            assert "value" not in env or "PASSWORD" not in env["name"].upper(), f"{name}: literal {env['name']}"
    (job,) = _kind(docs, "Job").values()
    assert _container({"spec": job["spec"]})["args"] == ["db", "upgrade"]


def test_api_probes_and_service(docs: Docs, settings: Settings) -> None:
    (api,) = [d for d in _kind(docs, "Deployment").values() if _role(d) == "api"]
    c = _container(api)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == settings.api.port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    services = _kind(docs, "Service")
    (svc,) = [s for s in services.values() if s["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]


def test_worker_probes_ask_their_metrics_port(docs: Docs, settings: Settings) -> None:
    for name, dep in _kind(docs, "Deployment").items():
        if _role(dep) == "api":
            continue
        c = _container(dep)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == settings.resilience.metrics_port, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}, name


# ------------------------------------------------------------------------------- autoscaling
def test_scorers_scale_on_their_route_queue_depth(docs: Docs, settings: Settings) -> None:
    topology = Topology.from_settings(settings.bus, settings.scoring)
    queues = [q for _r, q in topology.scoring_queues()]
    prefix = settings.bus.prefix
    assert f"{prefix}.scoring" in queues and len(queues) >= 2, "the example should show a route queue too"
    assert scaling_problems(docs, topology) == []


@pytest.mark.parametrize("breakage", ["wrong-queue", "missing-route", "unrouted-target"])
def test_the_scaling_check_catches_mistakes(docs: Docs, settings: Settings, breakage: str) -> None:
    broken = copy.deepcopy(docs)
    objects = [d for d in broken if d["kind"] == "ScaledObject"]
    if breakage == "wrong-queue":
        objects[0]["spec"]["triggers"][0]["metadata"]["queueName"] = "gateway.scorng"
    elif breakage == "missing-route":
        broken.remove(objects[-1])
    else:
        target = objects[0]["spec"]["scaleTargetRef"]["name"]
        dep = next(d for d in broken if d["kind"] == "Deployment" and d["metadata"]["name"] == target)
        _container(dep)["args"] = ["worker", "--role", "scorer"]
    assert scaling_problems(broken, Topology.from_settings(settings.bus, settings.scoring))
