"""LongMemEval_S (Wu et al., 2024, arXiv 2410.10813): memory of long user-assistant chat histories.

Schema (``longmemeval_s.json`` / ``longmemeval_s_cleaned.json``: a JSON list; JSONL also read)::

    {"question_id": "e47becba", "question_type": "single-session-user",
     "question": "What degree did I graduate with?", "answer": "Business Administration",
     "question_date": "2023/05/30 (Tue) 23:40",
     "haystack_session_ids": ["s1", ...], "haystack_dates": ["2023/05/20 (Sat) 02:21", ...],
     "haystack_sessions": [[{"role": "user", "content": "...", "has_answer": true}, ...], ...],
     "answer_session_ids": ["s1"]}

Context: the sessions in order, each headed by its index and date, one ``role: content`` line per
turn. Question: the current date and the question.

Scoring. The official metric is an LLM judge, which an offline harness cannot run; we use
normalised string matching instead and say so in reports:

- ``accuracy`` (main): the normalised gold answer occurs in the normalised prediction;
- ``f1``: LongBench token F1, useful when the gold answer is a long sentence;
- abstention questions (``question_id`` ending in ``_abs``) count as correct when the prediction
  declines (phrases such as "not mentioned", "don't know", "no information").

Results are broken down by ``question_type``.

Hub: read from the ``xiaowu0162/longmemeval-cleaned`` dataset repo with
``huggingface_hub.hf_hub_download`` (the ``datasets`` library cannot build its ``answer`` column,
which mixes strings and integers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbound.errors import KVBoundError
from kvbound.eval import metrics
from kvbound.eval.tasks.base import (
    TaskExample,
    TaskSpec,
    check_predictions,
    get_field,
    read_records,
    register,
    sample_records,
    summarize,
)

HUB_ID = "xiaowu0162/longmemeval-cleaned"
HUB_FILE = "longmemeval_s_cleaned.json"
MAX_NEW_TOKENS = 64
ABSTAIN_PATTERNS = re.compile(
    r"not (?:been )?mentioned|did not mention|didn't mention|no (?:information|mention|record)|"
    r"(?:do not|don't|does not|doesn't) (?:know|have|say|mention)|cannot (?:be )?(?:determine|"
    r"answer|find)|can't (?:determine|answer|find)|unknown|not (?:provided|specified|available)|"
    r"unanswerable|never (?:mentioned|told|said)",
    re.IGNORECASE,
)


def format_history(sessions: Sequence[Sequence[dict[str, Any]]], dates: Sequence[str]) -> str:
    """Chat history text: one block per session, headed by its number and date."""
    blocks = []
    for i, session in enumerate(sessions):
        date = dates[i] if i < len(dates) else ""
        lines = [f"### Session {i + 1} (date: {date})" if date else f"### Session {i + 1}"]
        for turn in session:
            lines.append(f"{turn.get('role', 'user')}: {str(turn.get('content', '')).strip()}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _hub_records() -> list[dict[str, Any]]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=HUB_ID, filename=HUB_FILE, repo_type="dataset")
    except Exception as exc:
        raise KVBoundError(
            f"Could not download {HUB_FILE} from the Hugging Face Hub dataset {HUB_ID} "
            f"({type(exc).__name__}: {exc}). If the Hub is unreachable, pass --data PATH with a "
            "local LongMemEval .json/.jsonl file (schema in kvbound.eval.tasks.longmemeval)."
        ) from exc
    return read_records(path)


def load(
    path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[TaskExample]:
    """LongMemEval examples from a local file or the Hub."""
    records = read_records(path_or_none) if path_or_none is not None else _hub_records()
    examples = []
    for i, rec in enumerate(records):
        qid = str(get_field(rec, "question_id", "id", default=f"longmemeval-{i}"))
        date = str(get_field(rec, "question_date", default="") or "")
        question = str(get_field(rec, "question", default="")).strip()
        prefix = f"Current date: {date}\n" if date else ""
        examples.append(TaskExample(
            id=qid,
            context=format_history(get_field(rec, "haystack_sessions", default=[]) or [],
                                   get_field(rec, "haystack_dates", default=[]) or []),
            question=(
                "Above is a history of chats between the user and an assistant. Answer the "
                "user's question from that history, briefly. If the history does not contain the "
                f"answer, say so.\n\n{prefix}Question: {question}\nAnswer:"
            ),
            answer=str(get_field(rec, "answer", default="")),
            max_new_tokens=MAX_NEW_TOKENS,
            task="longmemeval",
            metadata={
                "question_type": get_field(rec, "question_type", default=""),
                "abstention": qid.endswith("_abs"),
                "answer_session_ids": get_field(rec, "answer_session_ids", default=[]),
                "question_date": date,
            },
        ))
    return sample_records(examples, limit, seed)


def score_one(prediction: str, example: TaskExample) -> float:
    """1.0 if the prediction contains the gold answer (or rightly abstains), else 0.0."""
    if example.metadata.get("abstention"):
        return float(bool(ABSTAIN_PATTERNS.search(prediction or "")))
    return max(metrics.substring_match(prediction, example.answer),
               metrics.exact_match(prediction, example.answer))


def score(
    predictions: Sequence[str],
    examples: Sequence[TaskExample],
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy (%) by normalised substring match, token F1, and per question type."""
    preds = check_predictions(predictions, examples)
    values = [score_one(p, ex) for p, ex in zip(preds, examples)]
    out = summarize(values, "accuracy",
                    groups={"per_question_type": [ex.metadata.get("question_type", "")
                                                  for ex in examples]},
                    predictions=preds, reference_predictions=reference_predictions)
    out["f1"] = 100.0 * metrics.mean(metrics.qa_f1(p, ex.answer) for p, ex in zip(preds, examples))
    return out


SPEC = register(TaskSpec(
    name="longmemeval", load=load, score=score, hub_id=HUB_ID, metric="accuracy",
    description="LongMemEval_S chat-history memory; normalised substring match (no LLM judge).",
))
