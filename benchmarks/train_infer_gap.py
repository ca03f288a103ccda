"""How much of the real cache's damage does the training objective see?

Same gates, same tokens, same budget M: KL(full || ...) of

- the real bounded cache (TRIM-KV, decode protocol, top-M eviction with the buffer), with and
  without protected sinks;
- the training objective's student (``kvbound train``): the paper's soft decay
  ``softmax(q.k + (t - i) log beta_i)``, and the eviction-aware variant (``--evict-aware``) at
  several temperatures (relative to the threshold's magnitude, the default ``--evict-scale``, and
  absolute), with the decay or with the eviction mask alone (``--evict-no-decay``).

Measured on *training* text (the stdlib docstrings / first pydoc half that ``prose`` trains on), so
that a temperature chosen from this table is not tuned to evaluation text. Positions ``>= M``.

    python benchmarks/train_infer_gap.py --write-results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, publish  # noqa: E402

from kvbound.eval.fidelity import make_windows, run_fidelity  # noqa: E402
from kvbound.eval.stats import bootstrap_mean_ci  # noqa: E402
from kvbound.generation import resolve_gates  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from kvbound.train.data import prose_documents  # noqa: E402
from kvbound.train.probe import student_kl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--gates", default=None, help="default: the gates shipped for the model")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--taus", default="0.5,0.1,0.05,0.02", help="relative temperatures")
    ap.add_argument("--absolute-taus", default="0.5,0.02")
    ap.add_argument("--no-decay-taus", default="0.05",
                    help="relative temperatures of the mask alone (--evict-no-decay)")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "train_infer_gap.json")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    gates = resolve_gates(model, args.gates)
    docs = [(f"train-prose/{i}", d) for i, d in enumerate(prose_documents())]
    windows = make_windows(tok, [("train-prose", "\n\n".join(d for _, d in docs))],
                           args.seq_len, args.windows)
    ids = torch.stack([w.ids for w in windows])
    m = args.budget
    rows = []
    for sinks in (0, 4):
        cache = run_fidelity(model, tok, windows, methods=["trimkv"], budgets=[m],
                             buffer=args.buffer, sinks=sinks, gates=gates, progress=False)
        rows.append({"objective": f"real cache (top-{m}, buffer {args.buffer})", "sinks": sinks,
                     "kl": cache["results"][0]["kl_per_window"]})
        rows.append({"objective": "training: soft decay (paper)", "sinks": sinks,
                     "kl": student_kl(model, gates, ids, start=m, train_sinks=sinks).tolist()})
        for scale, taus, decay in (("relative", args.taus, True),
                                   ("absolute", args.absolute_taus, True),
                                   ("relative", args.no_decay_taus, False)):
            for tau in (float(t) for t in taus.split(",") if t):
                kl = student_kl(model, gates, ids, start=m, train_sinks=sinks,
                                evict={"evict_budget": m, "evict_tau": tau,
                                       "evict_scale": scale, "evict_decay": decay})
                rows.append({"objective": f"training: --evict-aware --evict-tau {tau:g} "
                                          f"--evict-scale {scale}"
                                          + ("" if decay else " --evict-no-decay"),
                             "sinks": sinks, "kl": kl.tolist()})
    res = {"rows": rows, "budget": m, "windows": len(windows), "seq_len": args.seq_len,
           "gates": gates.ref(), "command": command(), "machine": machine()}
    publish(res, args.json, "train-infer-gap", render, args.write_results)


def render(res: dict) -> str:
    lines = ["## What the training objective sees of the cache's damage", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
             f"Gates {res['gates']}; {res['windows']} windows of {res['seq_len']} tokens of "
             f"training prose; KL(full || ...) in nats over positions >= M = {res['budget']}, "
             "mean over windows [95% bootstrap CI]. The ratio is the real cache's KL over the "
             "objective's (how many times milder the objective is).", "",
             "| objective | sinks | KL [95% CI] | cache KL / this |", "|---|---|---|---|"]
    cache = {r["sinks"]: sum(r["kl"]) / len(r["kl"]) for r in res["rows"]
             if r["objective"].startswith("real cache")}
    for r in res["rows"]:
        mean = sum(r["kl"]) / len(r["kl"])
        lo, hi = bootstrap_mean_ci(r["kl"])
        lines.append(f"| {r['objective']} | {r['sinks']} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{cache[r['sinks']] / max(mean, 1e-12):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
