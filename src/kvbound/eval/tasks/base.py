"""Task examples, the task registry, and the record I/O shared by every benchmark loader.

Conventions
-----------
- A loader is ``load(path_or_none=None, *, limit=None, seed=0, **task_kwargs)`` and returns a list
  of :class:`TaskExample`. With a path it reads a local ``.jsonl``, ``.json`` or ``.parquet`` file
  (parquet needs ``pyarrow`` or ``pandas``) written in the benchmark's own schema; with ``None`` it
  reads the Hugging Face Hub through the optional ``datasets`` package, and otherwise raises
  :class:`~kvbound.errors.KVBoundError` saying to pass ``--data PATH``.
- ``limit`` keeps a seeded random subset of that many records, in their original order.
- A scorer is ``score(predictions, examples, reference_predictions=None) -> dict``. The dict always
  holds ``"score"`` (main metric, 0-100), ``"metric"`` (its name) and ``"n"``; breakdowns live in
  nested dicts (``"per_task"``, ``"per_dataset"``, ...). When ``reference_predictions`` (e.g. the
  full-cache outputs) are given, ``"reference"`` holds the agreement of ``predictions`` with them.
- Prompt layout: ``context`` is the long, shareable part (it is what a KV budget compresses),
  ``question`` follows it in the same user turn, and ``answer_prefix`` starts the assistant turn
  (kvpress/RULER style). The prediction to score is the generated continuation only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvbound.errors import KVBoundError
from kvbound.eval import metrics

__all__ = [
    "TASKS",
    "TaskExample",
    "TaskSpec",
    "check_predictions",
    "get_field",
    "get_task",
    "load_examples",
    "load_records",
    "read_records",
    "reference_agreement",
    "register",
    "sample_records",
    "save_examples",
    "summarize",
]


@dataclass
class TaskExample:
    """One evaluation prompt with its gold answer(s).

    Attributes
    ----------
    id : str
        Unique within a task.
    context : str
        Long context (document, haystack, chat history); may be empty (math tasks).
    question : str
        Instruction + question, placed after the context.
    answer : str or list of str
        Gold answer(s). Lists mean "any of" or "all of" depending on the task's metric.
    answer_prefix : str
        Text that starts the model's reply (already part of the prompt, not generated).
    max_new_tokens : int
        Generation budget for this example.
    task : str
        Registry name of the task (or sub-task, e.g. a RULER task or a LongBench dataset).
    metadata : dict
        Task-specific extras (depth of a needle, chat turns, dataset fields, ...). JSON-serialisable.
    """

    id: str
    context: str
    question: str
    answer: str | list[str]
    answer_prefix: str = ""
    max_new_tokens: int = 64
    task: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> list[str]:
        """Gold answers as a list."""
        return metrics.as_list(self.answer)

    @property
    def prompt(self) -> str:
        """``context`` and ``question`` joined by a blank line (user-turn text, no template)."""
        if not self.context:
            return self.question
        return f"{self.context}\n\n{self.question}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskExample:
        """Build from :meth:`to_dict` output; unknown keys go to ``metadata``."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        kwargs.setdefault("metadata", {})
        kwargs["metadata"] = {**kwargs["metadata"], **extra}
        kwargs["id"] = str(kwargs.get("id", ""))
        return cls(**kwargs)


Loader = Callable[..., list[TaskExample]]
Scorer = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class TaskSpec:
    """Registry entry of a task.

    Attributes
    ----------
    name : str
        Registry key (``"gsm8k"``, ``"ruler"``, ``"syn_needle"``, ...).
    load : callable
        ``load(path_or_none=None, *, limit=None, seed=0, **kwargs) -> list[TaskExample]``.
    score : callable
        ``score(predictions, examples, reference_predictions=None) -> dict``.
    hub_id : str or None
        Hugging Face dataset id read when no local file is given (``None`` for synthetic tasks).
    description : str
        One line for ``kvbound eval --list``.
    metric : str
        Name of the main metric reported as ``"score"``.
    synthetic : bool
        True for the offline generated tasks (``load`` also takes ``context_tokens_approx`` and
        ``tokenizer``; ``make`` is the generator).
    make : callable or None
        ``make(n, *, seed, context_tokens_approx, tokenizer=None)`` for synthetic tasks.
    """

    name: str
    load: Loader
    score: Scorer
    hub_id: str | None
    description: str
    metric: str
    synthetic: bool = False
    make: Callable[..., list[TaskExample]] | None = None


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to :data:`TASKS` (re-registering the same name replaces it)."""
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered as ``name``; :class:`KVBoundError` listing the valid names
    otherwise."""
    import kvbound.eval.tasks  # noqa: F401  (importing the package registers every task)

    try:
        return TASKS[name]
    except KeyError:
        valid = ", ".join(sorted(TASKS))
        raise KVBoundError(f"Unknown evaluation task {name!r}. Valid tasks: {valid}.") from None


# --------------------------------------------------------------------------------------------
# record I/O
# --------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``) or ``.parquet``.

    Raises
    ------
    KVBoundError
        Missing file, unsupported extension, parquet without ``pyarrow``/``pandas``, bad JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise KVBoundError(f"Data file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            with p.open(encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get("data", [data])
            if not isinstance(data, list):
                raise KVBoundError(f"{p}: expected a JSON list of records.")
            return list(data)
    except json.JSONDecodeError as exc:
        raise KVBoundError(f"{p}: invalid JSON ({exc}).") from exc
    if suffix == ".parquet":
        return _read_parquet(p)
    raise KVBoundError(f"{p}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet.")


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(p).to_pylist()
    try:
        import pandas as pd
    except ImportError:
        raise KVBoundError(
            f"{p}: reading parquet needs `pyarrow` or `pandas` (pip install pyarrow), "
            "or convert the file to JSONL."
        ) from None
    return [{k: _plain(v) for k, v in r.items()} for r in pd.read_parquet(p).to_dict("records")]


def _plain(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def load_records(
    path_or_none: str | Path | None,
    *,
    task: str,
    hub_id: str,
    hub_args: Sequence[Any] = (),
    hub_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Records from a local file, or from the Hub via ``datasets.load_dataset(hub_id, *hub_args,
    **hub_kwargs)`` when ``path_or_none`` is None and ``datasets`` is installed."""
    if path_or_none is not None:
        return read_records(path_or_none)
    hint = (
        f"pass --data PATH with a local .jsonl/.json file in the {hub_id} schema "
        f"(documented in kvbound.eval.tasks.{task})"
    )
    try:
        import datasets
    except ImportError:
        raise KVBoundError(
            f"No data file given for task {task!r} and the optional `datasets` package is not "
            f"installed, so {hub_id} cannot be read from the Hugging Face Hub: {hint}."
        ) from None
    try:
        ds = datasets.load_dataset(hub_id, *hub_args, **dict(hub_kwargs or {}))
    except Exception as exc:  # network, auth, missing config: all end the same way for the user
        raise KVBoundError(
            f"Could not load {hub_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"If the Hub is unreachable, {hint}."
        ) from exc
    return [dict(r) for r in ds]


def sample_records(records: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """A seeded random subset of ``limit`` records in their original order (all if ``limit`` is
    None or not smaller than the number of records)."""
    records = list(records)
    if limit is None or limit >= len(records):
        return records
    if limit < 0:
        raise KVBoundError(f"limit must be >= 0, got {limit}.")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def save_examples(path: str | Path, examples: Sequence[TaskExample]) -> None:
    """Write examples as JSONL (one :meth:`TaskExample.to_dict` per line)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)


def load_examples(path: str | Path) -> list[TaskExample]:
    """Read examples written by :func:`save_examples`."""
    return [TaskExample.from_dict(r) for r in read_records(path)]


def get_field(record: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """First of ``names`` present in ``record``, matched case-insensitively."""
    lower = {k.lower(): k for k in record}
    for name in names:
        if name in record:
            return record[name]
        if name.lower() in lower:
            return record[lower[name.lower()]]
    return default


# --------------------------------------------------------------------------------------------
# scoring helpers
# --------------------------------------------------------------------------------------------
def check_predictions(predictions: Sequence[str], examples: Sequence[TaskExample]) -> list[str]:
    """Validate lengths and turn ``None`` predictions into empty strings."""
    if len(predictions) != len(examples):
        raise KVBoundError(
            f"Got {len(predictions)} predictions for {len(examples)} examples; they must match."
        )
    return ["" if p is None else str(p) for p in predictions]


def reference_agreement(
    predictions: Sequence[str], reference_predictions: Sequence[str]
) -> dict[str, float]:
    """Agreement of predictions with reference predictions (e.g. the full cache's outputs):
    normalised exact match and token F1, both in percent."""
    if len(predictions) != len(reference_predictions):
        raise KVBoundError(
            f"Got {len(reference_predictions)} reference predictions for {len(predictions)} "
            "predictions; they must match."
        )
    pairs = list(zip(predictions, reference_predictions))
    return {
        "exact": 100.0 * metrics.mean(metrics.exact_match(p or "", r or "") for p, r in pairs),
        "f1": 100.0 * metrics.mean(metrics.qa_f1(p or "", r or "") for p, r in pairs),
    }


def summarize(
    values: Sequence[float],
    metric: str,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    predictions: Sequence[str] | None = None,
    reference_predictions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The standard result dict: ``score`` = 100 * mean(values), plus per-group means for each
    grouping in ``groups`` (``{"per_level": [level of each example], ...}``) and the reference
    agreement when ``reference_predictions`` is given. ``ci95`` is the 95% interval of the score:
    Wilson's for 0/1 values, a bootstrap of the mean otherwise."""
    from kvbound.eval.stats import bootstrap_mean_ci, wilson_interval

    out: dict[str, Any] = {"score": 100.0 * metrics.mean(values), "metric": metric,
                           "n": len(values)}
    if values:
        binary = all(v in (0.0, 1.0) for v in values)
        lo, hi = (wilson_interval(sum(values), len(values)) if binary
                  else bootstrap_mean_ci(list(values)))
        out["ci95"] = [100.0 * lo, 100.0 * hi]
        out["interval"] = "wilson" if binary else "bootstrap"
    for key, labels in (groups or {}).items():
        buckets: dict[str, list[float]] = {}
        for label, v in zip(labels, values):
            buckets.setdefault(str(label), []).append(v)
        out[key] = {
            k: {metric: 100.0 * metrics.mean(vs), "n": len(vs)} for k, vs in sorted(buckets.items())
        }
    if reference_predictions is not None and predictions is not None:
        out["reference"] = reference_agreement(predictions, reference_predictions)
    return out


def per_example_score(correct: Callable[[str, TaskExample], float], metric: str = "accuracy",
                      *, group_keys: Sequence[str] = (), doc: str = ""):
    """A task's ``score`` function from a per-example ``correct(prediction, example)`` in
    [0, 1]: 100 * the mean, per-group means for each ``metadata`` key in ``group_keys``, and the
    agreement with ``reference_predictions`` when given."""

    def score(predictions: Sequence[str], examples: Sequence[TaskExample],
              reference_predictions: Sequence[str] | None = None) -> dict[str, Any]:
        preds = check_predictions(predictions, examples)
        values = [float(correct(p, ex)) for p, ex in zip(preds, examples)]
        groups = {f"per_{k}": [ex.metadata.get(k, "") for ex in examples] for k in group_keys}
        return summarize(values, metric, groups=groups or None, predictions=preds,
                         reference_predictions=reference_predictions)

    score.__doc__ = doc
    return score


def macro_average(values: Sequence[float], labels: Sequence[str], key: str = "score"
                  ) -> tuple[float, dict[str, dict[str, float]]]:
    """Mean of per-label means (each sub-task counts once) and ``{label: {key: %, "n": n}}``,
    for benchmarks that average their sub-tasks (LongBench, SCBench, RULER)."""
    groups: dict[str, list[float]] = {}
    for label, v in zip(labels, values, strict=True):
        groups.setdefault(str(label), []).append(v)
    per = {k: {key: 100.0 * metrics.mean(v), "n": len(v)} for k, v in sorted(groups.items())}
    return metrics.mean(d[key] for d in per.values()), per
