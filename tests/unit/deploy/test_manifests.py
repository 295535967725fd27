"""deploy/kubernetes and deploy/overlays: schema validation (raw files and what `kubectl
kustomize` renders) and the facts the agent and controller depend on (capabilities, seccomp,
mounts, probes, flags, config, scheduling, images)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import msgspec
import pytest
import yaml

from tapio.agent.cli import build_parser as agent_parser
from tapio.agent.settings import MetricsServerSettings, parse_settings
from tapio.controller.cli import build_parser as controller_parser
from tapio.controller.cli import parse_address
from tapio.profile import compile_profile, load_profile

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "deploy" / "kubernetes"
PRODUCTION = ROOT / "deploy" / "overlays" / "production"
SECCOMP = ROOT / "deploy" / "seccomp"
# The oldest Kubernetes release we promise (CAP_BPF/PERFMON-era nodes, `labels` in kustomize)
# and the newest schema bundled with kubernetes-validate.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
ALLOWED_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}

Obj = dict[str, Any]
# Kinds without a namespace (kustomize's `namespace:` leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
}


def load_yaml_documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(path: Path) -> list[Obj]:
    """`kubectl kustomize <path>`: the renderer `kubectl apply -k` uses (kubectl is on every
    machine of this project; a missing one is a failure, not a skip)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: the manifest tests render with `kubectl kustomize`")
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def validate(obj: Obj, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        first = str(exc).split("\n", 1)[0]
        pytest.fail(f"{where} is invalid for Kubernetes {version}: {first}")


def manifest_files() -> list[Path]:
    return sorted(
        p for p in BASE.glob("*.yaml") if p.name not in {"kustomization.yaml", "profile.yaml"}
    )


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return render(BASE)


@pytest.fixture(scope="module")
def production() -> list[Obj]:
    return render(PRODUCTION)


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def container(obj: Obj) -> Obj:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Obj = containers[0]
    return c


# ---- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_file_validates(path: Path, version: str) -> None:
    docs = load_yaml_documents(path)
    assert docs
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_kustomization_validates(rendered: list[Obj], version: str) -> None:
    for obj in rendered:
        validate(obj, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_production_overlay_validates(production: list[Obj], version: str) -> None:
    for obj in production:
        validate(obj, version)


def test_the_validator_rejects_an_unknown_field() -> None:
    svc = load_yaml_documents(BASE / "controller-service.yaml")[0]
    svc["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, "1.30", strict=True)


def test_every_manifest_file_is_a_resource_of_the_kustomization() -> None:
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in manifest_files())


def test_the_kustomization_installs_both_components(rendered: list[Obj]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0]) for o in rendered)
    names: dict[str, set[str]] = {o["kind"]: set() for o in rendered}
    for o in rendered:
        names[o["kind"]].add(o["metadata"]["name"])
    assert names["Namespace"] == {"tapio-system"}
    assert names["DaemonSet"] == {"tapio-agent"}
    assert names["Deployment"] == {"tapio-controller"}
    assert names["Service"] == {"tapio-controller"}
    assert len(names["ConfigMap"]) == 2, kinds
    for o in rendered:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == "tapio-system", o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tapio"


def test_config_map_references_resolve(rendered: list[Obj]) -> None:
    config_maps = {o["metadata"]["name"] for o in rendered if o["kind"] == "ConfigMap"}
    for o in rendered:
        if o["kind"] in {"DaemonSet", "Deployment"}:
            for vol in o["spec"]["template"]["spec"].get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in config_maps


def test_images_are_pinned(rendered: list[Obj]) -> None:
    for o in rendered:
        if o["kind"] in {"DaemonSet", "Deployment"}:
            image = container(o)["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", image


# ---- agent ------------------------------------------------------------------------------------


def agent_config(rendered: list[Obj]) -> dict[str, Any]:
    cm = one(rendered, "ConfigMap", "tapio-agent-config")
    return tomllib.loads(cm["data"]["tapio.toml"])


def test_agent_least_privilege(rendered: list[Obj]) -> None:
    ds = one(rendered, "DaemonSet", "tapio-agent")
    pod = ds["spec"]["template"]["spec"]
    sc = container(ds)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = set(sc["capabilities"]["add"])
    assert {"BPF", "PERFMON"} <= added <= ALLOWED_CAPS
    assert pod["hostPID"] is True  # attribution reads /proc/<host pid>/cgroup
    assert pod.get("hostNetwork", False) is False
    assert pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"]


def test_agent_capabilities_are_each_justified(rendered: list[Obj]) -> None:
    """Every added capability is preceded by a comment block starting ``# <CAP>:``."""
    added = container(one(rendered, "DaemonSet", "tapio-agent"))["securityContext"]["capabilities"][
        "add"
    ]
    text = [line.strip() for line in (BASE / "agent-daemonset.yaml").read_text().splitlines()]
    for cap in added:
        i = text.index(f"- {cap}")
        block = []
        while text[i - 1].startswith("#"):
            i -= 1
            block.append(text[i])
        assert block and block[-1].startswith(f"# {cap}:"), f"{cap} has no justification"


def test_agent_host_mounts(rendered: list[Obj]) -> None:
    ds = one(rendered, "DaemonSet", "tapio-agent")
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(ds)["volumeMounts"]}
    for path in ("/sys/kernel/btf", "/sys/kernel/tracing"):
        m = mounts[path]
        assert m.get("readOnly") is True, path
        assert volumes[m["name"]]["hostPath"]["path"] == path
    # The host's cgroupfs beside the container's own view, and the agent told where it is.
    cg = mounts["/host/sys/fs/cgroup"]
    assert cg.get("readOnly") is True
    assert volumes[cg["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    env = {e["name"]: e.get("value") for e in container(ds)["env"]}
    assert env["TAPIO_CGROUP_ROOT"] == cg["mountPath"]
    assert "/sys/fs/cgroup" not in mounts
    data = mounts["/var/lib/tapio"]
    assert not data.get("readOnly", False)
    assert volumes[data["name"]]["hostPath"]["path"] == "/var/lib/tapio"


def test_agent_flags_parse_and_point_at_the_controller_service(rendered: list[Obj]) -> None:
    ds = one(rendered, "DaemonSet", "tapio-agent")
    c = container(ds)
    assert c["command"][-3:] == ["-m", "tapio", "agent"]
    args = agent_parser().parse_args(c["args"])
    assert args.sink == ["controller", "file"]
    svc = one(rendered, "Service", "tapio-controller")
    port = svc["spec"]["ports"][0]["port"]
    ns = svc["metadata"]["namespace"]
    assert args.controller_endpoint == f"http://{svc['metadata']['name']}.{ns}.svc:{port}"
    assert args.data_dir.startswith("/var/lib/tapio/")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(args.config).parent) in mounts


def test_agent_node_name_from_the_downward_api(rendered: list[Obj]) -> None:
    env = {e["name"]: e for e in container(one(rendered, "DaemonSet", "tapio-agent"))["env"]}
    assert env["TAPIO_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_agent_config_enables_the_probed_metrics_server(rendered: list[Obj]) -> None:
    doc = agent_config(rendered)
    parse_settings(doc)  # the agent accepts it
    ms = msgspec.convert(doc["metrics"], MetricsServerSettings)
    assert ms.enabled and ms.bind_address == "0.0.0.0"
    c = container(one(rendered, "DaemonSet", "tapio-agent"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == ms.port
    assert ports[c["readinessProbe"]["httpGet"]["port"]] == ms.port
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_agent_resources_and_shutdown_grace(rendered: list[Obj]) -> None:
    ds = one(rendered, "DaemonSet", "tapio-agent")
    res = container(ds)["resources"]
    assert res["requests"]["memory"] and res["limits"]["memory"]
    doc = agent_config(rendered)
    grace = parse_settings(doc).agent.shutdown_grace_secs
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


# ---- controller -------------------------------------------------------------------------------


def test_controller_runs_unprivileged(rendered: list[Obj]) -> None:
    dep = one(rendered, "Deployment", "tapio-controller")
    pod = dep["spec"]["template"]["spec"]
    sc = container(dep)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_controller_flags_probes_and_service(rendered: list[Obj]) -> None:
    dep = one(rendered, "Deployment", "tapio-controller")
    c = container(dep)
    args = controller_parser().parse_args(c["args"])
    host, port = parse_address(args.listen)
    assert host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    svc = one(rendered, "Service", "tapio-controller")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_controller_profile_config_map_compiles(rendered: list[Obj]) -> None:
    dep = one(rendered, "Deployment", "tapio-controller")
    args = controller_parser().parse_args(container(dep)["args"])
    mount = next(m for m in container(dep)["volumeMounts"] if m["name"] == "profile")
    assert "subPath" not in mount  # a subPath mount would never see ConfigMap updates
    assert Path(args.profile).parent == Path(mount["mountPath"])
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "profile")
    cm = one(rendered, "ConfigMap", vol["configMap"]["name"])
    assert cm["metadata"]["name"] == "tapio-profile"  # stable name: live reload, no restart
    text = cm["data"][Path(args.profile).name]
    compile_profile(load_profile(text=text))


# ---- scheduling, seccomp, images, overlays -------------------------------------------------------


def test_agent_is_node_critical_and_both_run_on_linux_nodes(rendered: list[Obj]) -> None:
    agent = one(rendered, "DaemonSet", "tapio-agent")["spec"]["template"]["spec"]
    assert agent["priorityClassName"] == "system-node-critical"
    controller = one(rendered, "Deployment", "tapio-controller")["spec"]["template"]["spec"]
    for pod in (agent, controller):
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_agent_runs_under_the_shipped_seccomp_profile(rendered: list[Obj]) -> None:
    """Not Unconfined, not privileged: the Localhost profile deploy/seccomp ships."""
    ds = one(rendered, "DaemonSet", "tapio-agent")
    pod = ds["spec"]["template"]["spec"]
    sc = container(ds)["securityContext"]
    assert sc["seccompProfile"]["type"] == "Localhost"
    shipped = Path(sc["seccompProfile"]["localhostProfile"])
    assert shipped.parts[0] == "profiles"
    assert (SECCOMP / shipped.name).is_file(), shipped
    assert "seccompProfile" not in pod.get("securityContext", {})  # no pod-wide override
    for obj in rendered:
        if obj["kind"] in {"DaemonSet", "Deployment"}:
            spec = obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                assert c["securityContext"].get("privileged", False) is False
            assert spec.get("securityContext", {}).get("seccompProfile", {}).get("type") not in {
                "Unconfined"
            }


def test_image_names_and_tags_are_set_in_one_place(rendered: list[Obj]) -> None:
    """The manifests name untagged images; the kustomization's `images:` sets every name and
    tag, so an overlay (or `kustomize edit set image`) changes them in one place."""
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in k["images"]}
    raw = [
        c["image"]
        for path in manifest_files()
        for doc in load_yaml_documents(path)
        if doc["kind"] in {"DaemonSet", "Deployment"}
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert sorted(raw) == sorted(images), raw
    for name in raw:
        assert ":" not in name and "@" not in name, f"{name}: tag it in kustomization.yaml"
        assert images[name].get("newName") and images[name].get("newTag")
    got = sorted(
        container(o)["image"] for o in rendered if o["kind"] in {"DaemonSet", "Deployment"}
    )
    assert got == sorted(f"{i['newName']}:{i['newTag']}" for i in images.values())


def test_production_overlay_changes_images_and_sizing_only(
    rendered: list[Obj], production: list[Obj]
) -> None:
    k = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())
    overlay_images = {i["name"]: i for i in k["images"]}
    assert set(overlay_images) == {"tapio/agent", "tapio/controller"}
    base = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    prod = {(o["kind"], o["metadata"]["name"]): o for o in production}
    assert base.keys() == prod.keys()
    for kind, name in (("DaemonSet", "tapio-agent"), ("Deployment", "tapio-controller")):
        want = overlay_images[f"tapio/{name.removeprefix('tapio-')}"]
        image = container(prod[(kind, name)])["image"]
        assert image == f"{want['newName']}:{want['newTag']}"
        assert image != container(base[(kind, name)])["image"]
    ds_base, ds_prod = base[("DaemonSet", "tapio-agent")], prod[("DaemonSet", "tapio-agent")]
    assert container(ds_prod)["resources"]["limits"]["memory"] == "384Mi"
    assert ds_prod["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    # What makes the agent work is the base's, untouched by the overlay.
    for key in ("securityContext", "volumeMounts", "args", "env", "livenessProbe"):
        assert container(ds_prod)[key] == container(ds_base)[key], key
    for key in ("priorityClassName", "nodeSelector", "hostPID", "volumes", "tolerations"):
        assert ds_prod["spec"]["template"]["spec"][key] == ds_base["spec"]["template"]["spec"][key]
    for key, obj in base.items():
        if key[0] not in {"DaemonSet", "Deployment"}:
            assert prod[key] == obj, key


# ---- what the tests rely on from kustomize -------------------------------------------------------


def test_kustomize_hashes_config_maps_and_rewrites_references(tmp_path: Path) -> None:
    """A changed agent config renames its ConfigMap, and the pod spec follows: that is what
    rolls the DaemonSet on a config change."""
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: img}]\n"
        "  volumes: [{name: v, configMap: {name: cfg}}]\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [pod.yaml]\nnamespace: ns\nconfigMapGenerator:\n- name: cfg\n  files: [a.txt]\n"
        "images:\n- name: img\n  newName: reg/img\n  newTag: '1.2'\n"
    )
    cm, pod = sorted(render(tmp_path), key=lambda o: str(o["kind"]))
    assert cm["metadata"]["name"].startswith("cfg-") and len(cm["metadata"]["name"]) == 14
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert pod["spec"]["containers"][0]["image"] == "reg/img:1.2"
    assert pod["metadata"]["namespace"] == "ns"
    (tmp_path / "a.txt").write_text("x = 2\n")
    cm2, pod2 = sorted(render(tmp_path), key=lambda o: str(o["kind"]))
    assert cm2["metadata"]["name"] != cm["metadata"]["name"]
    assert pod2["spec"]["volumes"][0]["configMap"]["name"] == cm2["metadata"]["name"]
