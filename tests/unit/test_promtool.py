"""Both ``/metrics`` expositions, scraped from the real servers (the agent's metrics server and the
controller's app, each on its real registry), pass ``promtool check metrics`` (Debian's
``prometheus`` package, installed by ``scripts/setup.sh --test``) and carry the families
operators expect: build info, process CPU/RSS/fds, and the latency and batch-size histograms."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tapio
from tapio.agent.httpserver import serve
from tapio.agent.settings import MetricsServerSettings
from tapio.buildinfo import git_commit
from tapio.controller import Controller
from tapio.controller.forward import Forwarder, ForwardSettings, build_output
from tapio.controller.metrics import ControllerMetrics
from tapio.metrics import DRAIN_BATCH

from .controller.ctl_harness import JSON, batch, capturing_logger, enc, event, hello, running
from .controller.nats_harness import wait_for
from .sinks.conftest import make_sink, occ, start_receiver
from .sinks.conftest import running as running_sink

PROCESS = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds")


def promtool(exposition: str) -> None:
    """``promtool check metrics`` on ``exposition``; fails the test with promtool's findings."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: scripts/setup.sh --test installs Debian's prometheus")
    done = subprocess.run(
        [exe, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"promtool check metrics: {done.stdout}{done.stderr}"


def samples(exposition: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], and every family name (with no sample) -> []."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(exposition):
        out.setdefault(fam.name, [])
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _check_common(found: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    ((labels, value),) = found["tapio_build_info"]
    assert value == 1.0 and labels["version"] == tapio.__version__
    assert labels["python_version"].count(".") == 2 and labels["git_commit"] == git_commit()
    for name in PROCESS:
        ((_, v),) = found[name]
        assert v > 0, name


def test_promtool_rejects_a_broken_exposition() -> None:
    """The check is real: a counter without ``_total`` is a finding."""
    with pytest.raises(AssertionError, match="_total"):
        promtool("# HELP foo x\n# TYPE foo counter\nfoo 1\n")


async def test_agent_exposition_passes_promtool() -> None:
    # One delivery through the OTLP sink (request latency) and one drain pass (batch size).
    async with start_receiver() as rx:
        sink = make_sink("otlp", rx.url, batch_size=1)
        async with running_sink(sink) as send:
            send.send_nowait([occ(1)])
            await rx.wait_for(1)
    DRAIN_BATCH.labels(observer="promtool-test").observe(17)
    settings = MetricsServerSettings(enabled=True, port=0)
    async with serve(settings, lambda: (True, {})) as srv, aiohttp.ClientSession() as s:
        assert srv is not None
        async with s.get(srv.base_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    promtool(text)
    found = samples(text)
    _check_common(found)
    latency = {
        tuple(sorted(lb.items())): v for lb, v in found["tapio_sink_request_duration_seconds_count"]
    }
    assert latency[(("sink", "otlp"),)] >= 1
    assert "tapio_sink_request_duration_seconds_bucket" in found
    drained = {lb["observer"]: v for lb, v in found["tapio_drain_batch_size_sum"]}
    assert drained["promtool-test"] == 17


async def test_controller_exposition_passes_promtool(tmp_path: Path) -> None:
    log, _ = capturing_logger()
    metrics = ControllerMetrics()
    output = build_output(f"file://{tmp_path / 'out'}", ForwardSettings())
    ctl = Controller(logger=log, metrics=metrics, forwarder=Forwarder([output], metrics, log))
    forwarded = metrics.forward_forwarded.labels(output.name)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=JSON) as r:
            assert r.status == 200
        body = batch(events=[event(facts={"occurrence_id": "prom-1", "dst_port": 1})])
        async with s.post(url + "/v1/events", data=enc(body), headers=JSON) as r:
            assert r.status == 200
        await wait_for(lambda: forwarded._value.get() == 1, 10, "one forwarded")
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    promtool(text)
    found = samples(text)
    _check_common(found)
    counts = {lb["output"]: v for lb, v in found["tapio_controller_forward_duration_seconds_count"]}
    assert counts[output.name] >= 1
    assert "tapio_controller_requests_total" in found


def test_git_commit_only_from_the_build_record() -> None:
    """``tapio/BUILD_COMMIT`` (written by the image build) is the only source; without it, or
    with something that is not a commit id, the label says ``unknown``."""
    record = Path(tapio.__file__).with_name("BUILD_COMMIT")
    assert not record.exists(), "a stale BUILD_COMMIT in the source tree"
    try:
        for text, want in (
            (
                "0123456789abcdef0123456789abcdef01234567\n",
                "0123456789abcdef0123456789abcdef01234567",
            ),
            ("not a commit; rm -rf /", "unknown"),
        ):
            record.write_text(text)
            git_commit.cache_clear()
            assert git_commit() == want
        record.unlink()
        git_commit.cache_clear()
        assert git_commit() == "unknown"
    finally:
        record.unlink(missing_ok=True)
        git_commit.cache_clear()
