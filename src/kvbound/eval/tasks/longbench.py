"""LongBench (Bai et al., 2023, arXiv 2308.14508): 21 bilingual long-context datasets.

Schema (``THUDM/LongBench``, one config per dataset, split ``test``; LongBench-E rows look the
same with ``_e`` configs)::

    {"input": "question or query", "context": "long text", "answers": ["..."],
     "length": 9151, "dataset": "hotpotqa", "language": "en", "all_classes": null, "_id": "..."}

Metric per dataset, as LongBench maps them:

- token F1 (``qa_f1``): narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique,
  triviaqa; Chinese token F1 (per character): multifieldqa_zh
- ROUGE-L: gov_report, qmsum, multi_news, samsum; Chinese ROUGE-L (per character): dureader, vcsum
- classification (``classification_score`` with ``all_classes``): trec, lsht
- retrieval: passage_retrieval_en, passage_retrieval_zh; count: passage_count
- code similarity: lcc, repobench-p

For trec, triviaqa, samsum and lsht only the first line of the prediction is scored. Each example
takes the best score over its gold answers. ``score`` is the mean over datasets of the per-dataset
means (LongBench reports the per-dataset numbers, kept in ``per_dataset``); ``per_length`` buckets
examples by LongBench-E's ``length`` field (0-4k, 4-8k, 8k+ words).

Question prompts are kvbound's own short instructions in LongBench's spirit (context first, then
the instruction and input), so the long context can be cached independently of the question.
"""

from __future__ import annotations

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

HUB_ID = "THUDM/LongBench"

_QA_EN = (
    "Answer the question based on the text above. Give only the answer, no other words.\n\n"
    "Question: {input}\nAnswer:"
)
_QA_ZH = "请根据上面的文章回答问题，只给出答案，不要输出其他文字。\n\n问题：{input}\n回答："

PROMPTS: dict[str, str] = {
    "narrativeqa": "Answer the question about the story above as concisely as you can, in a "
    "single phrase if possible. Do not explain.\n\nQuestion: {input}\nAnswer:",
    "qasper": "Answer the question about the article above in a single phrase or sentence. "
    "If it cannot be answered from the article, write \"unanswerable\"; for a yes/no question "
    "write \"yes\", \"no\" or \"unanswerable\". Do not explain.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_en": _QA_EN,
    "multifieldqa_zh": _QA_ZH,
    "hotpotqa": _QA_EN,
    "2wikimqa": _QA_EN,
    "musique": _QA_EN,
    "dureader": "请根据上面的文档回答问题。\n\n问题：{input}\n回答：",
    "gov_report": "Write a one-page summary of the report above.\n\nSummary:",
    "qmsum": "Answer the query about the meeting transcript above in one or more sentences."
    "\n\nQuery: {input}\nAnswer:",
    "multi_news": "Write a one-page summary of all the news articles above.\n\nSummary:",
    "vcsum": "请总结上面的会议记录。\n\n会议总结：",
    "trec": "Using the labelled questions above as examples, give the type of the last "
    "question. Write only the type.\n\n{input}",
    "triviaqa": "Answer the last question in the same style as the examples above. Write only "
    "the answer.\n\n{input}",
    "samsum": "Summarise the last dialogue in the same style as the examples above.\n\n{input}",
    "lsht": "请参照上面的示例，判断最后一则新闻的类别，只输出类别。\n\n{input}",
    "passage_count": "How many distinct paragraphs are there in the text above, once duplicates "
    "are removed? Answer with a single number.\n\nThe answer is: ",
    "passage_retrieval_en": "The abstract below summarises one of the paragraphs above. Which "
    "one? Answer in the form \"Paragraph 1\".\n\n{input}\n\nThe answer is: ",
    "passage_retrieval_zh": "下面的摘要概括了上面的哪一个段落？请按\"段落1\"的格式作答。\n\n{input}\n\n答案是：",
    "lcc": "Next line of code:\n",
    "repobench-p": "{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
    "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}


def _with_classes(fn: Callable[[str, str, Sequence[str]], float]) -> Callable[..., float]:
    return lambda pred, gold, classes: fn(pred, gold, classes or [])


def _plain(fn: Callable[[str, str], float]) -> Callable[..., float]:
    return lambda pred, gold, classes: fn(pred, gold)


METRICS: dict[str, tuple[str, Callable[..., float]]] = {
    **{d: ("qa_f1", _plain(metrics.qa_f1)) for d in (
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
        "triviaqa")},
    "multifieldqa_zh": ("qa_f1_zh", _plain(metrics.qa_f1_zh)),
    **{d: ("rouge_l", _plain(metrics.rouge_l)) for d in (
        "gov_report", "qmsum", "multi_news", "samsum")},
    **{d: ("rouge_l_zh", _plain(metrics.rouge_l_zh)) for d in ("dureader", "vcsum")},
    **{d: ("classification", _with_classes(metrics.classification_score))
       for d in ("trec", "lsht")},
    "passage_retrieval_en": ("retrieval", _plain(metrics.retrieval_score)),
    "passage_retrieval_zh": ("retrieval_zh", _plain(metrics.retrieval_zh_score)),
    "passage_count": ("count", _plain(metrics.count_score)),
    **{d: ("code_sim", _plain(metrics.code_sim_score)) for d in ("lcc", "repobench-p")},
}
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})
DATASETS = tuple(MAX_NEW_TOKENS)


def base_dataset(name: str) -> str:
    """LongBench dataset name without LongBench-E's ``_e`` suffix."""
    return name.removesuffix("_e")


def load(
    path_or_none: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    subset: str | Sequence[str] | None = None,
) -> list[TaskExample]:
    """LongBench rows from a local file (any mix of datasets) or the Hub.

    ``subset`` names one dataset or several (Hub: required to pick configs; default all 21).
    With a local file it filters rows by their ``dataset`` field. ``limit`` applies per dataset.
    """
    wanted = [subset] if isinstance(subset, str) else list(subset or [])
    if path_or_none is not None:
        records = load_records(path_or_none, task="longbench", hub_id=HUB_ID)
    else:
        records = []
        for name in wanted or DATASETS:
            rows = load_records(None, task="longbench", hub_id=HUB_ID, hub_args=(name,),
                                hub_kwargs={"split": "test"})
            for r in rows:
                r.setdefault("dataset", name)
            records.extend(rows)
    by_dataset: dict[str, list[TaskExample]] = {}
    for i, rec in enumerate(records):
        name = str(get_field(rec, "dataset", default="unknown"))
        if wanted and name not in wanted and base_dataset(name) not in wanted:
            continue
        base = base_dataset(name)
        template = PROMPTS.get(base, _QA_EN)
        by_dataset.setdefault(name, []).append(TaskExample(
            id=str(get_field(rec, "_id", "id", default=f"{name}-{i}")),
            context=str(get_field(rec, "context", default="")),
            question=template.replace("{input}", str(get_field(rec, "input", default=""))),
            answer=metrics.as_list(get_field(rec, "answers", "answer", default=[])),
            max_new_tokens=MAX_NEW_TOKENS.get(base, 64),
            task=name,
            metadata={
                "dataset": name,
                "length": get_field(rec, "length", default=None),
                "language": get_field(rec, "language", default=None),
                "all_classes": get_field(rec, "all_classes", default=None),
            },
        ))
    examples: list[TaskExample] = []
    for rows in by_dataset.values():
        examples.extend(sample_records(rows, limit, seed))
    return examples


def score_one(prediction: str, example: TaskExample) -> float:
    """LongBench score in [0, 1] of one prediction (best over gold answers)."""
    base = base_dataset(example.task)
    _, fn = METRICS.get(base, ("qa_f1", _plain(metrics.qa_f1)))
    pred = prediction or ""
    if base in FIRST_LINE_ONLY:
        pred = pred.lstrip("\n").split("\n")[0]
    classes = example.metadata.get("all_classes")
    return max((fn(pred, gold, classes) for gold in example.answers), default=0.0)


def _length_bucket(length: Any) -> str:
    if length is None:
        return "unknown"
    n = int(length)
    return "0-4k" if n < 4000 else "4-8k" if n < 8000 else "8k+"


def score(
    predictions: Sequence[str],
    examples: Sequence[TaskExample],
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-dataset LongBench metric (%), their mean, and per-length buckets."""
    preds = check_predictions(predictions, examples)
    values = [score_one(p, ex) for p, ex in zip(preds, examples)]
    mean, per_dataset = macro_average(values, [ex.task for ex in examples])
    for name, d in per_dataset.items():
        d["metric"] = METRICS.get(base_dataset(name), ("qa_f1",))[0]
    _, per_length = macro_average(
        values, [_length_bucket(ex.metadata.get("length")) for ex in examples])
    out: dict[str, Any] = {"score": mean, "metric": "longbench", "n": len(preds),
                           "per_dataset": per_dataset, "per_length": per_length}
    if reference_predictions is not None:
        out["reference"] = reference_agreement(preds, reference_predictions)
    return out


SPEC = register(TaskSpec(
    name="longbench", load=load, score=score, hub_id=HUB_ID, metric="longbench",
    description="LongBench (21 datasets): QA F1, ROUGE-L, classification, retrieval, code sim.",
))
