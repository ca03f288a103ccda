"""Pair rows of fidelity runs made at different times on the sweep's windows, window by window.

A candidate's run (``fidelity_sweep.py --methods full --variant LABEL=DIR``) scores only its own
rows; this pairs them with the published sweep (docs/data/fidelity_sweep.json) and the scope
sweep's stores (docs/data/scope_sweep*.partial.json), which scored the same windows:

    python benchmarks/paired_rows.py --regime 0 --runs runs/fid_rm.json \\
        --pair rm:32=trimkv:32 --pair rm:32=tova:64 --pair rmG:32=trimkv@global:32

Each ``--pair A:M=B:N`` prints mean KL of both, the paired difference A - B with its 95%
bootstrap CI, and the windows where A is lower. Rows at the same budget must have scored the same
windows (their full-cache NLL per window agrees); across budgets the windows' sources must agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvbound.errors import KVBoundError
from kvbound.eval.stats import paired_difference
from kvbound.eval.sweep import same_windows

DATA = Path(__file__).resolve().parents[1] / "docs" / "data"


def load_rows(regime: str, sweep: Path, stores: list[Path], runs: list[Path]) -> dict:
    """(label, budget) -> row with per-window lists; later sources override earlier ones."""
    rows: dict[tuple[str, int], dict] = {}
    if sweep.is_file():
        for r in json.loads(sweep.read_text())["regimes"].get(regime, {}).get("results", []):
            rows[(r["label"], r["budget"])] = r
    for store in stores:  # keys group/<group>/<sinks>/<label>: groups of windows, in order
        groups: dict[tuple[str, int], dict[int, dict]] = {}
        for key, entry in json.loads(store.read_text())["done"].items():
            _, group, sinks, label = key.split("/")
            if sinks != regime or label == "full":
                continue
            for r in entry["results"]:
                groups.setdefault((label, r["budget"]), {})[int(group)] = r
        for key, parts in groups.items():
            ordered = [parts[g] for g in sorted(parts)]
            rows[key] = {f: sum((p[f] for p in ordered), []) for f in
                         ("kl_per_window", "nll_full_per_window", "source_per_window")}
    for run in runs:
        for r in json.loads(run.read_text())["regimes"].get(regime, {}).get("results", []):
            if r["label"] != "full":
                rows[(r["label"], r["budget"])] = r
    return rows


def pair(rows: dict, a: tuple[str, int], b: tuple[str, int], rows_b: dict | None = None) -> dict:
    """Row ``a`` of ``rows`` minus row ``b`` of ``rows_b`` (default ``rows``), window by window."""
    rows_b = rows if rows_b is None else rows_b
    for key, where in ((a, rows), (b, rows_b)):
        if key not in where:
            raise KVBoundError(f"no row {key[0]}:{key[1]} in the given runs")
    ra, rb = rows[a], rows_b[b]
    n = min(len(ra["kl_per_window"]), len(rb["kl_per_window"]))
    if ra["source_per_window"][:n] != rb["source_per_window"][:n]:
        raise KVBoundError(f"{a} and {b} scored windows from other sources")
    if a[1] == b[1] and not same_windows(ra["nll_full_per_window"][:n],
                                         rb["nll_full_per_window"][:n]):
        raise KVBoundError(f"{a} and {b} scored other windows (full-cache NLL differs)")
    ka, kb = ra["kl_per_window"][:n], rb["kl_per_window"][:n]
    return {"a": sum(ka) / n, "b": sum(kb) / n, **paired_difference(ka, kb)}


def _key(text: str) -> tuple[str, int]:
    label, _, budget = text.rpartition(":")
    return label, int(budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--regime", default="0", help="protected sinks of the rows paired")
    ap.add_argument("--regime-b", default=None,
                    help="protected sinks of the right-hand rows (default: --regime), e.g. "
                         "TRIM-KV with 0 sinks against the baselines with 4")
    ap.add_argument("--sweep", type=Path, default=DATA / "fidelity_sweep.json")
    ap.add_argument("--store", type=Path, action="append", default=None,
                    help="scope sweep stores (default: docs/data/scope_sweep*.partial.json)")
    ap.add_argument("--runs", type=Path, nargs="*", default=[])
    ap.add_argument("--pair", action="append", default=[], metavar="A:M=B:N")
    args = ap.parse_args()
    stores = args.store if args.store is not None else sorted(DATA.glob("scope_sweep*.partial.json"))
    rows = load_rows(args.regime, args.sweep, stores, args.runs)
    regime_b = args.regime if args.regime_b is None else args.regime_b
    rows_b = rows if regime_b == args.regime else load_rows(regime_b, args.sweep, stores,
                                                             args.runs)
    for item in args.pair:
        left, sep, right = item.partition("=")
        if not sep:
            ap.error(f"--pair takes A:M=B:N, got {item!r}")
        try:
            a, b = _key(left), _key(right)
            d = pair(rows, a, b, rows_b)
        except (KVBoundError, ValueError) as e:
            ap.error(str(e))
        print(f"{a[0]} M={a[1]} sinks {args.regime} {d['a']:.4f} vs {b[0]} M={b[1]} sinks "
              f"{regime_b} {d['b']:.4f}: "
              f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], lower in "
              f"{d['wins']}/{d['n']} windows")


if __name__ == "__main__":
    main()
