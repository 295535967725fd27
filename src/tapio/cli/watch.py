"""Following the occurrence directory: inotify with a polling fallback.

Guarantees:

* a file is printed at most once (names are remembered until the file is deleted);
* an atomically written file (``.<id>.json.tmp`` renamed to ``<id>.json``) is never missed:
  ``IN_MOVED_TO`` reports the rename, ``IN_CLOSE_WRITE`` a plain write once the writer closes,
  and a periodic rescan (plus a full rescan on queue overflow) catches anything else;
* temp and dot files are ignored; a file that does not decode yet (a writer still busy) is
  retried and only reported as skipped once it has stayed invalid for a while;
* memory is bounded by the directory (names of deleted files are forgotten).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tapio.cli.store import (
    DataDirError,
    Record,
    SkipFile,
    Warn,
    is_candidate,
    list_names,
    read_record,
)
from tapio.inotify import (
    IN_CLOSE_WRITE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
)

WATCH_MASK = (
    IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
) | IN_ONLYDIR

POLL_INTERVAL = 0.2
"""Polling fallback period: new files show up within a fifth of a second."""
RESCAN_INTERVAL = 5.0
"""Safety rescan period while inotify is active."""
SETTLE_SECONDS = 2.0
"""How long a file may stay undecodable (a writer still busy) before it is reported."""

Emit = Callable[[list[Record]], None]


@dataclass
class Watcher:
    """Follows ``directory`` and hands new valid records, oldest first, to ``emit``."""

    directory: str
    emit: Emit
    warn: Warn
    use_inotify: bool = True
    monotonic: Callable[[], float] = time.monotonic
    seen: set[str] = field(default_factory=set)
    pending: dict[str, float] = field(default_factory=dict)  # name -> first failure time
    _inotify: Inotify | None = None
    _wd: int | None = None
    _dir_exists: bool = False

    # -- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        """Remember what is already there (it is not printed) and arm inotify if possible."""
        if self.use_inotify:
            try:
                self._inotify = Inotify()
            except (OSError, AttributeError):
                self._inotify = None
        self._arm()
        self.seen.update(self._listing())

    def _arm(self) -> None:
        """(Re)attach the inotify watch; the directory may not exist yet."""
        self._wd = None
        if self._inotify is not None:
            try:
                self._wd = self._inotify.add_watch(self.directory, WATCH_MASK)
            except FileNotFoundError:
                self._wd = None
            except OSError as exc:
                if not os.path.exists(self.directory):
                    self._wd = None
                elif os.path.isdir(self.directory):
                    # e.g. ENOSPC (watch limit): fall back to polling for good.
                    self._inotify.close()
                    self._inotify = None
                else:
                    raise DataDirError(f"{self.directory}: {exc.strerror}") from None
        self._dir_exists = os.path.isdir(self.directory)

    def _listing(self) -> set[str]:
        return set(list_names(self.directory))

    @property
    def inotify_active(self) -> bool:
        return self._inotify is not None and self._wd is not None

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    # -- processing ----------------------------------------------------------------------

    def _try(self, names: Iterable[str], *, final: bool) -> list[Record]:
        """Decode each unseen candidate; ``final`` (the writer closed or renamed it) reports
        a failure at once, otherwise the name is retried until it settles."""
        now = self.monotonic()
        out: list[Record] = []
        for name in names:
            if name in self.seen or not is_candidate(name):
                continue
            try:
                rec = read_record(self.directory, name)
            except FileNotFoundError:
                self.pending.pop(name, None)
                continue
            except SkipFile as exc:
                first = self.pending.setdefault(name, now)
                if final or now - first >= SETTLE_SECONDS:
                    self.pending.pop(name, None)
                    self.seen.add(name)
                    self.warn(os.path.join(self.directory, name), str(exc))
                continue
            self.pending.pop(name, None)
            self.seen.add(name)
            out.append(rec)
        return out

    def rescan(self) -> list[Record]:
        """Compare with a full listing: pick up anything missed and forget deleted names."""
        names = self._listing()
        self.seen.intersection_update(names)
        for gone in [n for n in self.pending if n not in names]:
            del self.pending[gone]
        return self._try(sorted(names - self.seen), final=False)

    def _handle_events(self, events: list[Event]) -> list[Record]:
        ready: list[str] = []
        rescan = False
        for ev in events:
            mask, name = ev.mask, ev.name
            if mask & IN_Q_OVERFLOW:
                rescan = True
            elif mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                # The directory went away (or was moved); wait for it to come back.
                self._wd = None
                rescan = True
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self.seen.discard(name)
                self.pending.pop(name, None)
            elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO) and name not in ready:
                ready.append(name)
        out = self._try(ready, final=True)
        if rescan:
            out += self.rescan()
        return out

    def step(self, timeout: float) -> list[Record]:
        """Wait up to ``timeout`` seconds for changes; return new records oldest first."""
        out: list[Record] = []
        if self._inotify is not None and self._wd is None:
            # Directory missing (or removed): re-arm once it exists, then rescan it.
            if os.path.isdir(self.directory):
                self._arm()
                out += self.rescan()
            else:
                time.sleep(timeout)
                return []
        if self.inotify_active:
            assert self._inotify is not None
            readable, _, _ = select.select([self._inotify.fd], [], [], timeout)
            if readable:
                out += self._handle_events(self._inotify.events())
            if self.pending:
                out += self._try(sorted(self.pending), final=False)
        else:
            time.sleep(timeout)
            out += self.rescan()
        out.sort(key=lambda r: r.sort_key)
        return out

    def run(self, stop: Callable[[], bool] | None = None) -> None:
        """Follow until ``stop()`` is true (or forever; Ctrl-C ends it in the caller)."""
        last_rescan = self.monotonic()
        while stop is None or not stop():
            if self.inotify_active:
                timeout = 0.1 if self.pending else RESCAN_INTERVAL / 5
            else:
                timeout = POLL_INTERVAL
            records = self.step(timeout)
            if self.inotify_active and self.monotonic() - last_rescan >= RESCAN_INTERVAL:
                records += self.rescan()
                records.sort(key=lambda r: r.sort_key)
                last_rescan = self.monotonic()
            if records:
                self.emit(records)
