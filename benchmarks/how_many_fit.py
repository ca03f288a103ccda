"""How many sequences fit: at a fixed KV memory limit and context length, the largest batch each
method holds, and the aggregate decode throughput of that batch (issue 20).

Per method, the KV bytes one sequence needs at that context: the full cache holds every token
(layers x 2 x KV heads x head dim x context x element size); a bounded cache allocates a fixed
capacity per layer and KV head (budget + buffer + the prefill chunk, kept while decoding),
measured on a real cache after a chunked prefill. The largest batch is ``limit // per-sequence bytes`` (``--max-batch`` caps what is
decoded on a small machine; the table then says so). That batch then decodes ``--decode-tokens``
tokens (greedy) and the aggregate tok/s is timed. Each method runs in its own subprocess (peak RSS
per method).

How the caches are filled (decode cost depends on how many tokens are resident and how they are
laid out, not on their values): the full cache gets random keys/values of the context length per
layer (prefilling 32K tokens x batch through a 1B model would take hours on 2 CPU cores);
a bounded cache prefills one row of random tokens through the real cache until it has evicted
(budget + buffer + one chunk), and is then repeated to the batch (``batch_repeat_interleave``),
so its policy state is real. Weights are random (``--model-config``: a real architecture's
config), as in ``kvbound bench``.

    python benchmarks/how_many_fit.py --write-results                      # CPU, 4 GB of KV
    python benchmarks/how_many_fit.py --device cuda --kv-limit-gb 16 --model-config qwen3-4b \\
        --dtype bfloat16 --json runs/how_many_fit_gpu.json                  # one GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, publish, run_worker  # noqa: E402

from kvbound.bench import fill_bounded, fill_full, full_kv_bytes_per_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3


def worker(args) -> dict:
    import torch

    from kvbound.cache import EvictionCache, stored_kv_bytes
    from kvbound.gates import RetentionGates
    from kvbound.models.random_config import random_model
    from kvbound.policies import POLICIES

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    model = random_model(args.model_config, dtype=dtype, seed=0, device=device)
    limit = int(args.kv_limit_gb * GB)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.method == "full":
        per_row = full_kv_bytes_per_row(model, args.context, dtype)
        fits = limit // per_row
        batch = min(fits, args.max_batch or fits)
        cache = fill_full(model, batch, args.context, dtype, device) if batch else None
    else:
        gates = RetentionGates.for_model(model, seed=0).to(device) \
            if POLICIES[args.method].needs_gates else None
        cache, _, _ = fill_bounded(model, args.method, budget=args.budget, buffer=args.buffer,
                                   chunk=args.chunk, context=args.context, gates=gates)
        per_row = stored_kv_bytes(cache)  # allocated, one row
        fits = limit // per_row
        batch = min(fits, args.max_batch or fits)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
    rec = {"method": args.method, "context": args.context, "kv_limit_gb": args.kv_limit_gb,
           "per_row_kv_bytes": per_row, "fits": fits, "batch": batch,
           "capped": batch < fits, "dtype": args.dtype, "device": args.device,
           "model": args.model_config, "weight_bytes": weights,
           "budget": None if args.method == "full" else args.budget,
           "buffer": None if args.method == "full" else args.buffer}
    if batch == 0:
        return rec | {"decode_tok_s": 0.0, "step_ms_mean": None, "kv_bytes": 0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    nxt = torch.full((batch, 1), 5, dtype=torch.long, device=device)
    steps = []
    with torch.no_grad():
        for _ in range(args.decode_tokens):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t)
    timed = steps[args.warmup:]
    kv = stored_kv_bytes(cache)
    if isinstance(cache, EvictionCache):
        cache.check_numerics()
    rec.update(decode_tok_s=batch * len(timed) / sum(timed),
               step_ms_mean=1000 * sum(timed) / len(timed), kv_bytes=kv,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def run(args) -> dict:
    records = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", "--method", method]
        for name in ("model_config", "context", "kv_limit_gb", "budget", "buffer", "chunk",
                     "decode_tokens", "warmup", "dtype", "device", "max_batch"):
            value = getattr(args, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        rec = run_worker(cmd, method)
        records.append(rec)
        print(f"{method:10s} fits {rec['fits']:5d} (decoded {rec['batch']})  "
              f"{rec['decode_tok_s']:8.1f} tok/s  KV {rec['kv_bytes'] / GB:6.2f} GB", flush=True)
    return {"records": records, "command": command(), "machine": machine(),
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "method")}}


def render(res: dict) -> str:
    a = res["args"]
    recs = res["records"]
    full = next((r for r in recs if r["method"] == "full"), None)
    lines = [
        f"## How many sequences fit ({a['kv_limit_gb']:g} GB of KV, {a['context']} tokens of "
        f"context, random-weight {a['model_config']} config, {a['dtype']}, {a['device']})",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        f"Bounded caches: M={a['budget']}, buffer {a['buffer']}; {a['decode_tokens']} decode "
        f"steps, {a['warmup']} warm-up steps excluded. Full cache filled with random K/V of the "
        "context length; bounded caches prefilled one row through the real cache until it "
        "evicted, then repeated to the batch (benchmarks/how_many_fit.py explains why).",
        "",
        "| method | KV per sequence MB | sequences that fit | batch decoded | KV held GB "
        "| aggregate decode tok/s | vs full cache | step ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        vs = (f"{r['decode_tok_s'] / full['decode_tok_s']:.1f}x" if full and full["decode_tok_s"]
              and r is not full else "")
        step = f"{r['step_ms_mean']:.0f}" if r["step_ms_mean"] else "-"
        capped = " (capped)" if r["capped"] else ""
        lines.append(
            f"| {r['method']} | {r['per_row_kv_bytes'] / 2**20:.1f} | {r['fits']} | "
            f"{r['batch']}{capped} | {r['kv_bytes'] / GB:.2f} | {r['decode_tok_s']:.1f} | {vs} | "
            f"{step} | {r['peak_rss_mb']:.0f} |")
    if any(r["capped"] for r in recs):
        lines += ["", f"(capped): more fit than `--max-batch {a['max_batch']}`, the batch this "
                  "machine decoded; the throughput is that batch's."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="llama-3.2-1b")
    ap.add_argument("--methods", default="full,trimkv,streaming,snapkv")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--kv-limit-gb", type=float, default=4.0)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk of the bounded fill")
    ap.add_argument("--decode-tokens", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="decode at most this many rows (a small machine); the table says so")
    ap.add_argument("--json", default=str(ROOT / "runs" / "how_many_fit.json"))
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.warmup >= args.decode_tokens:
        raise SystemExit("--warmup must be smaller than --decode-tokens")
    res = run(args)
    publish(res, args.json, "how-many-fit", render, args.write_results)


if __name__ == "__main__":
    main()
