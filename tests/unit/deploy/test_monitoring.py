"""The optional monitoring component (deploy/components/monitoring), rendered with
``kubectl kustomize`` through deploy/overlays/monitoring: its PodMonitor and ServiceMonitor select
the pods and Service the base installs, on the ports that serve /metrics, and its NetworkPolicy
opens exactly the controller's port; the base alone installs none of it."""

from __future__ import annotations

from typing import Any

import pytest

from tapio.agent.settings import DEFAULT_METRICS_PORT, parse_settings

from .test_manifests import K8S_VERSIONS, ROOT, agent_config, container, one, render, validate

MONITORING = ROOT / "deploy" / "overlays" / "monitoring"
CRD_GROUP = "monitoring.coreos.com/v1"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def monitoring() -> list[Obj]:
    return render(MONITORING)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_everything_but_the_operator_kinds_validates(monitoring: list[Obj], version: str) -> None:
    kinds = {o["kind"] for o in monitoring if o["apiVersion"] == CRD_GROUP}
    assert kinds == {"PodMonitor", "ServiceMonitor"}
    for obj in monitoring:
        if obj["apiVersion"] != CRD_GROUP:  # CRDs: no schema bundled, checked field by field below
            validate(obj, version)


def test_pod_monitor_scrapes_every_agent_on_its_metrics_port(monitoring: list[Obj]) -> None:
    ds = one(monitoring, "DaemonSet", "tapio-agent")
    pm = one(monitoring, "PodMonitor", "tapio-agent")
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    spec = pm["spec"]
    assert set(spec) == {"selector", "podMetricsEndpoints"}
    assert _selects(spec["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"])
    (ep,) = spec["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container(ds)["ports"]}
    ms = parse_settings(agent_config(monitoring)).metrics
    assert ports[ep["port"]] == ms.port == DEFAULT_METRICS_PORT != 9090
    assert ep["path"] == "/metrics"
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ms.port)


def test_service_monitor_scrapes_the_controller_service(monitoring: list[Obj]) -> None:
    svc = one(monitoring, "Service", "tapio-controller")
    sm = one(monitoring, "ServiceMonitor", "tapio-controller")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"


def test_network_policy_opens_only_the_controller_port(monitoring: list[Obj]) -> None:
    dep = one(monitoring, "Deployment", "tapio-controller")
    np = one(monitoring, "NetworkPolicy", "tapio-controller-metrics")
    assert _selects(
        np["spec"]["podSelector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]
    )
    ports = {p["containerPort"] for p in container(dep)["ports"]}
    (rule,) = np["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == sorted(ports)
    assert all("namespaceSelector" in peer for peer in rule["from"])


def test_the_base_installs_no_monitor() -> None:
    kinds = {o["kind"] for o in render(ROOT / "deploy" / "kubernetes")}
    assert not kinds & {"PodMonitor", "ServiceMonitor"}
