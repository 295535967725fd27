"""kube-scheduler's Prometheus text -> the two families the scheduler judges read.

* ``scheduler_scheduling_attempt_duration_seconds`` (histogram, labels ``result`` and
  ``profile``): cumulative bucket counts per ``result``, summed over profiles;
* ``scheduler_pending_pods`` (gauge, label ``queue``: active, backoff, unschedulable, gated).

The scheduler's page holds hundreds of other families (plugin histograms, client-go, Go
runtime); parsing all of them with ``prometheus_client``'s pure-Python parser would cost far more
than the two we need, on the controller's event loop. The page is therefore cut down to those
families' lines first (their ``# HELP``/``# TYPE`` lines and samples), and only that is parsed.
A page that does not parse, or lacks both families, is a scrape failure, never evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

ATTEMPT_DURATION: Final = "scheduler_scheduling_attempt_duration_seconds"
PENDING_PODS: Final = "scheduler_pending_pods"
_PREFIXES: Final = (ATTEMPT_DURATION, PENDING_PODS)
#: Bounds on what one page may contribute (label values are the scheduler's, but a proxy in
#: front of it could serve anything).
MAX_RESULTS: Final = 16
MAX_QUEUES: Final = 16
MAX_BUCKETS: Final = 64


class ExpositionError(ValueError):
    """The page cannot be read as the scheduler's metrics (the reason is the metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative counts at each upper bound, ascending; the last bound is ``+Inf``."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.counts[-1] if self.counts else 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One scrape: when (monotonic seconds) and the two families' values."""

    at: float
    attempts: dict[str, Histogram] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)


def _relevant(text: str) -> str:
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] in _PREFIXES:
                keep.append(line)
        elif line.startswith(_PREFIXES):
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse(text: str, at: float) -> Snapshot:
    """The snapshot of one page; :class:`ExpositionError` when it cannot be one."""
    buckets: dict[str, dict[float, float]] = {}
    pending: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(_relevant(text)):
            for sample in family.samples:
                if sample.name == ATTEMPT_DURATION + "_bucket":
                    result = sample.labels.get("result", "")
                    le = float(sample.labels.get("le", "nan"))
                    if math.isnan(le) or not math.isfinite(sample.value):
                        raise ExpositionError("parse", f"bad bucket in {ATTEMPT_DURATION}")
                    per = buckets.setdefault(result, {})
                    per[le] = per.get(le, 0.0) + sample.value
                elif sample.name == PENDING_PODS:
                    queue = sample.labels.get("queue", "")
                    pending[queue] = pending.get(queue, 0.0) + sample.value
    except ExpositionError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ExpositionError("parse", f"not Prometheus text: {type(exc).__name__}") from None
    if not buckets and not pending:
        raise ExpositionError(
            "no_metrics", f"neither {ATTEMPT_DURATION} nor {PENDING_PODS} on the page"
        )
    if len(buckets) > MAX_RESULTS or len(pending) > MAX_QUEUES:
        raise ExpositionError("parse", "too many result or queue label values")
    attempts = {}
    for result, per in buckets.items():
        if len(per) > MAX_BUCKETS or math.inf not in per:
            raise ExpositionError("parse", f"{ATTEMPT_DURATION} buckets malformed")
        bounds = tuple(sorted(per))
        attempts[result] = Histogram(bounds, tuple(per[b] for b in bounds))
    return Snapshot(at, attempts, pending)


def quantile(q: float, bounds: tuple[float, ...], counts: tuple[float, ...]) -> float:
    """The ``q`` quantile of a cumulative histogram, interpolated linearly inside the bucket it
    falls in (as Prometheus' ``histogram_quantile`` does); in the ``+Inf`` bucket it is the
    highest finite bound: a lower bound of the truth, never an invented number."""
    total = counts[-1]
    if total <= 0:
        return 0.0
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            in_bucket = count - lower_count
            if in_bucket <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket
        lower_bound, lower_count = bound, count
    return lower_bound
