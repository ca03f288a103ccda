"""Speed and memory sweep on the embedded model; writes the "speed" section of docs/RESULTS.md.

    python benchmarks/speed.py --lengths 1024,4096,16384 --write-results
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.bench import parser, render, run_bench  # noqa: E402

if __name__ == "__main__":
    ap = parser()
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    if args.write_results and not args.plot_dir:
        args.plot_dir = str(Path(__file__).resolve().parents[1] / "docs" / "img")
    result = run_bench(args)
    md = render(result, command(), machine())
    print(md)
    if args.write_results:
        write_section("speed", md)
