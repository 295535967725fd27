"""``tapio watch``: a real subprocess following a directory written like the file sink."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapio.cli.store import Record
from tapio.cli.watch import Watcher
from tapio.occurrence import Occurrence, encode_pretty, new_occurrence

from .conftest import SEVERITY_OF, write_occ

DEADLINE = 1.0  # each file must be printed within this many seconds


class Follower:
    """``python -m tapio watch`` with stdout lines collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tapio", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.monotonic(), raw.decode().rstrip("\n")))

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err.append(raw.decode())

    def next_line(self, timeout: float) -> tuple[float, str]:
        return self.lines.get(timeout=timeout)

    def no_more(self, wait: float) -> list[str]:
        time.sleep(wait)
        extra = []
        while not self.lines.empty():
            extra.append(self.lines.get_nowait()[1])
        return extra

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # fail without leaving the process behind
            self.proc.wait(timeout=5)
            raise
        time.sleep(0.05)
        return code


def wait_ready(directory: Path, follower: Follower) -> None:
    """Startup (interpreter + listing) is not part of the latency being measured: write a
    probe file until it is echoed."""
    probe_deadline = time.monotonic() + 20
    while time.monotonic() < probe_deadline:
        probe = new_occurrence("kernel.node.ipc_degradation", "warning", "in_progress")
        write_occ(directory, probe)
        try:
            _, line = follower.next_line(timeout=0.5)
        except queue.Empty:
            continue
        assert "kernel.node.ipc_degradation" in line
        # drain any duplicate probe echoes from earlier attempts
        follower.no_more(0.3)
        return
    raise AssertionError(f"watch never became ready: {''.join(follower.err)}")


def make(type_: str, i: int) -> Occurrence:
    return new_occurrence(
        type_,
        SEVERITY_OF[type_],  # type: ignore[arg-type]
        "failure",
        code="X",
        message=f"message {i}",
        data={"i": i},
    )


TYPES = list(SEVERITY_OF)


@pytest.fixture
def watch_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "occ"
    d.mkdir()
    # existing files are not printed
    for i in range(30):
        write_occ(d, make(TYPES[i % len(TYPES)], -i))
    yield d


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_watch_prints_each_new_file_exactly_once(watch_dir: Path, mode: str) -> None:
    args = ["--data-dir", str(watch_dir), "--json"] + (["--poll"] if mode == "poll" else [])
    f = Follower(args)
    try:
        wait_ready(watch_dir, f)
        written: dict[str, Occurrence] = {}
        for i in range(44 if mode == "inotify" else 12):
            o = make(TYPES[i % len(TYPES)], i)
            start = time.monotonic()
            if i % 4 == 3:
                # non-atomic: a partial write visible for a while, then completed in place
                raw = encode_pretty(o)
                path = watch_dir / f"{o.id}.json"
                with open(path, "wb") as fh:
                    fh.write(raw[:40])
                    fh.flush()
                    time.sleep(0.05)
                    fh.write(raw[40:])
            else:
                write_occ(watch_dir, o)
            written[o.id] = o
            seen_at, line = f.next_line(timeout=DEADLINE + 0.5)
            assert seen_at - start < DEADLINE + 0.3, (mode, seen_at - start)
            got = json.loads(line)
            assert got["id"] == o.id
            assert got == json.loads(encode_pretty(o))
        # a burst of atomic writes, plus sink temp files that are never renamed
        burst = [make(TYPES[i % len(TYPES)], 100 + i) for i in range(50)]
        for o in burst:
            write_occ(watch_dir, o)
            (watch_dir / f".{o.id}x.json.tmp").write_bytes(b"{")
        deadline = time.monotonic() + DEADLINE + 1
        got_ids = []
        while len(got_ids) < len(burst) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got_ids.append(json.loads(f.next_line(timeout=0.2)[1])["id"])
        assert sorted(got_ids) == sorted(o.id for o in burst)
        # rewriting or touching an already printed file never re-prints it
        victim = burst[0]
        write_occ(watch_dir, victim)
        os.utime(watch_dir / f"{victim.id}.json")
        assert f.no_more(0.8) == []
    finally:
        code = f.stop()
    assert code == 0
    assert "Traceback" not in "".join(f.err)


def test_watch_text_filters_and_warnings(watch_dir: Path) -> None:
    f = Follower(["--data-dir", str(watch_dir), "--network", "--storage", "--node"])
    try:
        wait_ready(watch_dir, f)
        shown = []
        for i, type_ in enumerate(TYPES):
            o = make(type_, i)
            write_occ(watch_dir, o)
            if ".container." not in type_:
                shown.append(o)
        (watch_dir / "corrupt.json").write_bytes(b"{not json")
        lines = [f.next_line(timeout=DEADLINE + 0.5)[1] for _ in shown]
        assert f.no_more(0.5) == []
        for o, line in zip(shown, lines, strict=True):
            assert line.split()[1] == o.severity.upper()
            assert line.split()[2] == o.type
            assert line.endswith(f"  message {TYPES.index(o.type)}")
            assert line[:19] == o.timestamp[:19]
        # messages line up (the type column is padded to the longest standard type)
        assert len({line.index("message") for line in lines}) == 1
    finally:
        code = f.stop()
    assert code == 0
    err = "".join(f.err)
    assert f"warning: skipped {watch_dir / 'corrupt.json'}: JSON is malformed" in err
    assert "Traceback" not in err


def test_watch_severity_and_observer_options(watch_dir: Path) -> None:
    f = Follower(["--data-dir", str(watch_dir), "--json", "--severity", "critical"])
    try:
        wait_probe = new_occurrence("kernel.storage.io_error", "critical", "failure")
        deadline = time.monotonic() + 20
        while True:  # readiness probe that passes the filter
            write_occ(watch_dir, wait_probe)
            try:
                f.next_line(timeout=0.5)
                break
            except queue.Empty:
                assert time.monotonic() < deadline
                wait_probe = new_occurrence("kernel.storage.io_error", "critical", "failure")
        f.no_more(0.3)
        expected = []
        for i, type_ in enumerate(TYPES):
            o = make(type_, i)
            write_occ(watch_dir, o)
            if o.severity == "critical":
                expected.append(o.id)
        got = [json.loads(f.next_line(timeout=DEADLINE + 0.5)[1])["id"] for _ in expected]
        assert got == expected
        assert f.no_more(0.4) == []
    finally:
        assert f.stop() == 0


def test_watch_directory_created_later(tmp_path: Path) -> None:
    d = tmp_path / "later"
    f = Follower(["--data-dir", str(d), "--json"])
    try:
        time.sleep(0.5)
        d.mkdir()
        o = make(TYPES[0], 1)
        write_occ(d, o)
        _, line = f.next_line(timeout=3)
        assert json.loads(line)["id"] == o.id
        o2 = make(TYPES[1], 2)
        write_occ(d, o2)
        _, line = f.next_line(timeout=DEADLINE + 0.5)
        assert json.loads(line)["id"] == o2.id
    finally:
        assert f.stop() == 0


# --------------------------------------------------------------------------------------------
# in-process Watcher (deterministic parts)


class Collect:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.warnings: list[tuple[str, str]] = []

    def emit(self, records: list[Record]) -> None:
        self.records.extend(records)

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append((path, reason))


@pytest.mark.parametrize("use_inotify", [True, False])
def test_watcher_partial_file_settles_then_prints_once(tmp_path: Path, use_inotify: bool) -> None:
    c = Collect()
    clock = [0.0]
    w = Watcher(str(tmp_path), c.emit, c.warn, use_inotify=use_inotify, monotonic=lambda: clock[0])
    w.start()
    try:
        o = make(TYPES[0], 1)
        raw = encode_pretty(o)
        path = tmp_path / f"{o.id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        os.write(fd, raw[:30])
        assert w.rescan() == []  # partial: pending, not reported yet
        assert c.warnings == []
        assert o.id + ".json" in w.pending
        os.write(fd, raw[30:])
        os.close(fd)
        records = w.step(0.2)
        if not records:  # polling mode picks it up on the retry
            records = w.rescan()
        assert [r.occ.id for r in records] == [o.id]
        assert w.rescan() == [] and w.step(0.05) == []
        # a file that never becomes valid is reported once, after settling
        bad = tmp_path / "bad.json"
        bad.write_bytes(b"{")
        w.rescan()
        assert c.warnings == []
        clock[0] += 5
        w.rescan()
        assert c.warnings == [(str(bad), c.warnings[0][1])]
        w.rescan()
        assert len(c.warnings) == 1
        # deleted names are forgotten (bounded memory)
        path.unlink()
        bad.unlink()
        w.step(0.1)
        w.rescan()
        assert w.seen == set()
    finally:
        w.close()


def test_watcher_follows_a_recreated_directory(tmp_path: Path) -> None:
    d = tmp_path / "occ"
    d.mkdir()
    c = Collect()
    w = Watcher(str(d), c.emit, c.warn)
    w.start()
    try:
        assert w.inotify_active
        first = make(TYPES[0], 1)
        write_occ(d, first)
        assert [r.occ.id for r in w.step(1.0)] == [first.id]
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        assert w.step(0.5) == []
        assert not w.inotify_active
        d.mkdir()
        second = make(TYPES[1], 2)
        write_occ(d, second)
        records = w.step(0.5)  # re-arms and rescans the new directory
        assert [r.occ.id for r in records] == [second.id]
        assert w.inotify_active
        third = make(TYPES[2], 3)
        write_occ(d, third)
        assert [r.occ.id for r in w.step(1.0)] == [third.id]
    finally:
        w.close()


def test_watch_on_a_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "tapio", "watch", "--data-dir", str(f)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"error: {f}: Not a directory\n"
