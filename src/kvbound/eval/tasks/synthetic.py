"""Offline, seeded synthetic tasks over natural English text (no download needed).

Haystacks and chat filler come from :func:`kvbound.eval.textpool.eval_text_pool` (the evaluation
half of Python's pydoc topics; training uses the other half), so an evaluation context never
contains text that the gates were trained on.

Every generator is ``make_<task>(n, *, seed=0, context_tokens_approx=1024, tokenizer=None, ...)``
and returns ``n`` :class:`TaskExample`. Example ``i`` is drawn from ``random.Random(f"{task}:
{seed}:{i}")``: the same seed gives the same examples on every run and machine with the same
Python version (the pydoc text ships with the interpreter), a different seed gives different
ones. Context length: with a ``tokenizer`` (anything with ``encode``), the filler is resized until
the context is within ~3% of ``context_tokens_approx`` tokens; without one, tokens are estimated
as ``max(1.3 * words, characters / 4)`` (the character term only matters for code-like text such
as the key-value JSON). When the target exceeds the pool (~11k tokens), paragraphs repeat.

Tasks (registered as ``syn_*``):

- ``syn_needle``: one "secret code" fact at a random depth; answer the code (string match).
- ``syn_multi_needle``: ``k`` codes at random depths; ask one of them or all (string match all).
- ``syn_kv_lookup``: a JSON object of short random keys and values; give one key's value.
- ``syn_conversation``: a user states a personal fact in an early turn; filler turns discuss
  topics from the pool; the final question asks for the fact. ``metadata["turns"]`` holds the
  ``{role, content}`` turns (the context is the same turns flattened as ``User: ...``).
- ``syn_procedure``: LongProc-like; records about people are scattered through the text and must
  be converted to a TSV with given columns in order of appearance (row-level F1).
- ``syn_arithmetic``: GSM8K-like; a quantity's start value and ``k`` updates are spread through
  the text in order; ask the final value (numeric exact match).

``score(predictions, examples, reference_predictions=None)``: with reference predictions (e.g. the
full cache's outputs), ``"reference"`` reports agreement with them; for ``syn_procedure`` it also
has ``row_f1`` computed against the reference TSV instead of the gold one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from kvbound.errors import KVBoundError
from kvbound.eval import metrics
from kvbound.eval.tasks.base import (
    TaskExample,
    TaskSpec,
    check_predictions,
    load_examples,
    register,
    sample_records,
    summarize,
)
from kvbound.eval.textpool import eval_text_pool, eval_text_pool_with_topics

__all__ = [
    "DEFAULT_N",
    "approx_tokens",
    "make_arithmetic",
    "make_conversation",
    "make_kv_lookup",
    "make_multi_needle",
    "make_needle",
    "make_procedure",
]

DEFAULT_N = 20

# --------------------------------------------------------------------------------------------
# vocabularies
# --------------------------------------------------------------------------------------------
COLORS = ["blue", "red", "green", "yellow", "purple", "orange", "silver", "golden", "black",
          "white", "brown", "pink", "grey", "crimson", "turquoise", "violet"]
FACT_COLORS = ["teal", "magenta", "amber", "lavender", "maroon", "ochre", "indigo", "coral",
               "crimson", "turquoise", "violet", "emerald"]
OBJECTS = ["door", "box", "gate", "vault", "chest", "locker", "drawer", "safe", "cabinet",
           "suitcase", "briefcase", "mailbox", "garage", "trunk", "shed", "wardrobe"]
FIRST_NAMES = ["Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Irene",
               "Jonas", "Keiko", "Liam", "Maria", "Nadia", "Oscar", "Priya", "Quentin", "Rosa",
               "Samuel", "Tara", "Umar", "Vera", "Wendy", "Xavier", "Yusuf", "Zoe"]
LAST_NAMES = ["Anders", "Baker", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Hansen",
              "Ito", "Jensen", "Kowalski", "Lopez", "Moreau", "Novak", "Okafor", "Petrov",
              "Quinn", "Rossi", "Silva", "Tanaka", "Usman", "Varga", "Walsh", "Yilmaz"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Valencia", "Krakow", "Lima",
          "Dublin", "Adelaide", "Tbilisi", "Porto", "Helsinki", "Cusco", "Hanoi", "Bergen",
          "Seville", "Quebec", "Ljubljana", "Zagreb"]
JOBS = ["baker", "nurse", "carpenter", "pilot", "librarian", "architect", "chemist", "gardener",
        "plumber", "teacher", "journalist", "dentist", "electrician", "florist", "translator",
        "veterinarian"]
ITEMS = ["apples", "marbles", "coins", "stamps", "books", "pencils", "cookies", "stickers",
         "seashells", "postcards", "candles", "buttons"]
PET_NAMES = ["Biscuit", "Pepper", "Mochi", "Ziggy", "Clementine", "Noodle", "Waffles",
             "Juniper", "Pickles", "Tofu", "Marmalade", "Bramble", "Sprocket", "Dumpling"]
PETS = ["dog", "cat", "parrot", "rabbit", "hamster", "turtle"]
FOODS = ["lasagna", "sushi", "paella", "pancakes", "ramen", "falafel", "goulash", "tacos",
         "risotto", "dumplings", "curry", "pierogi"]
INSTRUMENTS = ["cello", "violin", "trumpet", "harp", "clarinet", "banjo", "accordion",
               "saxophone", "flute", "ukulele"]
SIBLING_NAMES = ["Matilda", "Beatrice", "Rosalind", "Imogen", "Henrietta", "Philippa",
                 "Winifred", "Ottilie", "Cordelia", "Annika"]
KEY_WORDS = ["falcon", "maple", "harbor", "quartz", "ember", "willow", "cobalt", "meadow",
             "raven", "cedar", "lotus", "summit", "pebble", "comet", "thistle", "orchid",
             "canyon", "glacier", "saffron", "juniper", "beacon", "lagoon", "marble", "nectar"]

NEEDLE_TEMPLATES = [
    "The secret code of the {color} {obj} is {code}.",
    "Remember this: the secret code of the {color} {obj} is {code}.",
    "Note that the secret code for the {color} {obj} is {code}.",
    "Someone wrote down that the {color} {obj} has the secret code {code}.",
]
GAIN_TEMPLATES = [
    "Then {name} buys {x} more {item}.",
    "Later, {name} receives {x} {item} as a gift.",
    "After that, {name} finds {x} more {item}.",
    "Next, a friend gives {name} {x} {item}.",
]
LOSS_TEMPLATES = [
    "Then {name} gives away {x} {item}.",
    "Later, {name} loses {x} {item}.",
    "After that, {name} sells {x} {item}.",
    "Next, {name} gives {x} {item} to a neighbour.",
]
RECORD_TEMPLATES = [
    "[Record] {name} is {age} years old, lives in {city} and works as {a_job}.",
    "[Record] {name}, {a_job} aged {age}, lives in {city}.",
    "[Record] {name} lives in {city}, works as {a_job} and is {age} years old.",
    "[Record] Working as {a_job} in {city}, {name} is {age} years old.",
]
# kind -> (statement templates, question template, values); {pet} is an animal, {v} the value
FACTS: dict[str, tuple[list[str], str, list[str]]] = {
    "pet": (["I have a {pet} called {v}.", "My {pet}'s name is {v}."],
            "What is the name of my {pet}?", PET_NAMES),
    "city": (["I live in {v}.", "I moved to {v} a few years ago and I still live there."],
             "Which city do I live in?", CITIES),
    "colour": (["My favourite colour is {v}.", "I love the colour {v} more than any other."],
               "What is my favourite colour?", FACT_COLORS),
    "sister": (["My sister's name is {v}.", "I have one sister, {v}."],
               "What is my sister's name?", SIBLING_NAMES),
    "food": (["My favourite food is {v}.", "Nothing beats {v}, it is my favourite food."],
             "What is my favourite food?", FOODS),
    "job": (["I work as {a_v}.", "I have been {a_v} for ten years."],
            "What is my job?", JOBS),
    "instrument": (["I play the {v}.", "In my free time I play the {v}."],
                   "Which instrument do I play?", INSTRUMENTS),
}
OPENERS = ["Hi!", "Hello there.", "Good morning!", "Hey, nice to meet you."]
ACKS = ["Nice to meet you! How can I help?", "Thanks for sharing. What would you like to know?",
        "Great, happy to help. What shall we talk about?", "Understood. What is on your mind?"]
ASKS = ["Can you tell me about {topic}?", "What should I know about {topic}?",
        "Could you explain {topic} to me?", "I am curious about {topic}. Any details?"]
COLUMNS = {"name": "Name", "age": "Age", "city": "City", "job": "Job"}


# --------------------------------------------------------------------------------------------
# length control and filler
# --------------------------------------------------------------------------------------------
def approx_tokens(text: str, tokenizer: Any = None) -> int:
    """Token count of ``text``: exact with a tokenizer, else ``max(1.3 * words, chars / 4)``."""
    if tokenizer is None:
        return round(max(1.3 * len(text.split()), len(text) / 4))
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return len(ids)


def _fit(build: Callable[[int], str], target: int, tokenizer: Any) -> tuple[str, int]:
    """``(build(size), size)`` for a filler size whose output is close to ``target`` tokens
    (within 3% when the filler's granularity allows; otherwise the closest size tried)."""
    base = approx_tokens(build(0), tokenizer)
    size = max(0, round((target - base) / 1.3))
    text = build(size)
    best: tuple[int, str, int] | None = None
    for _ in range(6):
        n = approx_tokens(text, tokenizer)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), text, size)
        if abs(n - target) <= 0.03 * max(target, 1) or n <= base or size == 0:
            break
        new_size = max(0, round(size * (target - base) / (n - base)))
        if new_size == size:
            break
        size = new_size
        text = build(size)
    assert best is not None
    return best[1], best[2]


def _sentences(paragraph: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"“(])", paragraph)
    return [p for p in parts if p.strip()]


class _Filler:
    """Paragraphs of the eval pool in a seeded order, cut to a word budget at sentence ends."""

    def __init__(self, rng: random.Random, pool: Sequence[str] | None = None) -> None:
        paras = list(pool if pool is not None else eval_text_pool())
        rng.shuffle(paras)
        self._paras = [_sentences(p) for p in paras]

    def take(self, n_words: int) -> list[list[str]]:
        out: list[list[str]] = []
        words = 0
        i = 0
        while words < n_words and self._paras:
            para: list[str] = []
            for sent in self._paras[i % len(self._paras)]:
                if words >= n_words:
                    break
                para.append(sent)
                words += len(sent.split())
            out.append(para)
            i += 1
        return out


def _compose(paragraphs: list[list[str]], inserts: Sequence[tuple[float, str]]) -> str:
    """Join filler paragraphs, inserting each ``(depth, sentence)`` before the filler sentence at
    that fraction of the filler's words (depth 1.0 = at the very end). Ties keep their order."""
    flat = [(p, s) for p, para in enumerate(paragraphs) for s in range(len(para))]
    offsets, total = [], 0
    for p, s in flat:
        offsets.append(total)
        total += len(paragraphs[p][s].split())
    before: dict[tuple[int, int], list[str]] = {}
    tail: list[str] = []
    for depth, sentence in inserts:
        pos = depth * total
        k = next((j for j, off in enumerate(offsets) if off >= pos), None)
        if k is None:
            tail.append(sentence)
        else:
            before.setdefault(flat[k], []).append(sentence)
    blocks = []
    for p, para in enumerate(paragraphs):
        parts: list[str] = []
        for s, sent in enumerate(para):
            parts.extend(before.get((p, s), []))
            parts.append(sent)
        blocks.append(parts)
    if tail:
        if blocks:
            blocks[-1].extend(tail)
        else:
            blocks.append(list(tail))
    return "\n\n".join(" ".join(b) for b in blocks if b)


def _a(noun: str) -> str:
    """``noun`` with its indefinite article."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _filled(filler: _Filler, inserts: Sequence[tuple[float, str]], n_words: int) -> str:
    return _compose(filler.take(n_words), inserts)


def _rng(task: str, seed: int, i: int) -> random.Random:
    return random.Random(f"{task}:{seed}:{i}")


def _check_n(n: int) -> None:
    if n < 0:
        raise KVBoundError(f"Number of examples must be >= 0, got {n}.")


# --------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------
def make_needle(
    n: int, *, seed: int = 0, context_tokens_approx: int = 1024, tokenizer: Any = None
) -> list[TaskExample]:
    """``n`` single-needle retrieval examples (one secret code hidden in the text)."""
    _check_n(n)
    out = []
    for i in range(n):
        rng = _rng("syn_needle", seed, i)
        color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
        code = str(rng.randint(10000, 99999))
        needle = rng.choice(NEEDLE_TEMPLATES).format(color=color, obj=obj, code=code)
        depth = rng.random()
        filler = _Filler(random.Random(rng.getrandbits(64)))
        context, _ = _fit(partial(_filled, filler, [(depth, needle)]), context_tokens_approx,
                          tokenizer)
        out.append(TaskExample(
            id=f"syn_needle-{seed}-{i}",
            context=context,
            question=f"What is the secret code of the {color} {obj}? "
                     "Answer with the number only.",
            answer=[code],
            max_new_tokens=16,
            task="syn_needle",
            metadata={"depth": depth, "needle": needle, "key": f"{color} {obj}"},
        ))
    return out


def make_multi_needle(
    n: int,
    *,
    seed: int = 0,
    context_tokens_approx: int = 1024,
    tokenizer: Any = None,
    k: int = 4,
    ask: str = "mixed",
) -> list[TaskExample]:
    """``n`` examples with ``k`` secret codes; ``ask`` = ``"one"``, ``"all"`` or ``"mixed"``
    (each example picks one of the two at random)."""
    _check_n(n)
    if ask not in ("one", "all", "mixed"):
        raise KVBoundError(f"ask must be 'one', 'all' or 'mixed', got {ask!r}.")
    if not 1 <= k <= len(COLORS):
        raise KVBoundError(f"k must be between 1 and {len(COLORS)}, got {k}.")
    out = []
    for i in range(n):
        rng = _rng("syn_multi_needle", seed, i)
        colors = rng.sample(COLORS, k)
        objs = [rng.choice(OBJECTS) for _ in range(k)]
        codes = [str(c) for c in rng.sample(range(10000, 100000), k)]
        needles = [rng.choice(NEEDLE_TEMPLATES).format(color=c, obj=o, code=x)
                   for c, o, x in zip(colors, objs, codes)]
        depths = [rng.random() for _ in range(k)]
        mode = ask if ask != "mixed" else rng.choice(["one", "all"])
        filler = _Filler(random.Random(rng.getrandbits(64)))
        inserts = list(zip(depths, needles))
        context, _ = _fit(partial(_filled, filler, inserts), context_tokens_approx, tokenizer)
        if mode == "one":
            j = rng.randrange(k)
            question = (f"What is the secret code of the {colors[j]} {objs[j]}? "
                        "Answer with the number only.")
            answer = [codes[j]]
        else:
            names = ", ".join(f"the {c} {o}" for c, o in zip(colors, objs))
            question = (f"List the secret codes of {names}. Answer with the numbers only, "
                        "separated by commas.")
            answer = codes
        out.append(TaskExample(
            id=f"syn_multi_needle-{seed}-{i}",
            context=context,
            question=question,
            answer=answer,
            max_new_tokens=16 if mode == "one" else 10 * k + 8,
            task="syn_multi_needle",
            metadata={"mode": mode, "depths": depths, "needles": needles,
                      "keys": [f"{c} {o}" for c, o in zip(colors, objs)]},
        ))
    return out


def _kv_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_WORDS)}-{rng.getrandbits(16):04x}"


class _KVPairs:
    """A seeded stream of unique ``(key, value)`` pairs rendered as a JSON object."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._cache: dict[int, list[tuple[str, str]]] = {}

    def pairs(self, m: int) -> list[tuple[str, str]]:
        if m not in self._cache:
            prng = random.Random(self._seed)
            keys: list[str] = []
            seen: set[str] = set()
            while len(keys) < m:
                key = _kv_key(prng)
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
            self._cache[m] = [(key, f"{prng.getrandbits(32):08x}") for key in keys]
        return self._cache[m]

    def render(self, size: int) -> str:
        m = max(1, size // 4)  # one pair is about 5 estimated tokens
        lines = ",\n".join(f'  "{key}": "{val}"' for key, val in self.pairs(m))
        return "Here is a JSON object of key-value pairs:\n{\n" + lines + "\n}"


def make_kv_lookup(
    n: int, *, seed: int = 0, context_tokens_approx: int = 1024, tokenizer: Any = None
) -> list[TaskExample]:
    """``n`` key-value retrieval examples over a JSON object of random short keys/values."""
    _check_n(n)
    out = []
    for i in range(n):
        rng = _rng("syn_kv_lookup", seed, i)
        pairs = _KVPairs(rng.getrandbits(64))
        pos_draw = rng.random()
        context, _ = _fit(pairs.render, context_tokens_approx, tokenizer)
        items = [ln.strip().rstrip(",") for ln in context.splitlines() if ln.startswith('  "')]
        j = min(len(items) - 1, int(pos_draw * len(items)))
        key, val = (s.strip('"') for s in items[j].split(": "))
        out.append(TaskExample(
            id=f"syn_kv_lookup-{seed}-{i}",
            context=context,
            question=f'What is the value of the key "{key}" in the JSON object above? '
                     "Answer with the value only.",
            answer=[val],
            max_new_tokens=16,
            task="syn_kv_lookup",
            metadata={"key": key, "n_pairs": len(items), "position": j,
                      "depth": j / max(1, len(items) - 1)},
        ))
    return out


def _flatten_turns(turns: Sequence[dict[str, str]]) -> str:
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def _flat_conversation(turns_for: Callable[[int], list[dict[str, str]]], size: int) -> str:
    return _flatten_turns(turns_for(size))


def _conversation_turns(
    size: int,
    *,
    opener: str,
    ack: str,
    fact: str,
    fact_turn: int,
    order: Sequence[str],
    asks: Sequence[str],
    by_topic: dict[str, list[str]],
) -> list[dict[str, str]]:
    """Chat turns: greeting (+ fact if ``fact_turn`` is 0), then topic Q&A turns until
    ``size`` filler words; the fact opens user turn ``fact_turn``."""
    first = opener + (" " + fact if fact_turn == 0 else "")
    turns = [{"role": "user", "content": first}, {"role": "assistant", "content": ack}]
    words, t = 0, 0
    while words < size or t < fact_turn:
        topic = order[t % len(order)]
        reply = "\n\n".join(by_topic[topic][:2])
        user = asks[t % len(asks)].format(topic=f"the Python topic '{topic.replace('-', ' ')}'")
        if t + 1 == fact_turn:
            user = f"{fact} Anyway, {user[0].lower()}{user[1:]}"
        room = size - words - len(user.split())
        if len(reply.split()) > room:  # last turn: keep whole sentences up to the budget
            kept: list[str] = []
            for sent in _sentences(reply.replace("\n\n", " ")):
                if kept and len(" ".join(kept + [sent]).split()) > room:
                    break
                kept.append(sent)
            reply = " ".join(kept)
        turns.append({"role": "user", "content": user})
        turns.append({"role": "assistant", "content": reply})
        words += len(reply.split()) + len(user.split())
        t += 1
    return turns


def make_conversation(
    n: int, *, seed: int = 0, context_tokens_approx: int = 1024, tokenizer: Any = None
) -> list[TaskExample]:
    """``n`` chat-memory examples: a personal fact in an early user turn, topic filler after it,
    and a final question about the fact."""
    _check_n(n)
    by_topic: dict[str, list[str]] = {}
    for key, para in eval_text_pool_with_topics():
        by_topic.setdefault(key, []).append(para)
    topics = sorted(by_topic)
    out = []
    for i in range(n):
        rng = _rng("syn_conversation", seed, i)
        kind = rng.choice(sorted(FACTS))
        statements, question_t, values = FACTS[kind]
        value = rng.choice(values)
        pet = rng.choice(PETS)
        fact = rng.choice(statements).format(v=value, a_v=_a(value), pet=pet)
        question = question_t.format(pet=pet)
        fact_turn = rng.choice([0, 1])  # the fact comes in the first or second user turn
        order = topics[:]
        rng.shuffle(order)
        opener, ack = rng.choice(OPENERS), rng.choice(ACKS)
        asks = [rng.choice(ASKS) for _ in range(len(order))]

        turns_for = partial(
            _conversation_turns, opener=opener, ack=ack, fact=fact, fact_turn=fact_turn,
            order=order, asks=asks, by_topic=by_topic,
        )
        context, size = _fit(partial(_flat_conversation, turns_for), context_tokens_approx,
                             tokenizer)
        turns = turns_for(size)
        out.append(TaskExample(
            id=f"syn_conversation-{seed}-{i}",
            context=context,
            question=f"{question} Answer briefly.",
            answer=[value],
            max_new_tokens=24,
            task="syn_conversation",
            metadata={"turns": turns, "fact": fact, "fact_kind": kind,
                      "fact_turn": fact_turn, "question": question},
        ))
    return out


def make_procedure(
    n: int,
    *,
    seed: int = 0,
    context_tokens_approx: int = 1024,
    tokenizer: Any = None,
    n_records: int | None = None,
) -> list[TaskExample]:
    """``n`` TSV-conversion examples: ``n_records`` person records (default: one per ~150
    context tokens, between 3 and 20) scattered through the text, to be tabulated in order."""
    _check_n(n)
    out = []
    for i in range(n):
        rng = _rng("syn_procedure", seed, i)
        m = n_records or max(3, min(20, context_tokens_approx // 150))
        firsts = rng.sample(FIRST_NAMES, min(m, len(FIRST_NAMES)))
        people = []
        for j in range(m):
            first = firsts[j % len(firsts)]
            people.append({
                "name": f"{first} {rng.choice(LAST_NAMES)}",
                "age": str(rng.randint(21, 79)),
                "city": rng.choice(CITIES),
                "job": rng.choice(JOBS),
            })
        cols = ["name"] + rng.sample(["age", "city", "job"], rng.choice([2, 3]))
        sentences = [rng.choice(RECORD_TEMPLATES).format(a_job=_a(p["job"]), **p)
                     for p in people]
        depths = sorted(rng.random() for _ in range(m))
        filler = _Filler(random.Random(rng.getrandbits(64)))
        inserts = list(zip(depths, sentences))
        context, _ = _fit(partial(_filled, filler, inserts), context_tokens_approx, tokenizer)
        header = "\t".join(COLUMNS[c] for c in cols)
        gold = "\n".join([header] + ["\t".join(p[c] for c in cols) for p in people])
        col_list = ", ".join(COLUMNS[c] for c in cols)
        out.append(TaskExample(
            id=f"syn_procedure-{seed}-{i}",
            context=context,
            question=(
                f"The text above contains {m} records about people, each starting with "
                f"[Record]. Convert them into a TSV table with the columns {col_list}: first "
                "a header line with the column names, then one line per record in the order "
                "the records appear, values separated by tabs. Output only the table."
            ),
            answer=gold,
            max_new_tokens=2 * approx_tokens(gold, tokenizer) + 16,
            task="syn_procedure",
            metadata={"columns": [COLUMNS[c] for c in cols], "n_records": m,
                      "depths": depths},
        ))
    return out


def make_arithmetic(
    n: int,
    *,
    seed: int = 0,
    context_tokens_approx: int = 1024,
    tokenizer: Any = None,
    k: int = 3,
) -> list[TaskExample]:
    """``n`` examples where a start value and ``k`` updates of one person's count of items are
    spread through the text in order; the answer is the final count."""
    _check_n(n)
    if k < 1:
        raise KVBoundError(f"k must be >= 1, got {k}.")
    out = []
    for i in range(n):
        rng = _rng("syn_arithmetic", seed, i)
        name, item = rng.choice(FIRST_NAMES), rng.choice(ITEMS)
        value = rng.randint(5, 40)
        sentences = [f"{name} starts with {value} {item}."]
        gains, losses = GAIN_TEMPLATES[:], LOSS_TEMPLATES[:]
        rng.shuffle(gains)
        rng.shuffle(losses)
        ops = []
        for _ in range(k):
            if value > 3 and rng.random() < 0.5:
                x = rng.randint(2, min(value - 1, 20))
                value -= x
                ops.append(-x)
                template = losses[sum(o < 0 for o in ops) % len(losses) - 1]
                sentences.append(template.format(name=name, x=x, item=item))
            else:
                x = rng.randint(2, 20)
                value += x
                ops.append(x)
                template = gains[sum(o > 0 for o in ops) % len(gains) - 1]
                sentences.append(template.format(name=name, x=x, item=item))
        depths = sorted(rng.random() for _ in sentences)
        filler = _Filler(random.Random(rng.getrandbits(64)))
        inserts = list(zip(depths, sentences))
        context, _ = _fit(partial(_filled, filler, inserts), context_tokens_approx, tokenizer)
        out.append(TaskExample(
            id=f"syn_arithmetic-{seed}-{i}",
            context=context,
            question=f"How many {item} does {name} have at the end? "
                     "Answer with a single number.",
            answer=str(value),
            max_new_tokens=64,
            task="syn_arithmetic",
            metadata={"start": value - sum(ops), "ops": ops, "depths": depths,
                      "statements": sentences},
        ))
    return out


# --------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------
def _string_scorer(fn: Callable[[str, object], float], metric: str) -> Callable[..., dict]:
    def score(predictions: Sequence[str], examples: Sequence[TaskExample],
              reference_predictions: Sequence[str] | None = None) -> dict[str, Any]:
        preds = check_predictions(predictions, examples)
        values = [fn(p, ex.answers) for p, ex in zip(preds, examples)]
        return summarize(values, metric, predictions=preds,
                         reference_predictions=reference_predictions)

    score.__doc__ = f"Mean {metric} (%) of the predictions."
    return score


score_needle = _string_scorer(metrics.string_match_all, "string_match")
score_multi_needle = _string_scorer(metrics.string_match_all, "string_match")
score_kv_lookup = _string_scorer(metrics.string_match_all, "string_match")
score_conversation = _string_scorer(metrics.string_match_part, "string_match")


def score_arithmetic(predictions: Sequence[str], examples: Sequence[TaskExample],
                     reference_predictions: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy (%) of the final number (:func:`~kvbound.eval.metrics.extract_answer`)."""
    preds = check_predictions(predictions, examples)
    values = [float(metrics.numeric_equal(metrics.extract_answer(p), ex.answer))
              for p, ex in zip(preds, examples)]
    return summarize(values, "accuracy", predictions=preds,
                     reference_predictions=reference_predictions)


def _rows_without_header(text: str, header: tuple[str, ...]) -> list[tuple[str, ...]]:
    rows = metrics.parse_tsv(text)
    return rows[1:] if rows and rows[0] == header else rows


def score_procedure(predictions: Sequence[str], examples: Sequence[TaskExample],
                    reference_predictions: Sequence[str] | None = None) -> dict[str, Any]:
    """Row-level F1 (%) of the TSV against the gold table; with ``reference_predictions``,
    ``reference["row_f1"]`` is the F1 against the reference outputs instead."""
    preds = check_predictions(predictions, examples)
    values = [metrics.tsv_row_f1(p, ex.answers[0])["f1"] for p, ex in zip(preds, examples)]
    out = summarize(values, "row_f1", predictions=preds,
                    reference_predictions=reference_predictions)
    if reference_predictions is not None:
        f1s = []
        for p, ex, ref in zip(preds, examples, reference_predictions):
            header = metrics.parse_tsv(ex.answers[0])[0]
            a, b = _rows_without_header(p, header), _rows_without_header(ref or "", header)
            f1s.append(1.0 if not a and not b else metrics.token_f1(a, b)[0])
        out["reference"]["row_f1"] = 100.0 * metrics.mean(f1s)
    return out


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _loader(make: Callable[..., list[TaskExample]]) -> Callable[..., list[TaskExample]]:
    def load(path_or_none: str | Path | None = None, *, limit: int | None = None, seed: int = 0,
             context_tokens_approx: int = 1024, tokenizer: Any = None,
             **kwargs: Any) -> list[TaskExample]:
        if path_or_none is not None:  # examples saved earlier with base.save_examples
            return sample_records(load_examples(path_or_none), limit, seed)
        return make(DEFAULT_N if limit is None else limit, seed=seed,
                    context_tokens_approx=context_tokens_approx, tokenizer=tokenizer, **kwargs)

    load.__doc__ = (f"Generate examples with :func:`{make.__name__}` (``limit`` = how many, "
                    f"default {DEFAULT_N}), or read a JSONL saved with ``save_examples``.")
    return load


_SYNTHETIC = [
    ("syn_needle", make_needle, score_needle, "string_match",
     "One secret code hidden at a random depth in natural text."),
    ("syn_multi_needle", make_multi_needle, score_multi_needle, "string_match",
     "Several secret codes in the text; recall one or all."),
    ("syn_kv_lookup", make_kv_lookup, score_kv_lookup, "string_match",
     "Value of one key in a JSON object of random short keys."),
    ("syn_conversation", make_conversation, score_conversation, "string_match",
     "Recall a personal fact stated early in a long multi-turn chat."),
    ("syn_procedure", make_procedure, score_procedure, "row_f1",
     "Tabulate records scattered through the text as TSV (row F1)."),
    ("syn_arithmetic", make_arithmetic, score_arithmetic, "accuracy",
     "Track a count through updates spread across the text (numeric match)."),
]
for _name, _make, _score, _metric, _desc in _SYNTHETIC:
    register(TaskSpec(name=_name, load=_loader(_make), score=_score, hub_id=None,
                      description=_desc, metric=_metric, synthetic=True, make=_make))
