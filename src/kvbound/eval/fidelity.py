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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbound.errors import KVBoundError
from kvbound.progress import progress_bar

PROTOCOLS = ("decode", "context")
#: default windows per batch: as many as make this many tokens
TOKENS_PER_BATCH = 16384
#: the future-attention oracle (:mod:`kvbound.policies.oracle`): a method of fidelity runs only,
#: since it reads the text's future (its ``horizon`` override sets the tables' horizon)
ORACLE = "oracle"
#: overrides an oracle entry may set (:func:`kvbound.eval.oracle.oracle_policy`)
ORACLE_SETTINGS = ("horizon", "fit", "fit_steps", "fit_topm")


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


@contextmanager
def _deferred_head(model):
    """Inside the block the model returns empty logits and the final hidden states are collected
    (yielded list); the output projection then runs once over all of them. On CPU one (B*T, V)
    matmul is about twice as fast as one per 16-token chunk (the projection is memory-bound)."""
    head, hidden = model.get_output_embeddings(), []

    def keep(module, args):
        hidden.append(args[0])
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(keep)
    try:
        yield hidden
    finally:
        handle.remove()


@torch.no_grad()
def _head_is_plain(model) -> bool:
    """Whether the model's logits are exactly its output embeddings applied to the last hidden
    state (no soft-capping or scaling after it), so the projection may be deferred; checked once
    per model on a 3-token input."""
    known = model.__dict__.get("_kvbound_plain_head")
    if known is None:
        known = False
        if isinstance(model.get_output_embeddings(), torch.nn.Module):
            ids = torch.tensor([[1, 2, 3]], device=model.device)
            ref = model(ids).logits
            with _deferred_head(model) as hidden:
                model(ids)
            known = len(hidden) == 1 and torch.equal(model.get_output_embeddings()(hidden[0]), ref)
        model.__dict__["_kvbound_plain_head"] = known
    return known


@torch.no_grad()
def bounded_logprobs(model, ids: torch.Tensor, cache, *, protocol: str, buffer: int,
                     context_len: int | None = None, keep_from: int = 0) -> torch.Tensor:
    """(B, T - keep_from, V) log-probs of the windows ``ids`` (B, T) under ``cache``, fed per the
    protocol, for positions ``keep_from`` on (the earlier ones still pass through the cache)."""
    if protocol not in PROTOCOLS:
        raise KVBoundError(f"Unknown protocol {protocol!r}; choose one of {PROTOCOLS}.")
    t = ids.shape[1]
    if protocol == "decode":
        step = max(buffer, 1)
        feeds = [(s, min(s + step, t)) for s in range(0, t, step)]
    else:
        c = context_len or t // 2
        feeds = [(0, c), (c, t)]

    def feed(a: int, b: int):
        if protocol == "context" and a > 0:
            cache.compress_now()
            cache.freeze()
        return model(ids[:, a:b], cache=cache).logits

    if _head_is_plain(model):
        with _deferred_head(model) as hidden:
            for a, b in feeds:
                feed(a, b)
        logits = model.get_output_embeddings()(torch.cat(hidden, dim=1)[:, keep_from:])
    else:
        logits = torch.cat([feed(a, b) for a, b in feeds], dim=1)[:, keep_from:]
    return F.log_softmax(logits.float(), dim=-1)


def compare(full: torch.Tensor, ours: torch.Tensor, ids: torch.Tensor, start: int) -> dict:
    """KL(full || ours), top-1 agreement and NLLs over positions >= start (predicting t + 1);
    ``full`` and ``ours`` hold log-probs of positions ``start`` on, ``ids`` the whole window."""
    f, o = full[:-1], ours[:-1]
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
    batch_size: int | None = None,
    progress: bool = True,
    reference: dict | None = None,
) -> dict:
    """Every method x budget on every window (windows batched); returns a JSON-able dict.

    ``methods`` entries may be plain method names or ``(label, method, overrides)`` tuples, where
    ``overrides`` may set ``gates``, ``sinks``, ``max_windows`` (score only the first N windows,
    for weaker baselines in long sweeps) and policy settings (e.g. ``window``) for that entry.
    The method :data:`ORACLE` is the future-attention oracle, built from each group's ids (its
    overrides :data:`ORACLE_SETTINGS`: ``fit`` makes it the fitted-retention oracle).
    Every row records the cache's :meth:`~kvbound.cache.EvictionCache.settings` and its
    per-window values, in window order (so two rows pair window by window). ``reference`` (a
    dict) keeps the full-cache log-probs of each group between calls on the same windows.
    ``batch_size`` windows run together; by default as many as make 16K tokens (16 windows of 1K
    tokens were the fastest on a 2-core CPU: 3.1 s per window and method for SmolLM2-135M,
    against 4.5 s at 8 and 3.7 s at 32; log-probs of B x T positions are kept, so memory grows
    with B x T).
    """
    from kvbound.cache import EvictionCache
    from kvbound.eval.oracle import oracle_policy
    from kvbound.generation import build_cache
    from kvbound.hooks import get_state

    if protocol not in PROTOCOLS:
        raise KVBoundError(f"Unknown protocol {protocol!r}; choose one of {PROTOCOLS}.")
    specs = [m if isinstance(m, tuple) else (m, m, {}) for m in methods]
    torch.manual_seed(seed)
    rows: dict[tuple[str, int], list[dict]] = {}
    oracles: dict[tuple, object] = {}  # the future-attention oracle of the current group
    peaks: dict[tuple[str, int], int] = {}
    meta: dict[tuple[str, int], dict] = {}
    if not windows:
        raise KVBoundError("No windows to score: give text long enough for one window.")
    if batch_size is None:
        batch_size = max(1, TOKENS_PER_BATCH // int(windows[0].ids.numel()))
    groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    bar = progress_bar(progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("fidelity", total=len(groups) * len(specs) * len(budgets))
        for group in groups:
            ids = torch.stack([w.ids for w in group]).to(model.device)
            memo = f"{ids.shape}:{hash(ids.cpu().numpy().tobytes())}"
            if reference is not None and memo in reference:
                full = reference[memo]
            else:
                full = full_logprobs(model, ids)
                if reference is not None:
                    reference.clear()  # one group at a time: (B, T, V) floats are large
                    reference[memo] = full
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
                        ours, peak = full[:, start:], ids.shape[1]
                        info = {"sinks": None, "gates": None, "settings": None}
                    elif method == ORACLE:
                        oracle_kw = {k: over[k] for k in ORACLE_SETTINGS if k in over}
                        okey = (memo, sub_ids.shape[0], tuple(sorted(oracle_kw.items())))
                        if okey not in oracles:
                            if any(k[0] != memo for k in oracles):
                                oracles.clear()  # one group at a time (every variant kept)
                            oracles[okey] = oracle_policy(model, sub_ids, stride=max(buffer, 1),
                                                          **oracle_kw)
                        cache = EvictionCache(model, oracles[okey], budget=budget, buffer=buffer,
                                              sinks=over.get("sinks", sinks))
                        ours = bounded_logprobs(model, sub_ids, cache, protocol=protocol,
                                                buffer=buffer, context_len=context_len,
                                                keep_from=start)
                        peak = cache.stats().peak_tokens_per_head
                        info = {"sinks": cache.sinks, "settings": cache.settings(), "gates": None}
                    else:
                        cache, used, sinks_used = build_cache(
                            model, method, budget=budget, buffer=buffer,
                            sinks=over.get("sinks", sinks), gates=over.get("gates", gates),
                            **policy_kw)
                        ours = bounded_logprobs(model, sub_ids, cache, protocol=protocol,
                                                buffer=buffer, context_len=context_len,
                                                keep_from=start)
                        peak = cache.stats().peak_tokens_per_head
                        info = {"sinks": sinks_used, "settings": cache.settings(),
                                "gates": None if used is None else used.ref()}
                    meta[key] = {"method": method, **info}
                    peaks[key] = max(peaks.get(key, 0), peak)
                    for b, w in enumerate(group[: sub_ids.shape[0]]):
                        rows.setdefault(key, []).append(
                            {**compare(full[b, start:], ours[b], ids[b], start), "source": w.source})
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


PER_WINDOW = ("kl_per_window", "top1_per_window", "nll_per_window", "nll_full_per_window",
              "source_per_window")


def merge_results(parts: list[dict]) -> dict:
    """One result from :func:`run_fidelity` runs of the same methods and budgets on consecutive
    groups of windows: per-window values concatenated in order, means recomputed over positions."""
    if not parts:
        raise KVBoundError("Nothing to merge: no fidelity results given.")
    rows: dict[tuple[str, int], list[dict]] = {}
    for part in parts:
        for r in part["results"]:
            rows.setdefault((r["label"], r["budget"]), []).append(r)
    results = []
    for rs in rows.values():
        n = sum(r["positions"] for r in rs)

        def mean(key, rs=rs, n=n):
            return sum(r[key] * r["positions"] for r in rs) / n

        nll, nll_full = mean("nll"), mean("nll_full")
        merged = {**rs[0], "kl_mean": mean("kl_mean"), "top1_agreement": mean("top1_agreement"),
                  "nll": nll, "nll_full": nll_full, "ppl_ratio": math.exp(nll - nll_full),
                  "peak_tokens_per_head": max(r["peak_tokens_per_head"] for r in rs),
                  "windows": sum(r["windows"] for r in rs), "positions": n}
        for key in PER_WINDOW:
            merged[key] = [v for r in rs for v in r[key]]
        results.append(merged)
    # windows: the most any row was scored on (parts may be several methods on one group)
    return {**parts[0], "windows": max(r["windows"] for r in results),
            "sources": sorted({s for p in parts for s in p["sources"]}),
            "seconds": round(sum(p["seconds"] for p in parts), 1), "results": results}


def _versions() -> dict:
    import transformers

    import kvbound

    return {"trimkv": kvbound.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


