"""Pods for kernel tests: a pod-shaped cgroup to run a client in, and the in-test Kubernetes
API server (``tests/unit/controller/k8s_apiserver.py``) on a thread of its own, so a controller
subprocess can list and watch the Pod that cgroup belongs to."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..unit.controller.k8s_apiserver import FakeApiServer

CLIENTS = str(Path(__file__).with_name("net_clients.py"))
#: The cgroup hierarchies a pod's container cgroup exists in (one directory on pure cgroup2).
ROLES = ("unified", "memory", "cpu")


def pod_cgroup_rel(pod_uid: str, container_id: str) -> str:
    """A kubelet-shaped (systemd driver, containerd) container cgroup below a test-owned top."""
    uid_ = pod_uid.replace("-", "_")
    return (
        f"tapio-test-{uuid.uuid4().hex[:8]}/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{uid_}.slice/cri-containerd-{container_id}.scope"
    )


def refuse_in_cgroup(dirs: dict[str, Path], port: int, count: int, comm: str) -> int:
    """``count`` refused connects to 127.0.0.1:``port`` from a process that first joins every
    directory in ``dirs``; returns its pid."""
    procs = " ".join(f"{d}/cgroup.procs" for d in {str(p) for p in dirs.values()})
    cmd = [sys.executable, CLIENTS, "refuse", comm, "127.0.0.1", str(port), str(count)]
    join = f'for f in {procs}; do echo $$ > "$f" || exit 9; done; exec "$@"'
    client = subprocess.Popen(["sh", "-c", join, "sh", *cmd], stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and out.split() == [str(count)], (client.returncode, out)
    return client.pid


@contextlib.contextmanager
def api_server(kubeconfig: Path) -> Iterator[FakeApiServer]:
    """The in-test API server on its own event loop thread; ``kubeconfig`` points at it. The
    yielded server's methods are called through :func:`call` (they touch its loop's queues)."""
    api = FakeApiServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        async with api.serve(kubeconfig):
            ready.set()
            await stop[0].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "in-test API server did not start"
        api.loop = loop  # type: ignore[attr-defined]
        yield api
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()


def call(api: FakeApiServer, fn: str, *args: object) -> None:
    """Run ``api.<fn>(*args)`` on the server's loop and wait for it."""

    async def run() -> None:
        getattr(api, fn)(*args)

    loop: asyncio.AbstractEventLoop = api.loop  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(run(), loop).result(10)
