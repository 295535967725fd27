"""Events carry kernel facts, never conclusions: the keys that would make them reasoning.

An agent reports what the kernel said; explaining it is someone else's job. The controller
rejects a batch whose facts hold any of :data:`REASONING_KEYS` at any depth (objects and
arrays), naming the first one found in a stable order (``$.a[2].root_cause``, object keys
sorted), so the message does not depend on how a peer ordered its keys.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import Any, Final

REASONING_KEYS: Final = frozenset(
    {
        "reasoning",
        "root_cause",
        "rootCause",
        "causal_chain",
        "causalChain",
        "explanation",
        "possible_causes",
        "possibleCauses",
        "suggested_fix",
        "suggestedFix",
        "remediation",
        "recommendation",
    }
)


#: Value types that hold no keys: facts whose values are all of these are searched in one step.
_FLAT: Final = frozenset({str, int, float, bool, type(None)})
_DICT: Final = frozenset({dict})


def flat_facts_without_reasoning(facts: list[Any]) -> bool:
    """True when every element is an object of scalars (what agents send) with no reasoning
    key, checked over all of them at once; False also means "look closer", never "invalid"."""
    return (
        _DICT.issuperset(map(type, facts))
        and _FLAT.issuperset(map(type, itertools.chain.from_iterable(map(dict.values, facts))))
        and REASONING_KEYS.isdisjoint(itertools.chain.from_iterable(facts))
    )


_TYPE: Final = operator.attrgetter("type")
_OBSERVER: Final = operator.attrgetter("observer")
_FACTS: Final = operator.attrgetter("facts")


def kernel_events_without_reasoning(events: Sequence[Any], facts_proven: str) -> bool:
    """True when every event (a ``WireEvent``) passes its own ``validate``: a ``kernel.*`` type,
    an observer, facts without a reasoning key; proven for a whole batch in a few passes at C
    speed. False means "not proven": each event is then validated in turn, for the first error.
    ``facts_proven``: what the decoder already proved of every event's facts: an object of
    scalars ("flat": only their keys are looked at), one without a reasoning key too ("clean":
    nothing is), or nothing ("")."""
    types = list(map(_TYPE, events))
    if not (
        all(map(str.strip, types))
        and all(map(str.strip, map(_OBSERVER, events)))
        and all(map(str.startswith, types, itertools.repeat("kernel.")))
    ):
        return False
    if facts_proven == "clean":
        return True
    facts = list(map(_FACTS, events))
    if facts_proven == "flat":
        return REASONING_KEYS.isdisjoint(set[str]().union(*facts))  # one pass over the keys
    return flat_facts_without_reasoning(facts)


def _holds_reasoning_key(facts: Any) -> bool:
    if type(facts) is dict and _FLAT.issuperset(map(type, facts.values())):
        return not REASONING_KEYS.isdisjoint(facts)  # the common case: one flat object
    stack = [facts]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if not REASONING_KEYS.isdisjoint(value):
                return True
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append(child)
    return False


def find_reasoning_field(facts: Any) -> str | None:
    """Path of the first reasoning key in ``facts`` (objects and arrays), or None.

    Iterative depth-first pre-order walk, object keys sorted: bounded stack use whatever the
    nesting (the body limit bounds the total work).
    """
    if not _holds_reasoning_key(facts):  # the common case, without building any path
        return None
    stack: list[tuple[Any, str]] = [(facts, "$")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            keys = sorted(value)
            for key in keys:
                if key in REASONING_KEYS:
                    return f"{path}.{key}"
            # Push in reverse so the smallest key is explored first.
            for key in reversed(keys):
                child = value[key]
                if isinstance(child, dict | list):
                    stack.append((child, f"{path}.{key}"))
        elif isinstance(value, list):
            for index in range(len(value) - 1, -1, -1):
                child = value[index]
                if isinstance(child, dict | list):
                    stack.append((child, f"{path}[{index}]"))
    return None
