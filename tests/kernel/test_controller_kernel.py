"""Agent ↔ controller end to end: the real controller, the real agent, real BPF, real refusals.

One scenario, in the order an operator meets it (start, register, configure, restart), plus
runtime reconfiguration:

* A  registration, inert carriers before the first config, events accepted with the right
     ``dst_port`` and ``config_generation``;
* R  profile edits reach the kernel without a reload: network disabled → silence; re-enabled with
     a new retransmit threshold → occurrences again, with the new generation, the same BPF
     programs, the new threshold in the carrier, and heartbeats reporting the new hash;
* B1 controller SIGSTOP for 8 s then SIGCONT;
* B2 controller SIGKILL: the agent keeps running and counts the failures and drops;
* C  controller restarted on the same port: ``accepted:false`` → re-hello → converged again;
* D  agent restarted: a new registration with a clean sequence.

Occurrences are provoked with connects to closed loopback ports; each phase uses its own port so
other traffic on the host cannot be mistaken for ours.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tapio.bpf.abi import TAPIO_CONFIG

from ..ports import closed_port, refuse, reported_port
from .harness import AgentProcess, require_kernel, run, set_state_program, wait_until

pytestmark = pytest.mark.kernel

AGENT_ID = "node/ctl-kernel-worker"
NODE = "ctl-kernel-worker"
PROFILE_HEAD = (
    "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\nbase: production-default\n"
)


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel(("network",))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.loads(resp.read())


class ControllerProcess:
    """``python -m tapio controller`` on ``port`` (0: any free one; the controller reports the
    port it bound, and ``port``/``url`` are set from that report once started)."""

    def __init__(self, tmp: Path, port: int, profile: Path, tag: str) -> None:
        self.port = port
        self.url = ""
        self.log_path = tmp / f"controller-{tag}.log"
        self.cmd = [
            sys.executable,
            "-m",
            "tapio",
            "controller",
            "--listen",
            f"127.0.0.1:{port}",
            "--profile",
            str(profile),
            "--stale-after",
            "30",
            "--log-format",
            "json",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ControllerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        proc = self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = reported_port(self.log_path.read_text, lambda: proc.poll() is None)
        self.url = f"http://127.0.0.1:{self.port}"

        def healthy() -> bool:
            try:
                return bool(get_json(self.url + "/healthz")["status"] == "ok")
            except (OSError, ValueError):
                return False

        assert wait_until(healthy, 15, 0.1), self.log_path.read_text()
        return self

    def status(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/v1/status"))

    def agent(self) -> dict[str, Any] | None:
        for a in self.status()["agents"]:
            if a["agent_id"] == AGENT_ID:
                return dict(a)
        return None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    for p in reversed(procs):
        if isinstance(p, ControllerProcess):
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
            p.kill()
        else:
            p.stop()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def mine(a: AgentProcess, port: int) -> list[dict[str, Any]]:
    return [
        o
        for o in a.occurrences("kernel.network.connection_refused")
        if o["data"]["dst_port"] == port
    ]


def network_log(a: AgentProcess) -> list[dict[str, Any]]:
    return [e for e in a.logs() if e.get("event") == "network observer running"]


def carrier(program_id: int) -> bytes:
    info = json.loads(run(f"bpftool prog show id {program_id} -j").stdout)
    for map_id in info["map_ids"]:
        m = json.loads(run(f"bpftool map show id {map_id} -j").stdout)
        if m["name"] == "tapio_config":
            out = json.loads(run(f"bpftool map lookup id {map_id} key 0 0 0 0 -j").stdout)
            return bytes(int(b, 16) for b in out["value"])
    raise AssertionError("no tapio_config map on the network program")


def decoded_carrier(program_id: int) -> dict[str, Any]:
    values = TAPIO_CONFIG.struct.unpack(carrier(program_id))
    return {
        name: values[TAPIO_CONFIG.index[name]]
        for name, _ in TAPIO_CONFIG.fields
        if not name.startswith("_")
    }


def test_agent_and_controller_end_to_end(tmp_path: Path, cleanup: list[Any]) -> None:
    t_start = time.monotonic()
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE_HEAD)
    ctl = ControllerProcess(tmp_path, 0, profile, "1").start()  # reports the port it bound
    cleanup.append(ctl)

    config = (
        "[metrics]\nenabled = true\nport = 0\n"
        "[file]\nmax_files = 200000\n"
        "[agent]\nkernel_metrics_interval_secs = 1\n"
    )
    env = {"TAPIO_NODE_NAME": NODE, "TAPIO_AGENT_ID": AGENT_ID}
    args = [
        "--controller-endpoint",
        ctl.url,
        "--heartbeat-interval",
        "5",
        "--config-poll-interval",
        "5",
    ]

    def new_agent(sub: str) -> AgentProcess:
        d = tmp_path / sub
        d.mkdir()
        a = AgentProcess(d, sinks=("controller", "file"), config=config, extra_args=args, env=env)
        cleanup.append(a)
        return a

    agent = new_agent("agent1")
    agent.start()

    def scrape() -> str:
        return agent.metrics_text()

    # ---- Phase A: registration, inert until configured, events accepted ----------------------
    start_logs = network_log(agent)
    assert len(start_logs) == 1
    prog_ids: dict[str, int] = start_logs[0]["program_ids"]
    started = next(e for e in agent.logs() if e.get("event") == "agent started")
    assert started["config_generation"] == 0  # all-zero carriers until the controller answers
    assert wait_until(ctl.agent, 10), ctl.log_path.read_text()
    a0 = ctl.agent()
    assert a0 is not None and a0["node_name"] == NODE
    assert wait_until(lambda: (ctl.agent() or {}).get("reported_config_version") == "1", 10)
    st = ctl.status()
    assert st["config"]["version"] == "1"
    assert (ctl.agent() or {})["reported_config_hash"] == st["config"]["config_hash"]
    assert AGENT_ID not in st["unconverged_agents"]
    hello_log = [e for e in agent.logs() if e.get("event") == "controller hello accepted"]
    applied_log = [e for e in agent.logs() if e.get("event") == "config applied"]
    assert hello_log and applied_log
    # Before the first config nothing could be emitted: the carrier was inert. Now it is not.
    assert decoded_carrier(set_state_program(prog_ids))["generation"] == 1

    accepted0 = st["totals"]["accepted_events_total"]
    port_a = closed_port()
    refuse(port_a, 5)
    assert wait_until(lambda: len(mine(agent, port_a)) >= 5, 10)
    assert {o["data"]["config_generation"] for o in mine(agent, port_a)} == {1}
    assert wait_until(lambda: ctl.status()["totals"]["accepted_events_total"] >= accepted0 + 5, 10)

    def consistent() -> bool:
        text = scrape()
        ok = metric(text, "tapio_sink_writes_total", sink="controller", result="ok")
        return ok == ctl.status()["totals"]["accepted_events_total"] and ok >= 5

    # Everything the controller sink delivered is what the controller accepted (one agent).
    assert wait_until(consistent, 5, 0.2)
    assert metric(scrape(), "tapio_sink_drops_total", sink="controller") == 0
    a1 = ctl.agent() or {}
    assert a1["sequence"]["gaps_total"] == 0 and a1["sequence"]["regressions_total"] == 0
    assert a1["observers"]["network"] == "running"

    # ---- Phase R: runtime reconfiguration without reload --------------------------------------
    profile.write_text(PROFILE_HEAD + "overrides:\n  network:\n    enabled: false\n")
    assert wait_until(lambda: ctl.status()["config"]["version"] == "2", 5, 0.1)

    def applied(version: str) -> bool:
        return any(
            e.get("event") == "config applied" and e.get("version") == version for e in agent.logs()
        )

    assert wait_until(lambda: applied("2"), 5 + 1)  # within one poll interval
    port_off = closed_port()
    refuse(port_off, 5)
    time.sleep(1.0)
    assert mine(agent, port_off) == []  # disabled in the kernel: no record at all
    assert decoded_carrier(set_state_program(prog_ids))["flags"] & 1 == 0

    profile.write_text(
        PROFILE_HEAD
        + "overrides:\n  network:\n    enabled: true\n    retransmit: {threshold: 17}\n"
    )
    assert wait_until(lambda: ctl.status()["config"]["version"] == "3", 5, 0.1)
    assert wait_until(lambda: applied("3"), 5 + 1)
    kernel_cfg = decoded_carrier(set_state_program(prog_ids))
    assert kernel_cfg["generation"] == 3 and kernel_cfg["flags"] & 1 == 1
    assert kernel_cfg["retransmit_threshold"] == 17
    port_on = closed_port()
    refuse(port_on, 3)
    assert wait_until(lambda: len(mine(agent, port_on)) >= 3, 10)
    assert {o["data"]["config_generation"] for o in mine(agent, port_on)} == {3}
    # Same BPF programs: every id from the start log still exists, no second start log.
    for pid in prog_ids.values():
        assert run(f"bpftool prog show id {pid}", check=False).returncode == 0
    assert len(network_log(agent)) == 1
    assert not any("reload" in str(e.get("event", "")) for e in agent.logs())
    target = ctl.status()["config"]["config_hash"]

    def converged() -> bool:
        s = ctl.status()
        a: dict[str, Any] = next((x for x in s["agents"] if x["agent_id"] == AGENT_ID), {})
        return a.get("reported_config_hash") == target and AGENT_ID not in s["unconverged_agents"]

    assert wait_until(converged, 6, 0.2)
    assert (ctl.agent() or {})["reported_config_version"] == "3"

    # ---- Phase B1: controller SIGSTOP 8 s, SIGCONT ---------------------------------------------
    before_b1 = ctl.status()
    seq_b1 = (ctl.agent() or {})["sequence"]
    drops_b1 = metric(scrape(), "tapio_sink_drops_total", sink="controller")
    ctl.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    port_b1 = closed_port()
    refuse(port_b1, 10)
    # The file sink does not wait for the controller.
    assert wait_until(lambda: len(mine(agent, port_b1)) >= 10, 5)
    time.sleep(max(0.0, 8 - (time.monotonic() - stopped_at)))
    assert agent.proc is not None and agent.proc.poll() is None
    ctl.signal(signal.SIGCONT)
    assert wait_until(
        lambda: (
            ctl.status()["totals"]["accepted_events_total"]
            >= before_b1["totals"]["accepted_events_total"] + 10
        ),
        12,
        0.2,
    )
    # What happens: the batch in flight waits (10 s request timeout > 8 s stop) and is answered
    # after SIGCONT; later events waited in the sink's queue. Nothing was dropped, so the
    # controller sees no gap and no duplicate.
    seq_after = (ctl.agent() or {})["sequence"]
    assert seq_after["gaps_total"] == seq_b1["gaps_total"] == 0
    assert seq_after["regressions_total"] == 0
    assert seq_after["last_seen"] > seq_b1["last_seen"]
    assert metric(scrape(), "tapio_sink_drops_total", sink="controller") == drops_b1
    assert wait_until(consistent, 5, 0.2)

    # ---- Phase B2: controller SIGKILL ----------------------------------------------------------
    ctl.kill()
    files_before = len(agent.occurrences())
    port_b2 = closed_port()
    refuse(port_b2, 5)
    assert wait_until(lambda: len(mine(agent, port_b2)) >= 5, 5)

    def failing() -> bool:
        text = scrape()
        return (
            metric(text, "tapio_controller_send_failures_total", kind="events") > 0
            and metric(text, "tapio_sink_drops_total", sink="controller", reason="send_failed") >= 5
        )

    assert wait_until(failing, 10, 0.2), scrape()
    assert len(agent.occurrences()) > files_before
    assert agent.proc is not None and agent.proc.poll() is None

    # ---- Phase C: controller restarted on the same port ----------------------------------------
    restarted_at = int(time.time())
    ctl2 = ControllerProcess(tmp_path, ctl.port, profile, "2").start()
    assert ctl2.url == ctl.url
    cleanup.append(ctl2)
    # The agent may re-register before the first status read, so the proof that the restarted
    # controller starts empty is the registration's time, not an empty read at one instant.
    assert wait_until(ctl2.agent, 12, 0.2), agent.stderr()[-3000:]  # heartbeat → false → hello
    assert (ctl2.agent() or {})["registered_at_unix"] >= restarted_at
    assert any(
        e.get("event") == "controller does not know this agent; registering again"
        for e in agent.logs()
    )
    # A, then R's two edits, then the restarted controller's generation 1 (same hash).
    assert wait_until(
        lambda: (
            [e.get("version") for e in agent.logs() if e.get("event") == "config applied"]
            == ["1", "2", "3", "1"]
        ),
        8,
    )
    accepted_c = ctl2.status()["totals"]["accepted_events_total"]
    port_c = closed_port()
    refuse(port_c, 5)
    assert wait_until(
        lambda: ctl2.status()["totals"]["accepted_events_total"] >= accepted_c + 5, 10
    )
    assert wait_until(lambda: (ctl2.agent() or {})["sequence"]["last_seen"] is not None, 5)
    assert wait_until(lambda: len(mine(agent, port_c)) >= 5, 5)
    # The restarted controller serves generation 1 (same hash): the agent follows it.
    assert {o["data"]["config_generation"] for o in mine(agent, port_c)} == {1}
    c_agent = ctl2.agent() or {}
    assert c_agent["sequence"]["regressions_total"] == 0
    assert wait_until(lambda: AGENT_ID not in ctl2.status()["unconverged_agents"], 6, 0.2)

    # ---- Phase D: agent restarted --------------------------------------------------------------
    registered_before = c_agent["registered_at_unix"]
    assert agent.stop() == 0
    time.sleep(max(0.0, registered_before + 1 - time.time()))  # registered_at has 1 s resolution
    agent = new_agent("agent2")
    agent.start()

    def re_registered() -> bool:
        a = ctl2.agent() or {}
        return bool(a.get("registered_at_unix", 0) > registered_before)

    assert wait_until(re_registered, 10, 0.2)
    # Registered is not configured: the carriers stay all-zero (inert) until the first config is
    # applied, and a refusal before that is rightly never seen.
    assert wait_until(
        lambda: any(e.get("event") == "config applied" for e in agent.logs()), 10, 0.1
    ), agent.stderr()[-3000:]
    accepted_d = ctl2.status()["totals"]["accepted_events_total"]
    port_d = closed_port()
    refuse(port_d, 5)
    assert wait_until(
        lambda: ctl2.status()["totals"]["accepted_events_total"] >= accepted_d + 5, 10
    )
    assert wait_until(lambda: len(mine(agent, port_d)) >= 5, 5)
    d_agent = ctl2.agent() or {}
    assert d_agent["sequence"]["regressions_total"] == 0
    assert d_agent["sequence"]["gaps_total"] == 0
    assert agent.stop() == 0
    assert time.monotonic() - t_start < 120


def test_inert_until_first_config_when_the_controller_is_down(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    """No controller: the agent runs, retries hello, and its carriers stay all-zero (silent)."""
    cport = closed_port()  # nothing will ever listen here
    a = AgentProcess(
        tmp_path,
        sinks=("file",),
        config="[metrics]\nenabled = true\nport = 0\n",
        extra_args=["--controller-endpoint", f"http://127.0.0.1:{cport}"],
        env={"TAPIO_NODE_NAME": NODE, "TAPIO_AGENT_ID": AGENT_ID},
    )
    cleanup.append(a)
    a.start()
    prog = set_state_program(network_log(a)[0]["program_ids"])
    assert carrier(prog) == bytes(256)
    port = closed_port()
    refuse(port, 5)
    time.sleep(1.5)
    assert mine(a, port) == []
    text = a.metrics_text()
    assert metric(text, "tapio_controller_send_failures_total", kind="hello") >= 1
    assert re.search(r"tapio_config_generation 0\.0", text)
    assert a.stop() == 0
    # Each failed hello was logged with its cause, and no config was ever applied.
    failed = [e for e in a.logs() if e.get("event") == "controller hello failed"]
    assert failed and all(e.get("error") for e in failed), a.stderr()[-3000:]
    assert not [e for e in a.logs() if "config applied" in str(e.get("event"))]
