"""How much could better retention scores gain? The future-attention oracle on the sweep's windows.

The oracle (:mod:`kvbound.policies.oracle`) evicts, at every decision, the resident tokens the
full model's later queries attend to least: the attention-rank objective's target, known exactly.
It runs under the fidelity sweep's rules (same windows, buffer, decode protocol, both sink
regimes), and its KL is set beside TRIM-KV's and the best baseline's from the committed sweep
(``docs/data/fidelity_sweep.json``), window by window. Two horizons: all later queries, and the
next 256 (the training objective's). ``--variants fit-256,...`` adds the fitted-retention
oracle: TRIM-KV's score with per-token log beta fitted to the future (``-seq*``: to the cache's
sequential cut too), an estimate of the best any gate of that form can do.
Issue 17's goal 2 asks TRIM-KV at M to match the best baseline at 2M; the table shows how close
even perfect knowledge of future attention gets, and what share of the gap between the best
baseline and the oracle TRIM-KV has closed.

    python benchmarks/oracle_headroom.py --write-results
    python benchmarks/oracle_headroom.py --regimes 0 --json runs/oracle0.json   # one regime
    python benchmarks/oracle_headroom.py --merge runs/oracle0.json --merge runs/oracle4.json \\
        --write-results                                                          # then merge

On 2 cores, run the two regimes as two one-thread processes, then merge. The fitted oracles are
slow (a fit per group of windows): score them on the sweep's first windows and keep their table
in docs/TRAINING.md ("fitted-ceiling" markers), apart from the published section:

    python benchmarks/oracle_headroom.py --regimes 0 --budgets 32 --windows 8 \\
        --variants fit-256,fit-256+offset --json runs/fit.json
    python benchmarks/oracle_headroom.py --merge runs/fit.json --merge runs/fitseq.json --write-doc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, replace_block, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "docs" / "data" / "fidelity_sweep.json"
#: ``--write-doc`` puts the table (without its heading) between these markers of docs/TRAINING.md
DOC, DOC_BLOCK = ROOT / "docs" / "TRAINING.md", "fitted-ceiling"
#: the oracles a run can score (``--variants``): label -> overrides of the oracle entry
#: (:data:`kvbound.eval.fidelity.ORACLE_SETTINGS`). The ``fit-*`` variants are TRIM-KV's score
#: with per-token log beta fitted to the future attention of the next 256 queries
#: (:func:`kvbound.eval.oracle.fit_retention`; ``-seqM``: then to a budget-M cache's sequential
#: cut), an estimate of the best a gate of that form can do
VARIANTS = {
    "oracle": {"horizon": None},
    "oracle-256": {"horizon": 256},
    "fit-256": {"horizon": 256, "fit": "trimkv"},
    "fit-256+offset": {"horizon": 256, "fit": "trimkv+offset"},
    "fit-256-seq32": {"horizon": 256, "fit": "trimkv", "fit_topm": 32},
    "fit-256+offset-seq32": {"horizon": 256, "fit": "trimkv+offset", "fit_topm": 32},
    "fit-256-seq64": {"horizon": 256, "fit": "trimkv", "fit_topm": 64},
    "fit-256+offset-seq64": {"horizon": 256, "fit": "trimkv+offset", "fit_topm": 64},
}
DEFAULT_VARIANTS = "oracle,oracle-256"
FIT_NOTE = (" `fit-256` is TRIM-KV's own score, `(t - i) log beta_i`, with each token's log beta "
            "fitted ({steps} Adam steps of the attention-rank objective, per KV head) to the next "
            "256 queries' attention: the ranking of this form closest to the future, one decision "
            "at a time. `+offset` fits `a_i + (t - i) log beta_i`, a per-token offset beside the "
            "decay. `-seq32` (`-seq64`) then fits as many steps more to the cut a per-head cache "
            "of budget 32 (64) makes in sequence (the shipped gates' objective: an evicted key "
            "never returns): an estimate of the best a gate of that form can do in the cache.")


def sweep_windows(model, tok, sweep: dict, limit: int | None = None):
    """The sweep's windows (its first ``limit`` when given), rebuilt as
    ``benchmarks/fidelity_sweep.py`` builds them (checked against the sources it recorded)."""
    from fidelity_sweep import domain_texts, windows_per_domain

    windows, _ = windows_per_domain(tok, domain_texts(model, tok, sweep["seq_len"]),
                                    sweep["seq_len"], 11)
    regime = next(iter(sweep["regimes"].values()))
    want = next(r for r in regime["results"] if r["label"] == "trimkv")["source_per_window"]
    windows = windows[: len(want)]
    got = [w.source for w in windows]
    if got != want:
        sys.exit(f"These windows are not the sweep's: {got[:3]}... vs {want[:3]}...")
    return windows[:limit] if limit else windows


def run(args, sweep: dict) -> dict:
    from kvbound.eval.fidelity import ORACLE, run_fidelity
    from kvbound.models import load_model

    model, tok = load_model(None)
    windows = sweep_windows(model, tok, sweep, args.windows)
    out = {"regimes": {}, "budgets": args.budgets, "buffer": sweep["buffer"]}
    for sinks in args.regimes:
        methods = [(label, ORACLE, VARIANTS[label]) for label in args.variants]
        res = run_fidelity(model, tok, windows, methods=methods, budgets=args.budgets,
                           buffer=sweep["buffer"], sinks=sinks, batch_size=args.batch_size)
        out["regimes"][str(sinks)] = res["results"]
        out["seconds"] = out.get("seconds", 0) + res["seconds"]
    return out


def _stats(a: list[float], b: list[float]) -> dict:
    from kvbound.eval.stats import paired_difference

    return paired_difference(a, b)


def first_windows(rows: list[dict], n: int) -> list[dict]:
    """The sweep's rows cut to their first ``n`` windows (mean recomputed); rows scored on fewer
    windows are dropped."""
    out = []
    for r in rows:
        kl = r["kl_per_window"][:n]
        if len(kl) == n:
            out.append({**r, "kl_per_window": kl, "kl_mean": sum(kl) / n})
    return out


def summarize(oracle: dict, sweep: dict) -> list[dict]:
    """Per regime and budget: oracle, TRIM-KV and the best full-window baseline at M and 2M, on
    the windows the oracle was scored on (the sweep's first ones)."""
    from kvbound.eval.stats import bootstrap_mean_ci

    rows = []
    for sinks, results in oracle["regimes"].items():
        n = len(results[0]["kl_per_window"])
        base = first_windows(sweep["regimes"][sinks]["results"], n)
        by = {(r["label"], r["budget"]): r for r in base}
        baselines = [r for r in base if r["method"] not in ("full", "trimkv")]
        for o in results:
            m = o["budget"]
            trim = by[("trimkv", m)]["kl_per_window"]
            best = min((r for r in baselines if r["budget"] == m), key=lambda r: r["kl_mean"])
            double = [r for r in baselines if r["budget"] == 2 * m]
            best2 = min(double, key=lambda r: r["kl_mean"]) if double else None
            kl = o["kl_per_window"]
            gap = best["kl_mean"] - o["kl_mean"]
            rows.append({
                "sinks": int(sinks), "oracle": o["label"], "budget": m, "kl": o["kl_mean"],
                "kl_ci": list(bootstrap_mean_ci(kl)), "trimkv": by[("trimkv", m)]["kl_mean"],
                "best": best["label"], "best_kl": best["kl_mean"],
                "best_2m": best2["label"] if best2 else None,
                "best_2m_kl": best2["kl_mean"] if best2 else None,
                "vs_best_2m": _stats(kl, best2["kl_per_window"]) if best2 else None,
                "trimkv_vs_oracle": _stats(trim, kl),
                "closed": (best["kl_mean"] - by[("trimkv", m)]["kl_mean"]) / gap if gap > 0
                else None,
                "windows": len(kl), "settings": o["settings"],
            })
    return rows


def _ci(d: dict, fmt: str = "+.4f") -> str:
    return f"{d['mean']:{fmt}} [{d['ci'][0]:{fmt}}, {d['ci'][1]:{fmt}}]"


def render(res: dict) -> str:
    rows = res["summary"]
    fit = next((r for r in rows if r["oracle"].startswith("fit")), None)
    lines = [
        "## Headroom: the future-attention oracle under the sweep's rules",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        f"The oracle keeps, at every eviction, the tokens the full model's later queries attend "
        f"to most (`kvbound.policies.oracle`; it reads the future, so it is a reference, not a "
        f"method). The fidelity sweep's first {rows[0]['windows']} windows, buffer "
        f"{res['buffer']}, decode protocol and sinks as the fidelity sweep; TRIM-KV and the baselines are the sweep's "
        "(`docs/data/fidelity_sweep.json`), the best baseline taken among those scored on every "
        "window. Horizon: `oracle` sums the attention of all later queries, `oracle-256` of the "
        "next 256. 'Closed' = (best baseline - TRIM-KV) / (best baseline - oracle) at the same M."
        + (FIT_NOTE.format(steps=fit["settings"]["policy"]["steps"]) if fit else ""),
        "",
        "| sinks | oracle | M | oracle KL [95% CI] | TRIM-KV | best baseline at M | closed | "
        "best baseline at 2M | oracle - it [95% CI] | oracle wins | TRIM-KV - oracle [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["vs_best_2m"]
        closed = f"{100 * r['closed']:.0f}%" if r["closed"] is not None else "-"
        double = (f"{r['best_2m']} {r['best_2m_kl']:.4f} | {_ci(v)} | {v['wins']}/{v['n']}"
                  if v else "- | - | -")
        lines.append(
            f"| {r['sinks']} | {r['oracle']} | {r['budget']} | {r['kl']:.4f} "
            f"[{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}] | {r['trimkv']:.4f} | "
            f"{r['best']} {r['best_kl']:.4f} | {closed} | {double} | "
            f"{_ci(r['trimkv_vs_oracle'])} |")
    lines += ["", _reading(rows)]
    return "\n".join(lines)


def _reading(rows: list[dict]) -> str:
    """What the table says about goal 2, from the CIs."""
    parts = []
    for m in sorted({r["budget"] for r in rows}):
        here = [r for r in rows if r["budget"] == m and r["vs_best_2m"]]
        if not here:
            continue
        best = min(here, key=lambda r: r["kl"])
        v = best["vs_best_2m"]
        verdict = ("below it (CI below 0)" if v["ci"][1] < 0 else
                   "above it (CI above 0)" if v["ci"][0] > 0 else "level with it (CI spans 0)")
        parts.append(f"M={m}: the best oracle ({best['oracle']}, sinks {best['sinks']}) "
                     f"{best['kl']:.4f} vs {best['best_2m']} at 2M {best['best_2m_kl']:.4f}, "
                     f"{verdict}; TRIM-KV {best['trimkv']:.4f}")
    return ("Goal 2 (TRIM-KV at M no worse than the best baseline at 2M) against this bound: "
            + "; ".join(parts) + ".")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budgets", default="32,64,128")
    ap.add_argument("--regimes", default="0,4")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated oracles to score, of {', '.join(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, default=None,
                    help="score only the sweep's first N windows (the fitted oracles are slow); "
                         "every row of the table is then compared on those windows")
    ap.add_argument("--json", type=Path, default=None,
                    help="the run's JSON (default: docs/data/oracle_headroom.json with "
                         "--write-results, else runs/oracle_headroom.json)")
    ap.add_argument("--merge", action="append", default=[], type=Path, metavar="FILE",
                    help="take the regimes of these saved runs instead of running; repeatable")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--write-doc", action="store_true",
                    help=f"put the table between the {DOC_BLOCK} markers of docs/TRAINING.md "
                         "(for runs on fewer windows or fitted oracles, kept apart from the "
                         "published headroom section)")
    args = ap.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.regimes = [int(s) for s in args.regimes.split(",")]
    args.variants = args.variants.split(",")
    if args.windows is not None and args.windows < 1:
        sys.exit("--windows must be at least 1.")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"Unknown --variants {', '.join(unknown)}; choose among {', '.join(VARIANTS)}.")
    if args.json is None:
        args.json = ROOT / ("docs/data" if args.write_results else "runs") / "oracle_headroom.json"
    sweep = json.loads(SWEEP.read_text())
    if args.merge:
        res = {"regimes": {}, "seconds": 0}
        commands = []
        for f in args.merge:
            part = json.loads(f.read_text())
            for sinks, rows in part["regimes"].items():  # later runs' rows replace earlier ones
                have = res["regimes"].setdefault(sinks, [])
                new = {(r["label"], r["budget"]) for r in rows}
                have[:] = [r for r in have if (r["label"], r["budget"]) not in new] + rows
            res["seconds"] += part["seconds"]
            res["buffer"], res["budgets"] = part["buffer"], part["budgets"]
            commands.append(part["command"])
        res["command"] = " && ".join(commands + [command()])
        res["machine"] = machine()
    else:
        res = run(args, sweep)
        res.update(command=command(), machine=machine())
    res["summary"] = summarize(res, sweep)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    md = render(res)
    print(md)
    if args.write_results:
        write_section("oracle-headroom", md)
    if args.write_doc:
        replace_block(DOC, DOC_BLOCK, md.split("\n", 2)[2])  # the doc gives its own heading


if __name__ == "__main__":
    main()
