"""Lean gates: what the node agent may import, and the size budget of each BPF object.

1. Import boundaries, checked in a clean interpreter: the node agent (standalone and controller
   mode, every observer, the default sinks) never imports the controller, the CLI readers, MCP,
   a Kubernetes client, the YAML profile loader or PyYAML; and not aiohttp's server unless the
   metrics server is enabled (``tapio.agent.httpserver`` is imported only then).
2. BPF object budgets (docs/operations.md#lean-budgets): file size, map count, ring buffer
   bytes, the largest non-ring ``max_entries`` and an estimate of map memory, per object, read
   from each object's declared maps through libbpf's open (no load, so no root needed).

Import time and idle RSS are benchmarks (benchmarks/bench_lean.py, benchmarks/bench_agent.py),
not unit tests: they are too noisy to gate on a shared machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# ---- 1. import boundaries ----------------------------------------------------------------------

AGENT_MODULES = (
    "tapio.agent.cli",
    "tapio.agent.runtime",
    "tapio.agent.pipeline",
    "tapio.agent.settings",
    "tapio.agent.kconfig",
    "tapio.agent.preflight",
    "tapio.sinks.stdout",
    "tapio.sinks.file",
)
# Controller mode of the agent (the wire client and the controller sink).
CONTROLLER_MODE_MODULES = ("tapio.agent.controller_mode", "tapio.sinks.controller")
FORBIDDEN_PREFIXES = (
    "tapio.controller",
    "tapio.cli",
    "tapio.profile.loader",
    "yaml",
    "mcp",
    "kubernetes",
    "kubernetes_validate",
    "aiohttp.web",
    "opentelemetry",  # only with --sink otlp
    # The libbpf declarations are parsed at build time (build_bpf.py): no C parser at start.
    "cffi",
    "pycparser",
)

_PROBE = """
import importlib, json, sys
from tapio.observers import REGISTRY
for name in sys.argv[1:]:
    importlib.import_module(name)
for target in REGISTRY.values():
    importlib.import_module(target.partition(":")[0])
print(json.dumps(sorted(sys.modules)))
"""


def imported_modules(*modules: str) -> list[str]:
    """sys.modules after importing ``modules`` and every registered observer, in a fresh
    interpreter (so nothing this test process imported leaks in)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    result: list[str] = json.loads(out.stdout)
    return result


def forbidden(modules: list[str], prefixes: tuple[str, ...] = FORBIDDEN_PREFIXES) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_standalone_agent_imports_nothing_it_does_not_run() -> None:
    modules = imported_modules(*AGENT_MODULES)
    assert "tapio.agent.runtime" in modules and "tapio.observers.network" in modules
    assert forbidden(modules) == []
    # The metrics server is imported lazily, only when [metrics] enabled = true.
    assert "tapio.agent.httpserver" not in modules


def test_controller_mode_agent_imports_nothing_it_does_not_run() -> None:
    modules = imported_modules(*AGENT_MODULES, *CONTROLLER_MODE_MODULES)
    assert "tapio.wire" in modules
    assert forbidden(modules) == []


def test_metrics_server_pulls_in_aiohttp_web_only_itself() -> None:
    modules = imported_modules("tapio.agent.httpserver")
    assert "aiohttp.web" in modules
    assert forbidden(modules, tuple(p for p in FORBIDDEN_PREFIXES if p != "aiohttp.web")) == []


def test_the_probe_would_see_a_forbidden_import() -> None:
    assert forbidden(imported_modules("tapio.agent.cli", "yaml")) == ["yaml"] + [
        m for m in imported_modules("yaml") if m.startswith("yaml.")
    ]


# ---- 2. BPF object budgets ---------------------------------------------------------------------

RINGBUF = 27


@dataclass(frozen=True)
class Budget:
    size_bytes: int
    maps: int
    ring_bytes: int
    max_entries: int  # largest non-ring map
    map_memory_bytes: int  # sum over maps of (key + value) x max_entries, rings at their size


# Today's values (clang 14, x86_64) are in docs/operations.md#lean-budgets; every budget leaves
# headroom so that a deliberate change, not noise, is what moves one.
BUDGETS: dict[str, Budget] = {
    # The network ring is sized for a 50,000-refusal burst (2 MiB, docs/benchmarks.md); the DNS
    # programs add their own 256 KiB ring and the 4096-entry pending map. Reading the connecting
    # task's cgroups through CO-RE puts task_struct's BTF into the object. The connect records
    # are declared twice (the slot table, the LRU hash), each with its own four programs; one
    # of the two maps is created.
    "network": Budget(230_000, 10, 2560 * 1024, 32_768, 9 * 1024 * 1024),
    "container": Budget(96_000, 6, 512 * 1024, 32_768, 1024 * 1024),
    # Two correlation maps are declared (the slot table, the LRU hash); one of them is created.
    "storage": Budget(104_000, 7, 1024 * 1024, 32_768, 4 * 1024 * 1024),
    "node": Budget(72_000, 8, 256 * 1024, 32_768, 1024 * 1024),
}


@dataclass(frozen=True)
class MapInfo:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int

    @property
    def memory(self) -> int:
        if self.type == RINGBUF:
            return self.max_entries
        return (self.key_size + self.value_size) * self.max_entries


def declared_maps(path: Path) -> list[MapInfo]:
    """The maps an object declares, via bpf_object__open_file (nothing reaches the kernel)."""
    from tapio.bpf import libbpf as lb

    lib = lb.lib()
    obj = lb.check_ptr(lib.bpf_object__open_file(str(path).encode(), lb.ffi.NULL), f"open {path}")
    try:
        maps = []
        m = lib.bpf_object__next_map(obj, lb.ffi.NULL)
        while m != lb.ffi.NULL:
            maps.append(
                MapInfo(
                    lb.ffi.string(lib.bpf_map__name(m)).decode(),
                    int(lib.bpf_map__type(m)),
                    int(lib.bpf_map__key_size(m)),
                    int(lib.bpf_map__value_size(m)),
                    int(lib.bpf_map__max_entries(m)),
                )
            )
            m = lib.bpf_object__next_map(obj, m)
        return maps
    finally:
        lib.bpf_object__close(obj)


def object_path(name: str) -> Path:
    path = ROOT / "src" / "tapio" / "bpf" / "objects" / f"{name}.bpf.o"
    if not path.is_file():
        pytest.skip(f"{path.name} is not built (run `python build_bpf.py`)")
    return path


def check_budget(name: str, size: int, maps: list[MapInfo], budget: Budget) -> list[str]:
    over = []
    rings = [m for m in maps if m.type == RINGBUF]
    others = [m for m in maps if m.type != RINGBUF]
    facts = {
        "size_bytes": size,
        "maps": len(maps),
        "ring_bytes": sum(m.max_entries for m in rings),
        "max_entries": max((m.max_entries for m in others), default=0),
        "map_memory_bytes": sum(m.memory for m in maps),
    }
    for key, value in facts.items():
        limit = getattr(budget, key)
        if value > limit:
            over.append(f"{name}: {key} {value} > budget {limit}")
    return over


def test_every_bpf_source_has_a_budget() -> None:
    sources = {p.name.removesuffix(".bpf.c") for p in (ROOT / "bpf").glob("*.bpf.c")}
    assert sources == set(BUDGETS), "add a budget (and a docs/operations.md row) per object"


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_bpf_object_within_budget(name: str) -> None:
    path = object_path(name)
    maps = declared_maps(path)
    assert {"tapio_config", "tapio_metrics"} <= {m.name for m in maps}
    config = next(m for m in maps if m.name == "tapio_config")
    assert (config.value_size, config.max_entries) == (256, 1)  # one carrier per object
    assert check_budget(name, path.stat().st_size, maps, BUDGETS[name]) == []


def test_a_budget_overrun_is_reported() -> None:
    maps = [MapInfo("events", RINGBUF, 0, 0, 1 << 20), MapInfo("h", 9, 8, 8, 65_536)]
    over = check_budget("x", 200_000, maps, BUDGETS["node"])
    assert len(over) == 4 and over[0].startswith("x: size_bytes 200000")
