"""What the learned retention scores look like: half-lives, sinks, punctuation, eviction
timelines, and an automatic role per (layer, KV head) (sink, gist, sliding window, content).

Used by ``kvbound viz`` and the gate-quality benchmark. Everything here returns plain tensors or
dicts (tests assert on data, plots are drawn elsewhere).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kvbound.architectures import attention_modules

PUNCTUATION = set(string.punctuation) | {"\n"}


@torch.no_grad()
def gate_log_betas(model, gates, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """log beta (H_kv, T) per gated layer for the tokens ``ids`` (1, T), full-cache forward."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    # gates with a position input read each token's position (one unpadded row: 0..T-1)
    positions = (torch.arange(ids.shape[-1], device=ids.device)[None]
                 if getattr(gates, "uses_positions", False) else None)
    for idx, attn in enumerate(attention_modules(model)):
        if idx not in gates:
            continue

        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx] = gates(idx, hidden, positions)[0].float().cpu()

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


#: Roles in order of precedence: a head showing several traits gets the first one.
ROLES = ("gist", "sink", "sliding_window", "content")
UNDETERMINED = "undetermined"
ROLE_LETTERS = {"gist": "G", "sink": "S", "sliding_window": "W", "content": "C",
                UNDETERMINED: "?"}


# --------------------------------------------------------------------------------------------
# head roles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoleThresholds:
    """Thresholds of :func:`classify_head` (all measured on "late" snapshots, see there).

    first_tokens:
        k: the "first tokens" a sink head keeps are positions ``[0, k)``.
    sink_keep:
        sink if some first token is resident in at least this share of late snapshots ...
    sink_enrichment:
        ... and that share is at least this many times the retention rate of the other old tokens
        (positions outside the recent window), so a head that simply keeps everything is no sink.
    max_hole:
        the recent window may skip up to this many consecutive tokens (dropped whitespace, ...).
    window_coverage:
        sliding window if the recent window holds at least this share of the (non-first) resident
        tokens, on average.
    gist_ratio, gist_min_share:
        gist (punctuation) if the punctuation share of the resident tokens is at least
        ``gist_ratio`` times its base rate in the text seen so far and at least ``gist_min_share``.
    """

    first_tokens: int = 4
    sink_keep: float = 0.9
    sink_enrichment: float = 3.0
    max_hole: int = 3
    window_coverage: float = 0.7
    gist_ratio: float = 2.0
    gist_min_share: float = 0.25


@dataclass
class HeadRole:
    """Role and the measurements behind it for one (layer, KV head)."""

    layer: int
    head: int
    role: str
    traits: list[str] = field(default_factory=list)
    snapshots: int = 0  # late snapshots measured
    first_keep: float | None = None  # best share of late snapshots holding one of the first k
    background_keep: float = 0.0  # retention rate of old tokens outside the window
    sink_share: float = 0.0  # share of the resident set held by the first k tokens
    window: float = 0.0  # median width of the recent window (tokens)
    window_coverage: float = 0.0  # share of resident (non-first) tokens inside that window
    punct_share: float = 0.0  # share of resident (non-first) tokens that are punctuation
    punct_base: float = 0.0  # punctuation share of the text seen
    punct_ratio: float | None = None  # punct_share / punct_base
    median_half_life: float | None = None  # filled in by run_viz from the gates

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _snapshot_metrics(t: int, pos: np.ndarray, punct: np.ndarray, k: int, skip: int,
                      th: RoleThresholds) -> dict | None:
    """Measurements for one snapshot (``t`` tokens seen, ``pos`` resident positions)."""
    pos = np.unique(pos[(pos >= 0) & (pos < t)])
    n = pos.size
    if n == 0 or t - n < k:  # fewer than k tokens evicted yet: nothing to tell apart
        return None
    rest = pos[pos >= skip]  # resident tokens outside the first-token / protected region
    ages = np.sort(t - 1 - rest)
    width, block = 0, 0
    if ages.size and ages[0] <= th.max_hole:
        gaps = np.nonzero(np.diff(ages) > th.max_hole + 1)[0]
        block = int(gaps[0]) + 1 if gaps.size else int(ages.size)
        width = int(ages[block - 1]) + 1
    old_lo, old_hi = skip, t - width
    old_kept = int(((rest >= old_lo) & (rest < old_hi)).sum())
    out = {
        "first": np.isin(np.arange(k), pos),
        "background": old_kept / (old_hi - old_lo) if old_hi > old_lo else None,
        "sink_share": float((pos < k).sum()) / n,
        "window": width,
        "coverage": block / rest.size if rest.size else 0.0,
        "punct_share": float(punct[rest].mean()) if rest.size else 0.0,
        "punct_base": float(punct[skip:t].mean()) if t > skip else 0.0,
    }
    return out


def classify_head(
    snapshots: Sequence[tuple[int, Sequence[int] | torch.Tensor | np.ndarray]],
    punct: Sequence[bool] | torch.Tensor | np.ndarray,
    *,
    sinks: int = 0,
    thresholds: RoleThresholds | None = None,
    layer: int = -1,
    head: int = -1,
) -> HeadRole:
    """Role of one (layer, KV head) from what it held during a bounded run.

    ``snapshots``: ``(t, positions)`` pairs, ``t`` = tokens seen so far, ``positions`` = absolute
    positions the head held at that moment (-1 padding is ignored). ``punct``: per position, whether
    the token is punctuation (:func:`kvbound.analysis.is_punctuation`). ``sinks``: the first tokens
    the cache protected; with ``sinks > 0`` the sink role is not assigned (they are kept by rule)
    and positions ``< max(sinks, k)`` are left out of the other measurements.

    Only *late* snapshots count: those where at least ``k = first_tokens`` tokens have been evicted
    (before that every head holds everything). Per snapshot, the recent window is the run of
    resident tokens from the newest one backwards with holes of at most ``max_hole`` tokens
    (the first-token region excluded); its width is the age of its oldest token + 1.

    Traits (:class:`RoleThresholds` holds the numbers):

    * ``sink``: no protected sinks, one of the first ``k`` tokens is resident in >= 90% of late
      snapshots and >= 3x as often as the old tokens outside the window (A-shape heads count).
    * ``gist``: punctuation share of resident tokens >= 2x its base rate in the text and >= 25%
      (the paper's period-keeping "gist" heads).
    * ``sliding_window``: the recent window holds >= 70% of the resident tokens on average; the
      estimated width is ``window`` (it cannot exceed budget + buffer).

    The role is the first trait in the order gist, sink, sliding_window, else ``content``;
    ``undetermined`` if there was no late snapshot (the text is shorter than budget + buffer + k).
    """
    th = thresholds or RoleThresholds()
    punct = np.asarray(punct.cpu() if isinstance(punct, torch.Tensor) else punct, dtype=bool)
    k = th.first_tokens
    skip = max(sinks, k)
    rows = []
    for t, pos in snapshots:
        arr = np.asarray(pos.cpu() if isinstance(pos, torch.Tensor) else pos, dtype=np.int64)
        m = _snapshot_metrics(int(t), arr.reshape(-1), punct, k, skip, th)
        if m is not None:
            rows.append(m)
    role = HeadRole(layer=layer, head=head, role=UNDETERMINED, snapshots=len(rows))
    if not rows:
        return role
    backgrounds = [r["background"] for r in rows if r["background"] is not None]
    role.background_keep = float(np.mean(backgrounds)) if backgrounds else 0.0
    role.first_keep = None if sinks else float(np.stack([r["first"] for r in rows]).mean(0).max())
    role.sink_share = float(np.mean([r["sink_share"] for r in rows]))
    role.window = float(np.median([r["window"] for r in rows]))
    role.window_coverage = float(np.mean([r["coverage"] for r in rows]))
    role.punct_share = float(np.mean([r["punct_share"] for r in rows]))
    role.punct_base = float(np.mean([r["punct_base"] for r in rows]))
    role.punct_ratio = role.punct_share / role.punct_base if role.punct_base > 0 else None

    traits = []
    if role.punct_ratio is not None and role.punct_ratio >= th.gist_ratio \
            and role.punct_share >= th.gist_min_share:
        traits.append("gist")
    if role.first_keep is not None and role.first_keep >= th.sink_keep \
            and role.first_keep >= th.sink_enrichment * role.background_keep:
        traits.append("sink")
    if role.window_coverage >= th.window_coverage:
        traits.append("sliding_window")
    role.traits = traits
    role.role = traits[0] if traits else "content"
    return role


# --------------------------------------------------------------------------------------------
# the bounded run
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def bounded_snapshots(model, ids: torch.Tensor, *, budget: int, buffer: int, sinks: int = 0):
    """Feed ``ids`` (1, T) through a TRIM-KV EvictionCache in chunks of ``buffer`` tokens.

    Returns ``(snapshots, cache)``; ``snapshots[layer]`` is a list of ``(t, positions (H_kv, n))``
    after each chunk, ``t`` = tokens seen. The gates must be attached to ``model``.
    """
    from kvbound.cache import EvictionCache

    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, sinks=sinks)
    ids = ids.view(1, -1).to(model.device)
    step = max(buffer, 1)
    snaps: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in cache.evicted}
    for s in range(0, ids.shape[1], step):
        model(ids[:, s : s + step], cache=cache)
        t = min(s + step, ids.shape[1])
        for i in cache.evicted:
            snaps[i].append((t, cache.resident_positions(i)[0].cpu()))
    return snaps, cache


def budget_allocation(model, ids: torch.Tensor, *, budget: int, buffer: int, sinks: int = 0,
                      scope: str = "global") -> torch.Tensor:
    """Where a shared budget went: (evicted layers, H_kv) tokens each KV head holds after ``ids``
    (1, T) were fed in chunks of ``buffer`` through a TRIM-KV cache with ``budget_scope=scope``
    (M x H_kv per layer, or M x H_kv x L for the model). The gates must be attached."""
    from kvbound.cache import EvictionCache

    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, sinks=sinks,
                          budget_scope=scope)
    ids = ids.view(1, -1).to(model.device)
    step = max(buffer, 1)
    for s in range(0, ids.shape[1], step):
        model(ids[:, s : s + step], cache=cache)
    return torch.stack([layer.head_counts()[0].cpu() for layer in cache.eviction_layers])


def timeline_from_snapshots(snaps: list[tuple[int, torch.Tensor]], head: int,
                            total: int) -> torch.Tensor:
    """(T, T) bool, row t = positions <= t resident in ``head`` after token t (as
    :func:`kvbound.analysis.eviction_timeline`, which it equals for the same chunking)."""
    grid = torch.zeros(total, total, dtype=torch.bool)
    cols = torch.arange(total)
    start = 0
    for t, pos in snaps:
        p = pos[head]
        p = p[p >= 0]
        rows = torch.arange(start, t)
        block = torch.zeros(t - start, total, dtype=torch.bool)
        block[:, p] = True
        block &= cols[None, :] <= rows[:, None]
        block[torch.arange(t - start), rows] = True
        grid[start:t] = block
        start = t
    return grid


# --------------------------------------------------------------------------------------------
# run_viz
# --------------------------------------------------------------------------------------------


def json_safe(obj):
    """JSON-safe copy: non-finite floats -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj
