"""Agent controller mode: hello/backoff, config poll (ETag, rejection), heartbeats, re-hello.

The controller side is real: the ``tapio.controller`` aiohttp app on 127.0.0.1, or a recording
aiohttp server for scripted failures. The agent side is a small stand-in exposing what
``ControllerSession`` reads from ``tapio.agent.runtime.Agent`` (observers, ``apply_config``);
its sinks are real in-memory sinks.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web

from tapio import wire
from tapio.agent import controller_mode
from tapio.agent.controller_client import identity_from_env
from tapio.agent.controller_mode import ControllerSession, verify_hash
from tapio.agent.kconfig import from_compiled
from tapio.bpf.abi import (
    EXIT_SCOPE_CONTAINERS,
    FLAG_CONTAINER,
    FLAG_NETWORK,
    FLAG_NODE,
    FLAG_STORAGE,
    TapioConfig,
)
from tapio.controller import Controller
from tapio.metrics import REGISTRY
from tapio.observers.base import Capability, UserThresholds
from tapio.profile.compiled import (
    PRODUCTION_DEFAULT_HASH,
    NodeConfig,
    config_hash,
    production_default,
)
from tapio.sinks.memory import MemorySink
from tapio.transport import make_link

from ...ports import closed_port

# ---- stand-ins for the agent ------------------------------------------------------------------


@dataclass
class FakeObj:
    path: Path
    maps: dict[str, object]


@dataclass
class FakeObserver:
    name: str
    degraded_reasons: list[str] = field(default_factory=list)
    caps: list[Capability] = field(default_factory=list)

    def capabilities(self) -> list[Capability]:
        return self.caps


@dataclass
class FakeRunning:
    observer: FakeObserver
    obj: FakeObj | None
    state: str = "running"
    error: str = ""

    @property
    def name(self) -> str:
        return self.observer.name


@dataclass
class FakeAgent:
    observers: list[FakeRunning]
    sinks: list[MemorySink] = field(default_factory=lambda: [MemorySink()])
    applied_calls: list[tuple[TapioConfig, UserThresholds | None]] = field(default_factory=list)
    fail_on_apply: list[str] = field(default_factory=list)

    def apply_config(self, cfg: TapioConfig, user: UserThresholds | None = None) -> list[str]:
        self.applied_calls.append((cfg, user))
        return list(self.fail_on_apply)


def fake_agent(tmp_path: Path, *names: str) -> FakeAgent:
    observers = []
    for i, name in enumerate(names or ("network",)):
        obj_path = tmp_path / f"{name}.bpf.o"
        obj_path.write_bytes(b"\x7fELF" + bytes(100 * (i + 1)))
        obj = FakeObj(obj_path, {f"m{j}": object() for j in range(i + 3)})
        observers.append(FakeRunning(FakeObserver(name), obj))
    return FakeAgent(observers)


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def fetches(result: str) -> float:
    return sample("tapio_config_fetch_total", result=result)


def send_failures(kind: str) -> float:
    return sample("tapio_controller_send_failures_total", kind=kind)


def session_for(url: str, ca_file: str | None = None, **kw: Any) -> ControllerSession:
    link = make_link(url, "node/unit", "unit", ca_file)
    opts: dict[str, Any] = {
        "poll_interval": 5.0,
        "heartbeat_interval": 5.0,
        "hello_base": 0.05,
        "hello_max": 0.2,
        "connect_timeout": 2.0,
        "timeout": 2.0,
        "kubernetes": False,
    }
    opts.update(kw)
    return ControllerSession(link, **opts)


@contextlib.asynccontextmanager
async def client_for(session: ControllerSession) -> AsyncIterator[Any]:
    from tapio.agent.controller_client import ControllerClient

    http = session.http_session()
    try:
        yield ControllerClient(session.link, http)
    finally:
        await http.close()


# ---- servers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1]
    try:
        if ssl_context is not None:
            yield f"https://localhost:{bound}"
        else:
            yield f"http://127.0.0.1:{bound}"
    finally:
        await runner.cleanup()


Handler = Callable[[web.Request, int], web.Response]


@dataclass
class Scripted:
    """A recording server: ``handler(request, n)`` answers the n-th request (1-based)."""

    handler: Handler
    requests: list[tuple[float, str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            (time.monotonic(), request.method, request.path_qs, dict(request.headers), body)
        )
        return self.handler(request, len(self.requests))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def json_response(
    msg: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=wire.encode(msg), content_type="application/json", headers=headers
    )


def hello_answer(accepted: bool = True, version: str = "1", max_batch: int = 100) -> Any:
    return wire.HelloResponse(
        wire_version=wire.WIRE_VERSION,
        accepted=accepted,
        controller_id="scripted",
        config_version=version,
        send_interval_ms=250,
        max_batch_events=max_batch,
    )


def config_body(**over: Any) -> dict[str, Any]:
    compiled = production_default()
    doc: dict[str, Any] = {
        "wire_version": wire.WIRE_VERSION,
        "version": "4",
        "config_hash": config_hash(compiled),
        "config": msgspec.to_builtins(compiled),
        "batching": {"send_interval_ms": 1000, "max_batch_events": 256},
    }
    doc.update(over)
    return doc


# ---- kconfig.from_compiled -----------------------------------------------------------------


def test_from_compiled_maps_every_field() -> None:
    c = production_default()
    c.network.retransmit_threshold = 9
    c.network.rtt_spike_ratio = 3
    c.storage.enabled = False
    c.container.ignore_exit_codes = [1, 2, 1, 3]
    c.container.ignore_signals = [9, 15]
    c.node_pmc.stall_warning_permille = 255
    c.node_pmc.ipc_degradation_milli = 1500
    c.node_pmc.enabled = False
    c.node = NodeConfig(memory_some_permille=123, runq_latency_ns=7_000_000, runq_sampling=True)
    kernel, user = from_compiled(c, 42, kubernetes=False)
    assert kernel.generation == 42 and kernel.abi_version == 4
    assert kernel.flags == FLAG_NETWORK | FLAG_CONTAINER | FLAG_NODE
    assert kernel.flags & FLAG_STORAGE == 0
    assert kernel.retransmit_threshold == 9 and kernel.rtt_spike_multiplier == 3
    assert kernel.slow_io_threshold_ns == 50_000_000
    assert kernel.io_latency_critical_ns == 200_000_000
    assert kernel.ignore_exit_codes == (1, 2, 3)
    assert kernel.ignore_signal_mask == (1 << 9) | (1 << 15)
    assert kernel.runq_latency_threshold_ns == 7_000_000
    assert kernel.exit_flags == 0
    assert user.stall_pct_warning == 25.5 and user.ipc_degradation == 1.5
    assert user.memory_some_pct == 12.3 and user.node_pmc_enabled is False
    assert user.runq_sampling is True and user.runq_latency_ms == 7
    assert len(kernel.pack()) == 256


@pytest.mark.parametrize(
    ("scope", "k8s", "flags"),
    [
        ("auto", False, 0),
        ("auto", True, EXIT_SCOPE_CONTAINERS),
        ("containers", False, EXIT_SCOPE_CONTAINERS),
        ("all", True, 0),
    ],
)
def test_from_compiled_resolves_exit_scope_like_standalone(
    scope: str, k8s: bool, flags: int
) -> None:
    c = production_default()
    c.container.exit_scope = scope
    kernel, user = from_compiled(c, 1, kubernetes=k8s)
    assert kernel.exit_flags == flags and user.exit_scope == scope


def test_node_disabled_clears_the_node_flag() -> None:
    c = production_default()
    c.node = NodeConfig(enabled=False)
    assert from_compiled(c, 1)[0].flags == FLAG_NETWORK | FLAG_STORAGE | FLAG_CONTAINER


# ---- identity, hash --------------------------------------------------------------------------


def test_identity_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPIO_NODE_NAME", "worker-7")
    monkeypatch.delenv("TAPIO_AGENT_ID", raising=False)
    assert identity_from_env().agent_id == "node/worker-7"
    monkeypatch.setenv("TAPIO_AGENT_ID", "custom/1")
    assert identity_from_env().agent_id == "custom/1"
    monkeypatch.delenv("TAPIO_NODE_NAME")
    assert identity_from_env().node_name == socket.gethostname()


def test_link_is_shared_between_sink_and_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPIO_NODE_NAME", "shared-node")
    endpoint = f"http://127.0.0.1:{closed_port()}/shared"
    args = argparse.Namespace(
        controller_endpoint=endpoint, config_poll_interval=5, heartbeat_interval=5
    )
    sink = controller_mode.make_controller_sink(args)
    assert sink.link is controller_mode.link_for(args)  # type: ignore[attr-defined]
    assert sink.link.node_name == "shared-node"  # type: ignore[attr-defined]
    assert callable(controller_mode.controller_service(args))


def test_production_default_hash_is_verified() -> None:
    from tapio.agent.controller_client import FetchedConfig

    resp = wire.decode(msgspec.json.encode(config_body()), wire.ConfigResponse)
    raw = msgspec.json.encode(config_body()["config"])
    assert resp.config_hash == PRODUCTION_DEFAULT_HASH
    assert verify_hash(FetchedConfig(resp, raw, None)) is None
    # Bytes of a newer controller (an unknown knob) verify by the served bytes.
    newer = raw[:-1] + b',"future":{"x":1}}'
    import hashlib

    resp2 = wire.decode(
        msgspec.json.encode(
            config_body(
                config=msgspec.json.decode(newer),
                config_hash="sha256:" + hashlib.sha256(newer).hexdigest(),
            )
        ),
        wire.ConfigResponse,
    )
    assert verify_hash(FetchedConfig(resp2, newer, None)) is None
    resp3 = wire.decode(
        msgspec.json.encode(config_body(config_hash="sha256:" + "0" * 64)), wire.ConfigResponse
    )
    assert "does not match" in (verify_hash(FetchedConfig(resp3, raw, None)) or "")


# ---- hello -----------------------------------------------------------------------------------


async def test_hello_backs_off_exponentially_with_jitter_until_accepted(tmp_path: Path) -> None:
    def handler(req: web.Request, n: int) -> web.Response:
        if n <= 3:
            return web.Response(status=503, text="starting")
        if n == 4:
            return json_response(hello_answer(accepted=False))
        return json_response(hello_answer(max_batch=77))

    script = Scripted(handler)
    agent = fake_agent(tmp_path, "network", "node")
    agent.observers[1].observer.caps = [Capability("pmu", False), Capability("psi", True)]
    before = send_failures("hello")
    async with serve(script.app()) as url:
        session = session_for(url, hello_base=0.1, hello_max=0.25)
        async with client_for(session) as client:
            with anyio.fail_after(5):
                await session._register(client, agent)  # type: ignore[arg-type]
    assert len(script.requests) == 5
    assert send_failures("hello") - before == 4
    times = [r[0] for r in script.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # equal jitter: retry k waits in [d/2, d], d = min(0.25, 0.1 * 2^k)
    assert 0.04 <= gaps[0] <= 0.2
    assert 0.09 <= gaps[1] <= 0.3
    assert 0.11 <= gaps[2] <= 0.35 and 0.11 <= gaps[3] <= 0.35  # capped
    assert session.link.registered and session.link.max_batch_events == 77
    assert session.link.send_interval_ms == 250
    body = wire.decode(script.requests[-1][4], wire.HelloRequest)
    body.validate()
    assert body.agent_id == "node/unit" and body.node_name == "unit"
    assert body.kernel_release == Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert body.arch and body.tapio_version
    assert "observer.network" in body.capabilities and "node.psi" in body.capabilities
    assert "node.pmu" not in body.capabilities
    assert body.object_sizes == {"network.bpf.o": 104, "node.bpf.o": 204}
    assert body.map_counts == {"network.bpf.o": 3, "node.bpf.o": 4}


# ---- config poll -----------------------------------------------------------------------------


async def test_poll_applies_then_304_then_a_reloaded_profile(tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\nbase: production-default\n"
    )
    ctl = Controller(profile_path=str(profile))
    agent = fake_agent(tmp_path)
    base = {r: fetches(r) for r in ("applied", "not_modified", "rejected", "error")}
    async with serve(ctl.build_app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            assert await session.poll_once(client, agent) == "applied"  # type: ignore[arg-type]
            assert session.etag == f'"{PRODUCTION_DEFAULT_HASH}"'
            assert await session.poll_once(client, agent) == "not_modified"  # type: ignore[arg-type]
            profile.write_text(
                profile.read_text()
                + "overrides:\n  network:\n    enabled: false\n    retransmit: {threshold: 11}\n"
            )
            await ctl.reload(force=False)
            assert await session.poll_once(client, agent) == "applied"  # type: ignore[arg-type]
            assert await session.poll_once(client, agent) == "not_modified"  # type: ignore[arg-type]
    assert len(agent.applied_calls) == 2
    first, second = agent.applied_calls[0][0], agent.applied_calls[1][0]
    assert (first.generation, first.flags) == (1, 15)
    assert second.generation == 2 and second.flags & FLAG_NETWORK == 0
    assert second.retransmit_threshold == 11
    assert session.applied is not None and session.applied.version == "2"
    assert session.applied.config_hash == ctl.active.config_hash != PRODUCTION_DEFAULT_HASH
    assert fetches("applied") - base["applied"] == 2
    assert fetches("not_modified") - base["not_modified"] == 2


@pytest.mark.parametrize(
    ("over", "result"),
    [
        ({"config_hash": "sha256:" + "1" * 64}, "rejected"),
        ({"config_hash": ""}, "rejected"),
        ({"version": "v7"}, "rejected"),
        ({"version": "4294967296"}, "rejected"),
        ({"wire_version": "tapio-wire/v9"}, "rejected"),
        ({"batching": {"send_interval_ms": 0, "max_batch_events": 1}}, "rejected"),
        ({"config": {"network": {}}}, "rejected"),
    ],
)
async def test_bad_configs_are_rejected_and_keep_the_previous_one(
    tmp_path: Path, over: dict[str, Any], result: str
) -> None:
    good = msgspec.json.encode(config_body())
    bad = msgspec.json.encode(config_body(**over))

    def handler(req: web.Request, n: int) -> web.Response:
        return web.Response(body=good if n == 1 else bad, content_type="application/json")

    agent = fake_agent(tmp_path)
    before = fetches(result)
    async with serve(Scripted(handler).app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            assert await session.poll_once(client, agent) == "applied"  # type: ignore[arg-type]
            session.etag = None
            assert await session.poll_once(client, agent) == result  # type: ignore[arg-type]
    assert fetches(result) - before == 1
    assert len(agent.applied_calls) == 1
    assert session.applied is not None and session.applied.version == "4"


async def test_poll_transport_and_status_errors_count_error(tmp_path: Path) -> None:
    agent = fake_agent(tmp_path)
    before = fetches("error")
    session = session_for(f"http://127.0.0.1:{closed_port()}")  # refuses every connect
    async with client_for(session) as client:
        assert await session.poll_once(client, agent) == "error"  # type: ignore[arg-type]

    def handler(req: web.Request, n: int) -> web.Response:
        return web.Response(status=500, text="boom")

    async with serve(Scripted(handler).app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            assert await session.poll_once(client, agent) == "error"  # type: ignore[arg-type]
    assert fetches("error") - before == 2
    assert agent.applied_calls == []


async def test_oversized_config_response_is_refused(tmp_path: Path) -> None:
    huge = b'{"pad":"' + b"x" * (1024 * 1024 + 10) + b'"}'

    def handler(req: web.Request, n: int) -> web.Response:
        return web.Response(body=huge, content_type="application/json")

    agent = fake_agent(tmp_path)
    async with serve(Scripted(handler).app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            assert await session.poll_once(client, agent) == "error"  # type: ignore[arg-type]
    assert agent.applied_calls == []


async def test_poll_backs_off_on_errors(tmp_path: Path) -> None:
    def handler(req: web.Request, n: int) -> web.Response:
        return web.Response(status=503)

    script = Scripted(handler)
    agent = fake_agent(tmp_path)
    async with serve(script.app()) as url:
        session = session_for(url, poll_interval=0.1, poll_backoff_max=0.4)
        session._registered = anyio.Event()
        session._registered.set()
        async with client_for(session) as client, anyio.create_task_group() as tg:
            tg.start_soon(session._poll_loop, client, agent)
            await anyio.sleep(1.6)
            tg.cancel_scope.cancel()
    times = [r[0] for r in script.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # first retry in [0.05, 0.1], then [0.1, 0.2], [0.2, 0.4], capped at [0.2, 0.4]
    assert 4 <= len(script.requests) <= 9
    assert gaps[0] < 0.2 and max(gaps[2:]) >= 0.2 and max(gaps) <= 0.5
    assert all(r[3].get("If-None-Match") is None for r in script.requests)


# ---- heartbeat --------------------------------------------------------------------------------


async def test_heartbeat_before_and_after_config(tmp_path: Path) -> None:
    ctl = Controller()
    agent = fake_agent(tmp_path, "network", "storage", "node")
    agent.observers[1].state = "failed"
    agent.observers[1].error = "load failed"
    agent.observers[2].observer.degraded_reasons.append("no_pmu")
    async with serve(ctl.build_app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            before = session.heartbeat_request(agent)  # type: ignore[arg-type]
            assert before.config_version == "0" and before.config_hash == ""
            assert before.degraded_reasons[0] is wire.DegradedReason.UNCONFIGURED
            assert before.observers == {
                "network": wire.ObserverStatus.DISABLED,  # loaded, but the carrier is inert
                "storage": wire.ObserverStatus.FAILED,
                "container": wire.ObserverStatus.DISABLED,  # not loaded at all
                "node": wire.ObserverStatus.DISABLED,
            }
            before.validate()
            assert await session.hello_once(client, agent)  # type: ignore[arg-type]
            assert await session.poll_once(client, agent) == "applied"  # type: ignore[arg-type]
            assert await session.heartbeat_once(client, agent) is True  # type: ignore[arg-type]
            after = session.heartbeat_request(agent)  # type: ignore[arg-type]
    assert after.config_version == "1" and after.config_hash == PRODUCTION_DEFAULT_HASH
    assert after.observers == {
        "network": wire.ObserverStatus.RUNNING,
        "storage": wire.ObserverStatus.FAILED,
        "container": wire.ObserverStatus.DISABLED,
        "node": wire.ObserverStatus.DEGRADED,
    }
    assert after.degraded_reasons == [
        wire.DegradedReason.OBSERVER_FAILED,
        wire.DegradedReason.PMC_UNSUPPORTED,
    ]
    counters = after.counters
    assert counters.events_total == int(sample_sum("tapio_events_total"))
    assert counters.sink_drops_total == int(sample_sum("tapio_sink_drops_total"))
    st = next(a for a in ctl.status_response().agents if a.agent_id == "node/unit")
    assert st.reported_config_hash == PRODUCTION_DEFAULT_HASH
    assert st.observers["node"] is wire.ObserverStatus.DEGRADED
    assert ctl.status_response().unconverged_agents == []


def sample_sum(name: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name == name:
                total += s.value
    return total


async def test_heartbeat_reports_abi_mismatch_sink_failure_and_fanout_failure(
    tmp_path: Path,
) -> None:
    ctl = Controller()
    agent = fake_agent(tmp_path, "network", "container")
    agent.observers[0].observer.degraded_reasons.append("abi_mismatch")
    agent.fail_on_apply = ["container"]
    agent.sinks.append(MemorySink(healthy=False))
    async with serve(ctl.build_app()) as url:
        session = session_for(url)
        async with client_for(session) as client:
            assert await session.poll_once(client, agent) == "applied"  # type: ignore[arg-type]
    hb = session.heartbeat_request(agent)  # type: ignore[arg-type]
    assert hb.observers["network"] is wire.ObserverStatus.DEGRADED
    assert hb.observers["container"] is wire.ObserverStatus.DEGRADED
    assert set(hb.degraded_reasons) == {
        wire.DegradedReason.CONFIG_ABI_MISMATCH,
        wire.DegradedReason.OBSERVER_FAILED,
        wire.DegradedReason.SINK_FAILING,
    }


async def test_unknown_agent_heartbeat_triggers_re_hello_after_controller_restart(
    tmp_path: Path,
) -> None:
    agent = fake_agent(tmp_path)
    before = send_failures("heartbeat")
    first = Controller()
    async with anyio.create_task_group() as tg:
        async with serve(first.build_app()) as url:  # port 0: the first start reports its port
            session = session_for(url, heartbeat_interval=0.2, poll_interval=0.2)
            tg.start_soon(session.run, agent)
            with anyio.fail_after(5):
                while not any(
                    a.last_heartbeat_age_seconds is not None for a in first.status_response().agents
                ):
                    await anyio.sleep(0.05)
            assert session.registrations == 1
        second = Controller()  # a restart: empty registry, on the port the first one reported
        async with serve(second.build_app(), int(url.rsplit(":", 1)[1])):
            with anyio.fail_after(5):
                while not second.status_response().agents:
                    await anyio.sleep(0.05)
            with anyio.fail_after(5):
                while second.status_response().agents[0].last_heartbeat_age_seconds is None:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert session.registrations == 2
    assert send_failures("heartbeat") - before >= 1  # the accepted:false (and any refused ones)
    st = second.status_response()
    assert [a.agent_id for a in st.agents] == ["node/unit"]
    assert st.agents[0].reported_config_hash == PRODUCTION_DEFAULT_HASH


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("ftp://127.0.0.1:1", "must start with http:// or https://"),
        ("127.0.0.1:8080", "must start with http:// or https://"),
        ("http://", "has no host"),
    ],
)
def test_cli_rejects_bad_controller_endpoints(tmp_path: Path, endpoint: str, message: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tapio",
            "agent",
            "--config",
            str(tmp_path / "missing.toml"),
            "--controller-endpoint",
            endpoint,
            "--sink",
            "controller",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapio agent: --controller-endpoint")
    assert message in lines[0]


def test_controller_mode_imports_no_yaml_controller_or_aiohttp_server() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tapio.agent.controller_mode, tapio.sinks.controller, tapio.agent.kconfig\n"
        "bad = [m for m in sys.modules if m == 'yaml' or m.startswith(('yaml.', "
        "'tapio.controller', 'aiohttp.web'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- TLS to the controller -------------------------------------------------------------------


async def test_https_controller_is_verified_with_the_configured_ca(
    tmp_path: Path, tls: tuple[ssl.SSLContext, str]
) -> None:
    from tapio.agent.controller_client import ControllerCallError

    server_ctx, ca_file = tls
    script = Scripted(lambda req, n: json_response(hello_answer(max_batch=33)))
    agent = fake_agent(tmp_path, "network")
    async with serve(script.app(), ssl_context=server_ctx) as url:
        assert url.startswith("https://localhost:")
        # Without the CA the system store does not know the controller: fails closed.
        session = session_for(url)
        async with client_for(session) as client:
            with pytest.raises(ControllerCallError):
                await client.hello(session.hello_request(agent))  # type: ignore[arg-type]
        assert script.requests == []
        session = session_for(url, ca_file=ca_file)
        async with client_for(session) as client:
            with anyio.fail_after(5):
                await session._register(client, agent)  # type: ignore[arg-type]
    assert session.link.registered and session.link.max_batch_events == 33
    assert len(script.requests) == 1 and script.requests[0][2] == "/v1/agents/hello"


def test_cli_rejects_an_unreadable_controller_ca_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "tapio", "agent", "--config", str(tmp_path / "missing.toml")]
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    for extra, needle in [
        (["--controller-ca-file", str(tmp_path / "nope.pem")], "requires --controller-endpoint"),
        (
            ["--controller-endpoint", "https://c:1", "--controller-ca-file", str(tmp_path / "x")],
            "No such file or directory",
        ),
        (["--controller-endpoint", "https://c:1", "--controller-ca-file", str(bad)], str(bad)),
    ]:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tapio agent: --controller-ca-file")
        assert needle in lines[0], lines
