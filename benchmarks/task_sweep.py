"""Task sweep on the embedded model: synthetic long-context tasks, every method, budgets 32-256,
under the same rules for all, in two sink regimes and both prefill modes.

    python benchmarks/task_sweep.py --write-results

Every method of a run has the same protected sinks (``--regimes``: 0 for all, then 4 for all),
buffer, chunk and budget accounting (checked by the runner). Query-aware policies (SnapKV,
PyramidKV, R-KV, TOVA, H2O) are also run with full prefill, the question inside their
observation window, the setting they were designed for; chunked prefill (the context compressed
before the question is seen) is the query-agnostic setting every method gets. Cells: score with a
95% Wilson interval, N per cell (>= 32 for a claim). Result directories (kvpress layout) go to
runs/task_sweep/sinksS_PREFILL/; the tables and plots to docs/RESULTS.md ("task-sweep") and
docs/img/task_*.png.

A task the full cache itself fails (score below ``--min-full-score``) cannot tell budgets apart:
its full-cache score is measured first, reported, and the methods are not run on it. ``--dtype``
sets the model's dtype for every method alike (bf16 prefills ~2.5x faster on CPUs with native
bf16); it is recorded in the section.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _results import command, machine, write_section  # noqa: E402

from kvbound.eval.report import task_table  # noqa: E402
from kvbound.eval.runner import (  # noqa: E402
    EvalConfig,
    load_examples,
    per_example_scores,
    run_eval,
)
from kvbound.eval.stats import paired_difference  # noqa: E402
from kvbound.eval.tasks import get_task  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from kvbound.policies import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUERY_AWARE = ("snapkv", "pyramidkv", "rkv", "tova", "h2o")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="syn_needle,syn_kv_lookup,syn_conversation")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--limit", type=int, default=32, help="examples per task (N per cell)")
    ap.add_argument("--context-tokens", type=int, default=768)
    ap.add_argument("--regimes", default="0,4", help="protected sinks, one regime each")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--min-full-score", type=float, default=50.0,
                    help="run the methods only on tasks where the full cache scores at least this")
    ap.add_argument("--focus", default="trimkv",
                    help="the method compared with the best other one, example by example")
    ap.add_argument("--out", default=str(ROOT / "runs" / "task_sweep"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    methods = args.methods.split(",")
    tasks, dropped = full_cache_check(model, tok, args)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    sections, pics, plots, summaries = [], [], [], []
    for sinks in (int(x) for x in args.regimes.split(",")):
        runs = []
        for prefill in ("chunked", "full"):
            run_methods = methods if prefill == "chunked" else (
                ["full"] * ("full" in methods) + [m for m in methods if m in QUERY_AWARE])
            if len(run_methods) <= ("full" in run_methods):
                continue
            cfg = EvalConfig(tasks=tasks, methods=run_methods,
                             budgets=[int(b) for b in args.budgets.split(",")],
                             buffer=args.buffer, limit=args.limit, sinks=sinks, prefill=prefill,
                             context_tokens=args.context_tokens, batch_size=args.batch_size)
            out = Path(args.out) / f"sinks{sinks}_{prefill}"
            summary = run_eval(model, tok, cfg, out)
            runs.append((summary, out))
            label = ("chunked prefill (query-agnostic: the context is compressed before the "
                     f"question, chunk {cfg.chunk})" if prefill == "chunked" else
                     "full prefill (query-aware: the question is inside the observation window)")
            sections += ["", f"### Sinks {sinks} for every method, {label}", "",
                         task_table(summary)]
            for task in cfg.tasks:
                name = f"task_{task}_sinks{sinks}_{prefill}.png"
                plots.append((out / f"{task}.png", img / name))
                pics.append(f"![{task}, sinks {sinks}, {prefill}](img/{name})")
        paired = paired_rows(runs, cfg, tok, args.focus)
        heading = f"### Sinks {sinks}: {args.focus} against the best other method, example by example"
        part = ["", heading, "", *paired_table(paired, args.focus), "",
                f"Verdict, sinks {sinks}: {verdict(paired, args.focus)}."]
        sections += part
        summaries += part
    about = [
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"{args.limit} examples per task, contexts of ~{args.context_tokens} tokens from held-out "
        f"text (evaluation-only phrasing), greedy decoding, buffer {args.buffer}, model in "
        f"{args.dtype}. Score 0-100 with a 95% Wilson interval; in parentheses the share of "
        "answers identical to the full cache's. Paired tables: the difference in points on the "
        "same examples with a 95% bootstrap CI; the best other method is taken over both prefill "
        "modes (query-aware baselines with the question in their window included).",
        *([""] + [f"Not run with a bounded cache: {d}" for d in dropped] if dropped else [])]
    md = "\n".join([
        "## Task suite (offline synthetic long-context tasks), every method under the same rules",
        "", *about, *sections, "", " ".join(pics)])
    brief = "\n".join([
        f"## Retrieval under a budget: {args.focus} against the best other method (task sweep)",
        "", *about, *summaries, "", "Every method's score per budget: docs/RESULTS.md, "
        "\"Task suite\"."])
    print(md)
    if args.write_results:  # the plots belong to the section: written with it, never alone
        for old in img.glob("task_*.png"):
            old.unlink()
        for src, dst in plots:
            shutil.copy(src, dst)
        write_section("task-sweep", md)
        write_section("task-sweep-summary", brief)


def paired_rows(runs: list[tuple[dict, Path]], cfg: EvalConfig, tok, focus: str) -> list[dict]:
    """Per task and budget: ``focus`` (chunked prefill) minus the best other bounded method of
    either prefill mode, on the same examples: mean difference (0-1), 95% bootstrap CI, and the
    examples only the focus / only the other gets right."""
    rows = [(r, out) for summary, out in runs for r in summary["results"] if r["method"] != "full"]
    found = []
    for task in cfg.tasks:
        spec = get_task(task)
        examples = load_examples(spec, cfg, tok)
        for budget in cfg.budgets:
            here = [(r, out) for r, out in rows if r["task"] == task and r["budget"] == budget]
            mine = next(((r, o) for r, o in here
                         if r["method"] == focus and r.get("prefill") == "chunked"), None)
            others = [(r, o) for r, o in here if r["method"] != focus]
            if mine is None or not others:
                continue
            best = max(others, key=lambda x: x[0]["metrics"]["score"])
            a = per_example_scores(spec, examples, mine[1] / mine[0]["dir"])
            b = per_example_scores(spec, examples, best[1] / best[0]["dir"])
            d = paired_difference(b, a)  # other - focus: "wins" = examples the focus does better
            found.append({
                "task": task, "budget": budget, "score": mine[0]["metrics"]["score"],
                "other": best[0]["method"] + (" (full prefill)" if best[0].get("prefill") == "full"
                                              else ""),
                "other_score": best[0]["metrics"]["score"], "mean": -d["mean"],
                "ci": [-d["ci"][1], -d["ci"][0]], "wins": d["wins"],
                "losses": d["n"] - d["wins"] - d["ties"], "n": d["n"]})
    return found


def paired_table(rows: list[dict], focus: str) -> list[str]:
    lines = ["| task | M | " + focus + " | best other | its score | difference [95% CI] | "
             f"only {focus} right / only it right |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['budget']} | {r['score']:.1f} | {r['other']} | "
                     f"{r['other_score']:.1f} | {_points(r['mean'])} [{_points(r['ci'][0])}, "
                     f"{_points(r['ci'][1])}] | {r['wins']} / {r['losses']} |")
    return lines


def verdict(rows: list[dict], focus: str) -> str:
    """Where the focus is ahead (CI above 0), behind (CI below 0) or level, budget by budget."""
    def at(cond):
        got = [f"{r['task']} M={r['budget']}" for r in rows if cond(r)]
        return ", ".join(got) if got else "none"
    return (f"{focus} ahead (CI above 0): {at(lambda r: r['ci'][0] > 0)}; behind (CI below 0): "
            f"{at(lambda r: r['ci'][1] < 0)}; level (CI spans 0): "
            f"{at(lambda r: r['ci'][0] <= 0 <= r['ci'][1])}")


def _points(x: float) -> str:
    return f"{100.0 * x + 0.0:+.1f}"  # + 0.0: no "-0.0"


def full_cache_check(model, tok, args) -> tuple[list[str], list[str]]:
    """The tasks the full cache passes (score >= ``--min-full-score``), and a line for each task
    it fails: a budget cannot be judged on a task the model cannot do with its whole context."""
    cfg = EvalConfig(tasks=args.tasks.split(","), methods=["full"], budgets=[1],
                     buffer=args.buffer, limit=args.limit, sinks=0, prefill="chunked",
                     context_tokens=args.context_tokens, batch_size=args.batch_size)
    summary = run_eval(model, tok, cfg, Path(args.out) / "full_cache_check")
    keep, dropped = [], []
    for r in summary["results"]:
        m = r["metrics"]
        if m["score"] >= args.min_full_score:
            keep.append(r["task"])
        else:
            lo, hi = m.get("ci95", (float("nan"), float("nan")))
            dropped.append(f"{r['task']}: the full cache scores {m['score']:.1f} [{lo:.0f}, "
                           f"{hi:.0f}] (N={m['n']}), below {args.min_full_score:g}, so no "
                           "budget can be judged on it.")
    if not keep:
        sys.exit("The full cache fails every task (below --min-full-score); nothing to compare.")
    return keep, dropped


if __name__ == "__main__":
    main()
