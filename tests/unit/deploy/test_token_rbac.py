"""deploy/kubernetes: the agent token reaches both pods, and only the controller gets API access.

The controller authenticates agents with the ``tapio-agent-token`` Secret and watches Pods with
its ServiceAccount's token (``--kubernetes``); the agent presents the same Secret and never
calls the API server, so it mounts no ServiceAccount token and has no RBAC.
"""

from __future__ import annotations

from pathlib import Path

from tapio.agent.cli import build_parser as agent_parser
from tapio.controller.cli import build_parser as controller_parser

from .test_manifests import BASE, Obj, container, one, rendered

__all__ = ["rendered"]  # the module-scoped fixture, shared with the schema tests

SECRET = "tapio-agent-token"


def token_mount(obj: Obj) -> Path:
    """The directory the Secret is mounted at (a directory mount: rotations reach the file)."""
    pod = obj["spec"]["template"]["spec"]
    vols = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == SECRET]
    assert len(vols) == 1, f"{obj['metadata']['name']} does not mount {SECRET}"
    mounts = [m for m in container(obj)["volumeMounts"] if m["name"] == vols[0]["name"]]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True
    assert "subPath" not in mounts[0]  # a subPath mount never sees a Secret update
    assert not mounts[0]["mountPath"].startswith("/var/run/secrets/kubernetes.io")
    mode = vols[0]["secret"]["defaultMode"]
    assert mode & 0o007 == 0, "the token must not be world-readable"
    return Path(mounts[0]["mountPath"])


def test_controller_checks_the_agent_token_and_watches_pods(rendered: list[Obj]) -> None:
    dep = one(rendered, "Deployment", "tapio-controller")
    args = controller_parser().parse_args(container(dep)["args"])
    assert args.agent_token_file is not None
    assert Path(args.agent_token_file).parent == token_mount(dep)
    assert Path(args.agent_token_file).name == "token"
    assert args.kubernetes is True and args.kubeconfig is None
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True  # in-cluster config for the watch
    assert pod["serviceAccountName"] == "tapio-controller"
    # Not root, so the group-readable Secret file must belong to the pod's group.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_agent_presents_the_same_secret_and_mounts_no_api_token(rendered: list[Obj]) -> None:
    ds = one(rendered, "DaemonSet", "tapio-agent")
    args = agent_parser().parse_args(container(ds)["args"])
    assert args.controller_token_file is not None
    assert Path(args.controller_token_file).parent == token_mount(ds)
    secret = one(rendered, "Secret", SECRET)
    assert Path(args.controller_token_file).name in secret["stringData"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "tapio-agent"


def test_rbac_is_read_only_and_for_the_controller_only(rendered: list[Obj]) -> None:
    roles = [o for o in rendered if o["kind"] in ("ClusterRole", "Role")]
    assert [r["metadata"]["name"] for r in roles] == ["tapio-controller"]
    granted = {
        (g, res, tuple(rule["verbs"]))
        for rule in roles[0]["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
    }
    watch = ("get", "list", "watch")
    assert granted == {
        ("", "pods", watch),
        ("apps", "replicasets", watch),
        ("batch", "jobs", watch),
    }
    bindings = [o for o in rendered if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert len(bindings) == 1
    [subject] = bindings[0]["subjects"]
    assert (subject["kind"], subject["name"]) == ("ServiceAccount", "tapio-controller")
    assert (
        subject["namespace"]
        == one(rendered, "Deployment", "tapio-controller")["metadata"]["namespace"]
    )
    for sa in ("tapio-agent", "tapio-controller"):
        assert one(rendered, "ServiceAccount", sa)["automountServiceAccountToken"] is False


def test_the_deploy_text_describes_the_rbac_it_ships() -> None:
    text = (BASE / "serviceaccounts.yaml").read_text().lower()
    assert "no rbac and no mounted token" not in text and "so no rbac" not in text
    assert "controller-rbac.yaml" in text
