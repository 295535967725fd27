"""Reading the file sink's directory: one ``<id>.json`` occurrence per file.

Everything here streams: a directory of 100k files is scanned one file at a time and the callers
aggregate (counts, a bounded heap of the newest N), so memory stays bounded by what is shown,
not by what is on disk. Time windows use parsed timestamps (Unix nanoseconds), never string
comparison, so any RFC 3339 offset works.
"""

from __future__ import annotations

import heapq
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from tapio.occurrence import ANOMALY_TYPES, CLUSTER_TYPES, Occurrence, decode, parse_timestamp

NS_PER_SECOND = 1_000_000_000
HOUR_NS = 3600 * NS_PER_SECOND

#: Every anomaly type Tapio can record, straight from the occurrence registry, so a type (or a
#: whole observer) added there is known to the CLI and MCP filters without touching them.
KNOWN_TYPES: tuple[str, ...] = ANOMALY_TYPES
#: The observer categories (second segment of each known type), in registry order.
OBSERVERS: tuple[str, ...] = tuple(dict.fromkeys(t.split(".")[1] for t in KNOWN_TYPES))
#: What a controller's evidence window may hold on top: the cluster-level types it judges itself
#: (``cluster.scheduler.*``) and their observer categories.
CLUSTER_KNOWN_TYPES: tuple[str, ...] = KNOWN_TYPES + CLUSTER_TYPES
CLUSTER_OBSERVERS: tuple[str, ...] = tuple(
    dict.fromkeys(t.split(".")[1] for t in CLUSTER_KNOWN_TYPES)
)
SEVERITIES: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}

#: Occurrence files are a few hundred bytes; anything far larger is not one of ours.
MAX_FILE_BYTES = 4 * 1024 * 1024

DEFAULT_DATA_DIR = ".tapio/occurrences"

Clock = Callable[[], int]
"""Returns "now" as Unix nanoseconds (injected so tests can freeze time)."""

Warn = Callable[[str, str], None]
"""Called with (path, reason) for every file that is skipped."""


class DataDirError(Exception):
    """The data directory exists but cannot be listed (not a directory, permission denied)."""


def data_dir_problem(directory: str) -> tuple[str, str] | None:
    """Why ``directory`` holds no evidence at all, as ``(kind, message)`` with kind ``missing``
    or ``empty`` and a message naming the directory, so a wrong ``--data-dir`` is obvious;
    ``None`` when there is something to read (or the directory cannot be listed: that is a
    ``DataDirError`` for the reader to raise)."""
    try:
        with os.scandir(directory) as it:
            if any(is_candidate(entry.name) for entry in it):
                return None
    except FileNotFoundError:
        return "missing", f"data directory {directory} does not exist"
    except OSError:
        return None
    return "empty", f"data directory {directory} holds no occurrence files"


class SkipFile(Exception):
    """A candidate file is not a valid occurrence; ``str(exc)`` is the reason."""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """Where a controller's occurrence came from, and the document as the controller sent it."""

    node: str
    doc: bytes


@dataclass(frozen=True, slots=True)
class Record:
    """One valid occurrence: a file of a node's directory, or a document a controller forwarded
    (``forwarded``: the node that sent it and the document as forwarded)."""

    path: str
    name: str
    occ: Occurrence
    ts_ns: int
    forwarded: Forwarded | None = None

    @property
    def node(self) -> str | None:
        return self.forwarded.node if self.forwarded is not None else None

    @property
    def doc(self) -> bytes | None:
        return self.forwarded.doc if self.forwarded is not None else None

    @property
    def observer(self) -> str:
        return self.occ.observer

    @property
    def sort_key(self) -> tuple[int, str]:
        """Chronological order; the file name (a ULID) breaks ties deterministically."""
        return (self.ts_ns, self.name)


def is_candidate(name: str) -> bool:
    """``*.json`` files only; dot files (the sink's ``.<id>.json.tmp`` temp files) never count."""
    return name.endswith(".json") and not name.startswith(".")


def read_record(directory: str, name: str) -> Record:
    """Read and validate one file. Raises ``SkipFile`` (with a reason) or ``FileNotFoundError``."""
    path = os.path.join(directory, name)
    try:
        # O_NONBLOCK: a FIFO named *.json must not hang the CLI.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SkipFile(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkipFile("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise SkipFile(f"file too large ({st.st_size} bytes)")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise SkipFile(f"file too large (more than {MAX_FILE_BYTES} bytes)")
            chunks.append(chunk)
    except OSError as exc:
        raise SkipFile(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if not raw.strip():
        raise SkipFile("empty file")
    try:
        occ = decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise SkipFile(str(exc)) from None
    try:
        ts_ns = parse_timestamp(occ.timestamp)
    except ValueError:
        raise SkipFile(f"invalid timestamp {occ.timestamp!r}") from None
    return Record(path=path, name=name, occ=occ, ts_ns=ts_ns)


def list_names(directory: str) -> Iterator[str]:
    """Candidate file names in ``directory`` (none if it does not exist)."""
    try:
        it = os.scandir(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataDirError(f"{directory}: {exc.strerror or exc}") from None
    with it:
        for entry in it:
            if is_candidate(entry.name):
                yield entry.name


def iter_records(directory: str, warn: Warn) -> Iterator[Record]:
    """Every valid occurrence in ``directory``, in directory order, one file in memory at a time.

    A missing directory yields nothing; files deleted while scanning (retention) are silently
    passed over; invalid ones are reported through ``warn``.
    """
    for name in list_names(directory):
        try:
            yield read_record(directory, name)
        except FileNotFoundError:
            continue
        except SkipFile as exc:
            warn(os.path.join(directory, name), str(exc))


# --------------------------------------------------------------------------------------------
# filters and durations

_DURATION_RE = re.compile(r"^([0-9]+)([smhd])$")
_UNIT_NS = {"s": NS_PER_SECOND, "m": 60 * NS_PER_SECOND, "h": HOUR_NS, "d": 24 * HOUR_NS}


def parse_duration(text: str) -> int:
    """``<N><unit>`` (unit s, m, h or d; N a positive integer) to nanoseconds."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a positive integer followed by s, m, h or d"
            " (e.g. 30s, 5m, 1h, 2d)"
        )
    value = int(m.group(1))
    if value <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return value * _UNIT_NS[m.group(2)]


_ABSOLUTE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_time(text: str, now_ns: int) -> int:
    """A point in time as Unix nanoseconds: a duration before ``now_ns`` (``15m``, ``2h``) or an
    absolute RFC 3339 / ISO 8601 time with a UTC offset (``2024-01-15T00:10:00Z``,
    ``2024-01-15T01:10:00+01:00``). A time without an offset is refused rather than guessed."""
    text = text.strip()
    if _ABSOLUTE_RE.match(text):
        try:
            return parse_timestamp(text)
        except ValueError:
            raise ValueError(
                f"invalid time {text!r}: expected RFC 3339 with a UTC offset"
                " (e.g. 2024-01-15T00:10:00Z or 2024-01-15T01:10:00+01:00)"
            ) from None
    try:
        return now_ns - parse_duration(text)
    except ValueError as exc:
        raise ValueError(
            f"{exc}, or an RFC 3339 time with a UTC offset (e.g. 2024-01-15T00:10:00Z)"
        ) from None


def normalize_uid(value: str) -> str:
    """Pod UIDs appear with dashes (API) or underscores (systemd cgroup names)."""
    return value.strip().lower().replace("_", "-")


def container_matches(rec: Record, container_id: str | None, pod_uid: str | None) -> bool:
    """The ``container_id`` fact equals ``container_id`` or starts with it (a prefix of at
    least 6 characters, e.g. the 12-character short id); ``pod_uid`` equal in either spelling."""
    data = rec.occ.data or {}
    if container_id is not None:
        cid = data.get("container_id")
        if not isinstance(cid, str) or not cid:
            return False
        want = container_id.strip().lower()
        have = cid.lower()
        if have != want and not (len(want) >= 6 and have.startswith(want)):
            return False
    if pod_uid is not None:
        uid = data.get("pod_uid")
        if not isinstance(uid, str) or normalize_uid(uid) != normalize_uid(pod_uid):
            return False
    return True


def _text_fact(data: dict[str, object], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def workload_matches(wanted: frozenset[str], kind: str, name: str) -> bool:
    """``name`` or ``Kind/name`` (kind compared case-insensitively) against the workload."""
    for want in wanted:
        want_kind, sep, want_name = want.rpartition("/")
        if want_name == name and (not sep or want_kind.lower() == kind.lower()):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Filter:
    """Which occurrences a command shows. ``None`` means "no restriction".

    ``nodes``/``namespaces``/``pods``/``workloads`` are the cluster view's filters: the node
    that sent an occurrence and the Kubernetes names the controller's enrichment added
    (``pod_namespace``, ``pod_name``, ``workload_kind``/``workload_name``).
    """

    observers: frozenset[str] | None = None
    severities: frozenset[str] | None = None
    min_severity: str | None = None
    since_ns: int | None = None  # absolute cutoff (Unix ns): keep timestamps >= since_ns
    until_ns: int | None = None  # absolute cutoff (Unix ns): keep timestamps <= until_ns
    types: frozenset[str] | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    nodes: frozenset[str] | None = None
    namespaces: frozenset[str] | None = None
    pods: frozenset[str] | None = None
    workloads: frozenset[str] | None = None

    @property
    def needs_data(self) -> bool:
        """True when :meth:`matches_keys` alone cannot decide (container or pod uid facts)."""
        return self.container_id is not None or self.pod_uid is not None

    def matches_keys(
        self,
        ts_ns: int,
        type_: str,
        severity: str,
        node: str | None = None,
        namespace: str = "",
        pod: str = "",
        workload: tuple[str, str] = ("", ""),
    ) -> bool:
        """Everything but the container facts, from the fields an index keeps (the evidence
        window filters without decoding a document)."""
        if self.since_ns is not None and ts_ns < self.since_ns:
            return False
        if self.until_ns is not None and ts_ns > self.until_ns:
            return False
        if self.observers is not None:
            parts = type_.split(".")
            observer = parts[1] if len(parts) >= 2 and parts[1] else "unknown"
            if observer not in self.observers:
                return False
        if self.types is not None and type_ not in self.types:
            return False
        if self.severities is not None and severity not in self.severities:
            return False
        if self.nodes is not None and node not in self.nodes:
            return False
        if self.namespaces is not None and namespace not in self.namespaces:
            return False
        if self.pods is not None and pod not in self.pods:
            return False
        if self.workloads is not None and not workload_matches(self.workloads, *workload):
            return False
        return self.min_severity is None or (
            SEVERITY_RANK.get(severity, -1) >= SEVERITY_RANK[self.min_severity]
        )

    def matches(self, rec: Record) -> bool:
        data = rec.occ.data or {}
        if not self.matches_keys(
            rec.ts_ns,
            rec.occ.type,
            rec.occ.severity,
            rec.node,
            _text_fact(data, "pod_namespace"),
            _text_fact(data, "pod_name"),
            (_text_fact(data, "workload_kind"), _text_fact(data, "workload_name")),
        ):
            return False
        return not self.needs_data or container_matches(rec, self.container_id, self.pod_uid)


def select(records: Iterable[Record], flt: Filter) -> Iterator[Record]:
    return (rec for rec in records if flt.matches(rec))


def newest(records: Iterable[Record], limit: int | None) -> list[Record]:
    """Newest first; at most ``limit`` (holding only ``limit`` records while scanning)."""
    if limit is None:
        return sorted(records, key=lambda r: r.sort_key, reverse=True)
    if limit <= 0:
        for _ in records:  # still scan, so invalid files are reported consistently
            pass
        return []
    return heapq.nlargest(limit, records, key=lambda r: r.sort_key)


# --------------------------------------------------------------------------------------------
# aggregates


@dataclass(slots=True)
class ObserverStats:
    name: str
    count: int = 0
    critical: int = 0
    last_ns: int | None = None
    types: Counter[str] = field(default_factory=Counter)

    def add(self, rec: Record) -> None:
        self.count += 1
        if rec.occ.severity == "critical":
            self.critical += 1
        if self.last_ns is None or rec.ts_ns > self.last_ns:
            self.last_ns = rec.ts_ns
        self.types[rec.occ.type] += 1

    def most_frequent(self) -> tuple[str, int] | None:
        """The most frequent type; ties go to the alphabetically first type (deterministic)."""
        if not self.types:
            return None
        name, count = min(self.types.items(), key=lambda kv: (-kv[1], kv[0]))
        return name, count

    @property
    def status(self) -> str:
        return health_status(self.count, self.critical)

    def types_by_count(self) -> list[tuple[str, int]]:
        return sorted(self.types.items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass(slots=True)
class Summary:
    """Per-observer aggregates over a stream of records (O(observers x types) memory)."""

    observers: dict[str, ObserverStats] = field(default_factory=dict)
    total: int = 0
    critical: int = 0

    def add(self, rec: Record) -> None:
        name = rec.observer
        stats = self.observers.get(name)
        if stats is None:
            stats = self.observers[name] = ObserverStats(name)
        stats.add(rec)
        self.total += 1
        if rec.occ.severity == "critical":
            self.critical += 1

    @property
    def status(self) -> str:
        return health_status(self.total, self.critical)

    def get(self, name: str) -> ObserverStats:
        return self.observers.get(name) or ObserverStats(name)

    def ordered(self, *, include_fixed: bool) -> list[ObserverStats]:
        """The four fixed observers first (all of them when asked, else those present), then any
        other category by name."""
        names = [n for n in OBSERVERS if include_fixed or n in self.observers]
        names += sorted(n for n in self.observers if n not in OBSERVERS)
        return [self.get(n) for n in names]


def summarize(records: Iterable[Record]) -> Summary:
    summary = Summary()
    for rec in records:
        summary.add(rec)
    return summary


def health_status(total: int, critical: int) -> str:
    """``critical`` if >= 3 critical or >= 20 total; ``degraded`` if any; else ``healthy``."""
    if critical >= 3 or total >= 20:
        return "critical"
    if total > 0:
        return "degraded"
    return "healthy"


def display_ts(ns: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in UTC: the first 19 characters of the ``+00:00`` stamp, short
    enough for a table column and still sortable."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // NS_PER_SECOND))


def system_clock() -> int:
    return time.time_ns()
