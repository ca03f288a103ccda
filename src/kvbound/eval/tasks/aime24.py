"""AIME 2024: the 30 problems of the 2024 American Invitational Mathematics Examination.

Two Hub schemas are accepted (field names are matched case-insensitively)::

    HuggingFaceH4/aime_2024:  {"id": 60, "problem": "...", "solution": "...", "answer": "204", ...}
    Maxwell-Jia/AIME_2024:    {"ID": "2024-I-1", "Problem": "...", "Solution": "...", "Answer": 204}

Answers are integers 0-999: the last ``\\boxed{}`` (or the last number) of the prediction must
equal the gold integer.
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

HUB_ID = "HuggingFaceH4/aime_2024"
ALT_HUB_ID = "Maxwell-Jia/AIME_2024"
MAX_NEW_TOKENS = 2048
INSTRUCTION = (
    "Please reason step by step, and put your final answer (an integer from 0 to 999) "
    "within \\boxed{}."
)


def load(
    path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[TaskExample]:
    """AIME 2024 examples from a local file (either schema) or the Hub."""
    records = load_records(path_or_none, task="aime24", hub_id=HUB_ID,
                           hub_kwargs={"split": "train"})
    examples = []
    for i, rec in enumerate(records):
        answer = get_field(rec, "answer", default="")
        examples.append(TaskExample(
            id=str(get_field(rec, "id", default=f"aime24-{i}")),
            context="",
            question=f"{str(get_field(rec, 'problem')).strip()}\n\n{INSTRUCTION}",
            answer=metrics.normalize_number(answer) or str(answer).strip(),
            max_new_tokens=MAX_NEW_TOKENS,
            task="aime24",
            metadata={"solution": str(get_field(rec, "solution", default=""))},
        ))
    return sample_records(examples, limit, seed)


def _correct(prediction: str, ex: TaskExample) -> bool:
    got = metrics.extract_answer(prediction)
    return metrics.numeric_equal(got, ex.answer) or metrics.math_equal(got, ex.answer)


score = per_example_score(_correct, doc="Accuracy (%) of the final integer.")


SPEC = register(TaskSpec(
    name="aime24", load=load, score=score, hub_id=HUB_ID, metric="accuracy",
    description="AIME 2024 (30 problems); boxed integer answer exact match.",
))
