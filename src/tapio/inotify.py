"""The kernel's inotify, bound once: the agent's cgroup watch and ``tapio watch`` both use it.

The three system calls are reached through ctypes on the running process's own symbols
(``CDLL(None)``): the interpreter is linked against libc, so nothing is searched for at run
time (``ctypes.util.find_library`` would spawn ``ldconfig`` and can miss in a slim image),
and no dependency is added. Every failure is an ``OSError`` with the errno the kernel gave.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")  # struct inotify_event without its name
READ_SIZE = 64 * 1024


def _raise_errno(*args: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), *args)


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str


def parse_events(buf: bytes) -> Iterator[Event]:
    """``struct inotify_event`` records (the name is NUL-padded to its ``len``)."""
    off = 0
    while off + _HEADER.size <= len(buf):
        wd, mask, _cookie, length = _HEADER.unpack_from(buf, off)
        off += _HEADER.size
        raw = buf[off : off + length]
        off += length
        yield Event(wd, mask, os.fsdecode(raw.split(b"\0", 1)[0]))


class Inotify:
    """A non-blocking, close-on-exec inotify descriptor; raises ``OSError`` when unavailable."""

    def __init__(self) -> None:
        c = ctypes.CDLL(None, use_errno=True)
        self._init1 = c.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = c.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = c.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm.restype = ctypes.c_int
        fd = int(self._init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            _raise_errno()
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), mask))
        if wd < 0:
            _raise_errno(path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Drop a watch; one the kernel already dropped (``EINVAL``) is not an error."""
        self._rm(self.fd, wd)

    def read(self) -> bytes:
        """What is queued (at most :data:`READ_SIZE` bytes); empty when nothing is."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return b""

    def events(self) -> list[Event]:
        return list(parse_events(self.read()))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
