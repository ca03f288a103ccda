"""Issue check: 1000 new tokens with TRIM-KV (M=64, b=16) vs the full cache, via the CLI.

    python benchmarks/long_generation.py --write-results

Runs `kvbound generate ... --json` for both methods with the same prompt and greedy decoding
(min-new-tokens = max-new-tokens so both decode exactly the same number of tokens) and records
peak tokens per head, KV bytes and decode speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

PROMPT = "Write a very long story about a lighthouse keeper and a storm, with many details."


def run(method: str, args) -> dict:
    cmd = [str(Path(sys.executable).parent / "kvbound"), "generate", "--prompt", PROMPT,
           "--method", method, "--budget", str(args.budget), "--buffer", str(args.buffer),
           "--max-new-tokens", str(args.new), "--min-new-tokens", str(args.new), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
    rec["cli"] = " ".join(cmd[1:4]) + f" ... --method {method}"
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per method")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    recs = [run(m, args) for _ in range(args.repeats) for m in ("full", "trimkv")]
    lines = [
        "## Long generation: 1000 new tokens, TRIM-KV (M=64, b=16) vs full cache",
        "",
        f"Command: `{command()}` (each run is `kvbound generate --prompt ... --method METHOD "
        f"--budget {args.budget} --buffer {args.buffer} --max-new-tokens {args.new} "
        f"--min-new-tokens {args.new} --json`; methods alternate, {args.repeats} runs each)  ",
        f"Machine: {machine()}",
        "",
        "| run | method | new tokens | seen | peak tokens/head | peak KV MB | full KV MB | "
        "evictions | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(recs):
        lines.append(f"| {i + 1} | {r['method']} | {r['new_tokens']} | {r['seen_tokens']} | "
                     f"{r['peak_tokens_per_head']} | {r['peak_kv_bytes'] / 1e6:.2f} | "
                     f"{r['full_kv_bytes'] / 1e6:.2f} | {r['evictions']} | "
                     f"{r['decode_tokens_per_second']:.1f} |")
    full = [r["decode_tokens_per_second"] for r in recs if r["method"] == "full"]
    tk = [r["decode_tokens_per_second"] for r in recs if r["method"] == "trimkv"]
    lines.append("")
    lines.append(f"Mean decode speed: TRIM-KV {sum(tk) / len(tk):.1f} tok/s, full cache "
                 f"{sum(full) / len(full):.1f} tok/s (ratio {sum(tk) / sum(full):.2f}).")
    md = "\n".join(lines)
    print(md)
    if args.write_results:
        write_section("long-generation", md)


if __name__ == "__main__":
    main()
