"""The controller's settings file (``--config FILE``): the command-line settings as YAML.

Example::

    listen: 0.0.0.0:8080
    agent_token_file: /etc/tapio/token/token
    forward:
      - nats://nats.tapio.svc:4222
      - file:///var/lib/tapio/evidence
    nats_stream: TAPIO_EVIDENCE
    nats_max_age: 604800       # seconds
    nats_max_bytes: 1073741824
    queue_max_events: 10000
    drain_grace: 10
    kubernetes: true
    pod_labels: [app.kubernetes.io/name, team]
    evidence_window_max_events: 50000
    scheduler_metrics_url: https://kube-scheduler.kube-system:10259/metrics
    scheduler_token_file: /var/run/secrets/kubernetes.io/serviceaccount/token
    scheduler_insecure_skip_tls_verify: true

A flag given on the command line wins over the file; ``forward`` URLs from both are used. An
unknown key or a wrong type is an error at start-up, not a silently ignored setting.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

import yaml

MAX_CONFIG_BYTES: Final = 64 * 1024

_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "listen": (str,),
    "profile": (str,),
    "agent_token_file": (str,),
    "tls_cert": (str,),
    "tls_key": (str,),
    "queue_max_events": (int,),
    "drain_grace": (int, float),
    "nats_stream": (str,),
    "nats_max_age": (int, float),
    "nats_max_bytes": (int,),
    "kubernetes": (bool,),
    "kubeconfig": (str,),
    "evidence_window_max_events": (int,),
    "evidence_window_max_age": (int, float),
    "evidence_window_max_bytes": (int,),
    "scheduler_metrics_url": (str,),
    "scheduler_scrape_interval": (int, float),
    "scheduler_ca_file": (str,),
    "scheduler_token_file": (str,),
    "scheduler_insecure_skip_tls_verify": (bool,),
}


_FLOATS: Final = frozenset(k for k, t in _TYPES.items() if t == (int, float))


class ConfigFileError(Exception):
    pass


def load_config_file(path: str) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as exc:
        raise ConfigFileError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"--config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigFileError(f"--config {path} must be a mapping")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ("forward", "pod_labels"):
            if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
                raise ConfigFileError(f"--config: {key} must be a list of strings")
            out[key] = list(value)
            continue
        types = _TYPES.get(str(key))
        if types is None:
            raise ConfigFileError(f"--config: unknown setting {key!r}")
        if isinstance(value, bool) != (types == (bool,)) or not isinstance(value, types):
            raise ConfigFileError(f"--config: {key} has the wrong type")
        if isinstance(value, int | float) and not value > 0:
            raise ConfigFileError(f"--config: {key} must be positive")
        out[str(key)] = value
    return out


def apply_config_file(args: argparse.Namespace, path: str) -> None:
    """Fill the settings the command line left unset from ``path``."""
    for key, value in load_config_file(path).items():
        if key == "forward":
            args.forward = value + list(args.forward)
        elif key == "pod_labels":
            args.pod_label = value + list(args.pod_label)
        elif key == "listen":
            if args.listen is None and args.addr is None:
                args.listen = value
        elif getattr(args, key, None) is None:
            floats = _FLOATS
            setattr(args, key, float(value) if key in floats else value)
