"""Tiny random models and a byte-level tokenizer, for tests and examples without any download."""

from __future__ import annotations

import torch

from kvbound.errors import KVBoundError


class ByteTokenizer:
    """Maps each UTF-8 byte to one id in [3, vocab_size); 0 pad, 1 bos, 2 eos (as tiny models).

    Enough of the tokenizer interface for kvbound's data, training and evaluation code to run on
    tiny random models: ``__call__``, ``encode``, ``decode``, ``pad_token_id``, ``eos_token_id``.
    It has no chat template, so chat data is rendered as ``role: content`` lines.
    """

    chat_template = None
    padding_side = "left"

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [max(3, min(b, self.vocab_size - 1)) for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens: bool = False, return_tensors=None, **kwargs):
        ids = self.encode(text)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                                   dtype=torch.long)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if i > 2).decode("utf-8", errors="replace")



TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3")


def tiny_config(arch: str, *, num_layers: int = 2, vocab_size: int = 128, **overrides):
    """Config of a tiny model: hidden 64, 4 query / 2 KV heads of dim 16, MLP 128, 4096 positions.

    Token ids: pad 0, bos 1, eos 2. ``initializer_range`` is 0.1 (transformers uses 0.02, which at
    this width gives near-uniform attention, so dropping half the context moves the next-token
    distribution by a KL of only ~0.002; at 0.1 it is ~0.3). Embeddings are untied for every
    architecture (tied, Gemma3's sqrt(hidden) embedding scale makes it echo its input token).
    Gemma3 alternates sliding (window 16) and full attention layers, starting with sliding.
    ``overrides`` are passed to the config class and win over all of the above.
    """
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
        "gemma3": Gemma3TextConfig,
    }
    if arch not in classes:
        raise KVBoundError(
            f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}."
        )
    kwargs: dict = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "initializer_range": 0.1,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attn_implementation": "sdpa",
    }
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "phi3":
        kwargs["original_max_position_embeddings"] = 4096
    if arch == "gemma3":
        kwargs.update(
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=[
                "full_attention" if i % 2 == 1 else "sliding_attention" for i in range(num_layers)
            ],
        )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 128,
    **overrides,
):
    """A tiny random-weight causal LM of architecture `arch` (one of `TINY_ARCHS`), no download.

    Weights depend only on `seed` and the config (they are drawn in float32, then cast to `dtype`);
    the global RNG state is left untouched. Returned in eval mode with sdpa attention and
    ``kvbound_model_name = "tiny-<arch>"``. See `tiny_config` for the shapes and `overrides`.
    """
    from transformers import (
        Gemma3ForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        Phi3ForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "mistral": MistralForCausalLM,
        "phi3": Phi3ForCausalLM,
        "gemma3": Gemma3ForCausalLM,
    }
    config = tiny_config(arch, num_layers=num_layers, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = classes[arch](config)
    model.to(dtype)
    model.eval()
    model.kvbound_model_name = f"tiny-{arch}"
    return model
