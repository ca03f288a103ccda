"""LongProc (Ye et al., 2025, arXiv 2501.05414): long procedural generation.

Schema (``PrincetonPLI/LongProc``, one config per task and output length such as
``html_to_tsv_0.5k`` or ``countdown_2k``, split ``test``)::

    {"id": "...", "input_prompt": "full prompt with the instructions and the input",
     "reference_output": "gold procedure / TSV", "metadata": "{...json...}"}

``input`` / ``output`` are accepted as aliases of ``input_prompt`` / ``reference_output``; a
``metadata`` string is parsed as JSON. The whole prompt is the ``context`` (LongProc prompts put
the instructions first); ``question`` is empty.

The sub-task comes from the ``subset`` argument, else the record's ``task``/``subset`` field,
else a LongProc task name in the file name, else the content (a countdown search trace, a TSV).

Scoring (what LongProc's evaluators do, where it can run offline):

- ``html_to_tsv``: row-level F1 of the TSV (the last ```` ```tsv ```` block if present, else the
  whole output) against the reference TSV, cells normalised; rows match only whole
  (:func:`kvbound.eval.metrics.tsv_row_f1`; LongProc compares rows the same way).
- ``countdown``: success check. The last ``<Solution>...</Solution>`` block must list
  ``len(nums) - 1`` lines ``a op b = c`` that are arithmetically right, use each given number (or
  intermediate result) once, and end at the target. ``nums``/``target`` come from the metadata, or
  from "Initial number set: [...], target: N" in the reference or prompt. Parsed, never ``eval``-ed.
- ``path_traversal``: the ``<Route>...</Route>`` block must equal the reference route
  (``partial`` = share of leading lines right).
- other tasks (``pseudo_to_code`` needs compiling and running C++ test cases, ``tom_tracking`` and
  ``travel_planning`` need their task-specific checkers): line-level F1 between the output and
  the reference (a documented fallback, not LongProc's metric).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from kvbound.eval import metrics
from kvbound.eval.tasks.base import (
    TaskExample,
    TaskSpec,
    check_predictions,
    get_field,
    load_records,
    reference_agreement,
    register,
    sample_records,
)

HUB_ID = "PrincetonPLI/LongProc"
TASK_NAMES = ("html_to_tsv", "pseudo_to_code", "path_traversal", "tom_tracking", "countdown",
              "travel_planning")
MAX_NEW_TOKENS = {"0.5k": 1024, "2k": 3072, "8k": 9216}
_EQUATION = re.compile(r"^\s*(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(-?\d+(?:\.\d+)?)\s*$")
_INIT = re.compile(r"number set:?\s*\[([\d,\s]+)\],?\s*target:?\s*(\d+)", re.IGNORECASE)


def base_task(subset: str) -> str:
    """LongProc task name of a config name (``countdown_2k`` -> ``countdown``)."""
    for name in TASK_NAMES:
        if subset.startswith(name):
            return name
    return subset


def _guess_subset(path: str | Path | None, rec: dict[str, Any]) -> str:
    field = get_field(rec, "task", "subset", "dataset", default=None)
    if field:
        return str(field)
    if path is not None:
        stem = Path(path).stem
        for name in TASK_NAMES:
            if name in stem:
                m = re.search(re.escape(name) + r"_(0\.5k|2k|8k)", stem)
                return m.group(0) if m else name
    ref = str(get_field(rec, "reference_output", "output", default=""))
    if "<Solution>" in ref or _INIT.search(ref):
        return "countdown"
    if "<Route>" in ref:
        return "path_traversal"
    if "\t" in ref:
        return "html_to_tsv"
    return "unknown"


def _metadata(rec: dict[str, Any]) -> dict[str, Any]:
    meta = get_field(rec, "metadata", default=None)
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"raw": meta}
    return dict(meta) if isinstance(meta, dict) else {}


def load(
    path_or_none: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> list[TaskExample]:
    """LongProc rows from a local file or the Hub (``subset``, default ``html_to_tsv_0.5k``)."""
    hub_subset = subset or "html_to_tsv_0.5k"
    records = load_records(path_or_none, task="longproc", hub_id=HUB_ID, hub_args=(hub_subset,),
                           hub_kwargs={"split": "test"})
    examples = []
    for i, rec in enumerate(records):
        name = subset or (_guess_subset(path_or_none, rec) if path_or_none is not None
                          else hub_subset)
        level = name.rsplit("_", 1)[-1]
        meta = _metadata(rec)
        meta["subset"] = name
        examples.append(TaskExample(
            id=str(get_field(rec, "id", default=f"{name}-{i}")),
            context=str(get_field(rec, "input_prompt", "input", default="")),
            question="",
            answer=str(get_field(rec, "reference_output", "output", default="")),
            max_new_tokens=MAX_NEW_TOKENS.get(level, 3072),
            task=base_task(name),
            metadata=meta,
        ))
    return sample_records(examples, limit, seed)


# --------------------------------------------------------------------------------------------
# countdown
# --------------------------------------------------------------------------------------------
def countdown_numbers(example: TaskExample) -> tuple[list[int], int] | None:
    """``(nums, target)`` of a countdown example, from metadata or the reference/prompt text."""
    meta = example.metadata
    nums = meta.get("nums", meta.get("numbers"))
    target = meta.get("target")
    if nums is not None and target is not None:
        return [int(n) for n in nums], int(target)
    for text in (example.answers[0] if example.answers else "", example.context):
        m = _INIT.search(text)
        if m:
            return [int(n) for n in m.group(1).split(",") if n.strip()], int(m.group(2))
    return None


def countdown_success(solution: str | None, nums: Sequence[int], target: int) -> bool:
    """True when ``solution`` (lines ``a op b = c``) reaches ``target`` from ``nums``."""
    if not solution:
        return False
    lines = [ln for ln in solution.strip().splitlines() if ln.strip()]
    if len(lines) != len(nums) - 1:
        return False
    pool = [Fraction(n) for n in nums]
    for line in lines:
        m = _EQUATION.match(line)
        if not m:
            return False
        a, op, b, c = Fraction(m.group(1)), m.group(2), Fraction(m.group(3)), Fraction(m.group(4))
        if op in "x×*":
            value = a * b
        elif op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        else:
            if b == 0:
                return False
            value = a / b
        if value != c:
            return False
        for operand in (a, b):
            if operand not in pool:
                return False
            pool.remove(operand)
        pool.append(c)
    return len(pool) == 1 and pool[0] == target


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def score_one(prediction: str, example: TaskExample,
              reference: str | None = None) -> dict[str, float]:
    """Metrics of one prediction; ``reference`` replaces the gold output when given (for
    countdown, success does not depend on a reference and is kept)."""
    gold = example.answers[0] if reference is None else reference
    task = example.task
    if task == "html_to_tsv":
        r = metrics.tsv_row_f1(prediction, gold)
        return {"score": r["f1"], "precision": r["precision"], "recall": r["recall"]}
    if task == "countdown":
        found = countdown_numbers(example)
        sol = metrics.extract_tagged(prediction, "Solution")
        if found is not None:
            ok = countdown_success(sol, *found)
        else:
            ok = sol is not None and sol == metrics.extract_tagged(gold, "Solution")
        return {"score": float(ok)}
    if task == "path_traversal":
        pred_route = metrics.extract_tagged(prediction, "Route")
        gold_route = metrics.extract_tagged(gold, "Route") or gold.strip()
        if pred_route is None:
            return {"score": 0.0, "partial": 0.0}
        pl, gl = pred_route.splitlines(), gold_route.splitlines()
        prefix = 0
        for a, b in zip(pl, gl):
            if a.strip() != b.strip():
                break
            prefix += 1
        exact = float([x.strip() for x in pl] == [x.strip() for x in gl])
        return {"score": exact, "partial": prefix / max(1, len(gl))}
    return {"score": metrics.line_f1(prediction, gold)}


MAIN_METRIC = {"html_to_tsv": "row_f1", "countdown": "success", "path_traversal": "accuracy"}


def score(
    predictions: Sequence[str],
    examples: Sequence[TaskExample],
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per sub-task main metric (%) and their mean; ``reference`` rescored against
    ``reference_predictions`` with the same metric when given."""
    preds = check_predictions(predictions, examples)
    per: dict[str, list[float]] = {}
    for p, ex in zip(preds, examples):
        per.setdefault(ex.task, []).append(score_one(p, ex)["score"])
    per_task = {
        t: {"metric": MAIN_METRIC.get(t, "line_f1"), "score": 100.0 * metrics.mean(v),
            "n": len(v)}
        for t, v in sorted(per.items())
    }
    out: dict[str, Any] = {
        "score": metrics.mean(d["score"] for d in per_task.values()),
        "metric": "longproc",
        "n": len(preds),
        "per_task": per_task,
    }
    if reference_predictions is not None:
        out["reference"] = reference_agreement(preds, reference_predictions)
        out["reference"]["task_metric"] = 100.0 * metrics.mean(
            score_one(p, ex, reference=r)["score"]
            for p, ex, r in zip(preds, examples, reference_predictions)
        )
    return out


SPEC = register(TaskSpec(
    name="longproc", load=load, score=score, hub_id=HUB_ID, metric="longproc",
    description="LongProc procedural generation: TSV row F1, countdown success, route match.",
))
