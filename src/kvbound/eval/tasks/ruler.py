"""RULER synthetic long-context tasks (Hsieh et al., 2024, arXiv 2404.06654), kvpress layout.

Schema (one row per question; kvpress's ``simonjegou/ruler`` dataset, ``data_dir`` = context
length such as ``"4096"``; locally a JSONL with the same columns)::

    {"context": "...haystack...", "question": "What is the special magic number for ...?",
     "answer_prefix": " Answer: The special magic number for ... is", "answer": ["8176654"],
     "max_new_tokens": 128, "task": "niah_single_1"}

Scoring follows RULER: control characters are removed from the prediction; tasks whose name
starts with ``qa`` use ``string_match_part`` (any reference found), all others
``string_match_all`` (fraction of references found), both case-insensitive. ``score`` is the
mean over tasks of the per-task means; ``per_task`` has each task's ``string_match``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbound.eval import metrics
from kvbound.eval.tasks.base import (
    TaskExample,
    TaskSpec,
    check_predictions,
    get_field,
    load_records,
    macro_average,
    reference_agreement,
    register,
    sample_records,
)

HUB_ID = "simonjegou/ruler"
DEFAULT_SUBSET = "4096"
_CONTROL = re.compile(r"[\x00-\x1f]")


def load(
    path_or_none: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    subset: str = DEFAULT_SUBSET,
) -> list[TaskExample]:
    """RULER rows from a local file, or from the Hub (``subset`` = kvpress ``data_dir``)."""
    records = load_records(path_or_none, task="ruler", hub_id=HUB_ID,
                           hub_kwargs={"data_dir": str(subset), "split": "test"})
    examples = []
    for i, rec in enumerate(records):
        task = str(get_field(rec, "task", default="ruler"))
        examples.append(TaskExample(
            id=str(get_field(rec, "id", default=f"{task}-{i}")),
            context=str(get_field(rec, "context", default="")),
            question=str(get_field(rec, "question", default="")),
            answer=metrics.as_list(get_field(rec, "answer", "outputs", default=[])),
            answer_prefix=str(get_field(rec, "answer_prefix", default="") or ""),
            max_new_tokens=int(get_field(rec, "max_new_tokens", default=128)),
            task=task,
            metadata={"length": get_field(rec, "length", default=None)},
        ))
    return sample_records(examples, limit, seed)


def score_one(prediction: str, example: TaskExample) -> float:
    """RULER score of one prediction in [0, 1]."""
    pred = _CONTROL.sub("", (prediction or "").strip()).strip()
    if example.task.split("_")[0] == "qa":
        return metrics.string_match_part(pred, example.answers)
    return metrics.string_match_all(pred, example.answers)


def score(
    predictions: Sequence[str],
    examples: Sequence[TaskExample],
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-task string match (%) and their mean."""
    preds = check_predictions(predictions, examples)
    values = [score_one(p, ex) for p, ex in zip(preds, examples)]
    mean, per_task = macro_average(values, [ex.task for ex in examples], key="string_match")
    out: dict[str, Any] = {"score": mean, "metric": "string_match", "n": len(preds),
                           "per_task": per_task}
    if reference_predictions is not None:
        out["reference"] = reference_agreement(preds, reference_predictions)
    return out


SPEC = register(TaskSpec(
    name="ruler", load=load, score=score, hub_id=HUB_ID, metric="string_match",
    description="RULER (kvpress rows): NIAH, variable tracking, CWE/FWE, QA; string match.",
))
