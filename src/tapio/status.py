"""The agent's local status file: what the occurrence files cannot say (observer states,
capabilities the kernel lacks, the applied config), for ``tapio health`` on the same node.

The agent rewrites ``<data_dir>/.tapio-agent-status`` atomically every few seconds while the
file sink is on. It is a dot file, so occurrence readers never take it for an occurrence.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

STATUS_FILE = ".tapio-agent-status"


class ObserverStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    state: str  # running | failed
    error: str = ""
    degraded_reasons: list[str] = []
    #: capability -> available (e.g. {"pmu": false} on a VM without hardware counters)
    capabilities: dict[str, bool] = {}
    #: anomaly types this observer cannot produce here, with the reason
    unsupported: dict[str, str] = {}


class AgentStatus(msgspec.Struct, kw_only=True):
    written_at_unix: float
    pid: int
    node_name: str
    config_generation: int
    observers: dict[str, ObserverStatus]


def write_status(data_dir: str | os.PathLike[str], status: AgentStatus) -> None:
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{STATUS_FILE}.tmp"
    tmp.write_bytes(msgspec.json.encode(status))
    os.replace(tmp, d / STATUS_FILE)


def read_status(data_dir: str | os.PathLike[str]) -> AgentStatus | None:
    """The last status, or None when absent or unreadable (never raises)."""
    try:
        raw = (Path(data_dir) / STATUS_FILE).read_bytes()
        return msgspec.json.decode(raw, type=AgentStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
