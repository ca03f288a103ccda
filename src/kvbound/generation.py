"""High-level generation with any method under a KV budget, with timings and cache statistics.

``model.generate(..., cache=EvictionCache(...))`` is all kvbound needs; this module adds what a user
of the CLI or a benchmark wants around it: chat templating, gate resolution (the gates shipped for
the model when none are given), chunked prefill of long prompts, prefill/decode timings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from kvbound.cache import EvictionCache, stored_kv_bytes
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates, list_shipped_gates, shipped_gates_dir
from kvbound.hooks import get_state
from kvbound.policies import POLICIES, check_method

DEFAULT_CHUNK = 128


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    prefill_seconds: float
    decode_seconds: float
    method: str
    budget: int | None = None
    buffer: int | None = None
    chunk: int | None = None
    sinks: int | None = None
    gates: str | None = None
    seen_tokens: int = 0
    peak_tokens_per_head: int = 0
    peak_kv_bytes: int = 0
    full_kv_bytes: int = 0
    evictions: int = 0
    kv_footprint: float = 1.0
    compiled: bool = False
    positions: str | None = None  #: RoPE positions at the end: absolute or rolling
    token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_second(self) -> float:
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        d["decode_tokens_per_second"] = round(self.decode_tokens_per_second, 2)
        return d


def resolve_gates(model, gates: str | RetentionGates | None) -> RetentionGates:
    """Gates given by object, directory or shipped name; default: the gates already attached to
    the model, else the ones shipped for it."""
    if gates is None:
        state = get_state(model)
        if state is not None and isinstance(state.gates, RetentionGates):
            return state.gates
    if isinstance(gates, RetentionGates):
        gates.check_compatible(model)
        return gates
    if gates is None:
        name = getattr(model, "kvbound_model_name", None)
        if name is None or shipped_gates_dir(name) is None:
            raise KVBoundError(
                f"No gates shipped for model {name or '?'} (shipped: "
                f"{', '.join(list_shipped_gates()) or 'none'}). Pass --gates DIR, or train gates "
                "with `kvbound train --model ... --out DIR`."
            )
        gates = name
    return RetentionGates.load(gates, model)


def build_cache(model, method: str, *, budget: int, buffer: int, sinks: int | None = None,
                gates: str | RetentionGates | None = None, static: bool = False,
                max_cache_len: int | None = None, **policy_kwargs):
    """The cache for ``method`` (``full`` -> transformers' DynamicCache, or its StaticCache of
    ``max_cache_len`` tokens when ``static``; gates attached for ``trimkv``).
    Returns (cache, gates_or_None, sinks_used)."""
    from transformers import DynamicCache, StaticCache

    if check_method(method) == "full":
        if static:
            if max_cache_len is None:
                raise KVBoundError("A static full cache needs max_cache_len (prompt + new tokens).")
            return StaticCache(config=model.config, max_cache_len=max_cache_len), None, None
        return DynamicCache(config=model.config), None, None
    used = None
    if POLICIES[method].needs_gates:
        used = resolve_gates(model, gates)
        used.attach(model)
    cache = EvictionCache(model, method, budget=budget, buffer=buffer, sinks=sinks,
                          static=static, **policy_kwargs)
    return cache, used, cache.sinks


def _generate_compiled(model, ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Prefill + first token eagerly, then compiled decoding, with generate() twice.

    transformers would run a chunked prefill through the compiled forward (a graph per chunk
    shape, recompiling until its limit); the first call does it eagerly, exactly as without
    compilation, and the second continues from the cache with single-token compiled steps.
    Same tokens as one call (the random generator is not reseeded in between)."""
    first_kw = {k: v for k, v in kwargs.items() if k != "compile_config"}
    first_kw.update(max_new_tokens=1, disable_compile=True)
    if kwargs.get("min_new_tokens"):
        first_kw["min_new_tokens"] = 1
    first = model.generate(ids, **first_kw)
    if kwargs["max_new_tokens"] == 1 or int(first[0, -1]) in eos_ids(model):
        return first
    rest_kw = dict(kwargs, max_new_tokens=kwargs["max_new_tokens"] - 1, prefill_chunk_size=None,
                   attention_mask=torch.ones_like(first))
    if kwargs.get("min_new_tokens"):
        rest_kw["min_new_tokens"] = kwargs["min_new_tokens"] - 1
    return model.generate(first, **rest_kw)


def eos_ids(model) -> set[int]:
    """The token ids that end generation for ``model`` (its generation config's EOS, one or many)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def prefill_chunk_size(method: str, chunk: int | None, prompt_len: int, budget: int, *,
                       full_prefill: bool = False) -> int | None:
    """The ``prefill_chunk_size`` for ``model.generate``: bounded methods prefill a prompt longer
    than the budget in chunks (default :data:`DEFAULT_CHUNK`), so memory is bounded from the first
    token; ``None`` (one pass) for the full cache, ``full_prefill`` or a prompt that fits."""
    if method == "full" or full_prefill or prompt_len <= budget:
        return None
    return DEFAULT_CHUNK if chunk is None else chunk


def compile_config(device: torch.device):
    """transformers ``CompileConfig`` for static-cache decoding on ``device``.

    transformers only auto-compiles decoding on accelerators; this also enables it on CPU
    (inductor, default mode: CUDA graphs do not apply there)."""
    from transformers import CompileConfig

    cuda = torch.device(device).type == "cuda"
    cfg = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if cuda else "default")
    # No public switch exists (checked against transformers 5.24): generate() compiles decoding
    # only on accelerators unless this private flag is set. tests/cache/test_static.py fails
    # loudly if the attribute disappears.
    if not hasattr(cfg, "_compile_all_devices"):
        raise KVBoundError("This transformers version has no CompileConfig._compile_all_devices; "
                           "compiled decoding on CPU is unsupported with it (tested with 5.24).")
    cfg._compile_all_devices = True
    return cfg


def decoding_kwargs(tokenizer, *, max_new_tokens: int, sample: bool, temperature: float,
                    top_p: float, repetition_penalty: float) -> dict:
    """``model.generate`` keyword arguments of a decoding choice: greedy (sampling settings
    cleared, so a model's generation_config cannot turn sampling on) or sampled."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise KVBoundError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not repetition_penalty > 0:
        raise KVBoundError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}.")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample)
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = float(repetition_penalty)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


class _Timer:
    """Forward post-hook recording when each forward ends and how many tokens it took."""

    def __init__(self, model):
        self.events: list[tuple[int, float]] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    @torch.compiler.disable
    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        self.events.append((ref.shape[1], time.perf_counter()))

    def close(self):
        self.handle.remove()


def encode_prompt(tokenizer, prompt: str, *, chat: bool | None = None) -> torch.Tensor:
    """Token ids (1, T) for ``prompt``; instruct models get their chat template."""
    if not prompt:
        raise KVBoundError("The prompt is empty: give some text (or --prompt-file).")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        msgs = [{"role": "user", "content": prompt}]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate(
    model,
    tokenizer,
    prompt: str | torch.Tensor,
    *,
    method: str = "trimkv",
    gates: str | RetentionGates | None = None,
    budget: int = 256,
    buffer: int = 32,
    chunk: int | None = None,
    sinks: int | None = None,
    max_new_tokens: int = 256,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    min_new_tokens: int | None = None,
    full_prefill: bool = False,
    compile: bool = False,
    positions: str = "auto",
    budget_scope: str = "head",
    min_per_head: int = 0,
) -> GenerationResult:
    """Generate from one prompt with ``method`` under a budget; returns text, timings, stats.

    ``chunk``: prefill prompts longer than the budget in chunks of this many tokens (evicting after
    each); default 128 for bounded methods. ``full_prefill=True`` prefills the whole prompt at
    once, then cuts it to the budget (the official TRIM-KV behaviour; peak = prompt length).
    ``compile=True`` decodes with ``torch.compile`` on a static-shape cache (see
    :func:`compile_config`); the first decode step pays the compilation. ``positions``: RoPE
    positions of a bounded cache, ``"auto"`` (absolute, then rolling once the run passes the
    model's context), ``"absolute"`` or ``"rolling"`` (:mod:`kvbound.cache.positions`).
    ``repetition_penalty`` > 1 discourages tokens already in the prompt or output (CTRL, Keskar
    et al. 2019; transformers' ``RepetitionPenaltyLogitsProcessor``), greedy or sampled.
    ``budget_scope``: ``"head"`` (M per layer and KV head), ``"layer"`` or ``"global"`` (the same
    bytes shared by a layer's heads, or by every head of the model; ``min_per_head`` tokens at
    least per head), see :class:`~kvbound.cache.EvictionCache`.
    """
    ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt,
                                                                        chat=chat)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise KVBoundError("The prompt is empty.")
    limit = getattr(model.config, "max_position_embeddings", None)
    if method == "full" and limit and ids.shape[1] + max_new_tokens > limit:
        import warnings

        warnings.warn(f"Prompt + new tokens ({ids.shape[1] + max_new_tokens}) exceed the model's "
                      f"context ({limit}) with the full cache; quality will degrade.", stacklevel=2)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise KVBoundError(f"chunk must be a positive integer, got {chunk!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise KVBoundError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not repetition_penalty > 0:
        raise KVBoundError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}.")
    cache, used_gates, used_sinks = build_cache(
        model, method, budget=budget, buffer=buffer, sinks=sinks, gates=gates, static=compile,
        max_cache_len=ids.shape[1] + max_new_tokens,
        **({} if method == "full" else {"positions": positions, "budget_scope": budget_scope,
                                        "min_per_head": min_per_head}))
    prefill_chunk = prefill_chunk_size(method, chunk, ids.shape[1], budget,
                                       full_prefill=full_prefill)
    kwargs = dict(cache=cache, attention_mask=torch.ones_like(ids),
                  prefill_chunk_size=prefill_chunk,
                  **decoding_kwargs(tokenizer, max_new_tokens=max_new_tokens, sample=sample,
                                    temperature=temperature, top_p=top_p,
                                    repetition_penalty=repetition_penalty))
    if min_new_tokens is not None:
        kwargs["min_new_tokens"] = min_new_tokens
    if compile:
        kwargs["compile_config"] = compile_config(model.device)
    torch.manual_seed(seed)
    timer = _Timer(model)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            if compile:
                out = _generate_compiled(model, ids.to(model.device), kwargs)
            else:
                out = model.generate(ids.to(model.device), **kwargs)
        end = time.perf_counter()
    finally:
        timer.close()
    prefill_end, fed = start, 0
    for n, t in timer.events:
        fed += n
        prefill_end = t
        if fed >= ids.shape[1]:
            break
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    result = GenerationResult(
        text=text, prompt_tokens=ids.shape[1], new_tokens=int(new.numel()),
        seconds=end - start, prefill_seconds=prefill_end - start, decode_seconds=end - prefill_end,
        method=method, token_ids=new.tolist(), compiled=compile,
    )
    if isinstance(cache, EvictionCache):
        st = cache.stats()
        result.budget, result.buffer, result.sinks = budget, buffer, used_sinks
        result.chunk = prefill_chunk
        result.seen_tokens, result.peak_tokens_per_head = st.seen_tokens, st.peak_tokens_per_head
        result.peak_kv_bytes, result.full_kv_bytes = st.peak_kv_bytes, st.full_kv_bytes
        result.evictions, result.kv_footprint = st.evictions, st.kv_footprint
        result.positions = "rolling" if cache.rolling is not None and cache.rolling.active \
            else "absolute"
        if used_gates is not None:
            result.gates = used_gates.ref()
    else:
        seen = int(cache.get_seq_length())
        result.seen_tokens = result.peak_tokens_per_head = seen
        result.peak_kv_bytes = result.full_kv_bytes = stored_kv_bytes(cache)
    state = get_state(model)
    if state is not None:
        state.mode = "inference"
    return result
