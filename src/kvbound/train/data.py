"""Training data for retention gates: a seeded mixture of sources, one example per global index.

Example ``i`` depends only on ``(seed, i)``, so an interrupted run resumes on exactly the data it
would have seen, and several processes can take disjoint slices.

Sources (mix them with weights, e.g. ``--data "prose:0.8,synthetic:0.2"``):

* ``prose`` - natural English offline: docstrings of the Python standard library (read with
  ``ast``, nothing imported) and the training half of the pydoc topics
  (:func:`kvbound.eval.textpool.train_text_pool`; the other half is kept for evaluation).
  Targets on every token.
* ``synthetic`` - long-context tasks generated here: facts inserted in long documents and asked at
  the end, multi-key lookups, multi-turn conversations that refer back to early turns, state
  tracking. Chat-formatted; targets on the answer.
* ``selfgen[:N]`` - N (default 16) long texts the model writes itself from varied prompts
  (generated once, cached as ``selfgen.jsonl`` in the run directory).
* ``file:PATH`` - local ``.txt`` (documents separated by two blank lines) or ``.jsonl``/``.json``
  records with ``text``, or ``messages`` ([{role, content}]), or ``prompt``/``response``,
  ``problem``/``solution``, ``instruction``/``output``.
* ``hf:NAME[:SPLIT]`` - a Hugging Face dataset, same record schema: a Hub name (when online; e.g.
  ``hf:open-r1/OpenR1-Math-220k``, ``hf:Yukang/LongAlpaca-12k``), a directory written by
  ``save_to_disk``, or a local directory of data files (needs ``pip install 'kvbound[hf]'``).

A trailing number is the source's weight (default 1): ``selfgen:3`` is 16 texts at weight 3,
``selfgen:32:0.2`` is 32 texts at weight 0.2.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kvbound.errors import KVBoundError

SOURCES = ("prose", "synthetic", "selfgen", "file", "hf")


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) long
    target_mask: torch.Tensor  # (T,) bool: position t is scored on predicting token t + 1
    source: str


# ----------------------------------------------------------------------------- text pools
@lru_cache(maxsize=1)
def stdlib_docstrings(min_chars: int = 400) -> tuple[str, ...]:
    """One document per stdlib module: its module, class and function docstrings, in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append(text)
    return tuple(docs)


@lru_cache(maxsize=1)
def prose_documents() -> tuple[str, ...]:
    from kvbound.eval.textpool import train_text_pool

    pydoc = train_text_pool()
    # group pydoc paragraphs into documents of ~4K characters
    grouped, cur = [], []
    for para in pydoc:
        cur.append(para)
        if sum(map(len, cur)) > 4000:
            grouped.append("\n\n".join(cur))
            cur = []
    if cur:
        grouped.append("\n\n".join(cur))
    return tuple(grouped) + stdlib_docstrings()


# ----------------------------------------------------------------------------- sources
class Source:
    name = "source"

    def example(self, rng: random.Random, tokenizer, seq_len: int) -> Example:
        raise NotImplementedError


class _Tokens:
    """Per-document token cache (documents are tokenized on first use)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, list[int]] = {}

    def __call__(self, docs, idx: int) -> list[int]:
        if idx not in self.cache:
            self.cache[idx] = self.tokenizer(docs[idx], add_special_tokens=False)["input_ids"]
        return self.cache[idx]


class TextSource(Source):
    """Windows of concatenated documents; every token is a target."""

    def __init__(self, docs: tuple[str, ...] | list[str], name: str):
        if not docs:
            raise KVBoundError(f"Data source {name!r} has no documents.")
        self.docs, self.name = docs, name
        self._tok: _Tokens | None = None

    def example(self, rng, tokenizer, seq_len):
        if self._tok is None or self._tok.tokenizer is not tokenizer:
            self._tok = _Tokens(tokenizer)
        ids: list[int] = []
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        first = True
        while len(ids) < seq_len:
            doc = self._tok(self.docs, rng.randrange(len(self.docs)))
            if first and len(doc) > seq_len:  # start inside a long document, at a line start
                start = rng.randrange(0, len(doc) - seq_len // 2)
                doc = doc[start:]
            first = False
            ids.extend(doc + sep)
        ids = torch.tensor(ids[:seq_len])
        mask = torch.ones(seq_len, dtype=torch.bool)
        mask[-1] = False
        return Example(ids, mask, self.name)


class ChatSource(Source):
    """Chat records (list of {role, content}); targets on assistant turns."""

    def __init__(self, records: list[list[dict]], name: str):
        if not records:
            raise KVBoundError(f"Data source {name!r} has no records.")
        self.records, self.name = records, name

    def example(self, rng, tokenizer, seq_len):
        return chat_example(self.records[rng.randrange(len(self.records))], tokenizer, seq_len,
                            self.name)


def chat_example(messages: list[dict], tokenizer, seq_len: int, name: str) -> Example:
    """Tokenize a conversation; targets on assistant turns (unless a turn has ``target: False``).

    Long conversations keep their end (where the answer is)."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, msg in enumerate(messages):
        text = _render_turn(tokenizer, messages, i)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        mask.extend([msg["role"] == "assistant" and msg.get("target", True)] * len(toks))
    if len(ids) > seq_len:  # keep the end (the answer); drop the start of the context
        ids, mask = ids[-seq_len:], mask[-seq_len:]
    # position t predicts token t+1: shift the target mask left by one
    target = mask[1:] + [False]
    return Example(torch.tensor(ids), torch.tensor(target), name)


def _render_turn(tokenizer, messages, i) -> str:
    """Text of turn i as the chat template renders it (difference of two renderings)."""
    if getattr(tokenizer, "chat_template", None):
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if upto.startswith(before):
            return upto[len(before):]
    return f"{messages[i]['role']}: {messages[i]['content']}\n"


class SyntheticSource(Source):
    """Long-context tasks (seeded): needles in documents, key lookups, conversations, state.

    Haystacks come from the training prose only; evaluation uses other text.
    """

    name = "synthetic"
    KINDS = ("needle", "lookup", "conversation", "state")

    #: an English sentence to measure a tokenizer's tokens per word
    _PROBE = ("The keeper climbed the narrow stairs every evening to light the lamp, and the "
              "ships that passed the rocks below never knew his name.")

    def example(self, rng, tokenizer, seq_len):
        kind = rng.choice(self.KINDS)
        # ~0.6 words per token of context for BPE tokenizers (<= 1.5 tokens a word); fewer for
        # tokenizers that split finer (byte-level), so the facts told early are not cut off
        per_word = len(tokenizer(self._PROBE, add_special_tokens=False)["input_ids"]) / len(
            self._PROBE.split())
        budget_words = int(seq_len * min(0.6, 0.9 / per_word))
        build, name, state = getattr(self, f"_{kind}"), f"synthetic/{kind}", rng.getstate()
        for _ in range(10):  # too long: the same task with less filler, never a cut-off fact
            rng.setstate(state)
            messages = build(rng, budget_words)
            ex = chat_example(messages, tokenizer, 1 << 30, name)
            if len(ex.input_ids) <= seq_len:
                return ex
            budget_words = min(int(budget_words * 0.9 * seq_len / len(ex.input_ids)),
                               budget_words // 2)
        return chat_example(messages, tokenizer, seq_len, name)

    @staticmethod
    def _filler(rng, words: int) -> list[str]:
        docs = prose_documents()
        out: list[str] = []
        while sum(len(p.split()) for p in out) < words:
            doc = docs[rng.randrange(len(docs))].split("\n\n")
            out.append(doc[rng.randrange(len(doc))])
        return out

    def _needle(self, rng, words):
        paras = self._filler(rng, words)
        n = rng.randint(1, 3)
        facts = []
        for _ in range(n):
            thing = rng.choice(_THINGS)
            attr = rng.choice(["code", "number", "room number", "serial", "PIN"])
            value = str(rng.randint(1000, 99999))
            facts.append((f"the {attr} of the {thing}", value))
            paras.insert(rng.randrange(len(paras) + 1),
                         f"Keep in mind that {facts[-1][0]} is {value}.")
        subject, value = rng.choice(facts)
        q = f"{chr(10).join(paras)}\n\nWhich value was given for {subject}?"
        return [{"role": "user", "content": q},
                {"role": "assistant", "content": f"It was {value}."}]

    def _lookup(self, rng, words):
        n = max(8, min(200, words // 6))
        keys = rng.sample(_WORDS, min(n, len(_WORDS)))
        pairs = {k: f"{rng.choice(_WORDS)}-{rng.randint(10, 999)}" for k in keys}
        listing = "\n".join(f"{k} = {v}" for k, v in pairs.items())
        key = rng.choice(keys)
        return [{"role": "user", "content": f"Below are labels, each followed by its entry.\n"
                 f"{listing}\n\nWhich entry belongs to the label '{key}'?"},
                {"role": "assistant", "content": pairs[key]}]

    def _conversation(self, rng, words):
        name = rng.choice(_NAMES)
        fact_kind, fact = rng.choice([
            ("my dog's name", rng.choice(_NAMES)), ("the city I live in", rng.choice(_CITIES)),
            ("my favourite colour", rng.choice(_COLOURS)), ("my locker number",
                                                            str(rng.randint(10, 999)))])
        msgs = [{"role": "user", "content": f"Hey, {name} here. Quick note: {fact_kind} is {fact}."},
                {"role": "assistant", "content": f"Thanks, {name}, noted.", "target": False}]
        for para in self._filler(rng, words):
            sentence = para.split(". ")[0]
            msgs.append({"role": "user", "content": f"Please summarise: {sentence}."})
            msgs.append({"role": "assistant", "content": para, "target": False})
        msgs.append({"role": "user", "content": f"Do you recall {fact_kind}, which I mentioned "
                     "at the start?"})
        msgs.append({"role": "assistant", "content": f"Yes: {fact_kind} is {fact}."})
        return msgs

    def _state(self, rng, words):
        paras = self._filler(rng, words)
        who, thing = rng.choice(_NAMES), rng.choice(["apples", "coins", "books", "stamps"])
        value = rng.randint(5, 50)
        steps = [f"At first, {who} owns {value} {thing}."]
        for _ in range(rng.randint(2, 5)):
            delta = rng.randint(1, 9)
            if rng.random() < 0.5:
                value += delta
                steps.append(f"Afterwards {who} adds {delta} {thing} to the pile.")
            else:
                value -= delta
                steps.append(f"Afterwards {who} hands {delta} {thing} to someone.")
        for s in steps:
            paras.insert(rng.randrange(len(paras) + 1), s)
        # keep the narrative order of the steps
        order = iter(steps)
        paras = [next(order) if p in steps else p for p in paras]
        return [{"role": "user", "content": "\n\n".join(paras)
                 + f"\n\nWhat is the final count of {thing} that {who} owns?"},
                {"role": "assistant", "content": f"The final count is {value}."}]


_NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun",
          "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
_CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Cusco", "Bergen"]
_COLOURS = ["teal", "amber", "crimson", "olive", "indigo", "coral", "ochre", "lilac"]
# places, not "{colour} {object}" (the evaluation needles' phrasing)
_THINGS = ["north tower", "old library", "lower vault", "garden shed", "east wing",
           "spare workshop", "night train", "west harbour", "main depot", "third office"]
_WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "copper", "violet", "falcon", "harbor", "marble", "canyon", "pepper", "willow", "ember", "frost", "meadow", "saddle", "lantern", "quartz", "thistle", "pebble", "orchid", "badger", "cedar", "comet", "dune", "fern", "glacier", "hazel", "iris", "jasper", "kelp", "lotus", "mango", "nectar", "opal", "pine", "quill", "raven", "sage", "tulip", "umber", "vale", "wren", "yarrow", "zephyr", "acorn", "birch", "coral", "delta", "eagle", "fig", "grove", "heron", "ivy", "jade", "kite", "lark", "moss", "nova", "oak", "plum", "reed", "swan", "thorn", "vine", "wisp"]


class SelfGenSource(TextSource):
    """Text the model generates itself from varied prompts, generated once and cached as JSONL."""

    PROMPTS = (
        "Write a long, detailed story about {topic}.",
        "Explain {topic} step by step, with examples, as a long tutorial.",
        "Write a long essay discussing the history and future of {topic}.",
        "Write a detailed travel diary of a week spent learning about {topic}.",
    )
    TOPICS = ("lighthouses", "bread baking", "river ecosystems", "chess openings", "volcanoes",
              "beekeeping", "the printing press", "orbital mechanics", "jazz", "origami",
              "glaciers", "public libraries", "sailing", "mushrooms", "clocks", "bridges")

    def __init__(self, model, tokenizer, cache_file: Path, n: int = 16, max_new_tokens: int = 1024,
                 seed: int = 0):
        texts = []
        if cache_file.exists():
            texts = [json.loads(line)["text"] for line in cache_file.read_text().splitlines()]
        if len(texts) < n:
            rng = random.Random(seed)
            for i in range(len(texts), n):
                prompt = rng.choice(self.PROMPTS).format(topic=self.TOPICS[i % len(self.TOPICS)])
                texts.append(generate_text(model, tokenizer, prompt, max_new_tokens, seed + i))
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with cache_file.open("a") as fh:
                    fh.write(json.dumps({"prompt": prompt, "text": texts[-1]}) + "\n")
        super().__init__(texts[:n], "selfgen")


@torch.no_grad()
def generate_text(model, tokenizer, prompt, max_new_tokens, seed) -> str:
    msgs = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    torch.manual_seed(seed)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                         top_p=0.95, repetition_penalty=1.1)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def records_to_source(records: list[dict], name: str) -> Source:
    """Map generic records (text / messages / prompt+response / problem+solution) to a source."""
    texts, chats = [], []
    for r in records:
        if "messages" in r:
            chats.append(r["messages"])
        elif "prompt" in r and ("response" in r or "completion" in r):
            chats.append([{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r.get("response", r.get("completion"))}])
        elif "problem" in r and "solution" in r:
            chats.append([{"role": "user", "content": r["problem"]},
                          {"role": "assistant", "content": r["solution"]}])
        elif "instruction" in r and "output" in r:
            chats.append([{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}])
        elif "text" in r or "chapter" in r or "document" in r:
            texts.append(r.get("text") or r.get("chapter") or r.get("document"))
    if not chats and not texts:
        raise KVBoundError(f"Data source {name!r} has no usable records: each needs `text`, "
                           "`messages`, prompt+response, problem+solution or instruction+output.")
    if chats and len(chats) >= len(texts):
        return ChatSource(chats, name)
    return TextSource(texts, name)


def file_source(path: str) -> Source:
    p = Path(path)
    if not p.exists():
        raise KVBoundError(f"Data file {path} not found.")
    if p.suffix in (".jsonl", ".json"):
        lines = p.read_text().splitlines() if p.suffix == ".jsonl" else None
        records = [json.loads(x) for x in lines if x.strip()] if lines is not None else json.loads(
            p.read_text())
        return records_to_source(records, f"file:{p.name}")
    docs = [d for d in p.read_text(errors="replace").split("\n\n\n") if d.strip()]
    return TextSource(docs, f"file:{p.name}")


def hf_source(name: str, split: str = "train", limit: int = 20000) -> Source:
    """Records of a Hugging Face dataset: a Hub name (online), a directory written by
    ``Dataset.save_to_disk``, or a local directory of data files (``.jsonl``, ``.parquet``, ...)."""
    try:
        import datasets
    except ImportError:
        raise KVBoundError(f"hf:{name} needs the `datasets` package (pip install 'kvbound[hf]'); "
                           "or export the records to JSONL and use file:PATH.") from None
    local = Path(name).expanduser()
    try:
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KVBoundError(f"hf:{name} has no split {split!r}; it has "
                                       f"{', '.join(ds)} (hf:PATH:SPLIT).")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(local) if local.is_dir() else name, split=split)
    except KVBoundError:
        raise
    except Exception as exc:
        where = "the directory" if local.is_dir() else "the Hub"
        raise KVBoundError(f"Cannot load dataset {name!r} from {where} ({exc}). Offline, pass a "
                           "local dataset directory or export it to JSONL and use file:PATH.") from exc
    return records_to_source([ds[i] for i in range(min(limit, len(ds)))], f"hf:{local.name}")


# ----------------------------------------------------------------------------- mixture
def parse_spec(spec: str) -> list[tuple[str, str | None, float]]:
    """``"prose:0.7,synthetic:0.2,file:/x.txt:0.1"`` -> [(kind, arg, weight)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        bits = part.split(":")
        weight = 1.0
        try:
            weight = float(bits[-1])
            bits = bits[:-1]
        except ValueError:
            pass
        kind, arg = bits[0], ":".join(bits[1:]) or None
        if kind not in SOURCES:
            raise KVBoundError(f"Unknown data source {kind!r} in {spec!r}. Valid: "
                              f"{', '.join(SOURCES)} (file:PATH, hf:NAME).")
        if kind in ("file", "hf") and not arg:
            raise KVBoundError(f"Data source {kind} needs an argument: {kind}:PATH_OR_NAME.")
        if weight <= 0:
            raise KVBoundError(f"Data weight must be > 0 in {part!r}.")
        out.append((kind, arg, weight))
    if not out:
        raise KVBoundError("Empty data spec; e.g. --data prose:0.8,synthetic:0.2")
    return out


class Mixture:
    """Weighted mixture; :meth:`example` ``(i)`` is a pure function of (seed, i)."""

    def __init__(self, spec: str, tokenizer, seq_len: int, seed: int = 0, model=None,
                 cache_dir: Path | None = None):
        self.spec, self.tokenizer, self.seq_len, self.seed = spec, tokenizer, seq_len, seed
        self.sources: list[Source] = []
        self.weights: list[float] = []
        for kind, arg, weight in parse_spec(spec):
            if kind == "prose":
                src: Source = TextSource(prose_documents(), "prose")
            elif kind == "synthetic":
                src = SyntheticSource()
            elif kind == "selfgen":
                if model is None:
                    raise KVBoundError("selfgen data needs the model.")
                cache = (cache_dir or Path(".")) / "selfgen.jsonl"
                if arg is not None and not (arg.isdigit() and int(arg) > 0):
                    raise KVBoundError(f"selfgen:N needs a whole number of texts N > 0, got "
                                       f"{arg!r} (selfgen:N:WEIGHT).")
                src = SelfGenSource(model, tokenizer, cache, n=int(arg or 16), seed=seed)
            elif kind == "file":
                src = file_source(arg)
            else:
                name, _, split = arg.partition(":")
                src = hf_source(name, split or "train")
            self.sources.append(src)
            self.weights.append(weight)

    def example(self, index: int) -> Example:
        rng = random.Random(f"{self.seed}:{index}")
        src = rng.choices(self.sources, weights=self.weights)[0]
        return src.example(rng, self.tokenizer, self.seq_len)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, target_mask."""
        exs = [self.example(i) for i in indices]
        t = max(len(e.input_ids) for e in exs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(exs), t), pad, dtype=torch.long)
        att = torch.zeros((len(exs), t), dtype=torch.long)
        tgt = torch.zeros((len(exs), t), dtype=torch.bool)
        for j, e in enumerate(exs):
            n = len(e.input_ids)
            ids[j, :n], att[j, :n], tgt[j, :n] = e.input_ids, 1, e.target_mask
        return {"input_ids": ids, "attention_mask": att, "target_mask": tgt}
