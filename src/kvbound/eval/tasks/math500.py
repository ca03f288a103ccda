"""MATH-500: the 500-problem MATH test subset of Lightman et al. (2023, arXiv 2305.20050).

Schema (``HuggingFaceH4/MATH-500``, split ``test``)::

    {"problem": "...", "solution": "... \\boxed{...}", "answer": "\\frac{1}{2}",
     "subject": "Algebra", "level": 3, "unique_id": "test/algebra/1.json"}

The model is asked to put its final answer in ``\\boxed{}``; the last box (or, failing that, the
GSM8K-style fallback of :func:`kvbound.eval.metrics.extract_answer`) is compared with ``answer`` by
:func:`kvbound.eval.metrics.math_equal`. Results are also broken down by ``level``.
"""

from __future__ import annotations

from pathlib import Path

from kvbound.eval import metrics
from kvbound.eval.tasks.base import (
    TaskExample,
    TaskSpec,
    get_field,
    load_records,
    per_example_score,
    register,
    sample_records,
)

HUB_ID = "HuggingFaceH4/MATH-500"
MAX_NEW_TOKENS = 1024
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load(
    path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[TaskExample]:
    """MATH-500 examples from a local file or the Hub."""
    records = load_records(path_or_none, task="math500", hub_id=HUB_ID,
                           hub_kwargs={"split": "test"})
    examples = []
    for i, rec in enumerate(records):
        solution = str(get_field(rec, "solution", default=""))
        answer = get_field(rec, "answer")
        if answer is None:
            answer = metrics.last_boxed(solution) or ""
        examples.append(TaskExample(
            id=str(get_field(rec, "unique_id", "id", default=f"math500-{i}")),
            context="",
            question=f"{str(get_field(rec, 'problem')).strip()}\n\n{INSTRUCTION}",
            answer=str(answer),
            max_new_tokens=MAX_NEW_TOKENS,
            task="math500",
            metadata={"solution": solution, "subject": get_field(rec, "subject", default=""),
                      "level": get_field(rec, "level", default="")},
        ))
    return sample_records(examples, limit, seed)


def extract_math_answer(prediction: str) -> str | None:
    """Last boxed answer of a MATH-style solution, else the GSM8K-style fallback."""
    return metrics.extract_answer(prediction)


def is_correct(prediction: str, gold: str) -> bool:
    """The extracted answer equals ``gold``; a short unboxed reply (< 64 characters) is also
    compared whole, so ``"\\frac{1}{2}"`` alone counts."""
    if metrics.math_equal(extract_math_answer(prediction), gold):
        return True
    short = (prediction or "").strip()
    return len(short) < 64 and metrics.last_boxed(short) is None and metrics.math_equal(short, gold)


score = per_example_score(
    lambda p, ex: is_correct(p, ex.answer), group_keys=("level",),
    doc="Accuracy (%) under :func:`~kvbound.eval.metrics.math_equal`, also per level.")


SPEC = register(TaskSpec(
    name="math500", load=load, score=score, hub_id=HUB_ID, metric="accuracy",
    description="MATH-500 competition math; boxed answer, MATH-style equivalence.",
))
