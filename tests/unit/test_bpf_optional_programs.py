"""The loader's bookkeeping of optional programs, without a kernel: which alternative is loaded,
which program a failed load blames, and which capabilities (hence anomaly types) end up off."""

from __future__ import annotations

from typing import Any

import pytest

from tapio.bpf import loader
from tapio.bpf.features import ProgramSpec
from tapio.bpf.loader import BpfObject, Program, _verifier_summary
from tapio.observers import observer_class
from tapio.observers.base import ObserverContext

SPECS = (
    ProgramSpec("fast", "runq", group="g", maps=("storage",)),
    ProgramSpec("basic", "runq", group="g"),
    ProgramSpec("retrans", "retransmit", ("kernel.network.retransmit_spike",)),
    ProgramSpec("probe", "tcp_probe", ("kernel.network.rtt_degradation",)),
)


def _obj() -> BpfObject:
    return BpfObject("/nonexistent.bpf.o", programs=SPECS)


def _fake_program(name: str) -> Program:
    p = Program.__new__(Program)
    p.ptr, p.name, p.section = None, name, f"tp_btf/{name}"
    return p


def test_first_alternative_of_a_group_is_chosen() -> None:
    obj = _obj()
    off = obj._plan({})
    assert off == {"basic"}
    assert obj.unused == {"basic": "alternative fast loaded instead"}
    assert obj.skipped == {}


def test_failed_alternative_falls_back_to_the_next() -> None:
    obj = _obj()
    off = obj._plan({"fast": "map type of storage not supported by this kernel"})
    assert off == {"fast"}
    assert obj.skipped == {"fast": "map type of storage not supported by this kernel"}
    assert obj.unused == {}


def test_alternative_missing_from_the_object_leaves_the_next_in_place() -> None:
    # An object built before "fast" existed: "basic" must still load, not be left out as the
    # unused alternative of a program that is not there.
    obj = _obj()
    off = obj._plan({}, present={"basic", "retrans", "probe"})
    assert off == set()
    assert obj.unused == {}
    assert obj.skipped == {}


PAIRED = (
    ProgramSpec("issue_slot", "issue", group="issue", needs=("complete_slot",)),
    ProgramSpec("issue_lru", "issue", group="issue"),
    ProgramSpec("complete_slot", "complete", group="complete", needs=("issue_slot",)),
    ProgramSpec("complete_lru", "complete", group="complete"),
)


def test_paired_alternatives_load_together() -> None:
    obj = BpfObject("/nonexistent.bpf.o", programs=PAIRED)
    assert obj._plan({}) == {"issue_lru", "complete_lru"}
    assert obj.skipped == {}


@pytest.mark.parametrize("broken", ["issue_slot", "complete_slot"])
def test_one_half_of_a_pair_left_out_takes_the_other_with_it(broken: str) -> None:
    """Never one half of the slot correlation with one half of the LRU one: each group falls
    back, and the partner says why it is not loaded."""
    obj = BpfObject("/nonexistent.bpf.o", programs=PAIRED)
    off = obj._plan({broken: "load failed: unknown opcode"})
    assert off == {"issue_slot", "complete_slot"}
    partner = ({"issue_slot", "complete_slot"} - {broken}).pop()
    assert obj.skipped == {
        broken: "load failed: unknown opcode",
        partner: f"needs {broken}, which is not loaded",
    }
    assert obj.unused == {}


def test_a_partner_missing_from_the_object_counts_as_left_out() -> None:
    obj = BpfObject("/nonexistent.bpf.o", programs=PAIRED)
    off = obj._plan({}, present={"issue_slot", "issue_lru", "complete_lru"})
    assert off == {"issue_slot"}
    assert obj.skipped == {"issue_slot": "needs complete_slot, which is not loaded"}


def test_the_storage_slot_programs_all_need_each_other() -> None:
    specs = {s.name: s for s in observer_class("storage").programs}
    slots = {n for n in specs if n.endswith("_slot")}
    assert slots == {"handle_rq_issue_slot", "handle_rq_complete_slot", "handle_rq_requeue_slot"}
    for name in slots:
        assert set(specs[name].needs) == slots - {name}
        assert specs[name].maps == ("io_slots",)
    obj = BpfObject("/nonexistent.bpf.o", programs=tuple(specs.values()))
    obj._plan({"handle_rq_complete_slot": "load failed: unknown opcode"})
    assert set(obj.skipped) == slots
    assert obj.unused == {"handle_rq_complete": "alternative handle_rq_complete_btf loaded instead"}


def test_the_network_slot_programs_all_need_each_other_and_fall_back_together() -> None:
    specs = {s.name: s for s in observer_class("network").programs}
    lru = {"handle_set_state", "handle_receive_reset", "handle_retransmit", "handle_tcp_probe"}
    slots = {f"{n}_slot" for n in lru}
    assert slots <= set(specs)
    for name in lru:
        slot = specs[f"{name}_slot"]
        assert set(slot.needs) == slots - {slot.name}
        assert (slot.maps, specs[name].maps) == (("conn_slots",), ("conns",))
        assert slot.group == specs[name].group == name
        assert (slot.capability, slot.anomalies) == (specs[name].capability, specs[name].anomalies)
    order = list(specs)
    assert all(order.index(f"{n}_slot") < order.index(n) for n in lru)  # the slot build first
    obj = BpfObject("/nonexistent.bpf.o", programs=tuple(specs.values()))
    off = obj._plan({"handle_set_state_slot": "load failed: unknown opcode"})
    assert set(obj.skipped) == slots and slots <= off and not lru & off
    obj._plan({})
    assert {n: why for n, why in obj.unused.items() if n in lru} == {
        n: f"alternative {n}_slot loaded instead" for n in lru
    }


def test_culprit_is_the_optional_program_libbpf_names(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = _obj()
    obj.programs = {n: _fake_program(n) for n in ("fast", "retrans", "probe")}
    monkeypatch.setattr(
        loader,
        "_recent_messages",
        [
            "libbpf: prog 'retrans': BPF program load failed: Invalid argument",
            "libbpf: prog 'retrans': failed to load: -22",
            "libbpf: failed to load object 'x.bpf.o'",
        ],
    )
    obj.verifier_log = (
        "0: R1=ctx() R10=fp0\n; int err = ctx[2]\n"
        "0: (79) r1 = *(u64 *)(r1 +16)\nfunc 'tcp_retransmit_skb' doesn't have 3-th argument\n"
        "processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0\n"
    )
    name, why = obj._culprit(22)
    assert name == "retrans"
    assert why == "load failed: func 'tcp_retransmit_skb' doesn't have 3-th argument"


def test_a_failing_map_blames_the_program_that_owns_it(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = _obj()
    obj.programs = {n: _fake_program(n) for n in ("fast", "retrans")}
    monkeypatch.setattr(
        loader,
        "_recent_messages",
        ["libbpf: map 'storage': failed to create: Invalid argument(-22)"],
    )
    obj.verifier_log = ""
    name, why = obj._culprit(22)
    assert name == "fast"
    assert "map 'storage': failed to create" in why


def test_a_required_program_is_never_blamed(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = _obj()
    obj.programs = {n: _fake_program(n) for n in ("required_one", "retrans")}
    monkeypatch.setattr(
        loader, "_recent_messages", ["libbpf: prog 'required_one': failed to load: -13"]
    )
    assert obj._culprit(13) == (None, "")


def test_unavailable_capabilities_and_what_they_turn_off() -> None:
    obj = _obj()
    obj._plan({"retrans": "hook tp_btf/tcp_retransmit_skb does not exist on this kernel"})
    obj.attached = {"fast", "probe"}
    assert obj.unavailable() == {
        "retransmit": "retrans: hook tp_btf/tcp_retransmit_skb does not exist on this kernel"
    }
    # An unneeded alternative does not count as missing.
    assert "runq" not in obj.unavailable()


def test_verifier_summary_skips_statistics() -> None:
    log = "R1 invalid mem access 'scalar'\nprocessed 9 insns\nverification time 12 usec\n"
    assert _verifier_summary(log) == "R1 invalid mem access 'scalar'"
    assert _verifier_summary("") == ""


class _FakeObj:
    def __init__(self, attached: set[str], unavailable: dict[str, str]) -> None:
        self.attached = attached
        self._unavailable = unavailable
        self.path = type("P", (), {"name": "network.bpf.o"})()

    def unavailable(self) -> dict[str, str]:
        return self._unavailable


def test_observer_reports_the_anomaly_types_a_missing_program_serves() -> None:
    observer = observer_class("network")(ObserverContext(boot_offset_ns=0))
    fake: Any = _FakeObj(
        {"handle_set_state", "handle_receive_reset", "handle_tcp_probe"},
        {"retransmit": "handle_retransmit: hook tp_btf/tcp_retransmit_skb does not exist"},
    )
    observer.note_programs(fake)
    caps = {c.name: c for c in observer.capabilities()}
    assert caps["retransmit"].available is False
    assert caps["retransmit"].anomalies == ("kernel.network.retransmit_spike",)
    assert "does not exist" in caps["retransmit"].detail
    assert caps["connect_state"].available is True
    assert observer.degraded_reasons == ["no_retransmit"]


def test_observer_with_no_running_program_fails() -> None:
    observer = observer_class("container")(ObserverContext(boot_offset_ns=0))
    fake: Any = _FakeObj(
        set(),
        {"oom_mark_victim": "hook missing", "process_exit": "hook missing"},
    )
    with pytest.raises(OSError, match=r"no program of network\.bpf\.o runs"):
        observer.note_programs(fake)
