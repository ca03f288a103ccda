"""Shared budgets in the fair fidelity sweep: each method with ``budget_scope`` "layer" and
"global" beside its per-head rows, on the fidelity sweep's own windows, paired window by window.

    python benchmarks/scope_sweep.py --regimes 0 --store docs/data/scope_sweep0.partial.json
    python benchmarks/scope_sweep.py --regimes 4 --store docs/data/scope_sweep4.partial.json
    python benchmarks/scope_sweep.py --merge-store docs/data/scope_sweep0.partial.json \\
        --merge-store docs/data/scope_sweep4.partial.json --write-results

The per-head rows are not run again: they are the published sweep's (``--head-json``, default
docs/data/fidelity_sweep.json), and every pairing first checks that the two runs scored the same
windows (each window's full-cache NLL must agree). A scope holds the same KV bytes as M per head
(M x H_kv per layer, or M x H_kv x L for the model). Long: the decode protocol over 32 windows
per method and budget; run the two regimes as two one-thread processes. The stores live in
docs/data/ so that a run stopped at the end of a session continues in the next one (the same
command resumes). Writes the ``fidelity-scopes`` section of docs/RESULTS.md and
docs/data/scope_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402
from fidelity_sweep import domain_texts, windows_per_domain  # noqa: E402

from kvbound.errors import KVBoundError  # noqa: E402
from kvbound.eval import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"


def same_windows(mine: list[dict], theirs: list[dict]) -> None:
    """Refuse to pair two runs unless their full-cache rows scored the same windows."""
    a = next(r for r in mine if r["label"] == "full")
    b = next(r for r in theirs if r["label"] == "full")
    n = len(a["nll_full_per_window"])
    if not sweep.same_windows(a["nll_full_per_window"], b["nll_full_per_window"][:n]):
        raise KVBoundError("the head-scope rows were scored on other windows (the full cache's "
                           "NLL per window differs): rerun the fidelity sweep with these settings "
                           "or give its JSON with --head-json.")


def paired_rows(res: dict, head: dict) -> list[dict]:
    """Per regime, scoped entry and budget: its KL minus the same method's per-head KL (paired
    by window), and TRIM-KV's scopes against the best per-head baseline at M and 2M."""
    from kvbound.eval.stats import paired_difference

    rows = []
    for sinks, r in res["regimes"].items():
        if sinks not in head["regimes"]:
            continue
        theirs = head["regimes"][sinks]["results"]
        same_windows(r["results"], theirs)
        base = {(x["label"], x["budget"]): x for x in theirs}
        baselines = [x for x in theirs if x["method"] not in ("full", "trimkv")
                     and x["windows"] == max(y["windows"] for y in theirs)]
        for x in r["results"]:
            if "@" not in x["label"]:
                continue
            method, _, scope = x["label"].partition("@")
            ref = base.get((method, x["budget"]))
            if ref is None:
                continue
            n = len(x["kl_per_window"])
            d = paired_difference(x["kl_per_window"], ref["kl_per_window"][:n])
            row = {"sinks": int(sinks), "method": method, "scope": scope, "budget": x["budget"],
                   "kl": x["kl_mean"], "kl_ci": x["kl_ci"], "head_kl": _mean(ref, n),
                   "vs_head": d, "windows": n}
            if method == "trimkv":
                for key, m in (("vs_best", x["budget"]), ("vs_best_at_2m", 2 * x["budget"])):
                    pool = [y for y in baselines if y["budget"] == m]
                    if pool:
                        best = min(pool, key=lambda y: y["kl_mean"])
                        row[key] = {"other": best["label"], "other_kl": _mean(best, n),
                                    **paired_difference(x["kl_per_window"],
                                                        best["kl_per_window"][:n])}
            rows.append(row)
    return rows


def _mean(row: dict, n: int) -> float:
    """Mean KL of ``row`` over the first ``n`` windows (those both runs scored)."""
    return sum(row["kl_per_window"][:n]) / n


def _ci(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def render(res: dict, rows: list[dict], head_json: str) -> str:
    lines = [
        "## Shared budgets: every method with its heads (layer) or the whole model (global) "
        "sharing the budget", "",
        f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
        f"The fidelity sweep's windows, buffer, sinks regimes and decode protocol; per-head rows "
        f"from `{head_json}` (same windows, checked; means over the windows both scored). `layer`: M x H_kv tokens per layer, "
        "`global`: M x H_kv x L for the model, the same KV bytes as M per head; attention scores "
        "are read per head as a distribution over the head's own tokens (AdaKV's "
        "normalisation). Difference = scoped KL minus per-head KL, window by window (negative = "
        "the shared budget is closer to the full cache); wins = windows where it is lower.", "",
        "| sinks | method | scope | M | KL [95% CI] | per-head KL | difference [95% CI] | wins |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sinks']} | {r['method']} | {r['scope']} | {r['budget']} | "
                     f"{r['kl']:.4f} [{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}] | "
                     f"{r['head_kl']:.4f} | {_ci(r['vs_head'])} | "
                     f"{r['vs_head']['wins']}/{r['vs_head']['n']} |")
    trim = [r for r in rows if "vs_best" in r]
    if trim:
        lines += ["", "TRIM-KV with a shared budget against the best per-head baseline (scored "
                  "on every window) at M and at 2M:", "",
                  "| sinks | scope | M | KL | best at M | difference [95% CI] | wins | "
                  "best at 2M | difference [95% CI] | wins |", "|---|---|---|---|---|---|---|---|"
                  "---|---|"]
        for r in trim:
            v, d = r["vs_best"], r.get("vs_best_at_2m")
            lines.append(f"| {r['sinks']} | {r['scope']} | {r['budget']} | {r['kl']:.4f} | "
                         f"{v['other']} {v['other_kl']:.4f} | {_ci(v)} | {v['wins']}/{v['n']} | "
                         + (f"{d['other']} {d['other_kl']:.4f} | {_ci(d)} | {d['wins']}/{d['n']} |"
                            if d else "- | - | - |"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="trimkv,tova,h2o,snapkv")
    ap.add_argument("--scopes", default="layer,global")
    ap.add_argument("--budgets", default="32,64,128")
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--per-domain", type=int, default=11)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--selfgen", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--regimes", default="0,4")
    ap.add_argument("--head-json", default=str(DATA / "fidelity_sweep.json"))
    ap.add_argument("--store", type=Path, default=DATA / "scope_sweep.partial.json")
    ap.add_argument("--merge-store", action="append", default=[], type=Path)
    ap.add_argument("--json", type=Path, default=None,
                    help="default: docs/data/scope_sweep.json with --write-results")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    head_path = Path(args.head_json)
    if not head_path.is_file():
        ap.error(f"--head-json: no file {head_path} (run benchmarks/fidelity_sweep.py first)")
    head = json.loads(head_path.read_text())
    from kvbound.eval.sweep import fidelity_sweep, merge_stores
    from kvbound.models import load_model

    model, tok = load_model(args.model)
    texts = domain_texts(model, tok, args.seq_len, selfgen=args.selfgen)
    windows, _ = windows_per_domain(tok, texts, args.seq_len, args.per_domain)
    windows = windows[: args.windows]
    variants = {f"{m}@{s}": {"method": m, "budget_scope": s}
                for m in args.methods.split(",") for s in args.scopes.split(",")}
    try:
        if args.merge_store:
            merge_stores(args.store, args.merge_store)
        res = fidelity_sweep(model, tok, windows, methods=["full", *variants], store=args.store,
                             budgets=[int(b) for b in args.budgets.split(",")],
                             buffer=args.buffer, regimes=tuple(int(s) for s in
                                                               args.regimes.split(",")),
                             batch_size=args.batch_size, variants=variants, focus="full")
        res.update(command=command(), machine=machine())
        rows = paired_rows(res, head)
    except KVBoundError as e:
        sys.exit(str(e))
    rel = head_path.resolve().relative_to(ROOT) if head_path.resolve().is_relative_to(ROOT) \
        else head_path
    md = render(res, rows, str(rel))
    print(md)
    out = args.json or (DATA / "scope_sweep.json" if args.write_results else None)
    if out:
        Path(out).write_text(json.dumps({**res, "paired": rows}, indent=1))
    if args.write_results:
        write_section("fidelity-scopes", md)


if __name__ == "__main__":
    main()
