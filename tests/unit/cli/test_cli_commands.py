"""status / recent / health: exact output for fixed inputs, filters, windows, warnings."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tapio.cli.store import health_status, parse_duration
from tapio.occurrence import ANOMALY_TYPES, decode, format_timestamp, parse_timestamp

from .conftest import (
    HOUR,
    MIN,
    NOW,
    Generated,
    occ,
    run_cli,
    write_junk,
    write_occ,
)

# --------------------------------------------------------------------------------------------
# status

STATUS_FIXED = """\
Observer     Count  Last Seen
---------------------------------------
container    2      2024-01-14T23:00:00
network      2      2024-01-15T00:19:30
node         2      2024-01-15T00:00:00
storage      1      2024-01-15T00:10:00
---------------------------------------
total        7
"""


def test_status_exact(fixed_dir: Path) -> None:
    r = run_cli(["status", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out, r.err) == (0, STATUS_FIXED, "")


def test_status_since_window(fixed_dir: Path) -> None:
    r = run_cli(["status", "--since", "15m", "--data-dir", str(fixed_dir)])
    assert r.out.splitlines()[2:4] == [
        "network      2      2024-01-15T00:19:30",
        "storage      1      2024-01-15T00:10:00",
    ]
    assert r.out.splitlines()[-1] == "total        3"


def test_status_empty_and_missing(tmp_path: Path) -> None:
    assert run_cli(["status", "--data-dir", str(tmp_path / "nope")]).out == (
        "no anomalies recorded\n"
    )
    assert run_cli(["status", "--data-dir", str(tmp_path)]).out == "no anomalies recorded\n"


def test_status_counts_match_files(big: Generated) -> None:
    r = run_cli(["status", "--data-dir", str(big.directory)])
    assert r.code == 0
    expected = Counter(o.type.split(".")[1] for o in big.occurrences)
    rows = r.out.splitlines()[2:-2]
    got = {row.split()[0]: int(row.split()[1]) for row in rows}
    assert got == dict(expected)
    assert r.out.splitlines()[-1] == f"total        {len(big.occurrences)}"
    last = {}
    for o in big.occurrences:
        name = o.type.split(".")[1]
        last[name] = max(last.get(name, 0), parse_timestamp(o.timestamp))
    for row in rows:
        name, _, seen = row.split()
        assert parse_timestamp(seen + "+00:00") == last[name] // 10**9 * 10**9


# --------------------------------------------------------------------------------------------
# recent

RECENT_FIXED = """\
2024-01-15T00:19:30 WARNING   kernel.network.connection_refused  TCP RST 127.0.0.1:40000 → 127.0.0.1:5555
2024-01-15T00:19:00 WARNING   kernel.network.retransmit_spike    TCP retransmit 10.0.0.1:1 → 10.0.0.2:2 (total=5, cwnd=10)
2024-01-15T00:10:00 CRITICAL  kernel.storage.io_error            I/O error on 8:0 (error=-5, read)
2024-01-15T00:00:00 WARNING   kernel.node.memory_pressure
2024-01-14T23:50:00 CRITICAL  kernel.node.cpu_stall              CPU 0 stall 55.0% (ipc=0.40)
2024-01-14T23:00:00 CRITICAL  kernel.container.oom_kill          OOM kill pid=42 (usage=512MB, limit=0MB)
2024-01-13T12:00:00 ERROR     kernel.container.abnormal_exit     Abnormal exit pid=7 (code=1, signal=0)
"""


def test_recent_exact(fixed_dir: Path) -> None:
    r = run_cli(["recent", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out, r.err) == (0, RECENT_FIXED, "")


@pytest.mark.parametrize(
    ("since", "ids"),
    [
        ("15m", [1, 5, 2]),
        ("1h", [1, 5, 2, 7, 3]),
        ("1201s", [1, 5, 2, 7]),  # 00:00:00 is exactly 1200 s ago: included; 23:50 is not
        ("1200s", [1, 5, 2, 7]),
        ("1199s", [1, 5, 2]),
        ("2h", [1, 5, 2, 7, 3, 4]),
        ("2d", [1, 5, 2, 7, 3, 4, 6]),
    ],
)
def test_recent_since_across_midnight_and_offsets(
    fixed_dir: Path, since: str, ids: list[int]
) -> None:
    r = run_cli(["recent", "--json", "--since", since, "--data-dir", str(fixed_dir)])
    assert r.code == 0
    got = [json.loads(line)["id"] for line in r.out.splitlines()]
    assert got == [f"01HM00000000000000000000{i:02d}" for i in ids]


def test_recent_json_lines_are_the_files(fixed_dir: Path) -> None:
    r = run_cli(["recent", "--json", "--data-dir", str(fixed_dir)])
    for line in r.out.splitlines():
        parsed = decode(line)
        on_disk = decode((fixed_dir / f"{parsed.id}.json").read_bytes())
        assert parsed == on_disk
        assert json.loads(line) == json.loads((fixed_dir / f"{parsed.id}.json").read_bytes())


def test_recent_empty_window(fixed_dir: Path) -> None:
    r = run_cli(["recent", "--since", "5s", "--data-dir", str(fixed_dir)])
    assert r.out == "no anomalies recorded\n"


def test_recent_filters(fixed_dir: Path) -> None:
    d = str(fixed_dir)

    def ids(*args: str) -> list[str]:
        r = run_cli(["recent", "--json", "--data-dir", d, *args])
        assert r.code == 0, r.err
        return [json.loads(line)["id"][-1] for line in r.out.splitlines()]

    assert ids("--observer", "network") == ["1", "5"]
    assert ids("--observer", "network,node") == ["1", "5", "7", "3"]
    assert ids("--observer", "network", "--observer", "storage") == ["1", "5", "2"]
    assert ids("--severity", "critical") == ["2", "3", "4"]
    assert ids("--severity", "error,critical", "--observer", "container") == ["4", "6"]
    assert ids("--min-severity", "error") == ["2", "3", "4", "6"]
    assert ids("--severity", "critical", "--since", "1h") == ["2", "3"]
    assert ids("--limit", "2") == ["1", "5"]
    assert ids("-n", "3", "--observer", "node") == ["7", "3"]


def test_recent_bad_filter_values(fixed_dir: Path) -> None:
    r = run_cli(["recent", "--severity", "fatal", "--data-dir", str(fixed_dir)])
    assert r.code == 2
    assert "invalid choice 'fatal'" in r.err
    r = run_cli(["recent", "--limit", "0", "--data-dir", str(fixed_dir)])
    assert r.code == 2


def test_recent_limits_to_20_newest_first(big: Generated) -> None:
    r = run_cli(["recent", "--json", "--data-dir", str(big.directory)])
    got = [json.loads(line)["id"] for line in r.out.splitlines()]
    expected = sorted(
        big.occurrences, key=lambda o: (parse_timestamp(o.timestamp), o.id), reverse=True
    )
    assert got == [o.id for o in expected[:20]]


def test_recent_since_matches_files(big: Generated) -> None:
    r = run_cli(
        ["recent", "--json", "--since", "3h", "--limit", "100000", "--data-dir", str(big.directory)]
    )
    got = [json.loads(line)["id"] for line in r.out.splitlines()]
    expected = sorted(
        (o for o in big.occurrences if parse_timestamp(o.timestamp) >= NOW - 3 * HOUR),
        key=lambda o: (parse_timestamp(o.timestamp), o.id),
        reverse=True,
    )
    assert got == [o.id for o in expected]
    assert 0 < len(got) < len(big.occurrences)


@pytest.mark.parametrize("bad", ["abc", "5x", "", "-5m", "0s", "5", "m", "1.5h", "5 m", "5mm"])
def test_recent_since_rejects(fixed_dir: Path, bad: str) -> None:
    r = run_cli(["recent", "--since", bad, "--data-dir", str(fixed_dir)])
    assert r.code == 2
    assert "invalid duration" in r.err or "expected one argument" in r.err
    assert r.out == ""


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30 * 10**9
    assert parse_duration("5m") == 5 * MIN
    assert parse_duration("1h") == HOUR
    assert parse_duration("2d") == 48 * HOUR
    for bad in ("abc", "5x", "", "-5m", "0s", "0d", "+5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_text_output_sanitises_control_characters(tmp_path: Path) -> None:
    write_occ(
        tmp_path,
        occ(
            "01HM0000000000000000000001",
            "2024-01-15T00:19:30+00:00",
            "kernel.network.connection_refused",
            "warning",
            "comm=\x1b[31mevil\nline",
        ),
    )
    r = run_cli(["recent", "--data-dir", str(tmp_path)])
    assert "\x1b" not in r.out
    assert r.out.count("\n") == 1
    assert "comm=\\x1b[31mevil\\x0aline" in r.out


# --------------------------------------------------------------------------------------------
# health

HEALTH_FIXED = """\
Observer     Anomalies  Last Seen            Most Frequent
----------------------------------------------------------------------------------
network      2          2024-01-15T00:19:30  kernel.network.connection_refused (1)
container    0          -                    -
storage      1          2024-01-15T00:10:00  kernel.storage.io_error (1)
node         2          2024-01-15T00:00:00  kernel.node.cpu_stall (1)

overall: degraded (5 anomalies, 2 critical in last hour)
"""


def test_health_exact(fixed_dir: Path) -> None:
    r = run_cli(["health", "--data-dir", str(fixed_dir)])
    # degraded (anomalies in the last hour): not healthy, so exit 1 (a usable check)
    assert (r.code, r.out, r.err) == (1, HEALTH_FIXED, "")


HEALTH_NETWORK = """\
Observer: network

  anomalies:  2
  critical:   0
  last seen:  2024-01-15T00:19:30

  kernel.network.connection_refused  (1)
  kernel.network.retransmit_spike    (1)
"""


def test_health_observer_exact(fixed_dir: Path) -> None:
    r = run_cli(["health", "network", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out, r.err) == (1, HEALTH_NETWORK, "")
    # --data-dir before the command and the observer after it
    r = run_cli(["--data-dir", str(fixed_dir), "health", "network"])
    assert r.out == HEALTH_NETWORK


def test_health_observer_outside_window(fixed_dir: Path) -> None:
    # The container anomalies are 80 minutes and two days old.
    r = run_cli(["health", "container", "--data-dir", str(fixed_dir)])
    assert r.out == "Observer: container\n\n  no anomalies in last hour\n"
    assert r.code == 0  # this observer is healthy even though the node is not


def test_health_status_rule() -> None:
    assert health_status(0, 0) == "healthy"
    assert health_status(1, 0) == "degraded"
    assert health_status(19, 2) == "degraded"
    assert health_status(20, 0) == "critical"
    assert health_status(3, 3) == "critical"


def test_health_critical_and_healthy(tmp_path: Path) -> None:
    for i in range(3):
        write_occ(
            tmp_path,
            occ(
                f"01HM00000000000000000000{i:02d}",
                f"2024-01-15T00:1{i}:00+00:00",
                "kernel.storage.io_error",
                "critical",
            ),
        )
    r = run_cli(["health", "--data-dir", str(tmp_path)])
    assert r.code == 1
    assert r.out.splitlines()[-1] == "overall: critical (3 anomalies, 3 critical in last hour)"
    assert "storage      3          2024-01-15T00:12:00  kernel.storage.io_error (3)" in r.out
    # two hours later nothing is in the window
    r = run_cli(["health", "--data-dir", str(tmp_path)], now=NOW + 2 * HOUR)
    assert r.code == 0
    assert r.out.splitlines()[-1] == "overall: healthy (0 anomalies, 0 critical in last hour)"


def test_health_counts_match_files(big: Generated) -> None:
    r = run_cli(["health", "--data-dir", str(big.directory)])
    recent = [o for o in big.occurrences if parse_timestamp(o.timestamp) >= NOW - HOUR]
    crit = sum(o.severity == "critical" for o in recent)
    status = health_status(len(recent), crit)
    assert r.out.splitlines()[-1] == (
        f"overall: {status} ({len(recent)} anomalies, {crit} critical in last hour)"
    )
    per = Counter(o.type.split(".")[1] for o in recent)
    for row in r.out.splitlines()[2:6]:
        name, count = row.split()[:2]
        assert int(count) == per.get(name, 0)


# --------------------------------------------------------------------------------------------
# data dir resolution, warnings, errors


def test_data_dir_env_and_default(
    fixed_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run_cli(["status"], env={"TAPIO_DATA_DIR": str(fixed_dir)})
    assert r.out == STATUS_FIXED
    # the flag wins over the environment, before or after the command
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"TAPIO_DATA_DIR": str(fixed_dir)}
    assert run_cli(["status", "--data-dir", str(empty)], env=env).out == "no anomalies recorded\n"
    assert run_cli(["--data-dir", str(empty), "status"], env=env).out == "no anomalies recorded\n"
    # default: .tapio/occurrences under the working directory
    work = tmp_path / "work"
    (work / ".tapio").mkdir(parents=True)
    os.symlink(fixed_dir, work / ".tapio" / "occurrences")
    monkeypatch.chdir(work)
    assert run_cli(["status"]).out == STATUS_FIXED


def test_corrupt_partial_invalid_files_are_skipped_with_warnings(fixed_dir: Path) -> None:
    junk = write_junk(fixed_dir)
    r = run_cli(["status", "--data-dir", str(fixed_dir)])
    assert (r.code, r.out) == (0, STATUS_FIXED)
    warnings = sorted(r.err.splitlines())
    assert len(warnings) == len(junk)
    for line, (name, reason) in zip(warnings, sorted(junk.items()), strict=True):
        assert line.startswith(f"warning: skipped {fixed_dir / name}: {reason}")
    for cmd, code in (
        (["recent"], 0),
        (["health"], 1),
        (["health", "node"], 1),
        (["recent", "--json"], 0),
    ):
        r = run_cli([*cmd, "--data-dir", str(fixed_dir)])
        assert r.code == code
        assert len(r.err.splitlines()) == len(junk)
    assert run_cli(["recent", "--data-dir", str(fixed_dir)]).out == RECENT_FIXED


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli(["status", "--data-dir", str(f)])
    assert r.code == 1
    assert r.err == f"error: {f}: Not a directory\n"


def test_usage_errors() -> None:
    assert run_cli([]).code == 2
    r = run_cli(["frobnicate"])
    assert r.code == 2
    assert "invalid choice" in r.err
    r = run_cli(["status", "--help"])
    assert r.code == 0
    assert "--data-dir" in r.out


def test_ctrl_c_exits_130_without_traceback(fixed_dir: Path) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    r = run_cli(["recent", "--since", "1h", "--data-dir", str(fixed_dir)], clock=interrupted)
    assert (r.code, r.out, r.err) == (130, "", "")


# --------------------------------------------------------------------------------------------
# colour


def test_colour_only_on_a_tty_and_never_with_no_color(fixed_dir: Path) -> None:
    d = ["--data-dir", str(fixed_dir)]
    plain = run_cli(["recent", *d])
    assert "\x1b[" not in plain.out
    coloured = run_cli(["recent", *d], tty=True)
    assert "\x1b[1;31mCRITICAL\x1b[0m" in coloured.out
    assert "\x1b[33mWARNING \x1b[0m" in coloured.out
    # stripping the escapes gives exactly the plain output (alignment unchanged)
    import re

    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured.out) == plain.out
    assert "\x1b[" not in run_cli(["recent", *d], tty=True, env={"NO_COLOR": "1"}).out
    # NO_COLOR counts only when non-empty (no-color.org): an empty value leaves colour on
    assert run_cli(["recent", *d], tty=True, env={"NO_COLOR": ""}).out == coloured.out
    assert "\x1b[" not in run_cli(["recent", *d], tty=True, env={"TERM": "dumb"}).out
    health = run_cli(["health", *d], tty=True)
    assert "overall: \x1b[33mdegraded\x1b[0m" in health.out
    assert "\x1b[" not in run_cli(["recent", "--json", *d], tty=True).out


def _run_on_pty(argv: list[str], env: dict[str, str]) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tapio", *argv],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child closed the pty
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=10) == 0
    return b"".join(chunks).decode()


def test_real_tty_colour_and_no_color(fixed_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env["TERM"] = "xterm"
    out = _run_on_pty(["recent", "--data-dir", str(fixed_dir)], env)
    assert "\x1b[1;31mCRITICAL\x1b[0m" in out
    out = _run_on_pty(["recent", "--data-dir", str(fixed_dir)], {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in out
    assert "CRITICAL" in out
    piped = subprocess.run(
        [sys.executable, "-m", "tapio", "recent", "--data-dir", str(fixed_dir)],
        capture_output=True,
        env=env,
        check=True,
    )
    assert b"\x1b[" not in piped.stdout


def test_cli_does_not_import_heavy_modules(fixed_dir: Path) -> None:
    code = (
        "import sys; from tapio.__main__ import main; "
        f"rc = main(['status', '--data-dir', {str(fixed_dir)!r}]); "
        "heavy = [m for m in ('aiohttp', 'yaml', 'prometheus_client', 'tapio.controller', "
        "'mcp', 'structlog', 'tapio.metrics') if m in sys.modules]; "
        "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in r.stderr


# --------------------------------------------------------------------------------------------
# scale


def test_100k_files_bounded_memory(tmp_path: Path) -> None:
    """status/recent/health over 100k files work and hold only what they show."""
    # tmpfs when there is one: this is about the CLI, not about the disk
    shm = Path("/dev/shm")
    d = Path(tempfile.mkdtemp(prefix="tapio-cli-", dir=shm if shm.is_dir() else tmp_path))
    body = (
        b'{"id":"%s","timestamp":"%s","source":"tapio",'
        b'"type":"kernel.network.connection_refused","severity":"warning","outcome":"failure",'
        b'"protocol_version":"1.0","error":{"code":"RST_RECEIVED","message":"m"}}'
    )
    n = 100_000
    for i in range(n):
        name = f"01HM{i:022d}"
        with open(d / f"{name}.json", "wb") as f:
            ts = format_timestamp(NOW - (n - i) * 10_000_000)  # 10 ms apart, all in the hour
            f.write(body % (name.encode(), ts.encode()))
    # A fresh interpreter runs the three commands and reports its own peak RSS: holding all
    # 100k occurrences would cost well over 100 MB; streaming needs a fraction of that. VmHWM, not
    # ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
    code = (
        "import io, resource, sys; from tapio.cli.main import main; "
        "outs = []\n"
        "for cmd in (['status'], ['recent', '--json'], ['health']):\n"
        f"    o = io.StringIO(); rc = main([*cmd, '--data-dir', {str(d)!r}], stdout=o, "
        f"clock=lambda: {NOW}); "
        "outs.append((rc, o.getvalue()))\n"
        "import json; print(json.dumps({'outs': outs, "
        "'rss_kb': int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1])}))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
    finally:
        shutil.rmtree(d)  # do not leave 100k files for pytest's temp-dir rotation
    result = json.loads(proc.stdout)
    (rc1, status), (rc2, recent), (rc3, health) = result["outs"]
    assert (rc1, rc2, rc3) == (0, 0, 1)  # health: 100k warnings in the hour is critical
    assert status.splitlines()[-1] == f"total        {n}"
    got = [json.loads(line)["id"] for line in recent.splitlines()]
    assert got == [f"01HM{i:022d}" for i in range(n - 1, n - 21, -1)]
    assert f"network      {n}" in health
    assert result["rss_kb"] < 80 * 1024, result["rss_kb"]
    print("peak RSS KiB", result["rss_kb"])


def test_generated_fixture_covers_every_type(big: Generated) -> None:
    assert Counter(o.type for o in big.occurrences) == Counter({t: 60 for t in ANOMALY_TYPES})
    # ... and each one is on disk under its id, decoding to exactly what was generated.
    for o in big.occurrences:
        assert decode((big.directory / f"{o.id}.json").read_bytes()) == o
    assert any(not o.timestamp.endswith("+00:00") for o in big.occurrences)
