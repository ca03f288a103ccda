"""Task sweep on the embedded model: synthetic long-context tasks, every method, budgets 32-256.

    python benchmarks/task_sweep.py --write-results

Result directories (kvpress layout) go to runs/task_sweep/; the table and plots to
docs/RESULTS.md ("task-sweep") and docs/img/task_*.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.eval.report import task_table  # noqa: E402
from kvbound.eval.runner import EvalConfig, run_eval  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from kvbound.policies import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="syn_needle,syn_kv_lookup,syn_conversation")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=768)
    ap.add_argument("--out", default=str(ROOT / "runs" / "task_sweep"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    cfg = EvalConfig(tasks=args.tasks.split(","), methods=args.methods.split(","),
                     budgets=[int(b) for b in args.budgets.split(",")], buffer=args.buffer,
                     limit=args.limit, context_tokens=args.context_tokens, batch_size=args.limit)
    out = Path(args.out)
    summary = run_eval(model, tok, cfg, out)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    pics = []
    for task in cfg.tasks:
        shutil.copy(out / f"{task}.png", img / f"task_{task}.png")
        pics.append(f"![{task}](img/task_{task}.png)")
    md = "\n".join([
        "## Task suite (offline synthetic long-context tasks), every method",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"{args.limit} examples per task, contexts of ~{args.context_tokens} tokens from held-out "
        f"text, greedy decoding, chunked prefill (chunk {cfg.chunk}, the context is compressed "
        f"before the question is seen), buffer {args.buffer}. Score 0-100; in brackets the "
        "share of answers identical to the full cache's.",
        "",
        task_table(summary),
        "",
        " ".join(pics),
    ])
    print(md)
    if args.write_results:
        write_section("task-sweep", md)


if __name__ == "__main__":
    main()
