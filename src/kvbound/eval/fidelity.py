"""Fidelity to the full cache on any text: how much does a bounded cache change the model?

The text is teacher-forced through the bounded cache and the next-token distributions are compared
with the full cache's, position by position:

* ``kl_mean``: mean KL(full || method) over positions past the budget (nats);
* ``top1_agreement``: share of those positions where both caches pick the same next token;
* ``ppl_ratio``: perplexity of the text under the method / under the full cache (same positions);
* ``peak_tokens_per_head``: the cache's peak residency.

Protocols (recorded with every result):

* ``decode`` - the cache evicts throughout, exactly as while generating: tokens are fed in chunks
  of ``buffer`` tokens, so each token sees the M resident tokens plus the tokens since the last
  eviction, which is what it would see when decoding one token at a time (eviction every
  ``buffer`` steps). Resident tokens stay within M + buffer.
* ``context`` - kvpress's setting: the first ``context_len`` tokens are prefilled and compressed
  once to M per head, then the continuation is scored with no further eviction.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbound.errors import KVBoundError
from kvbound.progress import progress_bar

PROTOCOLS = ("decode", "context")


@dataclass
class Window:
    source: str
    ids: torch.Tensor  # (T,)


def make_windows(tokenizer, texts: list[tuple[str, str]], seq_len: int,
                 max_windows: int | None = None) -> list[Window]:
    """Non-overlapping windows of ``seq_len`` tokens cut from each (name, text)."""
    out: list[Window] = []
    for name, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            out.append(Window(name, torch.tensor(ids[start : start + seq_len])))
            if max_windows and len(out) >= max_windows:
                return out
    if not out:
        raise KVBoundError(f"No text long enough for one window of {seq_len} tokens; give longer "
                          "text or a smaller --seq-len.")
    return out


@torch.no_grad()
def full_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probs with the full cache for a batch of equal-length windows (B, T)."""
    return F.log_softmax(model(ids).logits.float(), dim=-1)


@torch.no_grad()
def bounded_logprobs(model, ids: torch.Tensor, cache, *, protocol: str, buffer: int,
                     context_len: int | None = None) -> torch.Tensor:
    """(B, T, V) log-probs of the windows ``ids`` (B, T) under ``cache``, fed per the protocol."""
    t = ids.shape[1]
    outs = []
    if protocol == "decode":
        step = max(buffer, 1)
        for s in range(0, t, step):
            outs.append(model(ids[:, s : s + step], cache=cache).logits)
    elif protocol == "context":
        c = context_len or t // 2
        outs.append(model(ids[:, :c], cache=cache).logits)
        cache.compress_now()
        cache.freeze()
        outs.append(model(ids[:, c:], cache=cache).logits)
    else:
        raise KVBoundError(f"Unknown protocol {protocol!r}; choose one of {PROTOCOLS}.")
    return F.log_softmax(torch.cat(outs, dim=1).float(), dim=-1)


def compare(full: torch.Tensor, ours: torch.Tensor, ids: torch.Tensor, start: int) -> dict:
    """KL(full || ours), top-1 agreement and NLLs over positions >= start (predicting t + 1)."""
    f, o = full[start:-1], ours[start:-1]
    target = ids[start + 1 :]
    kl = (f.exp() * (f - o)).sum(-1)
    return {
        "kl": kl.mean().item(),
        "top1": (f.argmax(-1) == o.argmax(-1)).float().mean().item(),
        "nll_full": -f.gather(-1, target[:, None]).mean().item(),
        "nll": -o.gather(-1, target[:, None]).mean().item(),
        "positions": int(target.numel()),
    }


def run_fidelity(
    model,
    tokenizer,
    windows: list[Window],
    *,
    methods: list[str],
    budgets: list[int],
    buffer: int = 16,
    sinks: int | None = None,
    gates=None,
    protocol: str = "decode",
    context_len: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Every method x budget on every window (windows batched); returns a JSON-able dict.

    ``methods`` entries may be plain method names or ``(label, method, overrides)`` tuples, where
    ``overrides`` may set ``gates``, ``sinks``, ``max_windows`` (score only the first N windows,
    for weaker baselines in long sweeps) and policy settings (e.g. ``window``) for that entry.
    Every row records the cache's :meth:`~kvbound.cache.EvictionCache.settings` and its
    per-window values, in window order (so two rows pair window by window).
    """
    from kvbound.generation import build_cache
    from kvbound.hooks import get_state

    if protocol not in PROTOCOLS:
        raise KVBoundError(f"Unknown protocol {protocol!r}; choose one of {PROTOCOLS}.")
    specs = [m if isinstance(m, tuple) else (m, m, {}) for m in methods]
    torch.manual_seed(seed)
    rows: dict[tuple[str, int], list[dict]] = {}
    peaks: dict[tuple[str, int], int] = {}
    meta: dict[tuple[str, int], dict] = {}
    groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    bar = progress_bar(progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("fidelity", total=len(groups) * len(specs) * len(budgets))
        for group in groups:
            ids = torch.stack([w.ids for w in group]).to(model.device)
            full = full_logprobs(model, ids)
            for budget in budgets:
                start = budget if protocol == "decode" else (context_len or ids.shape[1] // 2)
                if start >= ids.shape[1] - 1:
                    raise KVBoundError(f"Budget {budget} leaves no position to score in windows of "
                                      f"{ids.shape[1]} tokens; use a longer --seq-len.")
                for label, method, over in specs:
                    key = (label, budget)
                    done = len(rows.get(key, []))
                    limit = over.get("max_windows")
                    if limit is not None and done >= limit:
                        bar.update(task, advance=1)
                        continue
                    sub_ids = ids if limit is None else ids[: limit - done]
                    policy_kw = {k: v for k, v in over.items()
                                 if k not in ("sinks", "gates", "max_windows")}
                    if method == "full":
                        ours, peak = full, ids.shape[1]
                        info = {"sinks": None, "gates": None, "settings": None}
                    else:
                        cache, used, sinks_used = build_cache(
                            model, method, budget=budget, buffer=buffer,
                            sinks=over.get("sinks", sinks), gates=over.get("gates", gates),
                            **policy_kw)
                        ours = bounded_logprobs(model, sub_ids, cache, protocol=protocol,
                                                buffer=buffer, context_len=context_len)
                        peak = cache.stats().peak_tokens_per_head
                        info = {"sinks": sinks_used, "settings": cache.settings(),
                                "gates": None if used is None else used.ref()}
                    meta[key] = {"method": method, **info}
                    peaks[key] = max(peaks.get(key, 0), peak)
                    for b, w in enumerate(group[: sub_ids.shape[0]]):
                        rows.setdefault(key, []).append(
                            {**compare(full[b], ours[b], ids[b], start), "source": w.source})
                    bar.update(task, advance=1)
    state = get_state(model)
    if state is not None:
        state.mode = "inference"
    results = []
    for (label, budget), rs in rows.items():
        n = sum(r["positions"] for r in rs)
        nll = sum(r["nll"] * r["positions"] for r in rs) / n
        nll_full = sum(r["nll_full"] * r["positions"] for r in rs) / n
        results.append({
            "method": label,
            **meta[(label, budget)],
            "label": label,
            "budget": budget,
            "buffer": buffer if meta[(label, budget)]["method"] != "full" else None,
            "kl_mean": sum(r["kl"] * r["positions"] for r in rs) / n,
            "top1_agreement": sum(r["top1"] * r["positions"] for r in rs) / n,
            "ppl_ratio": math.exp(nll - nll_full),
            "nll": nll,
            "nll_full": nll_full,
            "peak_tokens_per_head": peaks[(label, budget)],
            "windows": len(rs),
            "positions": n,
            "kl_per_window": [r["kl"] for r in rs],
            "top1_per_window": [r["top1"] for r in rs],
            "nll_per_window": [r["nll"] for r in rs],
            "nll_full_per_window": [r["nll_full"] for r in rs],
            "source_per_window": [r["source"] for r in rs],
        })
    return {
        "protocol": protocol,
        "context_len": context_len if protocol == "context" else None,
        "seq_len": int(windows[0].ids.numel()),
        "windows": len(windows),
        "sources": sorted({w.source for w in windows}),
        "model": getattr(model, "kvbound_model_name", None),
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": _versions(),
        "results": results,
    }


def _versions() -> dict:
    import transformers

    import kvbound

    return {"trimkv": kvbound.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


