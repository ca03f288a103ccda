"""Helpers for tests and examples that run without any download: a byte-level tokenizer."""

from __future__ import annotations

import torch


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
