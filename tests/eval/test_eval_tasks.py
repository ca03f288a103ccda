"""Benchmark loaders on fixture files, the task registry, and the synthetic task suite."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from kvbound.errors import KVBoundError
from kvbound.eval.tasks import TASKS, TaskExample, base, get_task, longproc, synthetic
from kvbound.eval.textpool import (
    eval_text_pool,
    split_topic_keys,
    train_text_pool,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
BENCHMARKS = ["gsm8k", "math500", "aime24", "longproc", "longmemeval", "longbench",
              "longbench_v2", "scbench", "ruler"]
SYNTHETIC = ["syn_needle", "syn_multi_needle", "syn_kv_lookup", "syn_conversation",
             "syn_procedure", "syn_arithmetic"]


def _load(name: str, fixture: str | None = None, **kwargs) -> list[TaskExample]:
    return get_task(name).load(FIXTURES / f"{fixture or name}.jsonl", **kwargs)


def _perfect(ex: TaskExample) -> str:
    """A prediction that a correct model could give for ``ex``."""
    if ex.task in ("gsm8k", "aime24", "math500"):
        return f"Reasoning... so the final answer is \\boxed{{{ex.answer}}}."
    if ex.task == "longbench_v2":
        return f"The correct answer is ({ex.answer})"
    return " ".join(ex.answers)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_registry_has_every_task() -> None:
    assert set(BENCHMARKS + SYNTHETIC) <= set(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.description and spec.metric
        assert spec.synthetic == name.startswith("syn_")
        assert (spec.hub_id is None) == spec.synthetic


def test_get_task_unknown_lists_valid_names() -> None:
    with pytest.raises(KVBoundError, match='Unknown evaluation task') as info:
        get_task("gsm9k")
    assert "gsm8k" in str(info.value) and "syn_needle" in str(info.value)


# --------------------------------------------------------------------------------------------
# benchmark loaders on fixtures
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fixture", "kwargs", "count"),
    [
        ("gsm8k", None, {}, 3),
        ("math500", None, {}, 3),
        ("aime24", None, {}, 2),
        ("aime24", "aime24_maxwell", {}, 2),
        ("longproc", None, {}, 3),
        ("longmemeval", None, {}, 3),
        ("longbench", None, {}, 6),
        ("longbench_v2", None, {}, 2),
        ("scbench", None, {"subset": "scbench_kv"}, 3),
        ("ruler", None, {}, 3),
    ],
)
def test_fixture_perfect_and_wrong(name: str, fixture: str | None, kwargs: dict,
                                   count: int) -> None:
    examples = _load(name, fixture, **kwargs)
    assert len(examples) == count
    assert len({ex.id for ex in examples}) == count
    for ex in examples:
        assert isinstance(ex, TaskExample)
        assert ex.answers and all(isinstance(a, str) for a in ex.answers)
        assert ex.max_new_tokens > 0
        assert ex.prompt.endswith(ex.question)
        json.dumps(ex.to_dict())  # serialisable
    spec = get_task(name)
    good = spec.score([_perfect(ex) for ex in examples], examples)
    assert good["score"] == pytest.approx(100.0)
    assert good["n"] == count and good["metric"] == spec.metric
    bad = spec.score(["qqq"] * count, examples)
    assert bad["score"] == pytest.approx(0.0)


def test_gsm8k_gold_and_answer_formats() -> None:
    examples = _load("gsm8k")
    assert [ex.answer for ex in examples] == ["29", "12000", "7.5"]
    assert examples[0].context == "" and "####" in examples[0].metadata["solution"]
    preds = ["36 - 7 = 29\n#### 29", "So the answer is $12,000.", "She ran 7.50 km in total"]
    assert get_task("gsm8k").score(preds, examples)["score"] == pytest.approx(100.0)
    preds[1] = "The answer is 1200."
    assert get_task("gsm8k").score(preds, examples)["score"] == pytest.approx(200 / 3)


def test_math500_equivalent_forms() -> None:
    examples = _load("math500")
    preds = [r"\boxed{(3, \dfrac{\pi}{2})}", r"The probability is \boxed{0.5}.",
             r"Each angle is \boxed{120}."]
    result = get_task("math500").score(preds, examples)
    assert result["score"] == pytest.approx(100.0)
    assert set(result["per_level"]) == {"1", "2"}


def test_aime_schemas_agree() -> None:
    h4 = _load("aime24")
    maxwell = _load("aime24", "aime24_maxwell")
    assert h4[0].answer == maxwell[0].answer == "2"
    assert h4[1].answer == "1"  # "001" normalised
    assert h4[0].question.startswith("Find the number") and maxwell[0].id == "2024-I-1"


def test_longproc_subtasks_and_partial_scores() -> None:
    examples = _load("longproc")
    assert [ex.task for ex in examples] == ["html_to_tsv", "countdown", "path_traversal"]
    tsv, countdown, route = examples
    assert tsv.question == "" and "<html>" in tsv.context
    assert longproc.countdown_numbers(countdown) == ([9, 16, 6, 18], 12)
    # a TSV with one wrong row: 2/3 precision and recall
    wrong_row = tsv.answer.replace("2011", "2012")
    assert longproc.score_one(wrong_row, tsv)["score"] == pytest.approx(2 / 3)
    # another valid countdown solution counts; an arithmetic slip does not
    other = "<Solution>\n16 - 6 = 10\n18 / 9 = 2\n10 + 2 = 12\n</Solution>"
    slip = "<Solution>\n16 - 6 = 10\n18 / 9 = 2\n10 + 2 = 13\n</Solution>"
    reuse = "<Solution>\n16 - 6 = 10\n18 / 9 = 2\n10 + 10 = 20\n</Solution>"
    assert longproc.score_one(other, countdown)["score"] == 1.0
    assert longproc.score_one(slip, countdown)["score"] == 0.0
    assert longproc.score_one(reuse, countdown)["score"] == 0.0
    partial = "<Route>\nFrom Avon to Brill\nFrom Brill to Dunmore\n</Route>"
    r = longproc.score_one(partial, route)
    assert r["score"] == 0.0 and r["partial"] == pytest.approx(1 / 3)
    # reference predictions (e.g. full-cache outputs) replace the gold for `task_metric`
    preds = [wrong_row, other, partial]
    refs = [tsv.answer, other, partial]
    result = get_task("longproc").score(preds, examples, reference_predictions=refs)
    assert result["score"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert result["reference"]["task_metric"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
    assert result["reference"]["exact"] == pytest.approx(200 / 3)


def test_longproc_countdown_numbers_from_reference_text(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "longproc.jsonl").read_text().splitlines()]
    row = dict(rows[1], metadata="{}")
    path = tmp_path / "countdown_2k.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,) = get_task("longproc").load(path)
    assert ex.metadata["subset"] == "countdown_2k" and ex.max_new_tokens == 3072
    assert longproc.countdown_numbers(ex) == ([9, 16, 6, 18], 12)


def test_longmemeval_context_and_abstention() -> None:
    examples = _load("longmemeval")
    first, count, abstain = examples
    assert "### Session 1 (date: 2023/05/20 (Sat) 02:21)" in first.context
    assert "user: I graduated with a degree in Business Administration" in first.context
    assert "2023/05/30 (Tue) 23:40" in first.question
    assert count.answer == "3"
    assert abstain.metadata["abstention"] and not first.metadata["abstention"]
    preds = ["You graduated in business administration.", "You own 3 bikes.",
             "You never mentioned a violin teacher."]
    result = get_task("longmemeval").score(preds, examples)
    assert result["score"] == pytest.approx(100.0)
    preds[2] = "Your violin teacher is Paolo."
    assert get_task("longmemeval").score(preds, examples)["score"] == pytest.approx(200 / 3)


def test_longbench_per_dataset_metrics() -> None:
    examples = _load("longbench")
    by_task = {ex.task: ex for ex in examples}
    assert by_task["trec"].metadata["all_classes"] == ["Individual", "City", "Country", "Date"]
    assert by_task["passage_count"].answers == ["2"]
    assert by_task["hotpotqa"].max_new_tokens == 32 and by_task["gov_report"].max_new_tokens == 512
    preds = {
        "hotpotqa": "London, UK",  # F1 of {london, uk} vs {london} = 2/3
        "gov_report": by_task["gov_report"].answer[0],
        "trec": "City\nand more lines that are ignored: Country",
        "passage_count": "2",
        "passage_retrieval_en": "Paragraph 2",
        "lcc": "    return total",
    }
    result = get_task("longbench").score([preds[ex.task] for ex in examples], examples)
    per = result["per_dataset"]
    assert per["hotpotqa"]["score"] == pytest.approx(200 / 3)
    assert per["trec"]["score"] == pytest.approx(100.0)
    assert per["hotpotqa"]["metric"] == "qa_f1" and per["gov_report"]["metric"] == "rouge_l"
    assert result["score"] == pytest.approx((200 / 3 + 500) / 6)


def test_longbench_subset_filter() -> None:
    examples = _load("longbench", subset=["trec", "lcc"])
    assert sorted(ex.task for ex in examples) == ["lcc", "trec"]


def test_longbench_v2_question_and_breakdown() -> None:
    examples = _load("longbench_v2")
    assert "(B) Cloud services" in examples[0].question
    result = get_task("longbench_v2").score(["Answer: B", "I think (A)"], examples)
    assert result["score"] == pytest.approx(50.0)
    assert result["per_difficulty"]["easy"]["accuracy"] == 100.0
    assert result["per_difficulty"]["hard"]["accuracy"] == 0.0


def test_scbench_turns_share_context() -> None:
    examples = _load("scbench", subset="scbench_kv")
    a, b, c = examples
    assert a.context == b.context != c.context
    assert (a.metadata["turn"], b.metadata["turn"]) == (0, 1)
    assert a.metadata["history"] == []
    assert b.metadata["history"] == [{"input": a.question, "answer": "0c9e-41aa"}]
    assert a.metadata["scbench_id"] == b.metadata["scbench_id"] == "0"
    result = get_task("scbench").score(["0c9e-41aa", "wrong", "aa11-bb22"], examples)
    assert result["per_turn"]["0"]["score"] == 100.0 and result["per_turn"]["1"]["score"] == 0.0


def test_scbench_choice_subset_from_file_name(tmp_path: Path) -> None:
    row = {"id": 7, "context": "A story about a fox.",
           "multi_turns": [{"input": "What animal is it about?",
                            "options": ["A dog", "A fox", "A cat", "A bird"],
                            "answer": ["B", "A fox"]}]}
    path = tmp_path / "scbench_choice_eng.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,) = get_task("scbench").load(path)
    assert ex.task == "scbench_choice_eng" and "B. A fox" in ex.question
    score = get_task("scbench").score
    assert score(["B"], [ex])["score"] == 100.0
    assert score(["The answer is A fox"], [ex])["score"] == 100.0
    assert score(["C"], [ex])["score"] == 0.0


def test_ruler_metrics_by_task() -> None:
    examples = _load("ruler")
    assert examples[0].answer_prefix.startswith(" The special magic number")
    preds = ["8176654", "QPE, XKU", "It is the NILE"]
    result = get_task("ruler").score(preds, examples)
    assert result["per_task"]["vt"]["string_match"] == pytest.approx(200 / 3)
    assert result["per_task"]["qa_1"]["string_match"] == 100.0  # part: any reference
    assert result["score"] == pytest.approx((100 + 200 / 3 + 100) / 3)
    # control characters are stripped before matching
    assert get_task("ruler").score(["81766\x0054"], examples[:1])["score"] == 100.0


# --------------------------------------------------------------------------------------------
# record I/O, Hub fallback, limits
# --------------------------------------------------------------------------------------------
def test_hub_without_datasets_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    for name in ("gsm8k", "ruler", "longbench_v2", "scbench"):
        with pytest.raises(KVBoundError, match="--data PATH"):
            get_task(name).load(None)


def test_hub_path_uses_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = get_task("gsm8k").load(None, limit=2, seed=3)
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert len(examples) == 2

    def offline(*args, **kwargs):
        raise ConnectionError("Hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(KVBoundError, match="Hub unreachable"):
        get_task("math500").load(None)


def test_read_records_formats(tmp_path: Path) -> None:
    rows = [{"a": 1}, {"a": 2}]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "y.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "z.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("x.json", "y.json", "z.jsonl"):
        assert base.read_records(tmp_path / name) == rows
    (tmp_path / "bad.csv").write_text("a\n1\n")
    with pytest.raises(KVBoundError, match="unsupported"):
        base.read_records(tmp_path / "bad.csv")
    with pytest.raises(KVBoundError, match="does not exist"):
        base.read_records(tmp_path / "missing.jsonl")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KVBoundError, match="invalid JSON"):
        base.read_records(tmp_path / "broken.json")


def test_parquet_needs_pyarrow_or_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(KVBoundError, match="pyarrow"):
        base.read_records(path)


def test_longmemeval_reads_json_list(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "longmemeval.jsonl").read_text().splitlines()]
    path = tmp_path / "longmemeval_s.json"
    path.write_text(json.dumps(rows))
    assert [ex.id for ex in get_task("longmemeval").load(path)] == [r["question_id"] for r in rows]


def test_limit_is_seeded_and_keeps_order() -> None:
    full = _load("longmemeval")
    a = _load("longmemeval", limit=2, seed=1)
    b = _load("longmemeval", limit=2, seed=1)
    assert [ex.id for ex in a] == [ex.id for ex in b]
    order = [ex.id for ex in full]
    assert [order.index(ex.id) for ex in a] == sorted(order.index(ex.id) for ex in a)
    seen = {tuple(ex.id for ex in _load("longmemeval", limit=2, seed=s)) for s in range(10)}
    assert len(seen) > 1
    with pytest.raises(KVBoundError, match='limit must be'):
        base.sample_records([1, 2, 3], -1)


def test_prediction_count_must_match() -> None:
    examples = _load("ruler")
    with pytest.raises(KVBoundError, match="3 examples"):
        get_task("ruler").score(["x"], examples)


def test_reference_agreement_in_scores() -> None:
    examples = _load("gsm8k")
    preds = ["#### 29", "#### 5", "#### 7.5"]
    result = get_task("gsm8k").score(preds, examples, reference_predictions=preds)
    assert result["reference"] == {"exact": 100.0, "f1": 100.0}
    assert result["score"] == pytest.approx(200 / 3)


def test_save_and_load_examples(tmp_path: Path) -> None:
    examples = synthetic.make_conversation(2, seed=5, context_tokens_approx=300)
    path = tmp_path / "conv.jsonl"
    base.save_examples(path, examples)
    assert base.load_examples(path) == examples
    assert get_task("syn_conversation").load(path) == examples


# --------------------------------------------------------------------------------------------
# text pools
# --------------------------------------------------------------------------------------------
def test_text_pools_disjoint_and_split_by_sorted_keys() -> None:
    train_keys, eval_keys = split_topic_keys()
    assert train_keys and eval_keys
    assert max(train_keys) < min(eval_keys)
    assert abs(len(train_keys) - len(eval_keys)) <= 1
    train, evals = train_text_pool(), eval_text_pool()
    assert len(train) > 50 and len(evals) > 50
    assert not set(train) & set(evals)
    assert sum(len(p.split()) for p in evals) > 3000
    for para in evals[:20]:
        assert para.endswith(".") and "\n" not in para and "::=" not in para


# --------------------------------------------------------------------------------------------
# synthetic suite
# --------------------------------------------------------------------------------------------
MAKERS = {
    "syn_needle": synthetic.make_needle,
    "syn_multi_needle": synthetic.make_multi_needle,
    "syn_kv_lookup": synthetic.make_kv_lookup,
    "syn_conversation": synthetic.make_conversation,
    "syn_procedure": synthetic.make_procedure,
    "syn_arithmetic": synthetic.make_arithmetic,
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_deterministic_and_seed_dependent(name: str) -> None:
    make = MAKERS[name]
    a = make(3, seed=11, context_tokens_approx=400)
    b = make(3, seed=11, context_tokens_approx=400)
    c = make(3, seed=12, context_tokens_approx=400)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.context for x in a] != [x.context for x in c]
    assert [x.answer for x in a] != [x.answer for x in c]
    assert len({x.context for x in a}) == 3  # examples within a run differ too
    assert all(x.task == name for x in a)
    assert get_task(name).make is make


@pytest.mark.parametrize("name", SYNTHETIC)
@pytest.mark.parametrize("target", [300, 2000])
def test_synthetic_context_length(name: str, target: int) -> None:
    examples = MAKERS[name](4, seed=0, context_tokens_approx=target)
    for ex in examples:
        assert abs(synthetic.approx_tokens(ex.context) - target) <= 0.25 * target + 40


class _WordTokenizer:
    """One token per whitespace-separated word (a stand-in for a real tokenizer)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


@pytest.mark.parametrize("name", ["syn_needle", "syn_kv_lookup", "syn_arithmetic"])
def test_synthetic_length_with_tokenizer(name: str) -> None:
    tok = _WordTokenizer()
    for ex in MAKERS[name](3, seed=0, context_tokens_approx=1500, tokenizer=tok):
        assert abs(len(tok.encode(ex.context)) - 1500) <= 0.05 * 1500


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_scoring_perfect_and_wrong(name: str) -> None:
    examples = MAKERS[name](4, seed=2, context_tokens_approx=300)
    spec = get_task(name)
    perfect = [ex.answer if isinstance(ex.answer, str) else ", ".join(ex.answers)
               for ex in examples]
    assert spec.score(perfect, examples)["score"] == pytest.approx(100.0)
    assert spec.score(["nothing"] * 4, examples)["score"] == pytest.approx(0.0)
    ref = spec.score(perfect, examples, reference_predictions=perfect)["reference"]
    assert ref["exact"] == pytest.approx(100.0)


def test_needle_is_in_context_at_its_depth() -> None:
    for ex in synthetic.make_needle(8, seed=4, context_tokens_approx=800):
        (code,) = ex.answers
        assert ex.context.count(ex.metadata["needle"]) == 1
        assert code in ex.metadata["needle"] and ex.metadata["key"] in ex.question
        where = ex.context.index(ex.metadata["needle"]) / len(ex.context)
        assert abs(where - ex.metadata["depth"]) < 0.2


def test_multi_needle_all_codes_present() -> None:
    examples = synthetic.make_multi_needle(6, seed=1, context_tokens_approx=600, k=3)
    assert {ex.metadata["mode"] for ex in examples} == {"one", "all"}
    for ex in examples:
        for needle in ex.metadata["needles"]:
            assert needle in ex.context
        assert len(ex.answers) == (1 if ex.metadata["mode"] == "one" else 3)
        assert all(a in ex.context for a in ex.answers)
    every = synthetic.make_multi_needle(2, seed=1, context_tokens_approx=300, ask="all")
    assert all(len(ex.answers) == 4 for ex in every)
    result = get_task("syn_multi_needle").score(
        [ex.answers[0] for ex in every], every)  # one of four codes
    assert result["score"] == pytest.approx(25.0)
    with pytest.raises(KVBoundError, match='ask must be'):
        synthetic.make_multi_needle(1, ask="some")


def test_kv_lookup_pair_is_in_context() -> None:
    for ex in synthetic.make_kv_lookup(5, seed=3, context_tokens_approx=500):
        key = ex.metadata["key"]
        assert f'"{key}": "{ex.answers[0]}"' in ex.context
        assert ex.context.count(f'"{key}"') == 1
        json.loads(ex.context[ex.context.index("{"):])  # valid JSON object


def test_conversation_fact_in_early_user_turn() -> None:
    for ex in synthetic.make_conversation(6, seed=7, context_tokens_approx=800):
        turns = ex.metadata["turns"]
        assert [t["role"] for t in turns[:4]] == ["user", "assistant", "user", "assistant"]
        fact_turn = 2 * ex.metadata["fact_turn"]
        assert turns[fact_turn]["role"] == "user"
        assert ex.metadata["fact"] in turns[fact_turn]["content"]
        assert ex.answers[0] in ex.metadata["fact"]
        assert synthetic._flatten_turns(turns) == ex.context
        assert len(turns) >= 6
        later = " ".join(t["content"] for t in turns[fact_turn + 1:])
        assert ex.answers[0] not in later  # only the early turn knows the fact


def test_procedure_rows_come_from_context_in_order() -> None:
    (ex,) = synthetic.make_procedure(1, seed=9, context_tokens_approx=1200)
    lines = ex.answer.splitlines()
    assert lines[0].split("\t") == ex.metadata["columns"]
    assert len(lines) - 1 == ex.metadata["n_records"] == 8
    positions = [ex.context.index(row.split("\t")[0]) for row in lines[1:]]
    assert positions == sorted(positions)
    for row in lines[1:]:
        for value in row.split("\t"):
            assert value in ex.context
    score = get_task("syn_procedure").score
    shuffled = "\n".join([lines[0]] + lines[1:][::-1])
    assert score([shuffled], [ex])["score"] == pytest.approx(100.0)
    half = "\n".join(lines[:5])  # header + 4 of 8 rows: P=1, R=0.5
    assert score([half], [ex])["score"] == pytest.approx(100 * 2 / 3)
    # against the full cache's output instead of the gold table
    result = score([half], [ex], reference_predictions=[half])
    assert result["reference"]["row_f1"] == pytest.approx(100.0)


def test_arithmetic_chain_is_consistent() -> None:
    for ex in synthetic.make_arithmetic(6, seed=2, context_tokens_approx=700, k=4):
        meta = ex.metadata
        assert int(ex.answer) == meta["start"] + sum(meta["ops"]) >= 0
        positions = [ex.context.index(s) for s in meta["statements"]]
        assert positions == sorted(positions) and len(positions) == 5
    (ex,) = synthetic.make_arithmetic(1, seed=0, context_tokens_approx=200)
    score = get_task("syn_arithmetic").score
    assert score([f"{ex.metadata['start']} ... so the answer is {ex.answer}."], [ex])["score"] == 100


def test_synthetic_haystacks_use_only_eval_text() -> None:
    train = [p for p in train_text_pool() if len(p) > 80]
    evals = eval_text_pool()
    makers = [synthetic.make_needle, synthetic.make_procedure, synthetic.make_conversation]
    for make in makers:
        for ex in make(2, seed=0, context_tokens_approx=3000):
            assert not any(p[:80] in ex.context for p in train)
            assert sum(p[:60] in ex.context for p in evals) >= 5


def test_synthetic_loader_via_registry() -> None:
    spec = get_task("syn_needle")
    examples = spec.load(None, limit=3, seed=1, context_tokens_approx=300)
    assert len(examples) == 3
    assert examples == synthetic.make_needle(3, seed=1, context_tokens_approx=300)
    assert len(get_task("syn_arithmetic").load(None, limit=2, k=2)[0].metadata["ops"]) == 2
    with pytest.raises(KVBoundError, match='Number of examples'):
        synthetic.make_needle(-1)
