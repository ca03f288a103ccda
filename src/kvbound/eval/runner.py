"""Task evaluation: methods x budgets x tasks, with kvpress-style result directories.

For every (task, model, method, budget) a directory ``<task>__<model>__<method>__<budget>``
holds ``predictions.csv``, ``metrics.json`` and ``config.yaml``; existing directories are reused
(delete one to recompute it). The full cache runs first on each task so that every bounded method
is also scored by its agreement with the full cache's answers ("relative" metrics).

Prompts follow the task convention: the user turn is ``context + question`` (chat template for
instruct models) and the assistant turn starts with ``answer_prefix``. Examples are generated in
left-padded batches with greedy decoding.

Prefill modes, recorded with every result:

* ``chunked`` (default) - the prompt is prefilled in chunks with eviction after each, so the
  context is compressed before the question is seen (query-agnostic) and memory is bounded from
  the first token;
* ``full`` - the whole prompt is prefilled, then cut to the budget with the question present
  (query-aware for SnapKV-like policies, the kvpress/SnapKV paper setting).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvbound.errors import KVBoundError
from kvbound.eval.tasks import get_task
from kvbound.eval.tasks.base import TaskExample
from kvbound.io import atomic_dir_write, atomic_write_json, atomic_write_text
from kvbound.policies import check_method
from kvbound.progress import progress_bar

PREFILL_MODES = ("chunked", "full")


@dataclass
class EvalConfig:
    tasks: list[str]
    methods: list[str]
    budgets: list[int]
    buffer: int = 16
    chunk: int = 128
    sinks: int | None = None
    gates: str | None = None
    limit: int = 10
    seed: int = 0
    context_tokens: int = 1024
    prefill: str = "chunked"
    batch_size: int = 8
    data: dict[str, str] = field(default_factory=dict)  # task -> local file

    def validate(self) -> None:
        for m in self.methods:
            check_method(m)
        for t in self.tasks:
            get_task(t)
        if any(not isinstance(b, int) or b <= 0 for b in self.budgets):
            raise KVBoundError("Budgets must be positive integers.")
        if self.prefill not in PREFILL_MODES:
            raise KVBoundError(f"prefill must be one of {PREFILL_MODES}.")


def build_prompt(tokenizer, ex: TaskExample) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text + ex.answer_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{ex.prompt}\n{ex.answer_prefix}", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, *, method: str,
                   budget: int, buffer: int, chunk: int, sinks, gates, prefill: str) -> tuple:
    """Greedy generation for left-padded prompts; returns (texts, peak tokens/head, seconds,
    the cache's settings (None for the full cache))."""
    from kvbound.cache import EvictionCache
    from kvbound.generation import build_cache, prefill_chunk_size

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    cache, used, _ = build_cache(model, method, budget=budget, buffer=buffer, sinks=sinks,
                                 gates=gates)
    prefill_chunk = prefill_chunk_size(method, chunk, longest, budget,
                                       full_prefill=prefill != "chunked")
    t0 = time.perf_counter()
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), cache=cache,
                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=pad,
                         prefill_chunk_size=prefill_chunk)
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(row[longest:], skip_special_tokens=True) for row in out]
    bounded = isinstance(cache, EvictionCache)
    peak = cache.stats().peak_tokens_per_head if bounded else cache.get_seq_length()
    settings = None
    if bounded:
        settings = {**cache.settings(), "prefill_chunk": prefill_chunk,
                    "gates": None if used is None else used.ref()}
    return texts, peak, seconds, settings


def run_dir_name(task: str, model: str, method: str, budget: int, prefill: str) -> str:
    name = f"{task}__{model.replace('/', '--')}__{method}__{budget}"
    return name if prefill == "chunked" or method == "full" else name + "__fullprefill"


def run_eval(model, tokenizer, cfg: EvalConfig, out: Path, *, progress: bool = True) -> dict:
    """Run every task x method x budget; write result directories and a combined summary."""
    cfg.validate()
    model_name = str(getattr(model, "kvbound_model_name", None) or "model")
    out.mkdir(parents=True, exist_ok=True)
    combined: list[dict] = []
    bar = progress_bar(progress)
    methods = ["full"] + [m for m in cfg.methods if m != "full"]
    with bar:
        total = sum(1 for _ in cfg.tasks) * (1 + (len(methods) - 1) * len(cfg.budgets))
        task_id = bar.add_task("eval", total=total)
        for task in cfg.tasks:
            spec = get_task(task)
            examples = load_examples(spec, cfg, tokenizer)
            prompts = [build_prompt(tokenizer, ex) for ex in examples]
            reference = None
            for method in methods:
                for budget in ([0] if method == "full" else cfg.budgets):
                    rec = _run_one(model, tokenizer, cfg, spec, examples, prompts, method,
                                   budget, reference, out, model_name)
                    if method == "full":
                        reference = rec["predictions"]
                        full_score = rec["metrics"]["score"]
                    rec["metrics"]["relative_to_full"] = (
                        rec["metrics"]["score"] / full_score if full_score else None)
                    combined.append({k: v for k, v in rec.items() if k != "predictions"})
                    bar.update(task_id, advance=1,
                               description=f"{task} {method} M={budget}")
    from kvbound.eval.stats import check_same_rules

    check_same_rules(combined)
    summary = {"model": model_name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
               "config": cfg.__dict__, "results": combined}
    atomic_write_json(out / "results.json", summary)
    from kvbound.eval.report import write_report

    write_report(summary, out)
    return summary


def load_examples(spec, cfg: EvalConfig, tokenizer) -> list[TaskExample]:
    """The examples ``run_eval`` scores for task ``spec`` under ``cfg`` (deterministic)."""
    kwargs = {"limit": cfg.limit, "seed": cfg.seed}
    if spec.synthetic:
        kwargs.update(context_tokens_approx=cfg.context_tokens, tokenizer=tokenizer)
    examples = spec.load(cfg.data.get(spec.name), **kwargs)
    if not examples:
        raise KVBoundError(f"Task {spec.name} produced no examples.")
    return examples


def per_example_scores(spec, examples: list[TaskExample], run_dir: Path) -> list[float]:
    """Each example's score (0-1) in a result directory, in the examples' order."""
    preds = read_predictions(run_dir / "predictions.csv")
    if len(preds) != len(examples):
        raise KVBoundError(f"{run_dir} holds {len(preds)} predictions for {len(examples)} "
                           "examples: it was run with other settings.")
    return [spec.score([p], [ex])["score"] / 100.0 for p, ex in zip(preds, examples)]


def _run_one(model, tokenizer, cfg, spec, examples, prompts, method, budget, reference, out,
             model_name) -> dict:
    d = out / run_dir_name(spec.name, model_name, method, budget, cfg.prefill)
    if (d / "metrics.json").exists():
        import yaml

        metrics = json.loads((d / "metrics.json").read_text())
        preds = read_predictions(d / "predictions.csv")
        config = yaml.safe_load((d / "config.yaml").read_text())
        return {"task": spec.name, "method": method, "budget": budget, "metrics": metrics,
                "predictions": preds, "dir": d.name, "prefill": config.get("prefill"),
                "settings": config.get("settings")}
    preds, peaks, seconds, settings = [], [], 0.0, None
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # less padding
    texts: dict[int, str] = {}
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        new = max(examples[i].max_new_tokens for i in idx)
        got, peak, sec, settings = generate_batch(
            model, tokenizer, [prompts[i] for i in idx], new, method=method,
            budget=budget or 1 << 30, buffer=cfg.buffer, chunk=cfg.chunk, sinks=cfg.sinks,
            gates=cfg.gates, prefill=cfg.prefill)
        texts.update(zip(idx, got))
        peaks.append(peak)
        seconds += sec
    preds = [texts[i] for i in range(len(examples))]
    metrics = spec.score(preds, examples, reference_predictions=reference)
    metrics.update(peak_tokens_per_head=max(peaks), seconds=round(seconds, 2),
                   prompt_tokens_mean=sum(map(len, prompts)) / len(prompts))
    config = {"task": spec.name, "model": model_name, "method": method,
              "budget": budget or None, "buffer": cfg.buffer, "chunk": cfg.chunk,
              "prefill": cfg.prefill, "query_aware": cfg.prefill == "full",
              "sinks": None if settings is None else settings["sinks"],
              "gates": None if settings is None else settings["gates"], "seed": cfg.seed,
              "limit": cfg.limit, "n": len(examples),
              "context_tokens": cfg.context_tokens if spec.synthetic else None,
              "settings": settings}

    def write(tmp: Path) -> None:
        with (tmp / "predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "task", "question", "answer", "predicted_answer"])
            for ex, p in zip(examples, preds):
                w.writerow([ex.id, ex.task, ex.question[-300:], json.dumps(ex.answer), p])
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (tmp / "config.yaml").write_text(_yaml(config))

    atomic_dir_write(d, write)
    return {"task": spec.name, "method": method, "budget": budget, "metrics": metrics,
            "predictions": preds, "dir": d.name, "prefill": cfg.prefill, "settings": settings}


def read_predictions(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return [row["predicted_answer"] for row in csv.DictReader(fh)]


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


__all__ = ["EvalConfig", "run_eval", "build_prompt", "generate_batch", "atomic_write_text",
           "load_examples", "per_example_scores", "read_predictions"]
