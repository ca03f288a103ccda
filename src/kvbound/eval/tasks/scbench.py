"""SCBench (Li et al., 2024, arXiv 2412.10319): several queries over one shared long context.

Schema (``microsoft/SCBench``, one config per sub-task such as ``scbench_kv``, split ``test``)::

    {"id": 0, "context": "...shared long context...",
     "multi_turns": [{"input": "first query", "answer": "..."},
                     {"input": "second query", "answer": ["...", "..."], "options": [...]}]}

Every turn becomes one :class:`TaskExample` sharing the record's ``context``; ``metadata`` holds
``scbench_id``, ``turn`` (0-based), ``history`` (the earlier turns' inputs and gold answers, for a
multi-turn runner that replays them) and ``subset``. A runner that wants SCBench's
shared-context mode groups examples by ``metadata["scbench_id"]`` and answers the turns in order
from one prefilled (and compressed) cache.

The sub-task comes from the ``subset`` argument, else from the record's (or turn's) ``task``
field, else from a ``scbench_*`` name in the file name. Per sub-task metric, following SCBench's
``compute_scores``:

- substring of the gold in the prediction: kv, kv_hard, prefix_suffix, hashhop
- ``string_match_all``: vt
- first integer equals gold: passkey, mf (first number)
- any gold found (case-insensitive): qa_eng, many_shot
- Chinese token F1: qa_chn
- option letter (or option text): choice_eng
- ROUGE-L: summary
- repoqa: the generated function (first code block) must reach 0.8
  :class:`difflib.SequenceMatcher` similarity with the gold function (SCBench uses its own
  RepoQA similarity with the same 0.8 threshold; this is an approximation)
- unknown sub-tasks: any gold found.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
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

HUB_ID = "microsoft/SCBench"
SUBSETS = (
    "scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng",
    "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_summary",
    "scbench_mf", "scbench_summary_with_needles", "scbench_repoqa_and_kv",
)
_LONG_OUTPUT = {"scbench_summary", "scbench_repoqa"}


def _first_number_equal(pred: str, golds: list[str]) -> float:
    m = re.search(r"-?\d+(?:\.\d+)?", pred or "")
    if not m or not golds:
        return 0.0
    return float(metrics.numeric_equal(m.group(0), golds[0]))


def _first_int_equal(pred: str, golds: list[str]) -> float:
    return float(bool(golds) and metrics.first_int(pred) == golds[0].strip())


def _contains_gold(pred: str, golds: list[str]) -> float:
    return float(any(g in (pred or "") for g in golds))


def _choice(pred: str, golds: list[str], options: Sequence[str] | None = None) -> float:
    letter = metrics.extract_choice(pred)
    gold_set = {g.strip() for g in golds}
    if letter is not None and letter in gold_set:
        return 1.0
    # gold given as option text: accept the letter of that option, or the text itself
    if options:
        for i, opt in enumerate(options):
            if str(opt).strip() in gold_set and letter == "ABCD"[i:i + 1]:
                return 1.0
    return float(any(len(g) > 1 and g.lower() in (pred or "").lower() for g in gold_set))


def _repoqa(pred: str, golds: list[str]) -> float:
    m = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)```", pred or "", flags=re.DOTALL)
    code = (m.group(1) if m else pred or "").strip()
    best = max((difflib.SequenceMatcher(None, code, g.strip()).ratio() for g in golds),
               default=0.0)
    return float(best >= 0.8)


SCORERS: dict[str, Callable[[str, list[str]], float]] = {
    "scbench_kv": _contains_gold,
    "scbench_kv_hard": _contains_gold,
    "scbench_prefix_suffix": _contains_gold,
    "scbench_hashhop": _contains_gold,
    "scbench_vt": metrics.string_match_all,
    "scbench_passkey": _first_int_equal,
    "scbench_mf": _first_number_equal,
    "scbench_qa_eng": metrics.string_match_part,
    "scbench_many_shot": metrics.string_match_part,
    "scbench_qa_chn": metrics.qa_f1_zh,
    "scbench_summary": metrics.rouge_l,
    "scbench_repoqa": _repoqa,
}


def _subset_from_path(path: str | Path | None) -> str | None:
    if path is None:
        return None
    name = Path(path).stem
    for sub in sorted(SUBSETS, key=len, reverse=True):
        if sub in name:
            return sub
    return None


def format_question(turn: dict[str, Any]) -> str:
    """The turn's query, followed by lettered options when the turn has them."""
    text = str(get_field(turn, "input", "prompt", default="")).strip()
    options = get_field(turn, "options", default=None)
    if options:
        text += "\n\n" + "\n".join(f"{'ABCD'[i]}. {opt}" for i, opt in enumerate(options[:4]))
        text += "\n\nAnswer with the letter of the correct option."
    return text


def load(
    path_or_none: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> list[TaskExample]:
    """SCBench turns from a local file or the Hub (``subset``, default ``scbench_kv``).

    ``limit`` counts shared contexts (records), not turns.
    """
    hub_subset = subset or "scbench_kv"
    records = load_records(path_or_none, task="scbench", hub_id=HUB_ID, hub_args=(hub_subset,),
                           hub_kwargs={"split": "test"})
    file_subset = _subset_from_path(path_or_none) if path_or_none is not None else hub_subset
    examples = []
    for i, rec in enumerate(sample_records(records, limit, seed)):
        rid = str(get_field(rec, "id", default=i))
        rec_subset = subset or get_field(rec, "task", default=None) or file_subset or "scbench"
        turns = get_field(rec, "multi_turns", default=[]) or []
        history: list[dict[str, Any]] = []
        for t, turn in enumerate(turns):
            turn_subset = str(get_field(turn, "task", default=None) or rec_subset)
            if not turn_subset.startswith("scbench"):
                turn_subset = f"scbench_{turn_subset}"
            examples.append(TaskExample(
                id=f"{rid}-{t}",
                context=str(get_field(rec, "context", default="")),
                question=format_question(turn),
                answer=metrics.as_list(get_field(turn, "answer", "ground_truth", default=[])),
                max_new_tokens=512 if turn_subset in _LONG_OUTPUT else 64,
                task=turn_subset,
                metadata={
                    "scbench_id": rid,
                    "turn": t,
                    "subset": str(rec_subset),
                    "history": [dict(h) for h in history],
                    "options": get_field(turn, "options", default=None),
                },
            ))
            history.append({"input": str(get_field(turn, "input", default="")),
                             "answer": get_field(turn, "answer", default="")})
    return examples


def score_one(prediction: str, example: TaskExample) -> float:
    """SCBench score of one turn in [0, 1]."""
    if example.task == "scbench_choice_eng":
        return _choice(prediction, example.answers, example.metadata.get("options"))
    fn = SCORERS.get(example.task, metrics.string_match_part)
    return float(fn(prediction or "", example.answers))


def score(
    predictions: Sequence[str],
    examples: Sequence[TaskExample],
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per sub-task score (%), their mean, and per-turn means."""
    preds = check_predictions(predictions, examples)
    values = [score_one(p, ex) for p, ex in zip(preds, examples)]
    mean, per_task = macro_average(values, [ex.task for ex in examples])
    turns = [int(ex.metadata.get("turn", 0)) for ex in examples]
    _, per_turn = macro_average(values, turns)
    per_turn = {str(k): per_turn[str(k)] for k in sorted(set(turns))}  # numeric order
    out: dict[str, Any] = {"score": mean, "metric": "scbench", "n": len(preds),
                           "per_task": per_task, "per_turn": per_turn}
    if reference_predictions is not None:
        out["reference"] = reference_agreement(preds, reference_predictions)
    return out


SPEC = register(TaskSpec(
    name="scbench", load=load, score=score, hub_id=HUB_ID, metric="scbench",
    description="SCBench shared-context multi-turn queries; SCBench's per-sub-task metrics.",
))
