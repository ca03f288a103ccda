"""Speed and memory: prefill and decode throughput, step latency vs position, KV and process memory.

Each (method, length) runs in its own subprocess so that peak process memory (ru_maxrss) is
per-configuration. A prompt of L tokens (held-out text, repeated as needed) is prefilled (bounded
methods: in chunks with eviction after each; full cache: in one pass), then D tokens are decoded
one at a time with greedy argmax, timing every step. A method written ``NAME+compile`` (e.g.
``trimkv+compile``, ``full+compile``) decodes with ``torch.compile`` on a static-shape cache
(transformers' StaticCache for the full cache); its first decode step, which compiles, is reported
as ``compile_seconds`` and excluded like the other warm-up steps.

Also measured: the share of decode time spent computing the policy's inputs (retention gates, or
recomputed queries for attention-based baselines) and in cache bookkeeping (eviction + mask).

    kvbound bench --json out.json            # or: python benchmarks/speed.py --write-results
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(args) -> dict:
    import torch

    from kvbound.cache import EvictionCache, stored_kv_bytes
    from kvbound.eval.textpool import eval_text_pool
    from kvbound.generation import build_cache, compile_config
    from kvbound.models import load_model

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name, _, mode = args.method.partition("+")
    method, _, scope = name.partition("@")
    scoped = {"budget_scope": scope} if scope else {}
    gates = args.gates
    if args.model_config:  # random weights of a real architecture: random tokens, random gates
        from kvbound.gates import RetentionGates
        from kvbound.models.random_config import random_model
        from kvbound.policies import POLICIES

        model = random_model(args.model_config, dtype=dtype, seed=0, device=device)
        ids = torch.randint(3, model.config.vocab_size, (1, args.length),
                            generator=torch.Generator().manual_seed(0))
        if gates is None and method in POLICIES and POLICIES[method].needs_gates:
            gates = RetentionGates.for_model(model, seed=0)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=device)
        text_ids = tok("\n\n".join(eval_text_pool()), add_special_tokens=False)["input_ids"]
        reps = args.length // len(text_ids) + 1
        ids = torch.tensor((text_ids * reps)[: args.length])[None]
    ids = ids.expand(args.batch_size, -1).contiguous().to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compiled = mode == "compile"
    random_fill = args.fill == "random"
    if random_fill and compiled:
        raise SystemExit("--fill random measures eager decoding: drop '+compile' from --methods")
    sync()
    t0 = time.perf_counter()
    if random_fill and method == "full":
        cache, used, sinks = fill_full(model, args.batch_size, args.length, dtype, device), None, None
    elif random_fill:
        cache, used, sinks = fill_bounded(model, method, budget=args.budget, buffer=args.buffer,
                                          chunk=args.chunk, context=args.length, gates=gates,
                                          **scoped)
        if args.batch_size > 1:
            cache.batch_repeat_interleave(args.batch_size)
    else:
        cache, used, sinks = build_cache(model, method, budget=args.budget, buffer=args.buffer,
                                         gates=gates, static=compiled,
                                         max_cache_len=args.length + args.decode_tokens, **scoped)
    step_fn = model.get_compiled_call(compile_config(model.device)) if compiled else model
    bounded = isinstance(cache, EvictionCache)
    chunk = args.chunk if bounded else args.full_chunk
    with torch.no_grad():
        if random_fill:
            nxt = torch.full((args.batch_size, 1), 5, dtype=torch.long, device=device)
        else:
            for s in range(0, ids.shape[1], chunk):
                logits = model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1).logits
            nxt = logits[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - t0
        if bounded:
            for k in cache.timings:
                cache.timings[k] = 0.0
        steps = []
        for _ in range(args.decode_tokens):
            t = time.perf_counter()
            logits = step_fn(nxt, cache=cache).logits
            nxt = logits[:, -1:].argmax(-1)
            sync()
            steps.append(time.perf_counter() - t)
    decode = sum(steps[args.warmup:])
    n = len(steps) - args.warmup
    rec = {
        "method": args.method, "length": args.length, "budget": args.budget if bounded else None,
        "buffer": args.buffer if bounded else None, "sinks": sinks, "dtype": args.dtype,
        "batch_size": args.batch_size, "model": args.model_config or args.model,
        "random_weights": bool(args.model_config),
        "fill": args.fill, "prefill_seconds": prefill,
        "prefill_tok_s": None if random_fill else args.batch_size * args.length / prefill,
        "compiled": compiled, "compile_seconds": steps[0] if compiled else None,
        "decode_tok_s": args.batch_size * n / decode, "step_ms_mean": 1000 * decode / n,
        "step_ms": [round(1000 * x, 2) for x in steps],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "device": str(device),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if bounded:
        st = cache.stats()
        rec.update(settings=cache.settings(), gates=None if used is None else used.ref())
        rec.update(allocated_kv_bytes=st.allocated_kv_bytes, budget_scope=st.budget_scope)
        rec.update(peak_kv_bytes=st.peak_kv_bytes, peak_tokens_per_head=st.peak_tokens_per_head,
                   full_kv_bytes=st.full_kv_bytes,
                   scoring_share=cache.timings["scoring_inputs"] / sum(steps),
                   bookkeeping_share=cache.timings["cache_bookkeeping"] / sum(steps),
                   evict_share=cache.timings["evict"] / sum(steps))
        if random_fill:  # it saw fewer tokens than the context it stands for
            seen = args.length + args.decode_tokens
            rec["full_kv_bytes"] = args.batch_size * full_kv_bytes_per_row(model, seen, dtype)
    else:
        kv = stored_kv_bytes(cache)
        rec.update(peak_kv_bytes=kv, peak_tokens_per_head=int(cache.get_seq_length()),
                   full_kv_bytes=kv, scoring_share=0.0, bookkeeping_share=0.0,
                   evict_share=0.0)
    rec["ideal_speedup"] = ideal_speedup(rec)
    return rec


def full_kv_bytes_per_row(model, context: int, dtype) -> int:
    """Bytes of every K/V the full cache holds for one sequence of ``context`` tokens."""
    import torch

    from kvbound.architectures import model_fingerprint

    fp = model_fingerprint(model)
    layers = model.config.get_text_config().num_hidden_layers
    per_token = 2 * fp["num_kv_heads"] * fp["head_dim"] * torch.empty(0, dtype=dtype).element_size()
    return layers * per_token * context


def fill_full(model, batch: int, context: int, dtype, device):
    """A DynamicCache holding ``context`` random keys/values per layer and row."""
    import torch
    from transformers import DynamicCache

    from kvbound.architectures import model_fingerprint

    fp = model_fingerprint(model)
    cache = DynamicCache(config=model.config)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, fp["num_kv_heads"], context, fp["head_dim"])
    for layer in range(model.config.get_text_config().num_hidden_layers):
        k = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        v = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        cache.update(k, v, layer)
    return cache


def fill_bounded(model, method: str, *, budget: int, buffer: int, chunk: int, context: int,
                 gates=None, **cache_kwargs):
    """One row of random tokens prefilled through the real bounded cache in chunks until it is
    full and has taken one more whole chunk (or ``context`` tokens if fewer): its resident tokens,
    peak, layout and policy state are those of any longer context. ``gates`` as for
    ``build_cache`` (``cache_kwargs`` too, e.g. ``budget_scope``). Returns ``(cache, gates used,
    sinks)``."""
    import torch

    from kvbound.generation import build_cache

    cache, used, sinks = build_cache(model, method, budget=budget, buffer=buffer, gates=gates,
                                     **cache_kwargs)
    n = min(context, (-(-(budget + buffer) // chunk) + 1) * chunk)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (1, n),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        for s in range(0, n, chunk):
            model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1)
    return cache, used, sinks


def ideal_speedup(rec: dict) -> float:
    """The memory-bandwidth limit of the decode speed-up over the full cache: bytes a step must
    read with the full cache (weights + every K/V) over bytes with this cache (weights + its
    resident K/V), at the end of the run. 1.0 for the full cache."""
    w = rec["weight_bytes"]
    return (w + rec["full_kv_bytes"]) / (w + rec["peak_kv_bytes"])


def median_run(recs: list[dict]) -> dict:
    """The run with the median decode speed (the lower one of an even count: a real run), with
    every run's decode tok/s attached."""
    ordered = sorted(recs, key=lambda r: r["decode_tok_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["decode_tok_s_runs"] = [round(r["decode_tok_s"], 2) for r in ordered]
    return median


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--model-config", default=None,
                    help="random weights from a real config (shipped name or config.json)")
    ap.add_argument("--batch-size", type=int, default=1, help="rows decoded together")
    ap.add_argument("--gates", default=None)
    ap.add_argument("--methods", default="full,trimkv,streaming,knorm,snapkv,h2o,tova")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk for bounded methods")
    ap.add_argument("--full-chunk", type=int, default=4096, help="prefill chunk, full cache")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per configuration (methods alternate); the median run is reported")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--fill", choices=("prefill", "random"), default="prefill",
                    help="how the cache reaches the prompt length: 'prefill' runs the prompt "
                         "through the model; 'random' (decode speed at large sizes) gives the "
                         "full cache random K/V of that length and prefills a bounded cache only "
                         "until it has evicted, then repeats it to the batch")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--plot-name", default="speed_step_latency.png",
                    help="file name of the step-latency plot under --plot-dir")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    return ap


#: settings every worker takes (``parser``'s defaults where a caller's dict lacks one)
WORKER_SETTINGS = ("budget", "buffer", "chunk", "full_chunk", "decode_tokens", "warmup", "dtype",
                   "batch_size", "device", "model_config", "model", "gates", "fill")


def worker_command(settings: dict, method: str, length: int) -> list[str]:
    """The command line of one worker process (one method at one prompt length); ``settings``
    holds :data:`WORKER_SETTINGS` (missing or ``None``: the parser's default)."""
    cmd = [sys.executable, "-m", "kvbound.bench", "--worker", "--method", method, "--length",
           str(length)]
    for name in WORKER_SETTINGS:
        if settings.get(name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(settings[name])]
    return cmd


def run_bench(args: argparse.Namespace, meta: dict | None = None) -> dict | None:
    """Run the sweep described by ``args`` (see :func:`parser`); returns the result dict, with
    ``meta`` (e.g. the command and machine that produced it) merged in before it is saved."""
    if args.worker:
        print(json.dumps(worker(args)))
        return None
    records = []
    for length in [int(x) for x in args.lengths.split(",")]:
        runs: dict[str, list] = {}
        for method in [m for _ in range(args.repeats) for m in args.methods.split(",")]:
            out = subprocess.run(worker_command(vars(args), method, length), capture_output=True,
                                 text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker failed: {method} L={length}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(method, []).append(rec)
            print(f"{method:10s} L={length:6d} prefill {_prefill_cell(rec):>8s} tok/s  decode "
                  f"{rec['decode_tok_s']:6.1f} tok/s  KV {rec['peak_kv_bytes'] / 1e6:7.2f} MB  "
                  f"RSS {rec['peak_rss_mb']:7.0f} MB", flush=True)
        records.extend(median_run(recs) for recs in runs.values())
    result = {"records": records, "args": {k: v for k, v in vars(args).items()
                                           if k not in ("worker", "method", "length")}}
    result |= meta or {}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot_dir:
        plot(result, Path(args.plot_dir) / args.plot_name)
    return result


def render(result: dict, command: str = "", machine: str = "", title: str = "",
           image: str | None = "speed_step_latency.png", rendered_by: str = "") -> str:
    """The results section; ``image``: the step-latency plot's file under docs/img (or none);
    ``rendered_by``: the command that re-rendered a saved run, named beside the one that ran it."""
    recs = result["records"]
    a = result["args"]
    where = a.get("model_config") and f"random-weight {a['model_config']} config" or "embedded model"
    device = a.get("device", "cpu")
    gpu = any(r.get("peak_gpu_mb") for r in recs)
    lines = [
        f"## {title or 'Speed and memory'} ({where}, {device.upper()}, batch "
        f"{a.get('batch_size', 1)})",
        "",
        f"Command: `{command}`"
        + (f" (rendered from its JSON by `{rendered_by}`)" if rendered_by else "") + "  ",
        f"Machine: {machine}  ",
        f"Bounded methods: M={a['budget']}, buffer {a['buffer']}, prefill chunk {a['chunk']}; "
        + (f"full cache prefilled in chunks of {a['full_chunk']}; " if a.get("fill") != "random"
           else "caches filled without a full prefill (`--fill random`: the full cache holds "
                "random K/V of the prompt length; a bounded cache is prefilled with random tokens "
                "until it has evicted, then repeated to the batch; its decode reads the same "
                "resident tokens as after the whole prompt; prefill speed not measured); ")
        + f"{a['decode_tokens']} decode steps "
        f"({a['warmup']} warm-up steps excluded); dtype {a['dtype']}; "
        f"{a.get('repeats', 1)} run(s) per configuration, methods alternating, median run shown.",
        "",
        "| method | prompt tokens | prefill tok/s | decode tok/s | decode vs full* | ideal** "
        f"| peak KV MB | peak {'GPU' if gpu else 'RSS'} MB | gates/queries share "
        "| eviction+mask share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = {(r["length"], r.get("compiled", False)): r for r in recs
            if r["method"].partition("+")[0] == "full"}
    for r in recs:
        ref = full.get((r["length"], r.get("compiled", False)))
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else ""
        lines.append(
            f"| {r['method']} | {r['length']} | {_prefill_cell(r)} | {_decode_cell(r)}"
            f" | {ratio} | {_ideal(r)} | {r['peak_kv_bytes'] / 1e6:.2f} | "
            f"{r['peak_gpu_mb'] if gpu else r['peak_rss_mb']:.0f} | "
            f"{100 * r['scoring_share']:.1f}% | {100 * r['bookkeeping_share']:.1f}% |")
    lines.append("")
    lines.append("\\* against the full cache in the same mode (eager, or +compile: torch.compile "
                 "on a static cache; the first, compiling step is a warm-up step).  ")
    lines.append("\\** the memory-bandwidth limit of that speed-up: bytes a decode step reads with "
                 "the full cache (weights + all K/V) over bytes with this one (weights + resident "
                 "K/V), at the last step.")
    comp = [r for r in recs if r.get("compiled")]
    if comp:
        lines.append("")
        for r in comp:
            eager = next((e for e in recs if e["method"] == r["method"].partition("+")[0]
                          and e["length"] == r["length"] and not e.get("compiled")), None)
            vs = (f", {r['decode_tok_s'] / eager['decode_tok_s']:.2f}x its eager decode"
                  if eager else "")
            lines.append(f"- {r['method']} L={r['length']}: compiled in "
                         f"{r['compile_seconds']:.1f} s (first decode step){vs}")
    full = {length: r for (length, c), r in full.items() if not c}
    tk = {r["length"]: r for r in recs if r["method"] == "trimkv"}
    st = {r["length"]: r for r in recs if r["method"] == "streaming"}
    if tk and st:
        lines.append("")
        for length in sorted(tk):
            if length in st:
                lines.append(
                    f"- L={length}: TRIM-KV step {tk[length]['step_ms_mean']:.1f} ms vs "
                    f"StreamingLLM {st[length]['step_ms_mean']:.1f} ms "
                    f"({100 * (tk[length]['step_ms_mean'] / st[length]['step_ms_mean'] - 1):+.1f}%)"
                    + (f"; vs full {full[length]['step_ms_mean']:.1f} ms" if length in full else "")
                    + _of_ideal(tk[length], full.get(length)))
        kv = [tk[length]["peak_kv_bytes"] for length in sorted(tk)]
        lines.append(f"- TRIM-KV peak KV bytes over lengths {sorted(tk)}: "
                     f"{', '.join(f'{x / 1e6:.2f} MB' for x in kv)}")
    lines.extend(_scope_lines(recs))
    cost = _kv_cost_line(list(full.values()))
    if cost:
        lines.append(cost)
    if image:
        lines.append("")
        lines.append(f"![decode step latency vs position](img/{image})")
    return "\n".join(lines)


def _scope_lines(recs: list[dict]) -> list[str]:
    """A method run with a shared budget (``METHOD@layer`` / ``METHOD@global``, issue 18) against
    the same method per head at each length: step time and the KV bytes held and allocated."""
    head = {(r["method"], r["length"]): r for r in recs if "@" not in r["method"]}
    out = []
    for r in recs:
        name, plus, mode = r["method"].partition("+")
        base, at, _scope = name.partition("@")
        ref = head.get((base + plus + mode, r["length"]))
        if not at or ref is None:
            continue
        out.append(
            f"- L={r['length']}: {r['method']} step {r['step_ms_mean']:.1f} ms vs {ref['method']} "
            f"(per head) {ref['step_ms_mean']:.1f} ms "
            f"({100 * (r['step_ms_mean'] / ref['step_ms_mean'] - 1):+.1f}%); peak KV "
            f"{r['peak_kv_bytes'] / 1e6:.2f} vs {ref['peak_kv_bytes'] / 1e6:.2f} MB, allocated "
            f"{r.get('allocated_kv_bytes', 0) / 1e6:.2f} vs "
            f"{ref.get('allocated_kv_bytes', 0) / 1e6:.2f} MB")
    return [""] + out if out else []


def _kv_cost_line(fulls: list[dict]) -> str:
    """What 1K cached tokens cost a full-cache decode step, against reading their K/V.

    A straight line through the shortest and longest full-cache runs splits a step into a fixed
    part (weights and the rest) and a part per cached token. Reading the K/V of those tokens at
    the rate the fixed part reads the weights is what the ideal column assumes; when the measured
    cost per token is far above it, attention is compute-bound on this machine and a bounded cache
    saves more than that ideal (empty with fewer than two lengths).
    """
    fulls = sorted(fulls, key=lambda r: r["length"])
    if len(fulls) < 2 or fulls[-1]["length"] == fulls[0]["length"]:
        return ""
    a, b = fulls[0], fulls[-1]
    tokens = b["peak_tokens_per_head"] - a["peak_tokens_per_head"]
    per_1k = 1000 * (b["step_ms_mean"] - a["step_ms_mean"]) / tokens
    fixed_ms = a["step_ms_mean"] - per_1k * a["peak_tokens_per_head"] / 1000
    if per_1k <= 0 or fixed_ms <= 0:
        return (f"- Full cache: step {a['step_ms_mean']:.1f} ms at L={a['length']}, "
                f"{b['step_ms_mean']:.1f} ms at L={b['length']} (no per-token cost to fit)")
    rate = a["weight_bytes"] / (fixed_ms / 1000)  # bytes/s the fixed part reads weights at
    kv_1k = 1000 * (b["peak_kv_bytes"] - a["peak_kv_bytes"]) / tokens
    read_ms = 1000 * kv_1k / rate
    ratio = per_1k / read_ms
    verdict = ("attention is compute-bound here, so shrinking the cache saves more than the "
               "bandwidth ideal" if ratio > 2 else
               "attention is close to memory-bound, as the ideal column assumes")
    return (f"- Full cache: each 1K cached tokens adds {per_1k:.1f} ms to a step (line through "
            f"L={a['length']} and L={b['length']}; fixed part {fixed_ms:.0f} ms), {ratio:.1f}x "
            f"the {read_ms:.1f} ms that reading their {kv_1k / 1e6:.1f} MB of K/V takes at the "
            f"rate the fixed part reads the weights ({rate / 1e9:.1f} GB/s): {verdict}")


def _of_ideal(r: dict, full: dict | None) -> str:
    """``; speed-up 2.1x = 0.91 of its ideal 2.3x`` (empty without a full-cache run)."""
    if full is None or "ideal_speedup" not in r:
        return ""
    got = r["decode_tok_s"] / full["decode_tok_s"]
    ideal = r["ideal_speedup"]
    return f"; speed-up {got:.2f}x = {got / ideal:.2f} of its ideal {ideal:.2f}x"


def _ideal(r: dict) -> str:
    if "ideal_speedup" not in r:  # results written before it was recorded
        return ""
    return f"{r['ideal_speedup']:.2f}x"


def _prefill_cell(r: dict) -> str:
    return "-" if r.get("prefill_tok_s") is None else f"{r['prefill_tok_s']:.0f}"


def _decode_cell(r: dict) -> str:
    runs = r.get("decode_tok_s_runs") or []
    spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
    return f"{r['decode_tok_s']:.1f}{spread}"


def plot(result: dict, path: Path) -> None:
    """Decode step latency and peak KV bytes against the prompt length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in recs):
        rs = sorted((r for r in recs if r["method"] == method), key=lambda r: r["length"])
        axes[0].plot([r["length"] for r in rs], [r["step_ms_mean"] for r in rs], "-o",
                     label=method)
        axes[1].plot([r["length"] for r in rs], [r["peak_kv_bytes"] / 1e6 for r in rs], "-o",
                     label=method)
    for ax, ylabel in ((axes[0], "decode step (ms)"), (axes[1], "peak KV cache (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in context when decoding")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run_bench(parser().parse_args())
