"""Past the model's context: absolute vs rolling RoPE positions in a bounded cache.

    python benchmarks/past_context.py --write-results

Part 1, teacher-forced: perplexity per 1K-token block over a long natural text (default: the first
24K tokens of libpng's manual, ``/usr/share/doc/libpng16-16/libpng-manual.txt.gz``, 3x SmolLM2's
8K context; evaluation-only, never trained on) for the full cache (absolute positions) and for
TRIM-KV and StreamingLLM at M=256 (4 sinks each, buffer 16, decode protocol: 16 tokens a forward,
eviction throughout) with absolute and with rolling positions.

Part 2, generation: ``kvbound.generate(..., method="trimkv", budget=256, max_new_tokens=N,
positions=P)`` (sampled, T=0.7, top-p 0.9, seed 0, ``--repetition-penalty``, the same for
both P), and the full cache with the same sampling up to the model's context (mode ``full``:
what the unbounded model itself writes, the reference for both). Per 1K-token block of the generated text: its perplexity scored by the same model with a
fresh full cache over the preceding 2K tokens + the block (positions restarted at 0), and the
share of repeated 4-grams in the block.
``--part2-only`` keeps part 1 from the saved JSON and runs the generation alone;
``--part2-modes full`` runs only those modes of part 2 and keeps the saved ones (same sampling
settings) beside them; ``--jobs 2``
runs the configurations in two one-thread processes (twice as fast on 2 cores). The JSON of a
``--write-results`` run, every block's value included, is kept in ``docs/data/past_context.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.cache import EvictionCache  # noqa: E402
from kvbound.generation import generate, resolve_gates  # noqa: E402
from kvbound.models import load_model  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/doc/libpng16-16/libpng-manual.txt.gz")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a very long story about a lighthouse keeper and a storm, with many details."


def _read(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", "replace")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def teacher_forced(model, ids: torch.Tensor, cache, step: int) -> torch.Tensor:
    """NLL of tokens 1..T-1 feeding ``step`` tokens a forward through ``cache``."""
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[1] - 1, step):
            chunk = ids[:, i:i + step]
            logits = model(chunk, cache=cache).logits[0]
            targets = ids[0, i + 1:i + 1 + chunk.shape[1]]
            out.append(_nll(logits[: len(targets)], targets))
    return torch.cat(out)


def per_block(nll: torch.Tensor, block: int) -> list[float]:
    return [math.exp(nll[i:i + block].mean().item()) for i in range(0, len(nll) - block + 1, block)]


def scored_blocks(model, ids: list[int], prompt_ids: list[int], block: int,
                  lookback: int) -> tuple[list, list]:
    """Per block of generated ``ids``: perplexity under a fresh full cache over the ``lookback``
    tokens before it (the prompt included) + the block, and its share of repeated 4-grams."""
    ppl, rep = [], []
    history = prompt_ids + ids
    for b in range(0, len(ids) - block + 1, block):
        at = len(prompt_ids) + b
        context = history[max(0, at - lookback):at + block]
        x = torch.tensor([context])
        with torch.no_grad():
            logits = model(x).logits[0]
        start = len(context) - block
        nll = _nll(logits[start - 1:-1], x[0, start:])
        ppl.append(math.exp(nll.mean().item()))
        grams = [tuple(ids[b + i:b + i + 4]) for i in range(block - 3)]
        rep.append(1 - len(set(grams)) / len(grams))
    return ppl, rep


PART1 = ("full", "trimkv/absolute", "trimkv/rolling", "streaming/absolute", "streaming/rolling")
PART2 = ("full", "absolute", "rolling")  # full: the unbounded cache, up to the model's context


def _text_ids(args) -> list[int]:
    """The first ``args.tokens`` token ids of part 1's text."""
    return args.tok(_read(args.text_file), add_special_tokens=False)["input_ids"][: args.tokens]


def part1_run(model, name: str, args) -> list[float]:
    """Per-block perplexity of the teacher-forced text for one configuration of part 1."""
    ids = torch.tensor([_text_ids(args)])
    if name == "full":
        return per_block(teacher_forced(model, ids, None, 1024), args.block)
    method, positions = name.split("/")
    cache = EvictionCache(model, method, budget=args.budget, buffer=args.buffer, sinks=4,
                          positions=positions)
    return per_block(teacher_forced(model, ids, cache, args.buffer), args.block)


def part2_run(model, mode: str, args) -> dict:
    """Generate with one mode of part 2 (``full``, or TRIM-KV with ``absolute``/``rolling``
    positions); score each block."""
    tok = args.tok
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):  # transformers 5 returns a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    if mode == "full":  # the unbounded model, as far as its context goes
        new = min(args.new, model.config.max_position_embeddings - len(prompt_ids))
        how = dict(method="full")
    else:
        new, how = args.new, dict(method="trimkv", budget=args.budget, buffer=args.buffer,
                                  positions=mode)
    r = generate(model, tok, PROMPT, max_new_tokens=new, min_new_tokens=new, sample=True, seed=0,
                 repetition_penalty=args.repetition_penalty, **how)
    ppl, rep = scored_blocks(model, r.token_ids, list(prompt_ids), args.block, args.lookback)
    return {"ppl": ppl, "repeated_4grams": rep, "new_tokens": r.new_tokens,
            "peak_tokens_per_head": r.peak_tokens_per_head, "positions": r.positions,
            "decode_tok_s": round(r.decode_tokens_per_second, 2), "sample": r.text[-300:]}


_WORKER: dict = {}


def _load(args):
    torch.manual_seed(0)
    model, tok = load_model()
    args.tok = tok
    gates = resolve_gates(model, None)
    gates.attach(model)
    return model, gates


def _worker_init(args) -> None:
    torch.set_num_threads(1)  # one job per core: two 1-thread jobs run at full speed here
    _WORKER["model"], _ = _load(args)
    _WORKER["args"] = args


def _worker_task(task: tuple[str, str]):
    part, name = task
    t0 = time.perf_counter()
    fn = part1_run if part == "part1" else part2_run
    out = fn(_WORKER["model"], name, _WORKER["args"])
    return part, name, out, round(time.perf_counter() - t0)


def run_tasks(tasks: list, args, model, done) -> None:
    """Run (part, name) tasks in this process, or in ``args.jobs`` one-thread workers; call
    ``done(part, name, result, seconds)`` as each finishes (results are saved as they come)."""
    if args.jobs <= 1:
        _WORKER.update(model=model, args=args)
        for task in tasks:
            done(*_worker_task(task))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    args.tok = None  # reloaded in each worker
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(args,)) as pool:
        for fut in as_completed([pool.submit(_worker_task, t) for t in tasks]):
            done(*fut.result())


def _plot(result: dict, path: Path, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = "part2" in result
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 7, 4), squeeze=False)
    axes = axes[0]
    p1, block = result["part1"], result["block"]
    for name, ys in p1.items():
        if isinstance(ys, list):
            xs = [(i + 1) * block for i in range(len(ys))]
            axes[0].plot(xs, ys, "-o" if "rolling" in name else "--", ms=3, label=name)
    axes[0].set(title=f"teacher-forced ({result['text']})", xlabel="position (tokens)",
                ylabel="perplexity per 1K block", yscale="log")
    for name, r in result.get("part2", {}).items():
        xs = [(i + 1) * block for i in range(len(r["ppl"]))]
        axes[1].plot(xs, r["ppl"], "-o", ms=3, label=_label(name))
    if two:
        axes[1].set(title="generated text, scored with a fresh full cache",
                    xlabel="generated tokens", ylabel="perplexity per 1K block", yscale="log")
    for ax in axes:
        ax.axvline(context, color="grey", lw=1, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _other_commands(result: dict) -> list[str]:
    """Lines naming the commands of part 2's modes kept from an earlier run (grouped)."""
    by: dict[str, list[str]] = {}
    for k, v in result.get("part2", {}).items():
        if v.get("command") not in (None, result.get("command")):
            by.setdefault(v["command"], []).append(_label(k))
    return [f"Part 2 {', '.join(modes)} command: `{cmd}`  " for cmd, modes in by.items()]


def _label(mode: str) -> str:
    return "full cache" if mode == "full" else f"trimkv/{mode}"


def _table(result: dict) -> str:
    p1, block = result["part1"], result["block"]
    names = [k for k in p1 if isinstance(p1[k], list)]
    lines = ["| block (tokens) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(len(p1["full"])):
        lines.append(f"| {i * block}-{(i + 1) * block} | "
                     + " | ".join(f"{p1[n][i]:.2f}" for n in names) + " |")
    out = "\n".join(lines)
    if "part2" in result:
        p2 = result["part2"]
        modes = list(p2)
        rows = ["| block (generated tokens) | " + " | ".join(f"ppl {_label(m)}" for m in modes)
                + " | " + " | ".join(f"repeated 4-grams {_label(m)}" for m in modes) + " |",
                "|---" * (2 * len(modes) + 1) + "|"]

        def cell(xs, i, fmt):
            return format(xs[i], fmt) if i < len(xs) else "-"

        for i in range(max(len(v["ppl"]) for v in p2.values())):
            rows.append(f"| {i * block}-{(i + 1) * block} | "
                        + " | ".join(cell(p2[m]["ppl"], i, ".2f") for m in modes) + " | "
                        + " | ".join(cell(p2[m]["repeated_4grams"], i, ".3f") for m in modes)
                        + " |")
        runs = "; ".join(f"{_label(k)}: {v['new_tokens']} tokens, {v['decode_tok_s']} tok/s, "
                         f"peak {v['peak_tokens_per_head']} tokens/head"
                         for k, v in p2.items())
        ctx = result["context"]
        summary = []
        for k, v in p2.items():
            before = [i for i in range(len(v["ppl"])) if (i + 1) * block <= ctx]
            after = [i for i in range(len(v["ppl"])) if i * block >= ctx]

            def mean(xs, idx):
                return sum(xs[i] for i in idx) / len(idx) if idx else float("nan")

            line = (f"{_label(k)}: mean block perplexity {mean(v['ppl'], before):.2f} inside "
                    f"the context")
            reps = f"repeated 4-grams {mean(v['repeated_4grams'], before):.2f}"
            if after:
                line += f" vs {mean(v['ppl'], after):.2f} past it"
                reps += f" vs {mean(v['repeated_4grams'], after):.2f}"
            summary.append(f"{line}, {reps}")
        penalty = result.get("repetition_penalty", 1.0)
        out += (f"\n\nGeneration (TRIM-KV at M={result['budget']}, and the full cache up to the "
                f"context where run; sampled T=0.7 top-p 0.9 seed 0"
                + (f", repetition penalty {penalty}" if penalty != 1.0 else "") + "; "
                f"each block scored with a fresh full cache over the {result.get('lookback')} "
                f"tokens before it, positions restarted): {runs}. Summary: "
                + "; ".join(summary) + ". A repeated-4-gram share near 1 with a perplexity near "
                "1 is a repetition loop, not good text.\n\n" + "\n".join(rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=24 * 1024)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--new", type=int, default=20000, help="generated tokens (part 2)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="part 2 sampling: > 1 keeps the model out of repetition loops")
    ap.add_argument("--lookback", type=int, default=2048,
                    help="tokens of history the full-cache scorer sees before each block (part 2)")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--part2-only", action="store_true",
                    help="keep part 1 from the saved --json, run the generation")
    ap.add_argument("--part2-modes", default=",".join(PART2),
                    help=f"comma-separated modes of part 2 to run, of {', '.join(PART2)}; with "
                         "--part2-only the saved modes not run again are kept")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the configurations in this many one-thread processes (2 on 2 cores)")
    ap.add_argument("--json", type=Path, default=None,
                    help="the run's JSON (default: docs/data/past_context.json with "
                         "--write-results, --from-json or --part2-only, else runs/)")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--from-json", action="store_true",
                    help="render the saved --json (no model runs), e.g. after a stopped run")
    args = ap.parse_args()
    args.part2_modes = [m.strip() for m in args.part2_modes.split(",") if m.strip()]
    bad = [m for m in args.part2_modes if m not in PART2]
    if bad or not args.part2_modes:
        ap.error(f"--part2-modes takes modes of {', '.join(PART2)}; got {bad or 'none'}.")
    if args.json is None:
        kept = args.write_results or args.from_json or args.part2_only
        args.json = (ROOT / "docs" / "data" if kept else ROOT / "runs") / "past_context.json"
    if args.from_json:
        result = json.loads(args.json.read_text())
        context = result["context"]
    else:
        result, context = run(args)
    img = (ROOT / "docs" / "img" if args.write_results else args.json.parent) / "past_context.png"
    _plot(result, img, context)
    part2_note = "" if "part2" in result else (
        " Part 2 (generation past the context) was not run for these numbers.")
    body = "\n".join([
        "## Past the model's context: absolute vs rolling positions", "",
        (f"Part 1 command: `{result['command_part1']}`  " if result.get("command_part1") else ""),
        *_other_commands(result),
        f"Command: `{result.get('command') or command()}`"
        + (f" (rendered from its JSON by `{command()}`)  " if args.from_json else "  "),
        f"Machine: {result.get('machine') or machine()}", "",
        f"SmolLM2-135M (context {context}), shipped gates {result['gates']}, M={result['budget']}, "
        f"buffer {result['buffer']}, 4 sinks for every bounded method. Teacher-forced text: first "
        f"{result['part1']['tokens']} tokens of `{result['text']}` (evaluation-only); perplexity "
        f"per {result['block']}-token block.{part2_note}", "",
        _table(result), "", "![past context](img/past_context.png)", ""])
    print(body)
    if args.write_results:
        write_section("past_context", body)


def run(args) -> tuple[dict, int]:
    model, gates = _load(args)
    context = model.config.max_position_embeddings
    result = {"text": args.text_file.name, "block": args.block, "budget": args.budget,
              "buffer": args.buffer, "context": context, "gates": gates.digest(),
              "machine": machine(), "command": command()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    kept = {}
    if args.part2_only:
        if not args.json.is_file():
            sys.exit(f"--part2-only keeps part 1 from {args.json}, which does not exist: run "
                     "without --part2-only (or pass the saved --json).")
        saved = json.loads(args.json.read_text())
        args.block = result["block"] = saved["block"]  # part 2's blocks match part 1's
        result["part1"] = saved["part1"]
        result["command_part1"] = saved.get("command_part1") or saved.get("command")
        differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in (
            ("repetition_penalty", args.repetition_penalty), ("lookback", args.lookback),
            ("gates", result["gates"]), ("budget", args.budget)) if saved.get(k) != v]
        others = [k for k in saved.get("part2", {}) if k not in args.part2_modes]
        if differ and others:  # their rows were made under other settings: not comparable
            print(f"--part2-only: dropping the saved part-2 modes {', '.join(others)} (made with "
                  f"other settings: {'; '.join(differ)}); run them again with --part2-modes.",
                  file=sys.stderr)
        kept = {k: saved["part2"][k] for k in others} if not differ else {}
        for v in kept.values():  # each generation keeps the command that produced it
            v.setdefault("command", saved.get("command"))
    else:
        result["part1"] = {"tokens": len(_text_ids(args))}
    tasks = [] if args.part2_only else [("part1", n) for n in PART1]
    if not args.skip_generation:
        result["lookback"] = args.lookback
        result["repetition_penalty"] = args.repetition_penalty
        result["part2"] = kept if args.part2_only else {}
        tasks = [("part2", n) for n in args.part2_modes] + tasks  # the long ones first

    def done(part, name, out, seconds):
        if part == "part2":
            out["seconds"], out["command"] = seconds, result["command"]
        result[part][name] = out
        print(f"{part} {name}: {seconds}s", flush=True)
        args.json.write_text(json.dumps(result, indent=1))

    run_tasks(tasks, args, model, done)
    result["part1"] = {k: result["part1"][k] for k in ("tokens", *PART1) if k in result["part1"]}
    if "part2" in result:
        result["part2"] = {k: result["part2"][k] for k in PART2 if k in result["part2"]}
    args.json.write_text(json.dumps(result, indent=1))
    return result, context


if __name__ == "__main__":
    main()
