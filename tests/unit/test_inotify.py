"""The one inotify binding: real kernel events on a temporary directory, errors as OSError."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tapio.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_ISDIR,
    IN_ONLYDIR,
    Event,
    Inotify,
)


def test_events_report_creation_write_and_removal(tmp_path: Path) -> None:
    ino = Inotify()
    try:
        assert ino.events() == []  # non-blocking: nothing queued yet
        wd = ino.add_watch(str(tmp_path), IN_CREATE | IN_CLOSE_WRITE | IN_DELETE | IN_ONLYDIR)
        (tmp_path / "sub").mkdir()
        (tmp_path / "f.json").write_bytes(b"{}")
        (tmp_path / "sub").rmdir()
        assert ino.events() == [
            Event(wd, IN_CREATE | IN_ISDIR, "sub"),
            Event(wd, IN_CREATE, "f.json"),
            Event(wd, IN_CLOSE_WRITE, "f.json"),
            Event(wd, IN_DELETE | IN_ISDIR, "sub"),
        ]
        ino.rm_watch(wd)
        ino.rm_watch(wd)  # already gone: not an error
    finally:
        ino.close()
    assert ino.fd == -1
    ino.close()  # idempotent


def test_watch_errors_carry_the_kernels_errno(tmp_path: Path) -> None:
    ino = Inotify()
    try:
        with pytest.raises(FileNotFoundError) as missing:
            ino.add_watch(str(tmp_path / "absent"), IN_CREATE)
        assert missing.value.filename == str(tmp_path / "absent")
        (tmp_path / "file").write_bytes(b"")
        with pytest.raises(NotADirectoryError) as notdir:
            ino.add_watch(str(tmp_path / "file"), IN_CREATE | IN_ONLYDIR)
        assert notdir.value.errno == errno.ENOTDIR
    finally:
        ino.close()


def test_descriptor_is_nonblocking_and_close_on_exec() -> None:
    ino = Inotify()
    try:
        assert os.get_blocking(ino.fd) is False
        assert os.get_inheritable(ino.fd) is False
    finally:
        ino.close()
