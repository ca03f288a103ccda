"""The fidelity sweep we publish: every method x budget under the same rules, in two sink regimes,
with confidence intervals, paired differences and win counts.

Rules shared by every method of a regime (checked by :func:`~kvbound.eval.stats.check_same_rules`):
protected sinks (0 for all, then 4 for all), buffer, positions, budget accounting (L x M tokens
per KV head), protocol and windows. Per method and budget: mean KL with a bootstrap CI over
windows, top-1 agreement and perplexity ratio with theirs. Per budget: the focus method (TRIM-KV)
against the best other method (lowest mean KL), window by window (mean difference, 95% CI, wins),
and against the best other method given twice the budget.
"""

from __future__ import annotations

import math

from kvbound.eval.fidelity import Window, run_fidelity
from kvbound.eval.stats import bootstrap_mean_ci, check_same_rules, paired_difference


def fidelity_sweep(model, tokenizer, windows: list[Window], *, methods: list[str],
                   budgets: list[int], buffer: int = 16, regimes: tuple[int, ...] = (0, 4),
                   focus: str = "trimkv", fewer_windows: dict[str, int] | None = None,
                   gates=None, protocol: str = "decode", progress: bool = True) -> dict:
    """Run :func:`run_fidelity` once per sink regime; ``fewer_windows`` maps weaker methods to
    the number of windows they get (recorded per row as ``windows``)."""
    fewer = fewer_windows or {}
    out = {"regimes": {}, "budgets": budgets, "focus": focus, "buffer": buffer,
           "fewer_windows": fewer}
    for sinks in regimes:
        specs = [(m, m, {"max_windows": fewer[m]} if m in fewer else {}) for m in methods]
        res = run_fidelity(model, tokenizer, windows, methods=specs, budgets=budgets,
                           buffer=buffer, sinks=sinks, gates=gates, protocol=protocol,
                           context_len=None, progress=progress)
        check_same_rules(res["results"])
        for row in res["results"]:
            add_intervals(row)
        res["comparisons"] = compare_to_best(res["results"], budgets, focus)
        out["regimes"][str(sinks)] = res
    return out


def add_intervals(row: dict) -> None:
    """Bootstrap CIs over windows of KL, top-1 agreement and the perplexity ratio."""
    row["kl_ci"] = list(bootstrap_mean_ci(row["kl_per_window"]))
    row["top1_ci"] = list(bootstrap_mean_ci(row["top1_per_window"]))
    gap = [a - b for a, b in zip(row["nll_per_window"], row["nll_full_per_window"])]
    row["ppl_ratio_ci"] = [math.exp(x) for x in bootstrap_mean_ci(gap)]


def _paired(a: dict, b: dict) -> dict:
    n = min(len(a["kl_per_window"]), len(b["kl_per_window"]))  # windows are in the same order
    return {"other": b["label"], "other_budget": b["budget"], "other_kl": b["kl_mean"],
            **paired_difference(a["kl_per_window"][:n], b["kl_per_window"][:n])}


def compare_to_best(rows: list[dict], budgets: list[int], focus: str) -> list[dict]:
    """Per budget: ``focus`` minus the best other bounded method (window by window), at the same
    budget and, where the sweep has it, at twice the budget."""
    by = {(r["label"], r["budget"]): r for r in rows}
    others = [r for r in rows if r["label"] not in (focus, "full")]
    out = []
    for m in budgets:
        mine = by.get((focus, m))
        same = [r for r in others if r["budget"] == m]
        if mine is None or not same:
            continue
        best = min(same, key=lambda r: r["kl_mean"])
        entry = {"budget": m, "kl": mine["kl_mean"], "vs_best": _paired(mine, best)}
        double = [r for r in others if r["budget"] == 2 * m]
        if double:
            entry["vs_best_at_2m"] = _paired(mine, min(double, key=lambda r: r["kl_mean"]))
        out.append(entry)
    return out
