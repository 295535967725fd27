"""Evidence Profiles: YAML -> validated :class:`Profile` -> :class:`CompiledConfig` -> hash.

Pipeline and error policy:

* ``load_profile`` parses YAML (safe loader, duplicate keys rejected, 1 MiB cap);
  ``parse_document`` applies the closed schema (unknown fields and wrong types rejected at every
  level, ``null`` = not set, so a ``null`` block is an empty block); ``validate`` checks ranges
  and cross-field rules; ``compile_profile`` is infallible and deterministic once validation
  passed.
* **First error wins.** There is no accumulation: one
  :class:`ProfileError` with a dotted ``path`` and a message, e.g.
  ``overrides.network.rtt_spike.ratio: value 0 out of range 1..=100`` or
  ``overrides.network.bogus: unknown field``. Structural errors (types, unknown fields) are
  found first, in the document's key order; then semantic errors in a fixed order
  (apiVersion, kind, base, network, storage, container, node_pmc, the node block, then the
  controller's scheduler block).
  Reporting one error keeps messages stable and the reload log readable; the operator fixes
  and retries.
* **Canonical hash.** ``config_hash`` = ``"sha256:" + hex(sha256(canonical_json))``, compact
  JSON in declared field order. Tapio's new fields are emitted only when they differ from their
  default (omit-if-default), so an untouched profile keeps the hash it has always had and
  that other agents and controllers of the same protocol compute
  (``production-default`` -> ``sha256:845b719f…5ddef``).

Importing this package does not import PyYAML; only ``load_profile`` does, on first use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tapio.profile.compiled import (
    NODE_DEFAULT,
    PRODUCTION_DEFAULT_HASH,
    CompiledConfig,
    ContainerConfig,
    NetworkConfig,
    NodeConfig,
    NodePmcConfig,
    StorageConfig,
    canonical_json,
    compile_resolved,
    config_hash,
    production_default,
)
from tapio.profile.errors import ProfileError
from tapio.profile.model import Profile
from tapio.profile.scheduler import SchedulerThresholds
from tapio.profile.schema import parse_document
from tapio.profile.validate import API_VERSION, KIND, PRODUCTION_DEFAULT, resolve

DEFAULT_PROFILE_YAML = f"apiVersion: {API_VERSION}\nkind: {KIND}\nbase: {PRODUCTION_DEFAULT}\n"

__all__ = [
    "API_VERSION",
    "DEFAULT_PROFILE_YAML",
    "KIND",
    "NODE_DEFAULT",
    "PRODUCTION_DEFAULT",
    "PRODUCTION_DEFAULT_HASH",
    "CompiledConfig",
    "ContainerConfig",
    "NetworkConfig",
    "NodeConfig",
    "NodePmcConfig",
    "Profile",
    "ProfileError",
    "SchedulerThresholds",
    "StorageConfig",
    "canonical_json",
    "compile_profile",
    "config_hash",
    "default_profile",
    "load_profile",
    "parse_document",
    "production_default",
    "scheduler_thresholds",
    "validate",
]


def validate(profile: Profile | Mapping[str, Any] | Any) -> Profile:
    """Return the validated Profile, building it first from a plain (deserialized) document."""
    parsed = profile if isinstance(profile, Profile) else parse_document(profile)
    resolve(parsed)
    return parsed


def compile_profile(profile: Profile) -> CompiledConfig:
    """Compile a profile; only raises if ``profile`` did not pass :func:`validate`."""
    return compile_resolved(resolve(profile))


def scheduler_thresholds(profile: Profile) -> SchedulerThresholds:
    """The controller's scheduler thresholds of a validated profile (never sent to agents)."""
    return resolve(profile).scheduler


def load_profile(
    source: str | os.PathLike[str] | None = None, *, text: str | bytes | None = None
) -> Profile:
    """Load and validate a profile from a file path (positional) or from YAML ``text=``."""
    from tapio.profile.loader import parse_yaml, read_profile_file

    if (source is None) == (text is None):
        raise TypeError("load_profile() takes exactly one of a path or text=")
    raw: str | bytes = read_profile_file(source) if source is not None else text  # type: ignore[assignment]
    return validate_document(parse_yaml(raw))


def validate_document(document: Any) -> Profile:
    profile = parse_document(document)
    resolve(profile)
    return profile


def default_profile() -> Profile:
    return Profile(api_version=API_VERSION, kind=KIND, base=PRODUCTION_DEFAULT)
