"""Training data sources doing their job: JSONL records, local Hugging Face datasets, selfgen."""

from __future__ import annotations

import json

import pytest
import torch

from kvbound.errors import KVBoundError
from kvbound.testing import ByteTokenizer
from kvbound.train import data as data_mod
from kvbound.train.data import ChatSource, Mixture, TextSource, file_source, hf_source

datasets = pytest.importorskip("datasets")  # a dev dependency: present in `make test`

CHATS = [
    {"messages": [{"role": "user", "content": f"What is the code of box {i}?"},
                  {"role": "assistant", "content": f"Box {i} has code {1000 + 7 * i}."}]}
    for i in range(6)
] + [{"prompt": "Name a colour.", "response": "Teal."},
     {"problem": "What is 2+3?", "solution": "It is 5."},
     {"instruction": "Say hi.", "output": "Hi there."}]
ANSWERS = [c["messages"][1]["content"] for c in CHATS[:6]] + ["Teal.", "It is 5.", "Hi there."]
TEXTS = [{"text": f"Document {i}: the river ran past the mill number {i}. " * 6} for i in range(4)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _targets(ex, tok) -> str:
    return tok.decode(ex.input_ids[1:][ex.target_mask[:-1]])


def test_jsonl_chat_records_train_on_the_assistant_turns_only(tmp_path):
    tok = ByteTokenizer()
    mix = Mixture(f"file:{_jsonl(tmp_path / 'chat.jsonl', CHATS)}", tok, 96, seed=0)
    assert isinstance(mix.sources[0], ChatSource) and len(mix.sources[0].records) == len(CHATS)
    seen = set()
    for i in range(40):
        ex = mix.example(i)
        target = _targets(ex, tok).removeprefix("assistant: ").strip()
        assert target in ANSWERS, target
        assert ex.source == "file:chat.jsonl"
        seen.add(target)
    assert len(seen) >= 6  # records are drawn across the file


def test_jsonl_text_records_are_documents(tmp_path):
    tok = ByteTokenizer()
    src = file_source(str(_jsonl(tmp_path / "docs.jsonl", TEXTS)))
    assert isinstance(src, TextSource) and list(src.docs) == [r["text"] for r in TEXTS]
    import random

    ex = src.example(random.Random(0), tok, 64)
    assert len(ex.input_ids) == 64 and ex.target_mask[:-1].all()
    assert tok.decode(ex.input_ids) in "\n\n".join(r["text"] for r in TEXTS) * 2


def test_records_without_a_known_schema_are_refused(tmp_path):
    with pytest.raises(KVBoundError, match="no usable records"):
        file_source(str(_jsonl(tmp_path / "odd.jsonl", [{"title": "x"}, {"body": "y"}])))


def test_hf_saved_dataset_gives_the_same_examples_as_its_jsonl(tmp_path):
    tok = ByteTokenizer()
    datasets.Dataset.from_list(CHATS[:6]).save_to_disk(str(tmp_path / "saved"))
    via_hf = Mixture(f"hf:{tmp_path / 'saved'}", tok, 96, seed=2)
    via_file = Mixture(f"file:{_jsonl(tmp_path / 'same.jsonl', CHATS[:6])}", tok, 96, seed=2)
    assert via_hf.sources[0].name == "hf:saved"
    for i in range(12):
        a, b = via_hf.example(i), via_file.example(i)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_mask, b.target_mask)


def test_hf_dataset_dict_split_is_chosen_by_name(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(CHATS[:6]),
                              "test": datasets.Dataset.from_list(TEXTS)})
    d.save_to_disk(str(tmp_path / "dd"))
    assert isinstance(hf_source(str(tmp_path / "dd")), ChatSource)
    test = Mixture(f"hf:{tmp_path / 'dd'}:test:1", ByteTokenizer(), 32).sources[0]
    assert isinstance(test, TextSource) and list(test.docs) == [r["text"] for r in TEXTS]
    with pytest.raises(KVBoundError, match="no split 'dev'"):
        hf_source(str(tmp_path / "dd"), "dev")


def test_hf_directory_of_data_files_loads_offline(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", TEXTS)
    src = hf_source(str(folder))
    assert isinstance(src, TextSource) and sorted(src.docs) == sorted(r["text"] for r in TEXTS)


def test_hf_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(KVBoundError, match="file:PATH"):
        hf_source(str(tmp_path / "no-such-dataset-here"))


class _Gen:
    """Stands in for ``generate_text``: records calls, returns a distinct text per seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompt, max_new_tokens, seed):
        self.calls.append((prompt, seed))
        return f"Text {seed} about {prompt} " * 8


def test_selfgen_generates_once_then_reads_its_cache(tmp_path, monkeypatch):
    tok, fake = ByteTokenizer(), _Gen()
    monkeypatch.setattr(data_mod, "generate_text", fake)
    first = Mixture("selfgen:3:1", tok, 64, seed=5, model=object(), cache_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "selfgen.jsonl").read_text().splitlines()]
    assert len(fake.calls) == 3 and [r["prompt"] for r in lines] == [p for p, _ in fake.calls]
    assert len({s for _, s in fake.calls}) == 3
    topics = data_mod.SelfGenSource.TOPICS
    assert all(any(t in r["prompt"] for t in topics) for r in lines)

    def refuse(*a, **k):
        raise AssertionError("selfgen regenerated text it had cached")

    monkeypatch.setattr(data_mod, "generate_text", refuse)
    again = Mixture("selfgen:3:0.5", tok, 64, seed=5, model=object(), cache_dir=tmp_path)
    for i in range(6):
        assert torch.equal(first.example(i).input_ids, again.example(i).input_ids)
    monkeypatch.setattr(data_mod, "generate_text", fake)
    Mixture("selfgen:4:1", tok, 64, seed=5, model=object(), cache_dir=tmp_path)
    assert len(fake.calls) == 4  # only the missing text is generated


def test_selfgen_needs_the_model_and_a_whole_count(tmp_path, monkeypatch):
    with pytest.raises(KVBoundError, match="needs the model"):
        Mixture("selfgen:2", ByteTokenizer(), 64)
    with pytest.raises(KVBoundError, match="whole number"):
        Mixture("selfgen:x:1", ByteTokenizer(), 64, model=object(), cache_dir=tmp_path)
    fake = _Gen()
    monkeypatch.setattr(data_mod, "generate_text", fake)
    mix = Mixture("prose:1,selfgen:2", ByteTokenizer(), 64, model=object(), cache_dir=tmp_path)
    assert mix.weights == [1.0, 2.0] and len(fake.calls) == 16  # a lone number is the weight
