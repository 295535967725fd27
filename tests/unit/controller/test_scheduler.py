"""Scheduler evidence against a kube-scheduler metrics endpoint of the test's own.

A latency rise gives exactly one ``cluster.scheduler.latency_spike`` (with the p99 and the
window), a pending-pods backlog one ``cluster.scheduler.queue_backlog`` (with the queue), steady
values none, a recovery re-arms; an endpoint that fails (HTTP error, timeout, garbage, too
large, wrong token) is counted and shown in /readyz, never reported as evidence.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import trustme

from tapio.controller import Controller
from tapio.controller.forward import Forwarder
from tapio.controller.forward.file import CURRENT, FileOutput
from tapio.controller.forward.record import Record
from tapio.controller.metrics import ControllerMetrics
from tapio.controller.scheduler import SchedulerMonitor, ScrapeSettings
from tapio.controller.scheduler.exposition import ExpositionError, parse, quantile
from tapio.controller.scheduler.scrape import MAX_PENDING
from tapio.profile import SchedulerThresholds
from tapio.profile.scheduler import (
    DEFAULT_QUEUES,
    BacklogThresholds,
    LatencySpikeThresholds,
)

from .ctl_harness import capturing_logger, running
from .nats_harness import wait_for
from .scheduler_harness import BUCKETS, FakeScheduler, clock_at

STEP = 15.0  # the default scrape interval
DEFAULTS = SchedulerThresholds()


class Rig:
    def __init__(self, fake: FakeScheduler, monitor: SchedulerMonitor, clock: Any) -> None:
        self.fake, self.monitor, self.clock = fake, monitor, clock
        self.emitted: list[Record] = []
        self.session: aiohttp.ClientSession | None = None
        self.accept = True

    def emit(self, records: Any) -> bool:
        if not self.accept:
            return False
        self.emitted.extend(records)
        return True

    async def scrape(self, t: SchedulerThresholds = DEFAULTS, advance: float = STEP) -> list[Any]:
        assert self.session is not None
        self.clock.now += advance
        records = await self.monitor.scrape_once(self.session, t, self.emit)
        return [msgspec.json.decode(r.body) for r in records]

    def scrapes(self, result: str) -> float:
        value: float = self.monitor.metrics.scheduler_scrapes.labels(result)._value.get()
        return value


@contextlib.asynccontextmanager
async def rig(
    fake: FakeScheduler | None = None,
    *,
    token_file: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
    max_body: int | None = None,
) -> AsyncIterator[Rig]:
    from tapio.controller.auth import TokenFile

    fake = fake or FakeScheduler()
    clock = clock_at(5000.0)
    log, _ = capturing_logger()
    async with fake.serve(ssl_context) as url:
        kw: dict[str, Any] = {"url": url, "interval": 2.0, "ca_file": ca_file}
        if max_body is not None:
            kw["max_body_bytes"] = max_body
        token = TokenFile(token_file, name="scheduler token") if token_file else None
        monitor = SchedulerMonitor(
            ScrapeSettings(**kw), ControllerMetrics(), log, token=token, clock=clock
        )
        r = Rig(fake, monitor, clock)
        connector = aiohttp.TCPConnector(ssl=monitor.ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            r.session = session
            yield r


def test_page_parses_as_kube_scheduler_writes_it() -> None:
    fake = FakeScheduler()
    fake.observe(90, 0.003)
    fake.observe(10, 0.7, "unschedulable")
    fake.pending["unschedulable"] = 4
    snap = parse(fake.page(), 1.0)
    assert set(snap.attempts) == {"scheduled", "unschedulable", "error"}
    hist = snap.attempts["scheduled"]
    assert hist.bounds == (*BUCKETS, float("inf")) and hist.total == 90
    assert snap.pending == {"active": 0, "backoff": 0, "gated": 0, "unschedulable": 4}
    assert 2.0 < quantile(0.99, hist.bounds, hist.counts) * 1000 <= 4.0
    with pytest.raises(ExpositionError) as exc:
        parse("go_goroutines 3\n", 1.0)
    assert exc.value.reason == "no_metrics"
    with pytest.raises(ExpositionError) as exc:
        parse('scheduler_pending_pods{queue="active" 3\n', 1.0)
    assert exc.value.reason == "parse"


async def test_steady_values_give_nothing() -> None:
    async with rig() as r:
        r.fake.pending["active"] = 3
        for _ in range(20):
            r.fake.observe(200, 0.004)
            r.fake.observe(5, 0.02, "unschedulable")
            assert await r.scrape() == []
        assert r.emitted == [] and r.scrapes("ok") == 20


async def test_latency_rise_gives_one_spike_with_p99_and_window_and_recovery_rearms() -> None:
    async with rig() as r:
        for _ in range(6):  # a healthy minute and more
            r.fake.observe(100, 0.004)
            assert await r.scrape() == []
        spikes = []
        for _ in range(8):  # two minutes of slow attempts: one occurrence, not eight
            r.fake.observe(100, 0.004)
            r.fake.observe(30, 3.0)
            spikes += await r.scrape()
        assert len(spikes) == 1
        doc = spikes[0]
        assert doc["type"] == "cluster.scheduler.latency_spike"
        assert doc["source"] == "tapio-controller" and doc["observer"] == "scheduler"
        data = doc["data"]
        assert data["result"] == "scheduled" and data["window_seconds"] == 60
        assert data["threshold_ms"] == 1000 and data["observed_seconds"] == 60.0
        assert 2048 < data["p99_ms"] <= 4096 and data["p99_bucket_le_ms"] == 4096
        assert data["attempts"] >= 10
        assert doc["error"]["code"] == "SCHEDULER_LATENCY_SPIKE"
        # fast again: clears once the window no longer holds the slow attempts ...
        for _ in range(6):
            r.fake.observe(100, 0.004)
            assert await r.scrape() == []
        assert not r.monitor.judge.latency["scheduled"].active
        # ... and a new rise is a new incident
        again = []
        for _ in range(5):
            r.fake.observe(50, 5.0)
            again += await r.scrape()
        assert [d["type"] for d in again] == ["cluster.scheduler.latency_spike"]
        assert len(r.emitted) == 2


async def test_few_attempts_do_not_fire_and_a_restart_restarts_the_window() -> None:
    async with rig() as r:
        for _ in range(6):
            r.fake.observe(2, 9.0)  # slow, but 8 attempts a minute are below min_attempts
            assert await r.scrape() == []
        r.fake.reset()  # scheduler restarted: counters went backwards
        r.fake.observe(5, 9.0)
        assert await r.scrape() == []  # no window yet after the restart
        out = []
        for _ in range(5):
            r.fake.observe(100, 9.0)
            out += await r.scrape()
        assert len(out) == 1 and out[0]["data"]["p99_bucket_le_ms"] == 16384


async def test_backlog_sustained_gives_one_with_the_queue_and_recovery_rearms() -> None:
    t = SchedulerThresholds(queue_backlog=BacklogThresholds(pending_pods=50, sustain_seconds=120))
    async with rig() as r:
        r.fake.pending["gated"] = 500  # not judged by default (gated pods wait on purpose)
        r.fake.pending["active"] = 80
        out = []
        for _ in range(8):  # 8 x 15 s = 120 s sustained on the eighth scrape after the first
            out += await r.scrape(t)
        assert out == []
        r.fake.pending["active"] = 30  # dip below the threshold: the run starts over
        out += await r.scrape(t)
        r.fake.pending["active"] = 220
        for _ in range(12):
            out += await r.scrape(t)
        assert len(out) == 1
        data = out[0]["data"]
        assert out[0]["type"] == "cluster.scheduler.queue_backlog"
        assert data["queue"] == "active" and data["pending_pods"] == 220
        assert data["threshold_pods"] == 50 and data["sustain_seconds"] == 120
        assert data["sustained_seconds"] == 120.0 and data["window_seconds"] == 60
        assert out[0]["severity"] == "critical"  # >= 4x the threshold
        r.fake.pending["active"] = 45  # under the threshold but above the clear level
        for _ in range(10):
            assert await r.scrape(t) == []
        assert r.monitor.judge.backlog["active"].edge.active
        r.fake.pending["active"] = 0  # cleared
        assert await r.scrape(t) == []
        r.fake.pending["active"] = 60
        again = []
        for _ in range(10):
            again += await r.scrape(t)
        assert [d["data"]["queue"] for d in again] == ["active"]
        assert "gated" not in DEFAULT_QUEUES


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"status": 500}, "http_status"),
        ({"body_override": b"\x00\xffnot prometheus {{{\n"}, "no_metrics"),
        ({"body_override": b'scheduler_pending_pods{queue="active" 12\n'}, "parse"),
        ({"body_override": b"go_goroutines 3\n"}, "no_metrics"),
        ({"body_override": b"#" * 5000}, "too_large"),
        ({"delay": 3.0}, "timeout"),
    ],
)
async def test_a_failing_endpoint_is_counted_never_evidence(
    setup: dict[str, Any], reason: str
) -> None:
    fake = FakeScheduler()
    fake.pending["active"] = 10_000
    async with rig(fake, max_body=4096) as r:
        for key, value in setup.items():
            setattr(fake, key, value)
        for _ in range(3 if reason != "timeout" else 1):
            fake.observe(100, 9.0)
            assert (
                await r.scrape(
                    SchedulerThresholds(queue_backlog=BacklogThresholds(sustain_seconds=0))
                )
                == []
            )
        assert r.scrapes(reason) >= 1 and r.scrapes("ok") == 0
        health = r.monitor.health()
        assert health["up"] is False and health["consecutive_failures"] >= 1
        assert health["last_error"].startswith(reason)
        assert r.emitted == [] and r.monitor.judge.history == type(r.monitor.judge.history)()


async def test_connect_refused_is_counted() -> None:
    log, _ = capturing_logger()
    monitor = SchedulerMonitor(
        ScrapeSettings(url="http://127.0.0.1:9/metrics", interval=1.0), ControllerMetrics(), log
    )
    async with aiohttp.ClientSession() as session:
        assert await monitor.scrape_once(session, DEFAULTS, lambda recs: True) == []
    assert monitor.metrics.scheduler_scrapes.labels("connect")._value.get() == 1


async def test_https_with_ca_and_a_rotated_bearer_token(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-1\n")
    fake = FakeScheduler(token="sa-token-1")
    async with rig(fake, token_file=token_file, ssl_context=server_ctx, ca_file=str(ca_file)) as r:
        await r.scrape()
        assert r.scrapes("ok") == 1 and fake.authorizations[-1] == "Bearer sa-token-1"
        fake.token = "sa-token-2"
        await r.scrape()
        assert r.scrapes("http_status") == 1  # the old token is refused: counted
        new = tmp_path / "token.new"
        new.write_text("sa-token-2\n")
        new.replace(token_file)
        r.monitor.token._checked_at = -1e9  # type: ignore[union-attr]  # skip the 1 s re-check
        await r.scrape()
        assert r.scrapes("ok") == 2
    # without the CA the self-made certificate is not trusted
    async with rig(FakeScheduler(), ssl_context=server_ctx) as r:
        await r.scrape()
        assert r.scrapes("connect") == 1


async def test_profile_thresholds_apply_and_full_queue_holds_occurrences() -> None:
    t = SchedulerThresholds(
        latency_spike=LatencySpikeThresholds(p99_ms=20, min_attempts=1), window_seconds=30
    )
    async with rig() as r:
        r.accept = False  # forwarding queue full
        for _ in range(3):
            r.fake.observe(10, 0.05)
            await r.scrape(t)
        assert r.emitted == [] and len(r.monitor.pending) == 1
        r.accept = True
        await r.scrape(t)  # held occurrence goes out with the next scrape
        assert [rec.type for rec in r.emitted] == ["cluster.scheduler.latency_spike"]
        data = msgspec.json.decode(r.emitted[0].body)["data"]
        assert data["threshold_ms"] == 20 and data["window_seconds"] == 30
        assert MAX_PENDING >= 1


async def test_controller_forwards_scheduler_evidence_and_shows_scrapes_in_readyz(
    tmp_path: Path,
) -> None:
    """The whole path: the app's scrape loop, the file:// output, /v1/evidence, /readyz."""
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\nbase: production-default\n"
        "overrides:\n  scheduler:\n    queue_backlog: {pending_pods: 5, sustain_seconds: 0}\n"
    )
    fake = FakeScheduler()
    fake.pending["backoff"] = 9
    log, _ = capturing_logger()
    metrics = ControllerMetrics()
    out = tmp_path / "out"
    async with fake.serve() as url:
        monitor = SchedulerMonitor(ScrapeSettings(url=url, interval=0.1), metrics, log)
        ctl = Controller(
            profile_path=str(profile),
            logger=log,
            metrics=metrics,
            forwarder=Forwarder([FileOutput(f"file://{out}")], metrics, log),
            scheduler=monitor,
        )
        async with running(ctl) as base, aiohttp.ClientSession() as s:
            forwarded = metrics.forward_forwarded.labels(f"file://{out}")
            await wait_for(lambda: forwarded._value.get() >= 1, 10, "scheduler occurrence")
            docs = [msgspec.json.decode(line) for line in (out / CURRENT).read_bytes().splitlines()]
            assert [(d["type"], d["data"]["queue"]) for d in docs] == [
                ("cluster.scheduler.queue_backlog", "backoff")
            ]
            async with s.get(base + "/v1/evidence?observer=scheduler") as resp:
                body = await resp.json()
            assert [d["id"] for d in body["evidence"]] == [docs[0]["id"]]
            async with s.get(base + "/readyz") as resp:
                ready = await resp.json()
            assert resp.status == 200 and ready["scheduler"]["up"] is True
            fake.status = 503
            failed = metrics.scheduler_scrapes.labels("http_status")
            await wait_for(lambda: failed._value.get() >= 2, 10, "failed scrapes")
            async with s.get(base + "/readyz") as resp:
                ready = await resp.json()
            assert resp.status == 200  # the scheduler's outage does not make us unready
            assert ready["scheduler"]["up"] is False
            assert ready["scheduler"]["last_error"].startswith("http_status")
            async with s.get(base + "/metrics") as resp:
                text = await resp.text()
            assert 'tapio_controller_scheduler_scrapes_total{result="http_status"}' in text
        assert len((out / CURRENT).read_bytes().splitlines()) == 1  # failures made no evidence


def test_the_profile_scheduler_block_is_validated_and_stays_out_of_the_agents_config() -> None:
    from tapio.profile import (
        PRODUCTION_DEFAULT_HASH,
        ProfileError,
        compile_profile,
        config_hash,
        load_profile,
        scheduler_thresholds,
    )

    head = "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\nbase: production-default\n"
    p = load_profile(
        text=head + "overrides:\n  scheduler:\n    window_seconds: 120\n    hysteresis_pct: 50\n"
        "    latency_spike: {p99_ms: 250, min_attempts: 3}\n"
        "    queue_backlog: {pending_pods: 7, sustain_seconds: 30, queues: [gated, active, gated]}\n"
    )
    assert scheduler_thresholds(p) == SchedulerThresholds(
        window_seconds=120,
        hysteresis_pct=50.0,
        latency_spike=LatencySpikeThresholds(p99_ms=250, min_attempts=3),
        queue_backlog=BacklogThresholds(
            pending_pods=7, sustain_seconds=30, queues=("gated", "active")
        ),
    )
    assert config_hash(compile_profile(p)) == PRODUCTION_DEFAULT_HASH  # agents unaffected
    assert scheduler_thresholds(load_profile(text=head)) == SchedulerThresholds()
    bad = {
        "window_seconds: 5": "overrides.scheduler.window_seconds: value 5 out of range 10..=3600",
        "hysteresis_pct: 0": "overrides.scheduler.hysteresis_pct: value 0 out of range 1.0..=100.0",
        "latency_spike: {p99_ms: 0}": "overrides.scheduler.latency_spike.p99_ms: value 0 out of",
        "queue_backlog: {queues: [active, nope]}": "overrides.scheduler.queue_backlog.queues[1]: "
        'invalid value "nope"',
        "queue_backlog: {queues: []}": "overrides.scheduler.queue_backlog.queues: at least one",
        "bogus: 1": "overrides.scheduler.bogus: unknown field",
    }
    for line, message in bad.items():
        with pytest.raises(ProfileError) as exc:
            load_profile(text=head + f"overrides:\n  scheduler:\n    {line}\n")
        assert str(exc.value).startswith(message), str(exc.value)


def test_a_reload_that_changes_only_the_scheduler_block_keeps_the_generation(
    tmp_path: Path,
) -> None:
    from tapio.controller.config import ConfigStore, ReloadResult

    head = "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\nbase: production-default\n"
    path = tmp_path / "p.yaml"
    path.write_text(head)
    store = ConfigStore(path)
    path.write_text(head + "overrides:\n  scheduler:\n    latency_spike: {p99_ms: 300}\n")
    assert store.reload_now(force=False).result is ReloadResult.APPLIED
    assert store.active.generation == 1 and store.active.scheduler.latency_spike.p99_ms == 300
    assert store.reload_now(force=False).result is ReloadResult.UNCHANGED


def test_controller_flags_and_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tapio.controller.cli import build_parser, main
    from tapio.controller.settings import apply_config_file

    assert main(["--scheduler-token-file", "t"]) == 2
    assert "--scheduler-token-file needs --scheduler-metrics-url" in capsys.readouterr().err
    assert main(["--scheduler-metrics-url", "ftp://x/metrics"]) == 2
    assert "http:// or https://" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "scheduler_metrics_url: https://10.0.0.1:10259/metrics\nscheduler_scrape_interval: 30\n"
        "scheduler_insecure_skip_tls_verify: true\nevidence_window_max_events: 1000\n"
        "evidence_window_max_age: 600\n"
    )
    args = build_parser().parse_args(["--scheduler-scrape-interval", "5"])
    apply_config_file(args, str(cfg))
    assert args.scheduler_metrics_url == "https://10.0.0.1:10259/metrics"
    assert args.scheduler_scrape_interval == 5.0  # the flag wins
    assert args.scheduler_insecure_skip_tls_verify is True
    assert (args.evidence_window_max_events, args.evidence_window_max_age) == (1000, 600.0)
    settings = ScrapeSettings(url="https://u:p@10.0.0.1:10259/metrics?x=1", interval=30)
    assert settings.display_url == "https://10.0.0.1:10259/metrics" and settings.timeout == 10
