"""Start-up checks that turn an obscure libbpf failure into a one-line reason.

Order matters: privileges first (nothing else works without them), then the kernel (version
for ring buffers, BTF for CO-RE), then tracefs, which the agent mounts itself when it can.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MIN_KERNEL = (5, 8)  # BPF ring buffers
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")


class PreflightError(RuntimeError):
    """A reason the agent cannot run on this host (one line, actionable)."""


def effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> None:
    caps = effective_caps()

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    who = "root without capabilities" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    raise PreflightError(
        f"tapio agent needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); running as {who}: "
        "run as root or grant the capabilities"
    )


def kernel_release() -> str:
    return os.uname().release


def parse_release(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        major = int(parts[0])
        minor = int("".join(ch for ch in parts[1] if ch.isdigit()) or 0) if len(parts) > 1 else 0
    except ValueError as exc:
        raise PreflightError(f"cannot parse kernel release {release!r}") from exc
    return major, minor


def check_kernel(release: str | None = None, btf: Path = BTF_PATH) -> None:
    release = release or kernel_release()
    if parse_release(release) < MIN_KERNEL:
        raise PreflightError(
            f"kernel {release} is too old: tapio needs Linux >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} "
            "(BPF ring buffers)"
        )
    if not btf.exists():
        raise PreflightError(
            f"kernel BTF is missing ({btf}): tapio's CO-RE objects need a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y"
        )


def _mount_tracefs(target: Path) -> int:
    # The interpreter's own libc symbols: nothing is searched for on disk at run time.
    libc = ctypes.CDLL(None, use_errno=True)
    rc = int(libc.mount(b"nodev", str(target).encode(), b"tracefs", 0, None))
    return 0 if rc == 0 else ctypes.get_errno()


def ensure_tracefs(target: Path = TRACEFS) -> Path:
    """Return a tracefs with an ``events`` directory, mounting one at ``target`` if needed."""
    if (target / "events").is_dir():
        return target
    if (DEBUGFS_TRACING / "events").is_dir():
        return DEBUGFS_TRACING
    if not target.is_dir():
        raise PreflightError(f"{target} does not exist: is this kernel built with tracefs?")
    err = _mount_tracefs(target)
    if err or not (target / "events").is_dir():
        raise PreflightError(
            f"tracefs is not mounted at {target} and mounting it failed "
            f"({os.strerror(err) if err else 'no events directory'}): "
            f"mount -t tracefs nodev {target}"
        )
    return target


def run_preflight() -> Path:
    check_privileges()
    check_kernel()
    return ensure_tracefs()
