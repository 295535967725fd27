"""Structural pass: a deserialized document (YAML/JSON values) -> :class:`Profile` Structs.

Closed schema: an unknown key at any level is an error, as is a value of the wrong type. The
walk follows the document's own key order, so the first offending key in the file is reported
(as a YAML deserializer would). ``null`` anywhere means "not set": a ``null`` block is an empty
block and a ``null`` scalar inherits from the base.

The walk is driven by ``msgspec.inspect`` over the model Structs, so the model is the single
source of truth for names and types. Ranges are not checked here (see validate.py).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import msgspec.inspect as mi

from tapio.profile.errors import ProfileError
from tapio.profile.model import Profile


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "sequence"
    return type(value).__name__


def _type_error(path: str, expected: str, value: Any) -> ProfileError:
    return ProfileError(path, f"invalid type: expected {expected}, got {_kind(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(value: Any, t: mi.Type, path: str) -> Any:
    if isinstance(t, mi.UnionType):
        if value is None:
            return None
        (inner,) = [x for x in t.types if not isinstance(x, mi.NoneType)]
        return _convert(value, inner, path)
    if isinstance(t, mi.StructType):
        return _convert_struct(value, t, path)
    if isinstance(t, mi.BoolType):
        if not isinstance(value, bool):
            raise _type_error(path, "a boolean", value)
        return value
    if isinstance(t, mi.IntType):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "an integer", value)
        return value
    if isinstance(t, mi.FloatType):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, "a number", value)
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:
                return math.inf if value > 0 else -math.inf
        return value
    if isinstance(t, mi.StrType):
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    if isinstance(t, mi.ListType):
        if not isinstance(value, list):
            raise _type_error(path, "a sequence", value)
        return [_convert(item, t.item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"unsupported schema type {t!r} at {path}")  # a model bug, not user input


def _convert_struct(value: Any, t: mi.StructType, path: str) -> Any:
    if not isinstance(value, dict):
        raise _type_error(path, "a mapping", value)
    fields = {f.encode_name: f for f in t.fields}
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        key_text = key if isinstance(key, str) else str(key)
        field = fields.get(key_text) if isinstance(key, str) else None
        if field is None:
            raise ProfileError(_join(path, key_text), "unknown field")
        kwargs[field.name] = _convert(item, field.type, _join(path, key_text))
    return t.cls(**kwargs)


_PROFILE_TYPE = mi.type_info(Profile)


def parse_document(document: Any) -> Profile:
    """Build the Profile Structs from a deserialized document, or raise the first ProfileError."""
    if document is None:
        raise ProfileError("", "empty profile document: expected a mapping")
    profile = _convert(document, _PROFILE_TYPE, "")
    assert isinstance(profile, Profile)
    return profile


def to_document(profile: Profile) -> dict[str, Any]:
    """The plain-data form of a profile (unset fields left out), e.g. for round-trip tests."""
    result = msgspec.to_builtins(profile)
    assert isinstance(result, dict)
    return result
