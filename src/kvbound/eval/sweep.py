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

import hashlib
import json
import math
from pathlib import Path

from kvbound.errors import KVBoundError
from kvbound.eval.fidelity import Window, merge_results, run_fidelity
from kvbound.eval.stats import bootstrap_mean_ci, check_same_rules, paired_difference


def fidelity_sweep(model, tokenizer, windows: list[Window], *, methods: list[str],
                   budgets: list[int], buffer: int = 16, regimes: tuple[int, ...] = (0, 4),
                   focus: str = "trimkv", fewer_windows: dict[str, int] | None = None,
                   gates=None, protocol: str = "decode", progress: bool = True,
                   store: Path | None = None, batch_size: int = 16,
                   variants: dict[str, dict] | None = None) -> dict:
    """Run every method in every sink regime; ``fewer_windows`` maps weaker methods to the number
    of windows they get (recorded per row as ``windows``). ``variants`` adds labelled entries,
    label -> ``{"method": name, "gates": dir, name or RetentionGates}`` (e.g. newly trained gates
    beside the shipped ones): put the label in ``methods``, and make it the ``focus`` to compare it
    with the best other method.

    Windows are taken ``batch_size`` at a time and every method and budget of a regime runs on a
    group before the next one, so the full-cache reference is computed once per group and
    regime. With ``store`` (a JSON file) each (group, regime, method) is saved as soon as it is
    done and skipped when the sweep is run again with the same windows and settings (any subset
    of the regimes and methods: e.g. render the regimes finished so far), so a long sweep
    survives being stopped. Stored rows of gated methods must come from the same gates."""
    fewer = fewer_windows or {}
    fingerprint = {"windows": _windows_digest(windows), "budgets": budgets, "buffer": buffer,
                   "protocol": protocol, "fewer_windows": fewer, "batch_size": batch_size}
    done = _load_store(store, fingerprint)
    specs = {m: _spec(model, m, variants or {}, gates) for m in methods}
    parts, reference = [], {}
    for sinks in regimes:  # regime by regime: a stopped sweep has whole regimes done
        for g, first in enumerate(range(0, len(windows), batch_size)):
            for m in methods:
                if fewer.get(m, first + 1) <= first:
                    continue
                method, over, ref = specs[m]
                key = f"group/{g}/{sinks}/{m}"
                if key not in done:
                    over = {**over, "sinks": sinks,
                            **({"max_windows": fewer[m] - first} if m in fewer else {})}
                    done[key] = run_fidelity(
                        model, tokenizer, windows[first : first + batch_size],
                        methods=[(f"{sinks}/{m}", method, over)], budgets=budgets,
                        buffer=buffer, protocol=protocol, batch_size=batch_size,
                        progress=progress, reference=reference)
                    _save_store(store, fingerprint, done)
                _check_gates(done[key], ref, store)
                parts.append(done[key])
    merged = merge_results(parts)
    out = {"regimes": {}, "budgets": budgets, "focus": focus, "buffer": buffer,
           "fewer_windows": fewer, "seconds": merged["seconds"]}
    for sinks in regimes:
        rows = [{**r, "label": r["label"].split("/", 1)[1]} for r in merged["results"]
                if r["label"].split("/", 1)[0] == str(sinks)]
        check_same_rules(rows)
        for row in rows:
            add_intervals(row)
        res = {k: v for k, v in merged.items() if k != "results"}
        res["results"] = rows
        res["comparisons"] = compare_to_best(rows, budgets, focus)
        out["regimes"][str(sinks)] = res
    if len(regimes) > 1:  # the focus with the fewest sinks against the others with the most
        low, high = str(min(regimes)), str(max(regimes))
        out["across"] = {"focus_sinks": int(low), "others_sinks": int(high),
                         "comparisons": compare_across(out["regimes"][low]["results"],
                                                       out["regimes"][high]["results"],
                                                       budgets, focus)}
    return out


def _spec(model, label: str, variants: dict[str, dict], gates) -> tuple[str, dict, str | None]:
    """(method, overrides, gates ref) of a sweep entry; gated methods get their gates resolved
    once (so attaching a variant's gates cannot change which gates a plain entry uses)."""
    from kvbound.generation import resolve_gates
    from kvbound.policies import POLICIES, check_method

    v = dict(variants.get(label, {"method": label}))
    method = check_method(v.pop("method"))
    if method != "full" and POLICIES[method].needs_gates:
        v["gates"] = resolve_gates(model, v.get("gates", gates))
        return method, v, v["gates"].ref()
    return method, v, None


def _check_gates(entry: dict, want: str | None, store: Path | None) -> None:
    """Refuse stored rows that ran with other gates than ``want`` (a ``RetentionGates.ref()``)."""
    if want is None:
        return
    for row in entry["results"]:
        if row.get("gates") not in (None, want):
            raise KVBoundError(f"{store} holds {row['label']} results of other gates "
                               f"({row['gates']}, now {want}); give another --json file.")


def _windows_digest(windows: list[Window]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(w.source.encode())
        h.update(w.ids.numpy().tobytes())
    return h.hexdigest()[:16]


def _load_store(store: Path | None, fingerprint: dict) -> dict:
    if store is None or not store.exists():
        return {}
    saved = json.loads(store.read_text())
    known = saved.get("fingerprint") or {}
    if any(known.get(k) != v for k, v in fingerprint.items()):
        raise KVBoundError(f"{store} holds a sweep of other windows or settings; delete it or "
                           "choose another file to start afresh.")
    return saved["done"]


def _save_store(store: Path | None, fingerprint: dict, done: dict) -> None:
    if store is not None:
        from kvbound.io import atomic_write_json

        atomic_write_json(store, {"fingerprint": fingerprint, "done": done})


def merge_stores(store: Path, others: list[Path]) -> None:
    """Add the finished (group, regime, method) results of the stores ``others`` to ``store``
    (e.g. regimes run in parallel processes); all must hold the same windows and settings."""
    merged = json.loads(store.read_text()) if store.exists() else None
    for path in others:
        if not path.is_file():
            raise KVBoundError(f"--merge-store {path}: no such file.")
        saved = json.loads(path.read_text())
        if merged is None:
            merged = {"fingerprint": saved["fingerprint"], "done": {}}
        if saved["fingerprint"] != merged["fingerprint"]:
            raise KVBoundError(f"--merge-store {path} holds a sweep of other windows or settings "
                               f"than {store}.")
        merged["done"].update(saved["done"])
    store.parent.mkdir(parents=True, exist_ok=True)
    _save_store(store, merged["fingerprint"], merged["done"])


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
    budget and, where the sweep has it, at twice the budget. Other variants of the focus's own
    method (e.g. the shipped gates beside new ones) are not "other methods"."""
    by = {(r["label"], r["budget"]): r for r in rows}
    kind = next((r["method"] for r in rows if r["label"] == focus), focus)
    # other methods: not the focus, the full cache, or another variant of the focus's method
    others = [r for r in rows if r["label"] != focus and r["method"] not in (kind, "full")]
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


def compare_across(mine: list[dict], theirs: list[dict], budgets: list[int],
                   focus: str) -> list[dict]:
    """``focus`` from one regime's rows against the best other method of another regime's (same
    windows), e.g. TRIM-KV without sinks against baselines given 4 protected sinks."""
    return compare_to_best([r for r in mine if r["label"] == focus]
                           + [r for r in theirs if r["label"] != focus], budgets, focus)


def replace_rows(published: dict, fresh: dict, method: str, *, note: dict) -> dict:
    """The sweep ``published`` with the rows of ``method`` (e.g. ``trimkv`` with newly shipped
    gates) taken from ``fresh``, a sweep of ``full`` and ``method`` on the same windows, so that
    one method is re-measured without re-running every baseline. The windows must be the same:
    each regime's full-cache NLL must match ``published`` window by window (:func:`same_windows`).
    Comparisons and the cross-regime table are
    recomputed; ``note`` (e.g. command, machine, gates) is recorded under ``replaced``."""
    out = json.loads(json.dumps(published))  # a deep copy; the published dict stays as it was
    for sinks, regime in out["regimes"].items():
        new = fresh["regimes"].get(sinks)
        if new is None:
            raise KVBoundError(f"The new run has no sinks-{sinks} regime; run every regime of "
                               f"the published sweep ({', '.join(out['regimes'])}).")
        _check_same_windows(regime["results"], new["results"], sinks)
        mine = {r["budget"]: r for r in new["results"] if r["label"] == method}
        budgets = sorted({r["budget"] for r in regime["results"] if r["label"] == method})
        if not budgets:
            raise KVBoundError(f"The published sweep has no {method!r} rows to replace.")
        if missing := [b for b in budgets if b not in mine]:
            raise KVBoundError(f"The new run has no {method!r} rows at M={missing}; run the "
                               f"published budgets {budgets}.")
        regime["results"] = [mine[r["budget"]] if r["label"] == method else r
                             for r in regime["results"]]
        regime["comparisons"] = compare_to_best(regime["results"], out["budgets"],
                                                out.get("focus", "trimkv"))
    if "across" in out:
        a, b = str(out["across"]["focus_sinks"]), str(out["across"]["others_sinks"])
        out["across"]["comparisons"] = compare_across(
            out["regimes"][a]["results"], out["regimes"][b]["results"], out["budgets"],
            out.get("focus", "trimkv"))
    out["replaced"] = [r for r in out.get("replaced", []) if r["method"] != method]
    out["replaced"].append({"method": method, **note})
    return out


def same_windows(nll_a: list[float], nll_b: list[float]) -> bool:
    """Whether two runs scored the same windows: their full-cache NLL per window agrees (to
    1e-4, relative above 1 nat; other kernels or batch sizes move the last digits)."""
    return len(nll_a) == len(nll_b) and not any(
        abs(x - y) > 1e-4 * max(1.0, abs(y)) for x, y in zip(nll_a, nll_b))


def _check_same_windows(old: list[dict], new: list[dict], sinks: str) -> None:
    full_old = next((r for r in old if r["label"] == "full"), None)
    full_new = next((r for r in new if r["label"] == "full"), None)
    if full_old is None or full_new is None:
        raise KVBoundError("Both sweeps need their full-cache rows to check that the windows "
                           "are the same; run the new one with --methods full,METHOD.")
    if not same_windows(full_new["nll_full_per_window"], full_old["nll_full_per_window"]):
        raise KVBoundError(f"Sinks {sinks}: the new run's windows are not the published ones "
                           "(full-cache NLL differs); use the published --seq-len, --windows, "
                           "--per-domain and text.")
