"""Offline natural-English text pools, split so that training and evaluation never share text.

The source is ``pydoc_data.topics.topics``, the documentation pages that ship with every CPython
install. Its keys are sorted; the first half of the keys feeds training (:func:`train_text_pool`),
the second half feeds evaluation haystacks (:func:`eval_text_pool`). Only prose paragraphs are
kept (code samples, grammar rules, tables and headings are dropped), and any paragraph that occurs
in both halves is removed from the evaluation pool, so the two pools are disjoint.

The split depends on the running Python version's topic list (3.10 and 3.13 differ slightly), so
it is deterministic for one interpreter; record ``sys.version`` with results.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "eval_text_pool",
    "eval_text_pool_with_topics",
    "split_topic_keys",
    "train_text_pool",
    "train_text_pool_with_topics",
]

_MIN_WORDS = 10
_MAX_SENTENCE_WORDS = 60
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}\s*$")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


@lru_cache(maxsize=1)
def split_topic_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return ``(train_keys, eval_keys)``: sorted pydoc topic keys, first half / second half."""
    keys = sorted(_topics())
    half = len(keys) // 2
    return tuple(keys[:half]), tuple(keys[half:])


def _is_prose(block: list[str]) -> bool:
    if any(line[:1].isspace() for line in block):  # code samples and grammar are indented
        return False
    text = " ".join(line.strip() for line in block)
    if any(_HEADING_RULE.match(line) for line in block):
        return False
    if "|" in text or "::=" in text or ">>>" in text or "+--" in text:
        return False
    if re.match(r"^\[\d+\]", text):  # footnotes
        return False
    if not text.endswith("."):
        return False
    words = text.split()
    if len(words) < _MIN_WORDS:
        return False
    alpha = sum(ch.isalpha() or ch.isspace() for ch in text)
    if alpha / max(1, len(text)) <= 0.85:
        return False
    if text.count('"') > 0.2 * len(words):  # lists of quoted identifiers read like code
        return False
    sentences = re.split(r"(?<=[.!?])\s+", text)
    return max(len(s.split()) for s in sentences) <= _MAX_SENTENCE_WORDS


def _join_lines(block: list[str]) -> str:
    text = ""
    for line in block:
        line = " ".join(line.split())
        if text.endswith("-") and len(text) > 1 and text[-2].isalpha():
            text += line  # a word hyphenated across lines ("pre-\nexisting")
        else:
            text = f"{text} {line}" if text else line
    return text


def _paragraphs(doc: str) -> list[str]:
    out: list[str] = []
    block: list[str] = []
    lines = doc.splitlines() + [""]
    for line in lines:
        if line.strip():
            block.append(line.rstrip())
            continue
        if block and _is_prose(block):
            out.append(_join_lines(block))
        block = []
    return out


@lru_cache(maxsize=2)
def _pool(which: str) -> tuple[tuple[str, str], ...]:
    train_keys, eval_keys = split_topic_keys()
    topics = _topics()
    train = [(k, p) for k in train_keys for p in _paragraphs(topics[k])]
    if which == "train":
        return tuple(_dedupe(train))
    train_set = {p for _, p in train}
    evals = [(k, p) for k in eval_keys for p in _paragraphs(topics[k]) if p not in train_set]
    return tuple(_dedupe(evals))


def _dedupe(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for key, para in items:
        if para not in seen:
            seen.add(para)
            out.append((key, para))
    return out


def train_text_pool() -> list[str]:
    """Prose paragraphs for training (first half of the sorted pydoc topic keys)."""
    return [p for _, p in _pool("train")]


def eval_text_pool() -> list[str]:
    """Prose paragraphs for evaluation haystacks (second half of the keys; disjoint from train)."""
    return [p for _, p in _pool("eval")]


def train_text_pool_with_topics() -> list[tuple[str, str]]:
    """``(topic_key, paragraph)`` pairs of the training pool."""
    return list(_pool("train"))


def eval_text_pool_with_topics() -> list[tuple[str, str]]:
    """``(topic_key, paragraph)`` pairs of the evaluation pool."""
    return list(_pool("eval"))


def self_generated_eval_texts(model, tokenizer, n: int, seq_len: int, seed: int,
                              batch_size: int = 8) -> list[str]:
    """``n`` texts of at least ``seq_len`` tokens the model writes itself (sampled, batched) from
    :data:`EVAL_PROMPTS` x :data:`EVAL_TOPICS`, both disjoint from the training ``selfgen``
    prompts and topics: the distribution a bounded cache sees while generating."""
    import random

    import torch

    rng = random.Random(f"eval-selfgen:{seed}")
    prompts = [rng.choice(EVAL_PROMPTS).format(topic=EVAL_TOPICS[i % len(EVAL_TOPICS)])
               for i in range(n)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    texts = []
    for start in range(0, n, batch_size):
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                              add_generation_prompt=True, tokenize=False)
                for p in prompts[start:start + batch_size]]
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, row in enumerate(ids):
            x[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        torch.manual_seed(seed + 1000 + start)
        with torch.no_grad():
            out = model.generate(x.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=True, temperature=0.8, top_p=0.95,
                                 repetition_penalty=1.1, min_new_tokens=seq_len + 8,
                                 max_new_tokens=seq_len + 32, pad_token_id=pad)
        texts += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return texts


# prompts and topics for self-generated evaluation text: disjoint from the training ``selfgen``
# prompts and topics (kvbound.train.data.SelfGenSource; a test checks it)
EVAL_PROMPTS = (
    "Describe, in a long and careful report, everything a newcomer should know about {topic}.",
    "Tell me a long adventure in which a curious child discovers {topic}, chapter by chapter.",
    "Give a long lecture on {topic}: the main ideas, common mistakes and open questions.",
)
EVAL_TOPICS = ("coral reefs", "medieval castles", "weather forecasting", "tea ceremonies",
               "railway signalling", "desert plants", "violin making", "deep sea fish")
