"""The drainer parks after a quiet spell and a ring's wakeup brings it back at once.

The rings are recorded bytes (``RingBuffer`` over buffers) whose fd is a pipe: a byte written
to the pipe stands for the kernel's wakeup of the ring. The wake flags are anonymous shared
memory in place of the objects' ``tapio_wake`` maps.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from tapio.agent.pipeline import RunningObserver, drainer_for
from tapio.bpf import ringbuf
from tapio.bpf.ringbuf import Drainer, RingBuffer, WakeFlag

PAGE = 4096
SIZE = 4096
RECORD = 16


class Ring:
    """A ring buffer over plain buffers, its fd a pipe, and a producer for it."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        self.cons, self.prod = bytearray(PAGE), bytearray(PAGE + SIZE)
        self.ring = RingBuffer(self.cons, self.prod, SIZE, page=PAGE, fd=self.rfd)
        self.pos = 0

    def record(self, value: int) -> None:
        off = PAGE + (self.pos & (SIZE - 1))
        self.prod[off : off + 8 + RECORD] = struct.pack("<II", RECORD, 0) + struct.pack(
            "<QQ", value, 0
        )
        self.pos += 8 + RECORD
        struct.pack_into("<Q", self.prod, 0, self.pos)

    def wake(self) -> None:
        os.write(self.wfd, b"!")

    def quiet(self) -> None:
        os.set_blocking(self.rfd, False)
        try:
            while os.read(self.rfd, 64):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class Quiet:
    """An observer with one fixed-size record and, optionally, a side ring."""

    name = "quiet-test"
    record = SimpleNamespace(size=RECORD)

    def __init__(self, side: Sequence[tuple[RingBuffer, Callable[[], None]]] = ()) -> None:
        self.side = list(side)

    def side_rings(self) -> Sequence[tuple[RingBuffer, Callable[[], None]]]:
        return self.side


@pytest.fixture
def rings() -> Iterator[list[Ring]]:
    made = [Ring(), Ring()]
    yield made
    for r in made:
        r.close()


def running(obs: Quiet, ring: RingBuffer | None, flagged: bool = True) -> RunningObserver:
    maps = {"tapio_wake": SimpleNamespace(fd=-1)} if flagged else {}
    return RunningObserver(obs, SimpleNamespace(maps=maps), ring)  # type: ignore[arg-type]


async def wait_for(pred: Callable[[], Any], secs: float) -> Any:
    with anyio.move_on_after(secs):
        while not (value := pred()):
            await anyio.sleep(0.005)
        return value
    return pred()


async def test_quiet_rings_park_and_a_wakeup_unparks_at_once(
    rings: list[Ring], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ringbuf, "PARK_AFTER_SECS", 0.1)
    monkeypatch.setattr(ringbuf, "PARKED_PASS_SECS", 30.0)  # no safety pass in this test
    main, side = rings
    notified: list[float] = []
    obs = Quiet([(side.ring, lambda: notified.append(time.monotonic()))])
    drainer = drainer_for([running(obs, main.ring)], 0.01, 100)
    send, recv = anyio.create_memory_object_stream[bytes](8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drainer.run, {obs.name: send})
        assert await wait_for(lambda: drainer.flags and all(f.is_set() for f in drainer.flags), 2)
        # parked: a record without a wakeup waits (no timer runs) ...
        main.record(7)
        await anyio.sleep(0.3)
        assert recv.statistics().current_buffer_used == 0
        # ... and the ring's wakeup delivers it at once and clears the flag
        t0 = time.monotonic()
        main.wake()
        with anyio.fail_after(1):
            frames = await recv.receive()
        assert time.monotonic() - t0 < 1.0  # (the safety pass is 30 s away)
        main.quiet()
        assert struct.unpack_from("<Q", frames, 8)[0] == 7
        assert not any(f.is_set() for f in drainer.flags)
        # quiet again: parked again; a record on the side ring wakes it and reaches its owner
        assert await wait_for(lambda: all(f.is_set() for f in drainer.flags), 2)
        side.record(9)
        side.wake()
        assert await wait_for(lambda: notified, 1)
        assert not any(f.is_set() for f in drainer.flags)
        drainer.scope.cancel()
    assert drainer.flags == []


async def test_an_object_without_a_wake_flag_keeps_the_drain_timer(
    rings: list[Ring], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ringbuf, "PARK_AFTER_SECS", 0.05)
    main, other = rings
    a, b = Quiet(), Quiet()
    b.name = "other-test"  # type: ignore[misc]
    drainer = drainer_for([running(a, main.ring), running(b, other.ring, flagged=False)], 0.01, 100)
    sends = {}
    recvs = []
    for name in (a.name, b.name):
        s, r = anyio.create_memory_object_stream[bytes](8)
        sends[name] = s
        recvs.append(r)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drainer.run, sends)
        await anyio.sleep(0.3)
        assert drainer.flags == []  # one ring could not be woken: never park
        other.record(3)  # no wakeup: the 10 ms timer finds it
        with anyio.fail_after(1):
            frames = await recvs[1].receive()
        assert struct.unpack_from("<Q", frames, 8)[0] == 3
        drainer.scope.cancel()


def test_parking_rechecks_the_rings_after_setting_the_flags(rings: list[Ring]) -> None:
    """A record that came just before the flags were seen: parking is called off."""
    main, _ = rings
    flag = WakeFlag(-1)
    ep = select.epoll()
    try:
        assert Drainer._park([flag], [main.ring], ep) is True
        assert flag.is_set()
        main.record(1)
        assert Drainer._park([flag], [main.ring], ep) is False
        assert not flag.is_set()
    finally:
        ep.close()
        flag.close()
