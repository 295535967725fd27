"""Observers: parse one BPF object's records and classify them into occurrences.

``REGISTRY`` maps an observer name to ``module:Class``; the agent imports only what it runs.
"""

from __future__ import annotations

import importlib

from tapio.observers.base import Observer

REGISTRY: dict[str, str] = {
    "network": "tapio.observers.network:NetworkObserver",
    "node": "tapio.observers.node:NodeObserver",
    "container": "tapio.observers.container:ContainerObserver",
    "storage": "tapio.observers.storage:StorageObserver",
}


def observer_class(name: str) -> type[Observer]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown observer {name!r} (known: {', '.join(sorted(REGISTRY))})"
        ) from None
    module, _, cls = target.partition(":")
    obj: type[Observer] = getattr(importlib.import_module(module), cls)
    return obj
