"""deploy/seccomp/tapio-agent.json: the runtime's default seccomp profile plus exactly the system
calls the agent needs on top of it.

The containers-common default profile (CRI-O's RuntimeDefault, podman's default) allows
``bpf(2)`` and ``perf_event_open(2)`` only to containers holding CAP_SYS_ADMIN, so an agent
holding just CAP_BPF and CAP_PERFMON gets EPERM on its first map creation. The shipped
profile is the containers-common default with those two calls allowed when the container holds
the capability the kernel itself checks for them (CAP_BPF, CAP_PERFMON), and nothing else
changed. Regenerate it after a containers-common update with
``python tests/unit/deploy/test_seccomp.py > deploy/seccomp/tapio-agent.json``;
scripts/image-test.sh runs the agent under it in podman and containerd.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROFILE = ROOT / "deploy" / "seccomp" / "tapio-agent.json"
DEFAULT = Path("/usr/share/containers/seccomp.json")  # containers-common (podman, CRI-O)
# The calls the agent adds to the default, each with the capability the kernel requires for it.
ADDED = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}

Profile = dict[str, Any]


def derive(default: Profile) -> Profile:
    """The default profile with ADDED allowed under their capability instead of CAP_SYS_ADMIN."""
    out = copy.deepcopy(default)
    rules = []
    for rule in out["syscalls"]:
        names = [n for n in rule["names"] if n not in ADDED]
        if names:
            rules.append({**rule, "names": names})
    for name, cap in ADDED.items():
        rules.append(
            {"names": [name], "action": "SCMP_ACT_ALLOW", "args": [], "includes": {"caps": [cap]}}
        )
    out["syscalls"] = rules
    return out


def allowed(profile: Profile, name: str, caps: set[str]) -> bool:
    """What a runtime decides for `name` in a container with `caps` (no argument filters)."""
    verdict = profile["defaultAction"] == "SCMP_ACT_ALLOW"
    for rule in profile["syscalls"]:
        if name not in rule["names"] or rule.get("args"):
            continue
        inc = set(rule.get("includes", {}).get("caps", []))
        exc = set(rule.get("excludes", {}).get("caps", []))
        if (inc and not inc <= caps) or (exc and exc & caps):
            continue
        verdict = rule["action"] == "SCMP_ACT_ALLOW"
    return verdict


@pytest.fixture(scope="module")
def profile() -> Profile:
    data: Profile = json.loads(PROFILE.read_text())
    return data


AGENT_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE"}


def test_the_agent_gets_bpf_and_perf_event_open(profile: Profile) -> None:
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert allowed(profile, "bpf", AGENT_CAPS)
    assert allowed(profile, "perf_event_open", AGENT_CAPS)
    # ... only with the capability the kernel wants for them anyway
    assert not allowed(profile, "bpf", AGENT_CAPS - {"CAP_BPF"})
    assert not allowed(profile, "perf_event_open", AGENT_CAPS - {"CAP_PERFMON"})


def test_nothing_else_is_opened(profile: Profile) -> None:
    """Every other call gets the default's verdict, for the agent's capabilities and others."""
    if not DEFAULT.is_file():
        pytest.fail(f"{DEFAULT} missing: install podman (scripts/setup.sh --test)")
    default: Profile = json.loads(DEFAULT.read_text())
    names = {n for p in (default, profile) for rule in p["syscalls"] for n in rule["names"]}
    assert len(names) > 300
    for caps in (AGENT_CAPS, set(), {"CAP_SYS_ADMIN"}, {"CAP_BPF"}):
        for name in sorted(names - set(ADDED)):
            assert allowed(profile, name, caps) == allowed(default, name, caps), (name, caps)
    assert not allowed(profile, "kexec_load", AGENT_CAPS)


def test_the_profile_is_the_default_plus_the_agents_calls(profile: Profile) -> None:
    """Byte for byte what derive() makes of the installed containers-common profile (podman is
    installed by scripts/setup.sh --test, so under CI the file is there)."""
    if not DEFAULT.is_file():
        pytest.fail(f"{DEFAULT} missing: install podman (scripts/setup.sh --test)")
    default = json.loads(DEFAULT.read_text())
    assert not allowed(default, "bpf", AGENT_CAPS), "the default allows bpf() now: drop the profile"
    assert profile == derive(default)
    assert PROFILE.read_text() == render(derive(default))


def test_derive_only_touches_the_added_calls() -> None:
    default: Profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read", "bpf"], "action": "SCMP_ACT_ALLOW", "args": []},
            {
                "names": ["bpf", "perf_event_open"],
                "action": "SCMP_ACT_ERRNO",
                "args": [],
                "excludes": {"caps": ["CAP_SYS_ADMIN"]},
            },
        ],
    }
    out = derive(default)
    assert out["syscalls"][0]["names"] == ["read"]
    assert len(out["syscalls"]) == 3
    assert allowed(out, "read", set())
    assert not allowed(out, "bpf", set()) and allowed(out, "bpf", {"CAP_BPF"})


def render(profile: Profile) -> str:
    return json.dumps(profile, indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(derive(json.loads(DEFAULT.read_text()))))
    sys.stdout.flush()
    os._exit(0)
