"""Statistics for comparisons we publish: paired bootstrap intervals, win counts, Wilson intervals,
and the check that every method of a comparison ran under the same rules.

* :func:`bootstrap_mean_ci` - percentile bootstrap interval of a mean (resampling windows);
* :func:`paired_difference` - mean of ``a - b`` over the same windows, its bootstrap interval and
  how many windows ``a`` wins (lower is better: KL, NLL);
* :func:`wilson_interval` - score interval of a proportion (task accuracy over N examples);
* :func:`check_same_rules` - refuses results whose bounded methods differ in sinks, buffer,
  budget or budget accounting at one budget.
"""

from __future__ import annotations

import math
import random

from kvbound.errors import KVBoundError

#: no claim is made from a task cell with fewer examples
MIN_CLAIM_N = 32


def bootstrap_mean_ci(values: list[float], *, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded: same input, same CI)."""
    n = len(values)
    if n == 0:
        raise KVBoundError("No values to bootstrap.")
    if n == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


def paired_difference(a: list[float], b: list[float], **kw) -> dict:
    """``a - b`` window by window (the same windows, in the same order): mean, 95% bootstrap CI,
    and the windows where ``a`` is lower (wins; lower is better) or equal (ties)."""
    if len(a) != len(b):
        raise KVBoundError(f"Paired values need the same windows: {len(a)} vs {len(b)}.")
    diff = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_mean_ci(diff, **kw)
    return {"mean": sum(diff) / len(diff), "ci": [lo, hi], "wins": sum(d < 0 for d in diff),
            "ties": sum(d == 0 for d in diff), "n": len(diff)}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (both ends in [0, 1])."""
    if n <= 0:
        raise KVBoundError("A proportion needs n > 0.")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


RULES = ("sinks", "buffer", "layer_budget_total", "positions")


def check_same_rules(rows: list[dict]) -> None:
    """Every bounded row (``settings`` recorded, i.e. not the full cache) of one budget must share
    sinks, buffer, positions and budget accounting; else a comparison would favour one method."""
    by_budget: dict[int, dict[str, tuple]] = {}
    for row in rows:
        settings = row.get("settings")
        if not settings:
            continue
        rules = tuple(settings.get(k) for k in RULES)
        seen = by_budget.setdefault(settings["budget"], {})
        seen[row.get("label", row.get("method"))] = rules
    for budget, methods in by_budget.items():
        if len(set(methods.values())) > 1:
            detail = "; ".join(f"{m}: {dict(zip(RULES, r))}" for m, r in methods.items())
            raise KVBoundError(f"Methods at budget {budget} ran under different rules ({detail}); "
                               "give every method the same sinks, buffer and positions.")
