"""deploy/systemd/tapio-agent.service parses and carries the keys the agent needs."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from tapio.agent.cli import build_parser

UNIT = Path(__file__).resolve().parents[3] / "deploy" / "systemd" / "tapio-agent.service"


def load(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


@pytest.fixture(scope="module")
def unit() -> configparser.RawConfigParser:
    return load(UNIT.read_text())


def test_sections(unit: configparser.RawConfigParser) -> None:
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit["Unit"]["Description"]


def test_exec_start_runs_the_venv_agent_with_valid_flags(
    unit: configparser.RawConfigParser,
) -> None:
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/.venv/bin/python") and argv[0].startswith("/")
    assert argv[1:4] == ["-m", "tapio", "agent"]
    args = build_parser().parse_args(argv[4:])
    assert args.data_dir.startswith("/var/lib/tapio/")


def test_capabilities(unit: configparser.RawConfigParser) -> None:
    svc = unit["Service"]
    bounding = set(svc["CapabilityBoundingSet"].split())
    ambient = set(svc["AmbientCapabilities"].split())
    assert {"CAP_BPF", "CAP_PERFMON"} <= ambient <= bounding
    assert bounding <= {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_ADMIN",
        "CAP_NET_ADMIN",
    }
    assert svc["NoNewPrivileges"] == "yes"


def test_restart_state_dir_and_stop(unit: configparser.RawConfigParser) -> None:
    svc = unit["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["StateDirectory"] == "tapio"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > 5  # above the agent's default shutdown grace


def test_hardening_keeps_what_bpf_needs(unit: configparser.RawConfigParser) -> None:
    svc = unit["Service"]
    assert svc["ProtectSystem"] == "strict"
    # These would hide tracefs/cgroups or strip the host capabilities the agent needs.
    for key in ("PrivateUsers", "ProtectKernelTunables", "ProtectControlGroups", "ProtectProc"):
        assert key not in svc, key
    assert svc["MemoryDenyWriteExecute"] == "no"  # libffi closures for cffi callbacks


def test_the_parser_rejects_a_broken_unit() -> None:
    with pytest.raises(configparser.Error):
        load("[Service]\nExecStart\n")
