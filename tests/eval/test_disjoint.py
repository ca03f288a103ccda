"""Evaluation text and prompts never come from what training uses."""

from __future__ import annotations

import re

from kvbound.eval.textpool import EVAL_PROMPTS, EVAL_TOPICS, eval_text_pool, train_text_pool
from kvbound.train.data import SelfGenSource


def _shape(template: str) -> str:
    return re.sub(r"\{\w+\}", "{}", template).lower()


def test_self_generated_eval_prompts_and_topics_are_not_trainings():
    assert not set(EVAL_TOPICS) & set(SelfGenSource.TOPICS)
    assert not {_shape(p) for p in EVAL_PROMPTS} & {_shape(p) for p in SelfGenSource.PROMPTS}
    for p in EVAL_PROMPTS:  # no training prompt's opening words either
        assert not any(p.split()[:3] == t.split()[:3] for t in SelfGenSource.PROMPTS), p


def test_eval_pool_shares_no_paragraph_with_training():
    train, evals = set(train_text_pool()), eval_text_pool()
    assert evals and not train & set(evals)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _grams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _template_grams(texts: list[str], share: float = 0.25, n: int = 5) -> set[tuple[str, ...]]:
    """n-grams in at least ``share`` of the texts: the template, not the varying filler."""
    from collections import Counter

    counts = Counter(g for t in texts for g in _grams(t, n))
    return {g for g, c in counts.items() if c >= max(2, share * len(texts))}


def test_synthetic_eval_tasks_share_no_phrasing_with_training_generators():
    """Retrieval is measured, not template memory: no template phrase (a 5-word run found in a
    quarter of one generator's examples) of the training generators occurs in any evaluation
    example, and none of an evaluation task's occurs in any training example."""
    from kvbound.eval.tasks import TASKS
    from kvbound.testing import ByteTokenizer
    from kvbound.train.data import Mixture

    tok = ByteTokenizer()
    mix = Mixture("synthetic", tok, 1024, seed=7)
    train: dict[str, list[str]] = {}
    for i in range(160):
        ex = mix.example(i)
        train.setdefault(ex.source, []).append(tok.decode(ex.input_ids))
    assert len(train) == 4
    evals: dict[str, list[str]] = {}
    for name, spec in TASKS.items():
        if spec.synthetic:
            examples = spec.load(None, limit=24, seed=3, context_tokens_approx=600)
            evals[name] = [f"{ex.prompt}\n{ex.answer}" for ex in examples]
    assert len(evals) >= 4
    train_all = set().union(*(_grams(t) for ts in train.values() for t in ts))
    eval_all = set().union(*(_grams(t) for ts in evals.values() for t in ts))
    for kind, texts in train.items():
        shared = _template_grams(texts) & eval_all
        assert not shared, f"training {kind} phrasing found in evaluation: {sorted(shared)[:5]}"
    for name, texts in evals.items():
        shared = _template_grams(texts) & train_all
        assert not shared, f"evaluation {name} phrasing found in training: {sorted(shared)[:5]}"
    # shorter runs between templates (variables such as names break the 5-word runs)
    for kind, texts in train.items():
        mine = _template_grams(texts, n=4)
        for name, others in evals.items():
            shared = mine & _template_grams(others, n=4)
            assert not shared, f"training {kind} and evaluation {name} share {sorted(shared)}"
