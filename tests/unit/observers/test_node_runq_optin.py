"""Run-queue sampling is opt-in: TOML and Evidence Profile → one thresholds type → the carrier's
run-queue threshold (0 when off), and the node observer attaching or detaching its loaded hook
to match each config, without reloading anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tapio.agent.kconfig import from_compiled, standalone_config
from tapio.agent.settings import parse_settings
from tapio.bpf import libbpf
from tapio.bpf.abi import FLAG_NODE, TapioConfig
from tapio.metrics import REGISTRY
from tapio.observers.base import ObserverContext
from tapio.observers.node import NodeObserver
from tapio.profile import compile_profile, validate
from tapio.profile.compiled import PRODUCTION_DEFAULT_HASH, canonical_json, config_hash
from tapio.thresholds import DEFAULTS, Thresholds

MS = 1_000_000
CAP = {"observer": "node", "capability": "runq_sampling"}


def profile(node: dict[str, Any]) -> Any:
    return compile_profile(
        validate(
            {
                "apiVersion": "tapio.false.systems/v0",
                "kind": "EvidenceProfile",
                "base": "production-default",
                "overrides": {"node": node},
            }
        )
    )


def test_off_by_default_in_toml_and_profile() -> None:
    assert DEFAULTS.runq_sampling is False
    settings = parse_settings({})
    assert standalone_config(settings, ["node"]).runq_latency_threshold_ns == 0
    compiled = profile({})
    assert compiled.node.runq_sampling is False
    kernel, user = from_compiled(compiled, 3)
    assert kernel.runq_latency_threshold_ns == 0 and user.runq_sampling is False
    # The default (off) is not in the canonical form: the production default hash holds.
    assert config_hash(compiled) == PRODUCTION_DEFAULT_HASH


def test_toml_opt_in_reaches_the_carrier() -> None:
    settings = parse_settings({"thresholds": {"runq_sampling": True, "runq_latency_ms": 7}})
    assert settings.thresholds.runq_sampling is True
    assert standalone_config(settings, ["node"]).runq_latency_threshold_ns == 7 * MS


def test_profile_opt_in_reaches_the_carrier_and_the_thresholds() -> None:
    compiled = profile({"runq_sampling": True, "runq_latency_ms": 20})
    assert compiled.node.runq_sampling is True
    assert b'"runq_sampling":true' in canonical_json(compiled)
    assert config_hash(compiled) != PRODUCTION_DEFAULT_HASH
    kernel, user = from_compiled(compiled, 5)
    assert kernel.runq_latency_threshold_ns == 20 * MS
    assert user.runq_sampling is True and user.runq_latency_ms == 20


def test_profile_rejects_a_non_boolean_switch() -> None:
    from tapio.profile import ProfileError

    with pytest.raises(ProfileError, match="runq_sampling"):
        profile({"runq_sampling": 1})


class FakeProgram:
    def __init__(self, name: str) -> None:
        self.name, self.ptr, self.section = name, object(), "tp_btf/sched_switch"


class FakeObj:
    """The loaded node object as the observer sees it: programs by name."""

    def __init__(self, programs: tuple[str, ...] = ("node_switch",)) -> None:
        self.programs = {n: FakeProgram(n) for n in programs}

    def map(self, name: str) -> object:
        return object()


class FakeLib:
    """libbpf's attach and link destroy, recorded by program name."""

    def __init__(self, obj: FakeObj) -> None:
        self.names = {id(p.ptr): n for n, p in obj.programs.items()}
        self.links: dict[int, str] = {}
        self.calls: list[tuple[str, str]] = []

    def bpf_program__attach(self, ptr: object) -> object:
        link = object()
        self.links[id(link)] = self.names[id(ptr)]
        self.calls.append(("attach", self.names[id(ptr)]))
        return link

    def bpf_link__destroy(self, link: object) -> int:
        self.calls.append(("detach", self.links.pop(id(link))))
        return 0


@pytest.fixture
def fake_obj(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeObj, FakeLib]]:
    obj = FakeObj()
    fake = FakeLib(obj)
    monkeypatch.setattr(libbpf, "lib", lambda: fake)
    yield obj, fake


def cfg(threshold_ms: int, flags: int = FLAG_NODE) -> TapioConfig:
    return TapioConfig(generation=1, flags=flags, runq_latency_threshold_ns=threshold_ms * MS)


def test_the_hook_follows_every_config_change(fake_obj: tuple[FakeObj, FakeLib]) -> None:
    obs = NodeObserver(ObserverContext(boot_offset_ns=0))
    obj, lib = fake_obj
    obs.on_config(cfg(0), Thresholds())
    obs.attach(obj)  # type: ignore[arg-type]
    assert lib.calls == [] and not obs.runq_on
    caps = {c.name: c for c in obs.capabilities()}
    assert caps["runq_sampling"].available is False and caps["runq_sampling"].off is True
    assert "runq_sampling = true" in caps["runq_sampling"].detail
    assert "no_runq_sampling" not in obs.degraded_reasons
    assert REGISTRY.get_sample_value("tapio_observer_capability", CAP) == 0

    obs.on_config(cfg(50), Thresholds(runq_sampling=True))
    assert lib.calls == [("attach", "node_switch")] and obs.runq_on
    assert REGISTRY.get_sample_value("tapio_observer_capability", CAP) == 1
    caps = {c.name: c for c in obs.capabilities()}
    assert caps["runq_sampling"].available is True and caps["runq_sampling"].off is False
    obs.on_config(cfg(40), Thresholds(runq_sampling=True))  # a new threshold: no relink
    assert lib.calls == [("attach", "node_switch")]
    obs.on_config(cfg(40, flags=0), Thresholds())  # node observer off: hook off too
    assert lib.calls[-1] == ("detach", "node_switch") and not obs.runq_on
    obs.on_config(cfg(40), Thresholds(runq_sampling=True))
    obs.on_config(cfg(0), Thresholds())
    assert lib.calls[-2:] == [("attach", "node_switch"), ("detach", "node_switch")]
    assert REGISTRY.get_sample_value("tapio_observer_capability", CAP) == 0
    assert obs.read_runq() == (None, None)  # detached: the maps are not even read
    obs.on_config(cfg(40), Thresholds(runq_sampling=True))
    obs.close()  # the link goes before the object is closed
    assert lib.calls[-1] == ("detach", "node_switch") and lib.links == {}


def test_the_basic_hook_is_the_one_attached_where_it_was_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    obs = NodeObserver(ObserverContext(boot_offset_ns=0))
    obj = FakeObj(("node_switch_basic",))
    lib = FakeLib(obj)
    monkeypatch.setattr(libbpf, "lib", lambda: lib)
    obs.on_config(cfg(10), Thresholds(runq_sampling=True))
    obs.attach(obj)  # type: ignore[arg-type]
    assert lib.calls == [("attach", "node_switch_basic")]


def test_no_hook_loaded_means_no_runq_sampling_capability() -> None:
    obs = NodeObserver(ObserverContext(boot_offset_ns=0))
    obs.on_config(cfg(10), Thresholds(runq_sampling=True))
    obs.attach(FakeObj(()))  # type: ignore[arg-type]
    assert "runq_sampling" not in {c.name for c in obs.capabilities()}
