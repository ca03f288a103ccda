"""bf16 vs fp32 on CPU for the embedded model: decode speed (eager and compiled) and fidelity
(issue 20).

Speed: ``kvbound bench`` workers (one process per configuration) for full and trimkv, eager and
``+compile``, in float32 and bfloat16, at one prompt length. Fidelity: held-out windows
(``eval_text_pool``) teacher-forced through the full cache and through TRIM-KV (decode protocol,
the shipped gates and their sinks) in both dtypes; every KL is against the fp32 full cache, so
"bf16 full" is what bf16 alone costs and "bf16 trimkv" vs "fp32 trimkv" says whether bf16 adds to
the compression's error. The CPU's native bf16 support (AVX512-BF16, AMX) is recorded: without
it bf16 matmuls are emulated and slower.

    python benchmarks/cpu_dtype.py --write-results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, publish, run_worker  # noqa: E402

from kvbound.bench import worker_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def hardware() -> dict:
    import torch

    return {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "capability": torch.backends.cpu.get_cpu_capability()}


def speed(args) -> list[dict]:
    recs = []
    for dtype in DTYPES:
        for method in args.methods.split(","):
            settings = {"budget": args.budget, "buffer": args.buffer, "chunk": 512,
                        "full_chunk": 4096, "decode_tokens": args.decode_tokens,
                        "warmup": args.warmup, "dtype": dtype}
            rec = run_worker(worker_command(settings, method, args.length), f"{method} {dtype}")
            recs.append(rec)
            print(f"{method:16s} {dtype:9s} decode {rec['decode_tok_s']:6.1f} tok/s  prefill "
                  f"{rec['prefill_tok_s']:7.0f} tok/s", flush=True)
    return recs


def fidelity(args) -> dict:
    import torch

    from kvbound.eval.fidelity import bounded_logprobs, compare, full_logprobs, make_windows
    from kvbound.eval.stats import bootstrap_mean_ci
    from kvbound.eval.textpool import eval_text_pool
    from kvbound.generation import build_cache
    from kvbound.models import load_model

    ref_model, tok = load_model(None, dtype=torch.float32)
    # the pool's paragraphs are short: windows run across them, as in the fidelity sweep
    windows = make_windows(tok, [("pydoc-eval-half", "\n\n".join(eval_text_pool()))],
                           args.seq_len, max_windows=args.windows)
    models = {"float32": ref_model, "bfloat16": load_model(None, dtype=torch.bfloat16)[0]}
    start = args.budget + args.buffer
    per = {f"{d} {m}": [] for d in DTYPES for m in ("full", "trimkv")}
    sinks_used = None
    for w in windows:
        ids = w.ids[None]
        ref = full_logprobs(ref_model, ids)[0, start:]
        for dtype, model in models.items():
            full = full_logprobs(model, ids)[0, start:]
            per[f"{dtype} full"].append(compare(ref, full, w.ids, start))
            cache, gates, sinks_used = build_cache(model, "trimkv", budget=args.budget,
                                                   buffer=args.buffer)
            ours = bounded_logprobs(model, ids, cache, protocol="decode", buffer=args.buffer,
                                    keep_from=start)[0]
            gates.detach(model)
            per[f"{dtype} trimkv"].append(compare(ref, ours, w.ids, start))
        print(f"window {len(per['float32 full'])}/{len(windows)}", flush=True)

    def mean_ci(values):
        lo, hi = bootstrap_mean_ci(values)
        return {"mean": sum(values) / len(values), "lo": lo, "hi": hi}

    rows = {}
    for name, vals in per.items():
        kl = [v["kl"] for v in vals]
        top1 = [v["top1"] for v in vals]
        rows[name] = {"kl": mean_ci(kl), "top1": mean_ci(top1), "kl_per_window": kl}
    return {"rows": rows, "windows": len(windows), "seq_len": args.seq_len,
            "budget": args.budget, "buffer": args.buffer, "sinks": sinks_used,
            "sources": sorted({w.source for w in windows})}


def render(res: dict) -> str:
    hw, a, fid = res["hardware"], res["args"], res["fidelity"]
    lines = [
        "## bf16 vs fp32 on CPU (embedded model)", "",
        f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
        f"Native bf16 on this CPU: AVX512-BF16 {'yes' if hw['avx512_bf16'] else 'no'}, AMX "
        f"{'yes' if hw['amx'] else 'no'} (ATen capability {hw['capability']}).", "",
        f"Speed: prompt {a['length']} tokens, M={a['budget']}, buffer {a['buffer']}, "
        f"{a['decode_tokens']} decode steps ({a['warmup']} warm-up excluded).", "",
        "| method | fp32 decode tok/s | bf16 decode tok/s | bf16 / fp32 | fp32 prefill tok/s "
        "| bf16 prefill tok/s |", "|---|---|---|---|---|---|"]
    by = {(r["method"], r["dtype"]): r for r in res["speed"]}
    for method in dict.fromkeys(r["method"] for r in res["speed"]):
        f, b = by[(method, "float32")], by[(method, "bfloat16")]
        lines.append(f"| {method} | {f['decode_tok_s']:.1f} | {b['decode_tok_s']:.1f} | "
                     f"{b['decode_tok_s'] / f['decode_tok_s']:.2f}x | {f['prefill_tok_s']:.0f} | "
                     f"{b['prefill_tok_s']:.0f} |")
    lines += ["", f"Fidelity: {fid['windows']} held-out windows of {fid['seq_len']} tokens "
              f"({', '.join(fid['sources'])}); KL against the fp32 full cache over positions past "
              f"M + buffer; TRIM-KV M={fid['budget']}, buffer {fid['buffer']}, sinks "
              f"{fid['sinks']}, decode protocol. Mean [95% CI].", "",
              "| run | KL vs fp32 full | top-1 agreement |", "|---|---|---|"]
    for name, row in fid["rows"].items():
        kl, t1 = row["kl"], row["top1"]
        lines.append(f"| {name} | {kl['mean']:.4f} [{kl['lo']:.4f}, {kl['hi']:.4f}] | "
                     f"{t1['mean']:.3f} [{t1['lo']:.3f}, {t1['hi']:.3f}] |")
    lines += ["", verdict(res)]
    return "\n".join(lines)


def verdict(res: dict) -> str:
    """The rule for the CPU default: bf16 only if it decodes faster (eager, both methods),
    prefills no slower, and its TRIM-KV KL is within 5% of fp32's. Without native bf16 the
    prefill's matmuls are emulated: decoding (memory-bound) gains, the prompt (compute-bound)
    loses, so which is faster depends on the workload and the default stays float32."""
    by = {(r["method"], r["dtype"]): r for r in res["speed"]}
    eager = [m for m in ("full", "trimkv") if (m, "float32") in by]

    def ratio(key, m):
        return by[(m, "bfloat16")][key] / by[(m, "float32")][key]

    decode = min(ratio("decode_tok_s", m) for m in eager)
    prefill = min(ratio("prefill_tok_s", m) for m in eager)
    rows = res["fidelity"]["rows"]
    same = rows["bfloat16 trimkv"]["kl"]["mean"] <= 1.05 * rows["float32 trimkv"]["kl"]["mean"]
    quality = f"TRIM-KV KL {'within' if same else 'more than'} 5% of fp32's"
    if decode > 1 and prefill >= 1 and same:
        return (f"Verdict: bf16 decodes faster ({decode:.2f}x or more) and prefills no slower "
                f"here at equal quality ({quality}); on CPUs like this one it should be the "
                "default, and is: `generate` and `demo` take `--dtype auto`, bf16 where the CPU "
                "has AVX512-BF16 or AMX.")
    if decode > 1 and same:
        return (f"Verdict: the CPU default stays float32 here: bf16 decodes faster "
                f"({decode:.2f}x or more) at equal quality ({quality}) but prefills at "
                f"{prefill:.2f}x fp32's speed (no native bf16 matmuls), so it wins only when "
                "many tokens are generated per prompt token; pass `--dtype bfloat16` for long "
                "generations from short prompts. Re-run on a CPU with AMX before changing the "
                "default there.")
    return (f"Verdict: the CPU default stays float32 here (bf16 eager decode "
            f"{'faster' if decode > 1 else 'slower'}, {quality}). Re-run on a CPU with AMX, "
            "where bf16 matmuls are native, before changing it there.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="full,trimkv,full+compile,trimkv+compile")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--json", default=str(ROOT / "runs" / "cpu_dtype.json"))
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--from-json", action="store_true", help="re-render the saved --json run")
    args = ap.parse_args()
    if args.from_json:
        publish(json.loads(Path(args.json).read_text()), args.json, "cpu-dtype", render,
                args.write_results)
        return
    fid = fidelity(args)  # first: a failure there does not waste the speed runs
    res = {"hardware": hardware(), "speed": speed(args), "fidelity": fid,
           "args": vars(args), "command": command(), "machine": machine()}
    publish(res, args.json, "cpu-dtype", render, args.write_results)


if __name__ == "__main__":
    main()
