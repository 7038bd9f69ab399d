"""The figures of DESIGN section 7 from the filter's stats, and the one percentile
definition every harness user shares."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Iterable[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with at least a fraction `p`
    (0 < p <= 1) of the values at or below it. NaN for no values."""
    v = sorted(values)
    if not v:
        return float("nan")
    return v[max(1, min(len(v), math.ceil(len(v) * p))) - 1]


def percentiles(values: Sequence[float], points: Sequence[float] = (0.5, 0.9, 0.99), ndigits: int | None = 1
                ) -> dict[str, float | int | None]:
    """{"p50": ..., "p90": ..., "p99": ..., "max": ..., "n": ...} by `percentile`;
    None for no values."""
    out: dict[str, float | int | None] = {}
    for p in points:
        name = "p" + f"{p * 100:g}".replace(".", "")
        out[name] = None if not values else _round(percentile(values, p), ndigits)
    out["max"] = _round(max(values), ndigits) if values else None
    out["n"] = len(values)
    return out


def _round(v: float, ndigits: int | None) -> float:
    return v if ndigits is None else round(v, ndigits)


def figures(stats: dict[str, int]) -> dict[str, float | None]:
    """Sticky rate = sticky / (sticky + moved); concentration = max over nodes of
    node.*.requests / mean; error reconnection rate = upstream.errors / requests.
    `stats` are the filter's stats without the `wasmcustom.session_affinity.` prefix."""
    sticky, moved = stats.get("outcome.sticky", 0), stats.get("outcome.moved", 0)
    nodes = list(per_node(stats).values())
    requests = stats.get("requests", 0)
    return {
        "sticky_rate": sticky / (sticky + moved) if sticky + moved else None,
        "concentration": max(nodes) / (sum(nodes) / len(nodes)) if nodes and sum(nodes) else None,
        "error_rate": stats.get("upstream.errors", 0) / requests if requests else None,
    }


def per_node(stats: dict[str, int]) -> dict[str, int]:
    """{node label: requests} from the `node.<label>.requests` counters."""
    return {k[len("node."):-len(".requests")]: v for k, v in sorted(stats.items())
            if k.startswith("node.") and k.endswith(".requests")}
