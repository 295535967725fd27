"""CLI habits scripts rely on: exit codes, ``--json``/``-o json`` everywhere, usage errors for
unknown names, the directory named when it is empty, absolute times, per-command usage, who a
line is about, colour control and container/pod filters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapio.cli.store import KNOWN_TYPES, OBSERVERS
from tapio.occurrence import ANOMALY_TYPES, Context, Entity, format_timestamp
from tapio.status import AgentStatus, ObserverStatus, write_status

from .conftest import FIXED, HOUR, NOW, occ, run_cli, write_occ
from .test_cli_watch import Follower, wait_ready

CID = "4f1c2b9a7d3e" + "0123456789abcdef" * 3 + "0123"
POD = "8d2f6a1e-3b4c-4d5e-9f60-718293a4b5c6"


def _ids(out: str) -> list[str]:
    return [json.loads(line)["id"][-1] for line in out.splitlines()]


def _tapio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapio", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _status(tmp_path: Path, **observers: ObserverStatus) -> None:
    write_status(
        tmp_path,
        AgentStatus(
            written_at_unix=NOW / 1e9 - 2,
            pid=1,
            node_name="n",
            config_generation=1,
            observers=observers,
        ),
    )


# --------------------------------------------------------------------------------------------
# health exit codes: 0 healthy, 1 not healthy, 2 usage, 3 no data


def test_health_exit_codes(fixed_dir: Path, tmp_path: Path) -> None:
    d = str(fixed_dir)
    assert run_cli(["health", "--data-dir", d]).code == 1  # degraded
    assert (
        run_cli(["health", "storage", "--data-dir", d]).code == 1
    )  # one critical io_error: degraded
    assert run_cli(["health", "container", "--data-dir", d]).code == 0  # nothing in the hour
    assert run_cli(["health", "--data-dir", d], now=NOW + 2 * HOUR).code == 0  # window passed
    # a failed observer is not healthy even without anomalies; an unsupported type is fine
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    _status(quiet, node=ObserverStatus(state="running", unsupported={"x": "no PMU"}))
    assert run_cli(["health", "--data-dir", str(quiet)]).code == 0
    _status(quiet, node=ObserverStatus(state="running"), storage=ObserverStatus(state="failed"))
    assert run_cli(["health", "--data-dir", str(quiet)]).code == 1
    assert run_cli(["health", "node", "--data-dir", str(quiet)]).code == 0
    assert run_cli(["health", "storage", "--data-dir", str(quiet)]).code == 1
    # no data: a missing directory or one that cannot be read
    r = run_cli(["health", "--data-dir", str(tmp_path / "nope")])
    assert (r.code, r.out) == (3, "")
    assert r.err == f"error: no data: data directory {tmp_path / 'nope'} does not exist\n"
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli(["health", "--data-dir", str(f)])
    assert (r.code, r.out, r.err) == (3, "", f"error: no data: {f}: Not a directory\n")
    # usage errors; the codes are in the command's help
    assert run_cli(["health", "gpu", "--data-dir", d]).code == 2
    help_text = " ".join(run_cli(["health", "--help"]).out.split())
    assert "0 healthy, 1 not healthy" in help_text and "3 no data" in help_text
    assert run_cli(["health", "--bogus", "--data-dir", d]).code == 2


def test_health_exit_code_of_the_real_process(fixed_dir: Path, tmp_path: Path) -> None:
    """What a shell or a Kubernetes exec probe sees (the clock is real: the fixed data set is
    old, so the node counts as healthy unless a failure says otherwise)."""
    assert _tapio("health", "--data-dir", str(fixed_dir)).returncode == 0
    write_occ(tmp_path, occ("01HM0000000000000000000001", _now_ts(), FIXED[0].type, "warning"))
    assert _tapio("health", "--data-dir", str(tmp_path)).returncode == 1
    assert _tapio("--data-dir", str(tmp_path / "nope"), "health").returncode == 3
    assert _tapio("health", "gpu", "--data-dir", str(tmp_path)).returncode == 2


def _now_ts() -> str:
    return format_timestamp(time.time_ns())


# --------------------------------------------------------------------------------------------
# --json / -o json on every command


def test_json_on_every_command(fixed_dir: Path) -> None:
    d = ["--data-dir", str(fixed_dir)]
    for flag in (["--json"], ["-o", "json"], ["--output", "json"], ["--output=json"]):
        status = run_cli(["status", *flag, *d])
        assert status.code == 0
        doc = json.loads(status.out)
        assert doc["total"] == 7
        assert doc["observers"][0] == {
            "name": "container",
            "count": 2,
            "last_seen": "2024-01-14T23:00:00+00:00",
        }
        assert [o["name"] for o in doc["observers"]] == ["container", "network", "node", "storage"]

        recent = run_cli(["recent", *flag, *d])
        assert recent.code == 0
        assert _ids(recent.out) == ["1", "5", "2", "7", "3", "4", "6"]

        health = run_cli(["health", *flag, *d])
        assert health.code == 1
        h = json.loads(health.out)
        assert (h["status"], h["healthy"], h["total_anomalies_1h"], h["total_critical_1h"]) == (
            "degraded",
            False,
            5,
            2,
        )
        assert [o["name"] for o in h["observers"]] == list(OBSERVERS)
        assert h["observers"][0]["types"] == {
            "kernel.network.connection_refused": 1,
            "kernel.network.retransmit_spike": 1,
        }
        assert h["agent"] is None and h["failed_observers"] == []

        one = json.loads(run_cli(["health", "storage", *flag, *d]).out)
        assert (one["observer"], one["status"], len(one["observers"])) == ("storage", "degraded", 1)
    # text stays the default, and -o text is accepted
    assert run_cli(["status", "-o", "text", *d]).out.startswith("Observer     Count")
    assert run_cli(["status", "-o", "yaml", *d]).code == 2
    # no occurrence: no JSON line at all (not a text sentence inside a JSON stream)
    assert run_cli(["recent", "--json", "--since", "1s", *d]).out == ""
    assert json.loads(run_cli(["status", "--json", "--since", "1s", *d]).out) == {
        "total": 0,
        "observers": [],
    }


def test_health_json_carries_the_agent_status(tmp_path: Path) -> None:
    _status(tmp_path, storage=ObserverStatus(state="failed", error="attach failed"))
    r = run_cli(["health", "-o", "json", "--data-dir", str(tmp_path)])
    doc = json.loads(r.out)
    assert r.code == 1
    assert (doc["status"], doc["healthy"], doc["failed_observers"]) == (
        "healthy",
        False,
        ["storage"],
    )
    assert doc["agent"]["observers"]["storage"]["error"] == "attach failed"
    assert doc["agent"]["status_age_seconds"] == 2


def test_watch_output_json(tmp_path: Path) -> None:
    f = Follower(["-o", "json", "--data-dir", str(tmp_path)])
    try:
        wait_ready(tmp_path, f)
        o = occ("01HM0000000000000000000042", _now_ts(), "kernel.node.cpu_stall", "critical", "m")
        write_occ(tmp_path, o)
        _, line = f.next_line(timeout=5)
        assert json.loads(line)["id"] == o.id
    finally:
        assert f.stop() == 0


# --------------------------------------------------------------------------------------------
# unknown observer / anomaly type: usage error naming the valid ones


@pytest.mark.parametrize(
    "argv",
    [
        ["recent", "--observer", "gpu"],
        ["recent", "--observer", "network,gpu"],
        ["status", "--observer", "gpu"],
        ["watch", "--observer", "gpu"],
        ["health", "gpu"],
    ],
)
def test_unknown_observer_is_a_usage_error(fixed_dir: Path, argv: list[str]) -> None:
    r = run_cli([*argv, "--data-dir", str(fixed_dir)])
    assert (r.code, r.out) == (2, "")
    assert f"usage: tapio {argv[0]}" in r.err
    assert "invalid choice 'gpu': unknown observer" in r.err
    assert "(choose from network, container, storage, node)" in r.err


@pytest.mark.parametrize("cmd", ["recent", "status", "watch"])
def test_unknown_type_is_a_usage_error(fixed_dir: Path, cmd: str) -> None:
    r = run_cli([cmd, "--type", "kernel.network.nope", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out) == (2, "")
    assert "invalid choice 'kernel.network.nope': unknown anomaly type" in r.err
    for known in ANOMALY_TYPES:
        assert known in r.err


def test_type_filter(fixed_dir: Path) -> None:
    d = ["--data-dir", str(fixed_dir)]
    r = run_cli(["recent", "--json", "--type", "kernel.node.cpu_stall", *d])
    assert (r.code, _ids(r.out)) == (0, ["3"])
    r = run_cli(["recent", "--json", "--type", "kernel.node.cpu_stall,kernel.storage.io_error", *d])
    assert _ids(r.out) == ["2", "3"]
    r = run_cli(["status", "--type", "kernel.container.oom_kill", *d])
    assert r.out.splitlines()[-1] == "total        1"


def test_known_names_come_from_the_type_registry() -> None:
    """A type added to the registry (as the DNS types will be) is accepted everywhere without
    touching the CLI or MCP code."""
    assert KNOWN_TYPES == ANOMALY_TYPES
    assert tuple(dict.fromkeys(t.split(".")[1] for t in ANOMALY_TYPES)) == OBSERVERS
    code = (
        "import io, json, sys\n"
        "import tapio.occurrence as o\n"
        "o.ANOMALY_TYPES = (*o.ANOMALY_TYPES, 'kernel.network.dns_timeout', 'kernel.gpu.xid')\n"
        "from tapio.cli.main import main\n"
        "from tapio.cli.mcp_tools import TOOLS\n"
        "err = io.StringIO()\n"
        "rc1 = main(['recent', '--type', 'kernel.network.dns_timeout', '--data-dir', sys.argv[1]],"
        " stdout=io.StringIO(), stderr=err)\n"
        "rc2 = main(['recent', '--observer', 'gpu', '--data-dir', sys.argv[1]],"
        " stdout=io.StringIO(), stderr=err)\n"
        "rc3 = main(['recent', '--type', 'kernel.dns.nope', '--data-dir', sys.argv[1]],"
        " stdout=io.StringIO(), stderr=err)\n"
        "props = TOOLS[0]['inputSchema']['properties']\n"
        "print(json.dumps([rc1, rc2, rc3, props['type']['enum'], props['observer']['enum']]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent"], capture_output=True, text=True, check=True
    )
    rc1, rc2, rc3, types, observers = json.loads(proc.stdout)
    assert (rc1, rc2, rc3) == (0, 0, 2)
    assert "kernel.network.dns_timeout" in types
    assert observers == ["network", "container", "storage", "node", "gpu", "all"]


# --------------------------------------------------------------------------------------------
# the directory that was read is named when it holds nothing


def test_missing_or_empty_data_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an occurrence")
    for d, why in ((missing, "does not exist"), (empty, "holds no occurrence files")):
        for cmd in (["status"], ["recent"], ["recent", "--json"], ["status", "--json"]):
            r = run_cli([*cmd, "--data-dir", str(d)])
            assert r.code == 0
            assert r.err == f"note: data directory {d} {why}\n", (cmd, r.err)
        r = run_cli(["health", "--data-dir", str(d)])
        assert f"data directory {d} {why}" in r.err
    # from the environment and the default, too
    r = run_cli(["status"], env={"TAPIO_DATA_DIR": str(missing)})
    assert r.err == f"note: data directory {missing} does not exist\n"
    # a directory with data but nothing in the window gets no note
    write_occ(empty, FIXED[0])
    assert run_cli(["recent", "--since", "1s", "--data-dir", str(empty)]).err == ""


def test_watch_names_a_missing_directory(tmp_path: Path) -> None:
    d = tmp_path / "later"
    f = Follower(["--data-dir", str(d)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not f.err:
            time.sleep(0.05)
        assert f.err[0] == f"note: data directory {d} does not exist yet; waiting for it\n"
        d.mkdir()
        wait_ready(d, f)  # it still follows the directory once it appears
    finally:
        assert f.stop() == 0


# --------------------------------------------------------------------------------------------
# --since / --until: relative and absolute


@pytest.mark.parametrize(
    ("args", "ids"),
    [
        (["--since", "15m"], ["1", "5", "2"]),
        (["--since", "2024-01-15T00:05:00Z"], ["1", "5", "2"]),
        (["--since", "2024-01-15T01:05:00+01:00"], ["1", "5", "2"]),  # same instant
        (["--since", "2024-01-14T19:05:00-0500"], ["1", "5", "2"]),  # ISO 8601 basic offset
        (["--since", "2024-01-15 00:05:00.5+00:00"], ["1", "5", "2"]),
        (["--until", "2024-01-15T00:00:00Z"], ["7", "3", "4", "6"]),  # inclusive
        (["--until", "20m"], ["7", "3", "4", "6"]),
        (["--since", "1h", "--until", "2024-01-15T00:15:00+00:00"], ["2", "7", "3"]),
        (["--since", "2024-01-14T00:00:00Z", "--until", "2024-01-14T23:59:59Z"], ["3", "4"]),
    ],
)
def test_since_until(fixed_dir: Path, args: list[str], ids: list[str]) -> None:
    r = run_cli(["recent", "--json", *args, "--data-dir", str(fixed_dir)])
    assert r.code == 0, r.err
    assert _ids(r.out) == ids
    status = run_cli(["status", "--json", *args, "--data-dir", str(fixed_dir)])
    assert json.loads(status.out)["total"] == len(ids)


@pytest.mark.parametrize(
    "bad", ["2024-01-15T00:05:00", "2024-01-15", "2024-13-45T00:00:00Z", "yesterday", "5"]
)
def test_since_until_reject(fixed_dir: Path, bad: str) -> None:
    for opt in ("--since", "--until"):
        r = run_cli(["recent", opt, bad, "--data-dir", str(fixed_dir)])
        assert (r.code, r.out) == (2, ""), (opt, bad)
        assert "usage: tapio recent" in r.err
        assert "RFC 3339" in r.err


# --------------------------------------------------------------------------------------------
# the subcommand's own usage on a bad flag


@pytest.mark.parametrize("cmd", ["status", "recent", "watch", "health", "mcp"])
def test_bad_flag_shows_the_subcommand_usage(fixed_dir: Path, cmd: str) -> None:
    r = run_cli([cmd, "--bogus", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out) == (2, "")
    assert r.err.startswith(f"usage: tapio {cmd} ")
    assert f"tapio {cmd}: error: unrecognized arguments: --bogus" in r.err
    # also through the real entry point, with --data-dir before the command
    proc = _tapio("--data-dir", str(fixed_dir), cmd, "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: tapio {cmd} ")


# --------------------------------------------------------------------------------------------
# who a text line is about


def test_text_lines_show_pid_comm_pod_namespace(tmp_path: Path) -> None:
    with_pod = occ(
        "01HM0000000000000000000003",
        "2024-01-15T00:19:00+00:00",
        "kernel.container.oom_kill",
        "critical",
        "OOM kill",
        {"pid": 42, "comm": "java", "pod_name": "web-1", "namespace": "shop"},
    )
    with_entity = occ(
        "01HM0000000000000000000002",
        "2024-01-15T00:18:00+00:00",
        "kernel.network.connection_refused",
        "warning",
        None,
        {"pid": 7, "comm": "cu\x1brl"},
    )
    with_entity.context = Context(namespace="ops", entities=[Entity(kind="Pod", id="u", name="p")])
    ns_only = occ(
        "01HM0000000000000000000001",
        "2024-01-15T00:17:00+00:00",
        "kernel.node.cpu_stall",
        "critical",
        "stall",
        {"pid": True, "namespace": "kube-system"},
    )
    for o in (with_pod, with_entity, ns_only):
        write_occ(tmp_path, o)
    r = run_cli(["recent", "--data-dir", str(tmp_path)])
    assert r.out.splitlines() == [
        "2024-01-15T00:19:00 CRITICAL  kernel.container.oom_kill          OOM kill"
        "  pid=42 comm=java pod=shop/web-1",
        "2024-01-15T00:18:00 WARNING   kernel.network.connection_refused  pid=7 comm=cu\\x1brl"
        " pod=ops/p",
        "2024-01-15T00:17:00 CRITICAL  kernel.node.cpu_stall              stall"
        "  namespace=kube-system",
    ]


# --------------------------------------------------------------------------------------------
# colour


def test_color_flag_and_no_color(fixed_dir: Path) -> None:
    d = ["--data-dir", str(fixed_dir)]
    plain = run_cli(["recent", *d]).out
    forced = run_cli(["recent", "--color=always", *d]).out  # not a terminal, still coloured
    assert "\x1b[1;31mCRITICAL\x1b[0m" in forced
    assert run_cli(["--color", "always", "recent", *d]).out == forced  # before the command
    assert run_cli(["recent", "--colour", "always", *d]).out == forced
    # always beats NO_COLOR and TERM=dumb: the flag is the more specific request
    assert run_cli(["recent", "--color=always", *d], env={"NO_COLOR": "1"}).out == forced
    assert run_cli(["recent", "--color=never", *d], tty=True).out == plain
    assert run_cli(["recent", "--color=auto", *d], tty=True).out == forced
    assert run_cli(["recent", *d], tty=True, env={"NO_COLOR": ""}).out == forced
    assert run_cli(["recent", *d], tty=True, env={"NO_COLOR": "0"}).out == plain
    r = run_cli(["recent", "--color=sometimes", *d])
    assert r.code == 2 and "usage: tapio recent" in r.err
    # JSON never carries escapes
    assert "\x1b" not in run_cli(["recent", "--json", "--color=always", *d]).out
    # the entry point takes --color's value as a value, not as the command
    proc = _tapio("--color", "always", "recent", *d)
    assert proc.returncode == 0 and "\x1b[1;31m" in proc.stdout


# --------------------------------------------------------------------------------------------
# container id / pod uid filters


def test_container_and_pod_filters(tmp_path: Path) -> None:
    spec = [
        ("1", {"container_id": CID, "pod_uid": POD}),
        ("2", {"container_id": CID, "pod_uid": POD.replace("-", "_")}),
        ("3", {"container_id": "ab" * 32}),
        ("4", None),
    ]
    for n, data in spec:
        write_occ(
            tmp_path,
            occ(f"01HM000000000000000000000{n}", f"2024-01-15T00:1{n}:00Z", FIXED[0].type, "error",
                "m", data),
        )  # fmt: skip
    d = ["--data-dir", str(tmp_path)]

    def ids(*args: str) -> list[str]:
        r = run_cli(["recent", "--json", *d, *args])
        assert r.code == 0, r.err
        return _ids(r.out)

    assert ids("--container-id", CID) == ["2", "1"]
    assert ids("--container-id", CID[:12].upper()) == ["2", "1"]
    assert ids("--container-id", CID[:5]) == []  # a prefix needs 6 characters
    assert ids("--pod-uid", POD) == ["2", "1"]
    assert ids("--pod-uid", POD.replace("-", "_").upper()) == ["2", "1"]
    assert ids("--container-id", "abab" * 4) == ["3"]
    assert ids("--container-id", CID, "--pod-uid", "other") == []
    r = run_cli(["status", "--container-id", CID, *d])
    assert r.out.splitlines()[-1] == "total        2"
    assert run_cli(["recent", "--container-id", "", *d]).code == 2
