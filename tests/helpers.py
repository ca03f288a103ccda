"""Shared test helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvbound.testing import tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_model_dir(path: Path, data: Path, chat: bool = False) -> Path:
    """A tiny llama with a small byte-level BPE tokenizer, loadable by ``--model PATH``; with
    ``chat`` its tokenizer has a ``role: content`` chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([data.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    model = tiny_model("llama", seed=0, vocab_size=len(hf))
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return path


def load_benchmark(name: str):
    """The module ``benchmarks/NAME.py`` (benchmarks are scripts, not a package)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def gates_with_random(model, part: str, seed: int, **extra):
    """Small fresh gates for ``model`` (I = 8, wide init) whose zero-initialised ``part`` of every
    gate (``"position"`` or ``"alpha"``, switched on by ``extra``) holds seeded N(0, 3^2)
    weights, so that it changes what the gates give the cache."""
    import torch

    from kvbound.gates import RetentionGates

    gates = RetentionGates.for_model(model, intermediate_size=8, init_std=0.5, bias_init=2.0,
                                     seed=seed, **extra)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in gates.config.gated_layers:
            weight = getattr(gates[i], part).weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 3)
    return gates
