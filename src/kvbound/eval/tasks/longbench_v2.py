"""LongBench v2 (Bai et al., 2024, arXiv 2412.15204): 503 long-context multiple-choice questions.

Schema (``THUDM/LongBench-v2``, split ``train``)::

    {"_id": "...", "domain": "Single-Document QA", "sub_domain": "Financial",
     "difficulty": "easy" | "hard", "length": "short" | "medium" | "long",
     "question": "...", "choice_A": "...", "choice_B": "...", "choice_C": "...",
     "choice_D": "...", "answer": "B", "context": "..."}

The model is asked to reply "The correct answer is (X)"; :func:`kvbound.eval.metrics.extract_choice`
reads the letter (with fallbacks for "Answer: X", "(X)", a leading letter). Accuracy is reported
overall and per difficulty, length and domain, as the LongBench v2 leaderboard does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

HUB_ID = "THUDM/LongBench-v2"
MAX_NEW_TOKENS = 128
LETTERS = "ABCD"


def format_question(record: dict[str, Any]) -> str:
    """Question, the four choices and the answer-format instruction."""
    choices = "\n".join(f"({c}) {get_field(record, f'choice_{c}', default='')}" for c in LETTERS)
    return (
        "Answer the multiple-choice question about the text above.\n\n"
        f"Question: {str(get_field(record, 'question', default='')).strip()}\n\n"
        f"Choices:\n{choices}\n\n"
        'Reply with the letter of the single correct choice, in the form '
        '"The correct answer is (X)".'
    )


def load(
    path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[TaskExample]:
    """LongBench v2 rows from a local file or the Hub."""
    records = load_records(path_or_none, task="longbench_v2", hub_id=HUB_ID,
                           hub_kwargs={"split": "train"})
    examples = []
    for i, rec in enumerate(records):
        examples.append(TaskExample(
            id=str(get_field(rec, "_id", "id", default=f"longbench_v2-{i}")),
            context=str(get_field(rec, "context", default="")),
            question=format_question(rec),
            answer=str(get_field(rec, "answer", default="")).strip().upper(),
            max_new_tokens=MAX_NEW_TOKENS,
            task="longbench_v2",
            metadata={k: get_field(rec, k, default="") for k in
                      ("domain", "sub_domain", "difficulty", "length")},
        ))
    return sample_records(examples, limit, seed)


score = per_example_score(
    lambda p, ex: metrics.extract_choice(p, LETTERS) == ex.answer,
    group_keys=("difficulty", "length", "domain"),
    doc="Accuracy (%) of the chosen letter, overall and per difficulty / length / domain.")


SPEC = register(TaskSpec(
    name="longbench_v2", load=load, score=score, hub_id=HUB_ID, metric="accuracy",
    description="LongBench v2 multiple choice (A-D) over long contexts; accuracy.",
))
