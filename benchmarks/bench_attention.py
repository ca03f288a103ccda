"""Benchmark the retention-gated attention implementations (speed and peak memory, CPU).

Each configuration runs in a fresh subprocess so that its peak resident memory can be measured:
``peak_extra_mb`` = max RSS during the measured runs minus the RSS after the inputs were created
(glibc returns large blocks to the OS, so this tracks the transient working set well).

Modes:
* ``fwd_bwd``: forward + backward with gradients for query, key, value and log_beta.
* ``fwd``: forward under ``torch.no_grad()`` (the only mode FlexAttention supports on CPU).

Timing: ``time_s_min`` is the best wall time over ``--reps`` runs and ``cpu_s_min`` the best process
CPU time (summed over threads). On a shared, oversubscribed machine (see ``loadavg_1min``) wall
times with 2 threads are dominated by OpenMP barrier waits for descheduled threads; the 1-thread CPU
times are then the reliable comparison between implementations.

Implementations: ``blockwise`` / ``sdpa`` / ``flex`` (kvbound.train.attention), ``naive`` (materialises
the full fp32 scores), ``vanilla_sdpa`` (plain causal SDPA without the retention bias; reference
for the cost of the teacher's attention).

Usage::

    python benchmarks/bench_attention.py                   # default grid, JSON on stdout
    python benchmarks/bench_attention.py --seq-lens 1024 --impls blockwise sdpa --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE = {"batch": 1, "q_heads": 9, "kv_heads": 3, "head_dim": 64}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from kvbound.train.attention import (
        DEFAULT_BLOCK_SIZE,
        naive_retention_attention,
        retention_attention,
    )

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    b, hq, hkv, d = SHAPE["batch"], SHAPE["q_heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    t = cfg["seq_len"]
    grad = cfg["mode"] == "fwd_bwd"
    q = torch.randn(b, hq, t, d, requires_grad=grad)
    k = torch.randn(b, hkv, t, d, requires_grad=grad)
    v = torch.randn(b, hkv, t, d, requires_grad=grad)
    log_beta = (-0.05 * torch.rand(b, hkv, t)).requires_grad_(grad)
    go = torch.randn(b, hq, t, d)
    impl = cfg["impl"]

    def attn():
        if impl == "naive":
            return naive_retention_attention(q, k, v, log_beta)
        if impl == "vanilla_sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        bs = cfg["block_size"] or DEFAULT_BLOCK_SIZE
        return retention_attention(q, k, v, log_beta, block_size=bs, impl=impl)

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["dtype"] == "bf16" else _Null()
        if grad:
            with ctx:
                out = attn()
            (out.float() * go).sum().backward()
            for x in (q, k, v, log_beta):
                x.grad = None
        else:
            with torch.no_grad(), ctx:
                attn()

    t0 = time.perf_counter()
    step()  # warm-up (and compile for flex)
    first_s = time.perf_counter() - t0
    base = _rss_mb()
    times, cpu = [], []
    for _ in range(cfg["reps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        **cfg,
        "first_call_s": round(first_s, 3),
        "time_s_median": round(statistics.median(times), 4),
        "time_s_min": round(min(times), 4),
        "cpu_s_min": round(min(cpu), 4),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "peak_extra_mb": round(max(_peak_mb() - base, 0.0), 1),
    }


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument(
        "--impls", nargs="+", default=["blockwise", "sdpa", "flex", "naive", "vanilla_sdpa"]
    )
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--sdpa-block-sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts"
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    import torch

    from kvbound.train.attention import DEFAULT_BLOCK_SIZE

    configs = []
    for th, t in ((th, t) for th in args.threads for t in args.seq_lens):
        for dt in args.dtypes:
            for impl in args.impls:
                modes = ["fwd"] if impl == "flex" else ["fwd_bwd"]
                if impl in ("blockwise", "vanilla_sdpa"):
                    modes = ["fwd_bwd", "fwd"]
                sizes = {"blockwise": args.block_sizes, "sdpa": args.sdpa_block_sizes}.get(
                    impl, [None]
                )
                for mode in modes:
                    for bs in sizes:
                        if mode == "fwd" and bs not in (None, DEFAULT_BLOCK_SIZE):
                            continue
                        configs.append(
                            {
                                "impl": impl,
                                "mode": mode,
                                "dtype": dt,
                                "seq_len": t,
                                "block_size": bs,
                                "reps": args.reps,
                                "threads": th,
                            }
                        )
    results = []
    for cfg in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({**cfg, "error": f"timeout after {args.timeout}s"})
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results.append({**cfg, "error": err[:300]})
        else:
            results.append(json.loads(lines[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    out = {
        "benchmark": "retention_attention",
        "shape": SHAPE,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "results": results,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
