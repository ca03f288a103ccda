"""Fidelity sweep: every method at budgets 32-256 on held-out text (decode protocol).

    python benchmarks/fidelity_sweep.py --write-results

Writes the "fidelity-sweep" section of docs/RESULTS.md and docs/img/fidelity_*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.eval.fidelity import make_windows, run_fidelity  # noqa: E402
from kvbound.eval.report import fidelity_plots  # noqa: E402
from kvbound.eval.textpool import eval_text_pool  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from kvbound.policies import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--protocol", default="decode")
    ap.add_argument("--text-file", action="append", default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    texts = [("pydoc-eval-half", "\n\n".join(eval_text_pool()))]
    texts += [(f, Path(f).read_text(errors="replace")) for f in args.text_file]
    windows = make_windows(tok, texts, args.seq_len, args.max_windows)
    budgets = [int(b) for b in args.budgets.split(",")]
    res = run_fidelity(model, tok, windows, methods=args.methods.split(","), budgets=budgets,
                       buffer=args.buffer, protocol=args.protocol,
                       context_len=args.seq_len // 2 if args.protocol == "context" else None)
    res["command"] = command()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fidelity_plots(res, img / f"fidelity_{args.protocol}")
    md = render(res, budgets, args)
    print(md)
    if args.write_results:
        write_section(f"fidelity-sweep-{args.protocol}", md)


def render(res, budgets, args) -> str:
    by = {(r["label"], r["budget"]): r for r in res["results"]}
    labels = [m for m in dict.fromkeys(r["label"] for r in res["results"]) if m != "full"]
    lines = [
        f"## Fidelity to the full cache, every method ({res['protocol']} protocol)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {machine()}  ",
        f"{res['windows']} held-out windows of {res['seq_len']} tokens ({', '.join(res['sources'])}),"
        f" buffer {args.buffer}; KL(full || method) in nats over positions past the budget, "
        "top-1 agreement, perplexity ratio. Sinks: each method's default (StreamingLLM 4; "
        "TRIM-KV: the shipped gates' recommendation).",
        "",
        "| method | sinks | " + " | ".join(f"KL M={b}" for b in budgets) + " | "
        + " | ".join(f"top-1 M={b}" for b in budgets) + " | "
        + " | ".join(f"ppl x M={b}" for b in budgets) + " |",
        "|---|---|" + "---|" * (3 * len(budgets)),
    ]
    best = {b: min(by[(m, b)]["kl_mean"] for m in labels) for b in budgets}
    for m in labels:
        kl = " | ".join(("**{:.4f}**" if by[(m, b)]["kl_mean"] == best[b] else "{:.4f}")
                        .format(by[(m, b)]["kl_mean"]) for b in budgets)
        top = " | ".join(f"{by[(m, b)]['top1_agreement']:.3f}" for b in budgets)
        ppl = " | ".join(f"{by[(m, b)]['ppl_ratio']:.3f}" for b in budgets)
        lines.append(f"| {m} | {by[(m, budgets[0])]['sinks']} | {kl} | {top} | {ppl} |")
    lines += ["", f"![KL vs budget](img/fidelity_{res['protocol']}_kl_mean.png) "
              f"![top-1 vs budget](img/fidelity_{res['protocol']}_top1_agreement.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
