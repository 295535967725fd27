"""What a cgroup path says about its container: id, runtime and pod UID (see the package)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX64 = r"[0-9a-f]{64}"
_CONTAINER_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_HEX64})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
)
_BARE_ID = re.compile(rf"^({_HEX64})$")
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
_POD_SYSTEMD = re.compile(
    r"^kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod"
    r"([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice$"
)
_UNIT = re.compile(r"^([A-Za-z0-9:_.@\\-]+)\.(service|scope)$")


@dataclass(frozen=True, slots=True)
class Attribution:
    container_id: str | None
    runtime: str | None
    pod_uid: str | None

    def facts(self) -> dict[str, object]:
        """The occurrence facts this attribution adds (nothing for what is unknown)."""
        out: dict[str, object] = {}
        if self.container_id is not None:
            out["container_id"] = self.container_id
            out["container_runtime"] = self.runtime
        if self.pod_uid is not None:
            out["pod_uid"] = self.pod_uid
        return out


NO_ATTRIBUTION = Attribution(None, None, None)


def parse_container(path: str) -> Attribution:
    """Container id, runtime and pod UID from a cgroup path (relative to its hierarchy root)."""
    parts = [p for p in path.split("/") if p]
    pod_uid: str | None = None
    in_kubepods = False
    for p in parts:
        if p == "kubepods" or p.startswith("kubepods.") or p.startswith("kubepods-"):
            in_kubepods = True
        m = _POD_CGROUPFS.match(p)
        if m:
            pod_uid = m.group(1)
            continue
        m = _POD_SYSTEMD.match(p)
        if m:
            pod_uid = m.group(1).replace("_", "-")
    # The deepest component that names a container wins.
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i]
        for pattern, runtime in _CONTAINER_PATTERNS:
            m = pattern.match(p)
            if m:
                return Attribution(m.group(1), runtime, pod_uid)
        m = _BARE_ID.match(p)
        if m:
            if i > 0 and parts[i - 1] == "docker":
                return Attribution(m.group(1), "docker", pod_uid)
            if in_kubepods:
                return Attribution(m.group(1), "containerd", pod_uid)
    for i in range(len(parts) - 1, -1, -1):
        if _UNIT.match(parts[i]):
            return Attribution(parts[i], "systemd", pod_uid)
    return Attribution(None, None, pod_uid)
