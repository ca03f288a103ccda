"""GSM8K: grade-school math word problems (Cobbe et al., 2021, arXiv 2110.14168).

Schema (``openai/gsm8k``, config ``main``, split ``test``; one JSON object per line locally)::

    {"question": "...", "answer": "step-by-step solution ... #### 42"}

The gold answer is the number after ``####``. A prediction is scored by exact numeric match of
:func:`kvbound.eval.metrics.extract_answer` (last ``\\boxed{}``, then ``####``, then "the answer
is", then the last number) against it.
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

HUB_ID = "openai/gsm8k"
MAX_NEW_TOKENS = 512
INSTRUCTION = (
    "Solve the problem step by step. End with the final answer as a number after '####', "
    "for example '#### 42'."
)


def gold_from_solution(solution: str) -> str:
    """The number after the last ``####`` of a GSM8K solution, commas removed."""
    tail = str(solution).rsplit("####", 1)[-1].strip()
    return metrics.normalize_number(tail) or tail


def load(
    path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[TaskExample]:
    """GSM8K examples from a local file or the Hub (test split)."""
    records = load_records(path_or_none, task="gsm8k", hub_id=HUB_ID, hub_args=("main",),
                           hub_kwargs={"split": "test"})
    examples = []
    for i, rec in enumerate(records):
        solution = str(get_field(rec, "answer", default=""))
        examples.append(TaskExample(
            id=str(get_field(rec, "id", default=f"gsm8k-{i}")),
            context="",
            question=f"{str(get_field(rec, 'question')).strip()}\n\n{INSTRUCTION}",
            answer=gold_from_solution(solution),
            max_new_tokens=MAX_NEW_TOKENS,
            task="gsm8k",
            metadata={"solution": solution},
        ))
    return sample_records(examples, limit, seed)


score = per_example_score(
    lambda p, ex: metrics.numeric_equal(metrics.extract_answer(p), ex.answer),
    doc="Accuracy (%) of the extracted final number.")


SPEC = register(TaskSpec(
    name="gsm8k", load=load, score=score, hub_id=HUB_ID, metric="accuracy",
    description="GSM8K math word problems; numeric exact match of the final answer.",
))
