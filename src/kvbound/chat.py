"""Conversations with bounded memory that persist between turns and between processes.

Every turn feeds only what the cache has not seen (the last reply token and the new user turn in
the model's chat template) into the same bounded cache, and :meth:`Conversation.save` writes that
cache and the conversation's small state into one file (:mod:`kvbound.cache.persist`). However
long the conversation, the file holds at most ``budget + buffer + chunk`` tokens per layer and KV
head, so it resumes in constant memory and load time; a full cache would grow with every token.

    conv = Conversation.start(model, tokenizer, method="trimkv", budget=256)
    print(conv.say("Hello!"))
    conv.save("session/conversation.safetensors")
    conv = Conversation.load("session/conversation.safetensors", model, tokenizer)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvbound.cache import EvictionCache
from kvbound.cache.persist import read_metadata
from kvbound.errors import KVBoundError
from kvbound.generation import build_cache, decoding_kwargs, eos_ids, prefill_chunk_size

#: file of a chat session directory
SESSION_FILE = "conversation.safetensors"
_SENTINEL_USER, _SENTINEL_REPLY = "\u2063kvbound-user\u2063", "\u2063kvbound-reply\u2063"


@dataclass
class ConversationState:
    """What a conversation needs besides its cache (saved in the same file)."""

    model: str | None
    chat: bool  #: the model's chat template frames the turns
    turns: int = 0
    pending: list[int] = field(default_factory=list)  #: generated tokens not fed to the cache yet
    closing: str = ""  #: template text owed after the last reply (e.g. the newline after its end)


def _render(tokenizer, messages: list[dict], *, prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)


def turn_text(tokenizer, message: str, *, first: bool) -> tuple[str, str]:
    """(text of a user turn in the chat template, the template's closing after a reply).

    The first turn is rendered as a one-message conversation (system prompt included where the
    template adds one); a later turn is what the template appends after a finished exchange,
    found by rendering one with placeholder texts."""
    pair = [{"role": "user", "content": _SENTINEL_USER},
            {"role": "assistant", "content": _SENTINEL_REPLY}]
    before = _render(tokenizer, pair, prompt=False)
    closing = before[before.rindex(_SENTINEL_REPLY) + len(_SENTINEL_REPLY):]
    if first:
        text = _render(tokenizer, [{"role": "user", "content": message}], prompt=True)
    else:
        after = _render(tokenizer, [*pair, {"role": "user", "content": message}], prompt=True)
        if not after.startswith(before):
            raise KVBoundError("This chat template renders earlier turns differently once a new "
                               "one follows, so a conversation cannot be continued turn by turn; "
                               "use --no-chat.")
        text = after[len(before):]
    return text, closing


class Conversation:
    """A chat whose memory is one bounded cache; see the module docstring."""

    def __init__(self, model, tokenizer, cache: EvictionCache, state: ConversationState):
        self.model, self.tokenizer, self.cache, self.state = model, tokenizer, cache, state

    @classmethod
    def start(cls, model, tokenizer, *, method: str = "trimkv", budget: int = 256,
              buffer: int = 32, sinks: int | None = None, gates=None, chat: bool | None = None,
              positions: str = "auto") -> Conversation:
        if method == "full":
            raise KVBoundError("A conversation that persists needs a bounded method (the full "
                               "cache grows with every token); pick e.g. --method trimkv.")
        cache, _, _ = build_cache(model, method, budget=budget, buffer=buffer, sinks=sinks,
                                  gates=gates, positions=positions)
        use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        state = ConversationState(model=getattr(model, "kvbound_model_name", None), chat=use_chat)
        return cls(model, tokenizer, cache, state)

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer, *, gates=None) -> Conversation:
        """The conversation saved at ``path`` (gates: those it was built with are needed; the
        shipped ones for the model by default)."""
        meta = read_metadata(path)
        saved = meta.get("extra", {}).get("conversation")
        if saved is None:
            raise KVBoundError(f"{path} holds a cache but no conversation.")
        if meta["gates"] is not None:
            from kvbound.generation import resolve_gates

            resolve_gates(model, gates).attach(model)
        cache = EvictionCache.load(path, model)
        return cls(model, tokenizer, cache, ConversationState(**saved))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache and the conversation's state to ``path`` (one file, atomic)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return self.cache.save(path, extra={"conversation": asdict(self.state)})

    def _unseen_ids(self, message: str) -> list[int]:
        tok, st = self.tokenizer, self.state
        if st.chat:
            text, closing = turn_text(tok, message, first=st.turns == 0)
        else:
            text, closing = (message if st.turns == 0 else "\n\n" + message), ""
        ids = tok(st.closing + text, add_special_tokens=st.turns == 0 and not st.chat)["input_ids"]
        self._closing_next = closing
        return [*st.pending, *ids]

    @torch.no_grad()
    def say(self, message: str, *, max_new_tokens: int = 256, sample: bool = False,
            temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.0,
            seed: int = 0, chunk: int | None = None) -> str:
        """The model's reply to ``message``; the cache (and :attr:`state`) move past it."""
        if not message or not message.strip():
            raise KVBoundError("The message is empty: say something.")
        kwargs = decoding_kwargs(self.tokenizer, max_new_tokens=max_new_tokens, sample=sample,
                                 temperature=temperature, top_p=top_p,
                                 repetition_penalty=repetition_penalty)
        unseen = torch.tensor([self._unseen_ids(message)], device=self.model.device)
        seen = int(self.cache.get_seq_length())
        mask = torch.ones(1, seen + unseen.shape[1], dtype=torch.long, device=unseen.device)
        chunk_size = prefill_chunk_size(self.cache.policy.name, chunk, unseen.shape[1],
                                        self.cache.budget)
        torch.manual_seed(seed + self.state.turns)
        out = self.model.generate(unseen, attention_mask=mask, cache=self.cache,
                                  prefill_chunk_size=chunk_size, **kwargs)
        reply = out[0, unseen.shape[1]:].tolist()
        eos = eos_ids(self.model)
        closing, text = self._closing_next, reply
        if reply and reply[-1] in eos:  # the reply's end marker is part of the closing text
            end = self.tokenizer.decode(reply[-1:])
            closing = closing[len(end):] if closing.startswith(end) else closing
            text = reply[:-1]
        # else: cut by max_new_tokens, and the whole closing (end marker included) is owed
        self.state.pending = reply[-1:]
        self.state.closing = closing
        self.state.turns += 1
        return self.tokenizer.decode(text, skip_special_tokens=True)
