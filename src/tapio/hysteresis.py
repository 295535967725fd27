"""Edge detection with hysteresis: the one state machine every judged condition goes through.

One transition when a condition starts, one when it clears, nothing while it lasts, so a value
hovering around its threshold is reported once. Used by the node observer's judges and by the
controller's scheduler judges; it has no dependencies so the controller can use it without
loading anything of the node agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Transition(Enum):
    START = "start"
    CLEAR = "clear"


@dataclass(slots=True)
class Hysteresis:
    """Edge detection: ``start`` once when a condition begins, ``clear`` once when it ends.

    The caller decides what "begins" and "ended" mean (:func:`above` and :func:`below` give the
    usual threshold/hysteresis pair); between the two the state holds, so a value hovering just
    under the threshold neither re-fires nor clears.
    """

    active: bool = False

    def step(self, starts: bool, clears: bool) -> Transition | None:
        if not self.active and starts:
            self.active = True
            return Transition.START
        if self.active and clears:
            self.active = False
            return Transition.CLEAR
        return None


def above(value: float, threshold: float, hysteresis_pct: float) -> tuple[bool, bool]:
    """(starts, clears) for a high-is-bad value: starts at ``>= threshold``, clears below
    ``threshold × hysteresis_pct / 100``. A threshold <= 0 never starts (disabled)."""
    if threshold <= 0:
        return False, True
    return value >= threshold, value < threshold * clamp_hysteresis(hysteresis_pct) / 100.0


def below(value: float, threshold: float, hysteresis_pct: float) -> tuple[bool, bool]:
    """(starts, clears) for a low-is-bad value (IPC): starts at ``< threshold``, clears at
    ``>= threshold × (2 - hysteresis_pct / 100)`` (mirror image of :func:`above`)."""
    if threshold <= 0:
        return False, True
    h = clamp_hysteresis(hysteresis_pct) / 100.0
    return value < threshold, value >= threshold * (2.0 - h)


def clamp_hysteresis(pct: float) -> float:
    """0 < hysteresis <= 100 (100 = clear as soon as the value is under the threshold)."""
    return min(100.0, max(1.0, pct))
