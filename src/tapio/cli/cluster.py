"""``tapio recent|status|health --controller URL``: the node commands over the cluster's evidence.

The same filters, tables and JSON as on a node (one implementation: :mod:`tapio.cli.store` and
:mod:`tapio.cli.render`), over what the controller's evidence window holds, plus the cluster
filters ``--namespace``, ``--pod``, ``--node`` and ``--workload``, which the controller applies
(so only matching evidence crosses the network). ``recent`` adds NODE and POD columns; its
``--json`` lines are the documents as the controller forwarded them (with ``node_name``).

``health`` judges the last hour of the window like a node's health, and adds what the controller
knows of its agents (``GET /v1/status``): an agent that reports an observer as ``failed``, or
that stopped sending heartbeats (stale), makes the cluster not healthy. Exit codes are the node
commands': 0, 1 (for ``recent``/``status`` the controller cannot be asked), 2, 3 (``health``
cannot ask the controller).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tapio.cli import render
from tapio.cli.commands import (
    EXIT_ERROR,
    EXIT_NO_DATA,
    EXIT_OK,
    EXIT_UNHEALTHY,
    Console,
    health_doc,
)
from tapio.cli.remote import Controller, RemoteError
from tapio.cli.store import Record, parse_time, summarize
from tapio.occurrence import format_timestamp

_SCOPE = (("namespace", "namespace"), ("pod", "pod"), ("node", "node"), ("workload", "workload"))


def query(args: argparse.Namespace, con: Console, *, since: str | None = None) -> list[Any]:
    """The ``/v1/evidence`` parameters of the command's filters (times resolved now)."""
    now = con.clock()
    q: list[tuple[str, str]] = []
    since = since or getattr(args, "since", None)
    until = getattr(args, "until", None)
    if since is not None:
        q.append(("since", format_timestamp(parse_time(since, now))))
    if until is not None:
        q.append(("until", format_timestamp(parse_time(until, now))))
    for key in ("observer", "type", "severity"):
        values = getattr(args, key, None)
        if values:
            q.append((key, ",".join(values)))
    for key in ("min_severity", "container_id", "pod_uid"):
        value = getattr(args, key, None)
        if value:
            q.append((key, value))
    for attr, key in _SCOPE:
        value = getattr(args, attr, None)
        if value:
            q.append((key, value))
    return q


def controller(args: argparse.Namespace) -> Controller:
    return Controller.from_args(args.controller, args.token_file, getattr(args, "ca_file", None))


def cmd_recent(args: argparse.Namespace, con: Console) -> int:
    try:
        records = list(controller(args).evidence(query(args, con), args.limit))
    except RemoteError as exc:
        con.error(str(exc))
        return EXIT_ERROR
    if not records:
        if args.output != "json":
            con.out(["no anomalies recorded"])
    elif args.output == "json":
        con.out([rec.doc.decode() if rec.doc is not None else "{}" for rec in records])
    else:
        con.out(render.cluster_lines(records, con.style))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, con: Console) -> int:
    try:
        summary = summarize(controller(args).evidence(query(args, con), None))
    except RemoteError as exc:
        con.error(str(exc))
        return EXIT_ERROR
    if args.output == "json":
        con.out([json.dumps(render.status_json(summary), ensure_ascii=False)])
    else:
        con.out(render.status_table(summary))
    return EXIT_OK


def _agents(status: Any, node: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Per agent: node, observers not running; and the stale agents (by node name)."""
    agents = status.get("agents", []) if isinstance(status, dict) else []
    stale_ids = set(status.get("stale_agents", []) if isinstance(status, dict) else [])
    out = []
    for agent in agents if isinstance(agents, list) else []:
        if not isinstance(agent, dict) or (node and agent.get("node_name") != node):
            continue
        observers = agent.get("observers") or {}
        out.append(
            {
                "agent_id": agent.get("agent_id"),
                "node_name": agent.get("node_name"),
                "stale": agent.get("agent_id") in stale_ids,
                "observers": {k: v for k, v in sorted(observers.items()) if v != "running"},
            }
        )
    stale = sorted(str(a["node_name"]) for a in out if a["stale"])
    return out, stale


def cmd_health(args: argparse.Namespace, con: Console) -> int:
    try:
        ctl = controller(args)
        records: list[Record] = list(ctl.evidence(query(args, con, since="1h"), None))
        status = ctl.get("/v1/status")
    except RemoteError as exc:
        con.error(f"no data: {exc}")
        return EXIT_NO_DATA
    observer: str | None = args.observer
    summary = summarize(records)
    agents, stale = _agents(status, getattr(args, "node", None))
    failed = sorted(
        f"{a['node_name']}/{name}"
        for a in agents
        for name, state in a["observers"].items()
        if state == "failed" and (observer is None or name == observer)
    )
    state = summary.get(observer).status if observer else summary.status
    healthy = state == "healthy" and not failed and not stale
    if args.output == "json":
        doc = health_doc(summary, observer, healthy, failed, stale_nodes=stale, agents=agents)
        con.out([json.dumps(doc, ensure_ascii=False)])
        return EXIT_OK if healthy else EXIT_UNHEALTHY
    if observer:
        con.out(render.health_observer(summary.get(observer)))
    else:
        con.out(render.health_table(summary, con.style))
    lines = [f"agents: {len(agents)} ({len(stale)} stale)"] if agents or stale else []
    for agent in agents:
        for name, st in agent["observers"].items():
            if observer is None or name == observer:
                lines.append(f"  {render.clean(str(agent['node_name']))}: {name} {st}")
        if agent["stale"]:
            lines.append(f"  {render.clean(str(agent['node_name']))}: stale (no heartbeat)")
    if lines:
        con.out(["", *lines])
    return EXIT_OK if healthy else EXIT_UNHEALTHY


COMMANDS = {"recent": cmd_recent, "status": cmd_status, "health": cmd_health}
