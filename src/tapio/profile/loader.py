"""YAML front end. The only module of the package that imports PyYAML.

Uses ``yaml.SafeLoader`` (no arbitrary objects) with duplicate mapping keys rejected: PyYAML
would silently keep the last one, which hides typos in a file meant to be reviewed. Input is
capped at :data:`MAX_PROFILE_BYTES` so a runaway file cannot stall the controller's reload loop.
"""

from __future__ import annotations

import os
from typing import Any, Final

import yaml

from tapio.profile.errors import ProfileError

MAX_PROFILE_BYTES: Final = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key; SafeLoader reports it below
                continue
            if duplicate:
                line = key_node.start_mark.line + 1
                raise ProfileError("", f"duplicate key {key!r} at line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str | bytes) -> Any:
    if len(text) > MAX_PROFILE_BYTES:
        raise ProfileError("", f"profile larger than {MAX_PROFILE_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ProfileError("", f"invalid YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise ProfileError("", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ProfileError("", "invalid YAML: nested too deeply") from None


def read_profile_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError("", f"cannot read profile {os.fspath(path)}: {exc.strerror}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError("", f"profile larger than {MAX_PROFILE_BYTES} bytes")
    return data
