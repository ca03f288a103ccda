"""What the learned retention scores look like: half-lives, sinks, punctuation, eviction timelines.

Used by ``kvbound viz`` and the gate-quality benchmark. Everything here returns plain tensors or
dicts (tests assert on data, plots are drawn elsewhere).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch

from kvbound.architectures import attention_modules

PUNCTUATION = set(string.punctuation) | {"\n"}


@torch.no_grad()
def gate_log_betas(model, gates, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """log beta (H_kv, T) per gated layer for the tokens ``ids`` (1, T), full-cache forward."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx, attn in enumerate(attention_modules(model)):
        if idx not in gates:
            continue

        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx] = gates(idx, hidden)[0].float().cpu()

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return captured


def half_lives(log_beta: torch.Tensor) -> torch.Tensor:
    """Tokens until beta^age = 1/2: ln(1/2) / log beta (inf where beta == 1)."""
    return math.log(0.5) / log_beta.clamp(max=-1e-30)


def median_half_life(log_betas: dict[int, torch.Tensor]) -> torch.Tensor:
    """(layers, H_kv) median half-life of tokens, rows in sorted layer order."""
    return torch.stack([half_lives(log_betas[i]).median(dim=-1).values for i in sorted(log_betas)])


def is_punctuation(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """(T,) True where the token is only punctuation/whitespace with some punctuation."""
    out = []
    for t in ids.tolist():
        text = tokenizer.decode([t])
        stripped = text.strip()
        out.append(bool(stripped) and all(c in PUNCTUATION for c in stripped) or text == "\n")
    return torch.tensor(out)


@dataclass
class Composition:
    """What the resident set holds at the end of a run, per (layer, head)."""

    sink_share: torch.Tensor  # (L, H) share of the budget held by the first `sinks` tokens
    punct_share: torch.Tensor  # (L, H) share of resident tokens that are punctuation
    punct_base_rate: float  # share of punctuation in the text
    recent_share: torch.Tensor  # (L, H) share of resident tokens among the last M positions

    def to_dict(self) -> dict:
        return {
            "sink_share_mean": float(self.sink_share.mean()),
            "punct_share_mean": float(self.punct_share.mean()),
            "punct_base_rate": self.punct_base_rate,
            "recent_share_mean": float(self.recent_share.mean()),
            "sink_share": self.sink_share.tolist(),
            "punct_share": self.punct_share.tolist(),
        }


def composition(cache, ids: torch.Tensor, punct: torch.Tensor, first: int = 4) -> Composition:
    """Share of each head's resident set held by the first tokens, punctuation, recent tokens."""
    seen = cache.get_seq_length()
    sink, pun, rec = [], [], []
    for idx in cache.evicted:
        pos = cache.resident_positions(idx)[0]  # (H, n)
        valid = pos >= 0
        n = valid.sum(-1).clamp(min=1).float()
        sink.append(((pos < first) & valid).sum(-1) / n)
        pun.append((punct[pos.clamp(min=0)] & valid).sum(-1) / n)
        rec.append(((pos >= seen - cache.layers[idx].budget) & valid).sum(-1) / n)
    return Composition(torch.stack(sink), torch.stack(pun), float(punct.float().mean()),
                       torch.stack(rec))


@torch.no_grad()
def eviction_timeline(model, ids: torch.Tensor, cache, layer: int, head: int,
                      step: int = 1) -> torch.Tensor:
    """(T, T) bool: row t = which positions <= t are resident in (layer, head) after token t.

    The text is fed ``step`` tokens at a time (``step = buffer`` reproduces decoding exactly).
    """
    t_total = ids.shape[-1]
    grid = torch.zeros(t_total, t_total, dtype=torch.bool)
    ids = ids.view(1, -1).to(model.device)
    for s in range(0, t_total, step):
        model(ids[:, s : s + step], cache=cache)
        end = min(s + step, t_total)
        pos = cache.resident_positions(layer)[0, head]
        pos = pos[pos >= 0]
        for t in range(s, end):
            grid[t, pos[pos <= t]] = True
            grid[t, t] = True
    return grid
