"""Speed and memory sweep (``kvbound bench``); writes a section of docs/RESULTS.md ("speed" by
default: the embedded model; ``--section`` names another, e.g. for a random-weight config).

    python benchmarks/speed.py --lengths 1024,4096,16384 --write-results
    python benchmarks/speed.py --model-config llama-3.2-1b --fill random --section speed-llama-1b \
        --title "Decode speed at 1B" --write-results
    python benchmarks/speed.py --from-json runs/speed.json --section speed --write-results

``--from-json PATH`` re-renders a finished run (its ``--json``, which keeps the command and the
machine it ran with) without measuring again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.bench import parser, plot, render, run_bench  # noqa: E402

if __name__ == "__main__":
    ap = parser()
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--section", default="speed", help="the docs/RESULTS.md section written")
    ap.add_argument("--title", default="", help="the section's heading")
    ap.add_argument("--from-json", default="", help="re-render this saved --json run")
    args = ap.parse_args()
    if args.section != "speed" and args.plot_name == ap.get_default("plot_name"):
        args.plot_name = f"{args.section}_step_latency.png"
    if args.write_results and not args.plot_dir:
        args.plot_dir = str(Path(__file__).resolve().parents[1] / "docs" / "img")
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        cmd, where = result.get("command", "?"), result.get("machine", "?")
        args.plot_name = result["args"].get("plot_name", args.plot_name)
        args.title = args.title or result["args"].get("title", "")
        if args.plot_dir:
            plot(result, Path(args.plot_dir) / args.plot_name)
    else:
        result = run_bench(args)
        cmd, where = command(), machine()
        if args.json:  # keep what produced it, for --from-json
            Path(args.json).write_text(json.dumps(result | {"command": cmd, "machine": where},
                                                  indent=2))
    md = render(result, cmd, where, title=args.title,
                image=args.plot_name if args.plot_dir else None,
                rendered_by=command() if args.from_json else "")
    print(md)
    if args.write_results:
        write_section(args.section, md)
