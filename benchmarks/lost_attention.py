"""How much future attention does a top-M cut by each score throw away? A fast probe of rankings.

At every decision time ``t`` (every 16 tokens) of a window and for every KV head, the keys
``i < t`` are cut to the top M by a score, and the share of the next ``horizon`` queries'
attention that falls on the cut keys is reported (the attention-rank objective's target,
:func:`kvbound.eval.oracle.future_attention_tables`). Scores compared, all under the same cut:

- ``oracle``: the future attention itself (the least any cut can lose);
- ``gates``: TRIM-KV's score with the given gates (``(t - i) log beta_i`` [+ log alpha_i]);
- ``fit-trimkv``: TRIM-KV's score with per-token log beta fitted to the future
  (:func:`kvbound.eval.oracle.fit_retention`): the best any gate of the paper's form could do;
- ``fit-trimkv+offset``: the same with a fitted log alpha per token as well.

It is a one-shot cut of the full history, not the cache's sequence of evictions (an evicted key
never comes back there), so it ranks scores quickly; the fidelity sweep measures the real thing.

    python benchmarks/lost_attention.py --windows 8 --budgets 32,64 --json runs/lost.json
    python benchmarks/lost_attention.py --from-json docs/data/lost_attention.json --write-doc

``--write-doc`` puts the table between the ``lost-attention`` markers of docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "TRAINING.md"


def lost_share(table: torch.Tensor, score: torch.Tensor, budget: int, stride: int,
               first: int) -> torch.Tensor:
    """(B, H, J, T) future attention and (B, H, J, T) scores -> (B, H) mean share of each
    decision's future attention on keys outside the score's top ``budget`` (decisions with more
    than ``budget`` candidates, from time ``first``)."""
    from kvbound.eval.oracle import decision_times

    b, h, j, t = table.shape
    times = decision_times(j, stride, t)
    cand = torch.arange(t) < times[:, None]  # (J, T)
    use = (cand.sum(-1) > budget) & (times >= first)
    table, score, cand = table[:, :, use], score[:, :, use], cand[use]
    s = score.masked_fill(~cand, -torch.inf)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(budget, -1).indices, True)
    mass = table.sum(-1).clamp_min(1e-30)
    return ((table * (~kept & cand)).sum(-1) / mass).mean(-1)


def gate_scores(model, gates, ids: torch.Tensor, stride: int, j: int) -> dict[int, torch.Tensor]:
    """{layer: (B, H, J, T)} the gates' scores ``[log alpha_i +] (t - i) log beta_i``."""
    from kvbound.architectures import attention_modules
    from kvbound.eval.oracle import decision_ages

    out: dict[int, dict] = {}
    handles = []
    positions = torch.arange(ids.shape[-1])[None].expand(ids.shape[0], -1)
    for idx, attn in enumerate(attention_modules(model)):
        if idx not in gates:
            continue

        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out[idx] = gates.retention(idx, hidden, positions if gates.uses_positions else None)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    age = decision_ages(j, stride, ids.shape[-1])
    scores = {}
    for idx, o in out.items():
        s = age * o["log_beta"].float()[:, :, None, :]
        if "log_alpha" in o:
            s = s + o["log_alpha"].float()[:, :, None, :]
        scores[idx] = s
    return scores


def fitted_scores(tables, stride: int, form: str, steps: int) -> dict[int, torch.Tensor]:
    from kvbound.eval.oracle import decision_ages, fit_retention

    log_beta, log_alpha, _ = fit_retention(tables, stride, form=form, steps=steps)
    _, _, j, t = next(iter(tables.values())).shape
    age = decision_ages(j, stride, t)
    return {k: age * lb[:, :, None, :] + (log_alpha[k][:, :, None, :] if log_alpha else 0.0)
            for k, lb in log_beta.items()}


def render(res: dict) -> str:
    """Markdown: one row per scorer, the mean lost share per budget and its excess over the
    oracle's."""
    from kvbound.eval.stats import bootstrap_mean_ci

    budgets = sorted({r["budget"] for r in res["rows"]})
    by = {(r["scorer"], r["budget"]): r for r in res["rows"]}
    scorers = list(dict.fromkeys(r["scorer"] for r in res["rows"]))
    lines = [f"Command: `{res['command']}`  ", f"{len(res['windows'])} windows, horizon "
             f"{res['horizon']}, fits of {res['fit_steps']} Adam steps; mean over windows "
             "[95% CI], and the excess over the oracle.", "",
             "| scorer | " + " | ".join(f"lost at M={m} | over oracle" for m in budgets) + " |",
             "|---|" + "---|---|" * len(budgets)]
    for name in scorers:
        cells = []
        for m in budgets:
            r = by[(name, m)]
            lo, hi = bootstrap_mean_ci(r["lost_per_window"])
            cells.append(f"{r['lost']:.4f} [{lo:.4f}, {hi:.4f}] | "
                         f"{r['lost'] - by[('oracle', m)]['lost']:+.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=8, help="the sweep's first N windows")
    ap.add_argument("--budgets", default="32,64")
    ap.add_argument("--horizon", type=int, default=256)
    ap.add_argument("--gates", action="append", default=[], metavar="LABEL=DIR",
                    help="gates to score (default: the shipped ones); repeatable")
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "lost_attention.json")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="render this saved run instead of running")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args)
    md = render(res)
    print(md)
    if args.write_doc:
        replace_block(DOC, "lost-attention", md)


def run(args) -> dict:
    from oracle_headroom import SWEEP, sweep_windows

    from kvbound.eval.oracle import future_attention_tables
    from kvbound.gates import RetentionGates
    from kvbound.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(None)
    windows = sweep_windows(model, tok, json.loads(SWEEP.read_text()))[: args.windows]
    ids = torch.stack([w.ids for w in windows])
    stride, budgets = 16, [int(b) for b in args.budgets.split(",")]
    tables = future_attention_tables(model, ids, stride=stride, horizon=args.horizon)
    j = next(iter(tables.values())).shape[2]
    named = [g.split("=", 1) for g in args.gates] or [["shipped", "smollm2-135m"]]
    scorers = {"oracle": tables}
    for label, source in named:
        scorers[label] = gate_scores(model, RetentionGates.load(source, model), ids, stride, j)
    for form in ("trimkv", "trimkv+offset"):
        scorers[f"fit-{form}"] = fitted_scores(tables, stride, form, args.fit_steps)
    rows = []
    for label, scores in scorers.items():
        for m in budgets:
            per_layer = torch.stack([lost_share(tables[k], scores[k], m, stride, m + 16)
                                     for k in sorted(tables)])  # (L, B, H)
            per_window = per_layer.mean((0, 2))
            rows.append({"scorer": label, "budget": m, "lost": float(per_window.mean()),
                         "lost_per_window": per_window.tolist()})
            print(f"{label:20s} M={m:4d} lost share {float(per_window.mean()):.4f}", flush=True)
    res = {"rows": rows, "windows": [w.source for w in windows], "horizon": args.horizon,
           "gates": dict(named), "fit_steps": args.fit_steps, "command": command(),
           "machine": machine(), "seconds": round(time.perf_counter() - t0, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
