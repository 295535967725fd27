"""Text rendering: the status and health tables and the occurrence lines, aligned, optionally
coloured, plus the JSON documents of ``status --json`` and ``health --json``.

Colour (``--color=auto``, the default) is used only when the output stream is a terminal,
``NO_COLOR`` is unset or empty, and ``TERM`` is not ``dumb``; ``--color=always|never`` overrides
all of that. Text coming from the evidence (types, messages, ``comm``: chosen by whatever process
ran) is stripped of control characters so it cannot drive the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from tapio.cli.store import ObserverStats, Record, Summary, display_ts
from tapio.occurrence import format_timestamp

COLOR_MODES = ("auto", "always", "never")

_RESET = "\x1b[0m"
_SEVERITY_SGR = {
    "critical": "\x1b[1;31m",
    "error": "\x1b[31m",
    "warning": "\x1b[33m",
    "info": "\x1b[36m",
    "debug": "\x1b[2m",
}
_STATUS_SGR = {"healthy": "\x1b[32m", "degraded": "\x1b[33m", "critical": "\x1b[1;31m"}

#: Width of the type column in ``watch`` (the longest of the standard types).
WATCH_TYPE_WIDTH = len("kernel.network.connection_timeout")

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def colour_enabled(stream: TextIO, environ: Mapping[str, str], mode: str = "auto") -> bool:
    """``always``/``never`` as asked; ``auto``: only a terminal, with ``NO_COLOR`` unset or
    empty (an empty value does not count, as no-color.org says) and not ``TERM=dumb``."""
    if mode != "auto":
        return mode == "always"
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def clean(text: str) -> str:
    """Replace control characters (escape sequences, newlines) with visible ``\\xNN`` escapes."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, sgr: str | None, text: str) -> str:
        if not self.enabled or sgr is None:
            return text
        return f"{sgr}{text}{_RESET}"

    def severity(self, severity: str, text: str) -> str:
        return self._wrap(_SEVERITY_SGR.get(severity), text)

    def status(self, status: str, text: str) -> str:
        return self._wrap(_STATUS_SGR.get(status), text)

    def bold(self, text: str) -> str:
        return self._wrap("\x1b[1m", text)


def _str_fact(data: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def pod_of(rec: Record) -> tuple[str | None, str | None]:
    """(namespace, pod name) from the facts or the context, each None when absent."""
    occ = rec.occ
    data = occ.data or {}
    pod = _str_fact(data, "pod_name", "k8s_pod_name", "pod")
    namespace = _str_fact(data, "namespace", "pod_namespace", "k8s_namespace")
    ctx = occ.context
    if ctx is not None:
        namespace = namespace or ctx.namespace
        for entity in ctx.entities or ():
            if pod is None and entity.kind.lower() == "pod":
                pod = entity.name or entity.id
    return namespace, pod


def who(rec: Record, *, pod_column: bool = False) -> str:
    """``pid=<n> comm=<c> pod=<ns>/<name>``: the facts that say which process (and pod) an
    occurrence is about, those present in the evidence only; empty when none is. With
    ``pod_column`` the pod is left out (the cluster view shows it in a column of its own)."""
    occ = rec.occ
    data = occ.data or {}
    parts = []
    pid = data.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool):
        parts.append(f"pid={pid}")
    comm = _str_fact(data, "comm")
    if comm is not None:
        parts.append(f"comm={clean(comm)}")
    if pod_column:
        return " ".join(parts)
    namespace, pod = pod_of(rec)
    if pod is not None:
        parts.append(f"pod={clean(namespace + '/' if namespace else '')}{clean(pod)}")
    elif namespace is not None:
        parts.append(f"namespace={clean(namespace)}")
    return " ".join(parts)


def occurrence_line(rec: Record, style: Style, type_width: int = 0) -> str:
    """``<ts[..19]> <SEVERITY padded 8>  <type>[  <error.message>][  pid=.. comm=.. pod=..]``;
    the type is padded to ``type_width`` when more follows so messages line up."""
    occ = rec.occ
    severity = style.severity(occ.severity, occ.severity.upper().ljust(8))
    type_ = clean(occ.type)
    line = f"{display_ts(rec.ts_ns)} {severity}  "
    message = occ.error.message if occ.error is not None else ""
    tail = [clean(message)] if message else []
    facts = who(rec)
    if facts:
        tail.append(facts)
    if tail:
        return f"{line}{type_.ljust(type_width)}  " + "  ".join(tail)
    return line + type_


def occurrence_lines(records: Sequence[Record], style: Style) -> list[str]:
    width = max((len(clean(r.occ.type)) for r in records), default=0)
    return [occurrence_line(rec, style, width) for rec in records]


def pod_column(rec: Record) -> str:
    namespace, pod = pod_of(rec)
    if pod is not None:
        return clean(f"{namespace}/{pod}" if namespace else pod)
    return clean(f"{namespace}/-") if namespace else "-"


def cluster_lines(records: Sequence[Record], style: Style) -> list[str]:
    """The cluster view's lines: the node's line with NODE and POD columns after the severity,
    ``<ts> <SEVERITY>  <node>  <namespace/pod>  <type>[  <message>][  pid=.. comm=..]``
    (``-`` where an occurrence names no node or pod, e.g. the controller's scheduler evidence).
    """
    nodes = [clean(r.node) if r.node else "-" for r in records]
    pods = [pod_column(r) for r in records]
    node_w = max((len(n) for n in nodes), default=0)
    pod_w = max((len(p) for p in pods), default=0)
    type_w = max((len(clean(r.occ.type)) for r in records), default=0)
    lines = []
    for rec, node, pod in zip(records, nodes, pods, strict=True):
        occ = rec.occ
        severity = style.severity(occ.severity, occ.severity.upper().ljust(8))
        head = f"{display_ts(rec.ts_ns)} {severity}  {node.ljust(node_w)}  {pod.ljust(pod_w)}  "
        message = occ.error.message if occ.error is not None else ""
        tail = [clean(message)] if message else []
        facts = who(rec, pod_column=True)
        if facts:
            tail.append(facts)
        type_ = clean(occ.type)
        lines.append(f"{head}{type_.ljust(type_w)}  " + "  ".join(tail) if tail else head + type_)
    return lines


def status_table(summary: Summary) -> list[str]:
    """The ``status`` table (rows sorted by observer name)."""
    if summary.total == 0:
        return ["no anomalies recorded"]
    rows = [summary.observers[name] for name in sorted(summary.observers)]
    name_w = max([12, *(len(clean(r.name)) for r in rows)])
    count_w = max([5, len(str(summary.total))])
    header = f"{'Observer'.ljust(name_w)} {'Count'.ljust(count_w)}  Last Seen"
    rule = "-" * (name_w + 1 + count_w + 2 + 19)
    lines = [header, rule]
    for row in rows:
        last = display_ts(row.last_ns) if row.last_ns is not None else "-"
        lines.append(f"{clean(row.name).ljust(name_w)} {str(row.count).ljust(count_w)}  {last}")
    lines += [rule, f"{'total'.ljust(name_w)} {summary.total}"]
    return lines


def _most_frequent(stats: ObserverStats) -> str:
    top = stats.most_frequent()
    return "-" if top is None else f"{clean(top[0])} ({top[1]})"


def health_table(summary: Summary, style: Style) -> list[str]:
    """``health`` without an observer: the four observers (plus any other category seen)."""
    rows = summary.ordered(include_fixed=True)
    name_w = max([12, *(len(clean(r.name)) for r in rows)])
    count_w = max([9, len(str(summary.total))])
    header = (
        f"{'Observer'.ljust(name_w)} {'Anomalies'.ljust(count_w)}  {'Last Seen'.ljust(20)} "
        "Most Frequent"
    )
    body = []
    for row in rows:
        last = display_ts(row.last_ns) if row.last_ns is not None else "-"
        body.append(
            f"{clean(row.name).ljust(name_w)} {str(row.count).ljust(count_w)}  {last.ljust(20)} "
            f"{_most_frequent(row)}"
        )
    rule = "-" * max(len(line) for line in [header, *body])
    status = summary.status
    overall = (
        f"overall: {style.status(status, status)} ({summary.total} anomalies, "
        f"{summary.critical} critical in last hour)"
    )
    return [header, rule, *body, "", overall]


def health_observer(stats: ObserverStats) -> list[str]:
    """``health <observer>``: counts, last seen and the types by frequency."""
    lines = [f"Observer: {clean(stats.name)}", ""]
    if stats.count == 0 or stats.last_ns is None:
        return [*lines, "  no anomalies in last hour"]
    lines += [
        f"  anomalies:  {stats.count}",
        f"  critical:   {stats.critical}",
        f"  last seen:  {display_ts(stats.last_ns)}",
        "",
    ]
    types = stats.types_by_count()
    width = max(len(clean(t)) for t, _ in types)
    lines += [f"  {clean(t).ljust(width)}  ({n})" for t, n in types]
    return lines


# --------------------------------------------------------------------------------------------
# JSON documents (``--json``): the same facts as the tables, with full RFC 3339 timestamps


def _ts(ns: int | None) -> str | None:
    return None if ns is None else format_timestamp(ns)


def status_json(summary: Summary) -> dict[str, Any]:
    return {
        "total": summary.total,
        "observers": [
            {"name": s.name, "count": s.count, "last_seen": _ts(s.last_ns)}
            for s in (summary.observers[n] for n in sorted(summary.observers))
        ],
    }


def observer_json(stats: ObserverStats) -> dict[str, Any]:
    return {
        "name": stats.name,
        "anomalies": stats.count,
        "critical": stats.critical,
        "status": stats.status,
        "last_seen": _ts(stats.last_ns),
        "types": dict(stats.types_by_count()),
    }
