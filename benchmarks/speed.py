"""Speed and memory sweep (``kvbound bench``); writes a section of docs/RESULTS.md ("speed" by
default: the embedded model; ``--section`` names another, e.g. for a random-weight config).

    python benchmarks/speed.py --lengths 1024,4096,16384 --write-results
    python benchmarks/speed.py --model-config llama-3.2-1b --fill random --section speed-llama-1b \
        --title "Decode speed at 1B" --write-results
    python benchmarks/speed.py --json runs/speed.json --from-json --section speed --write-results

``--from-json`` re-renders the finished run saved in ``--json`` (which keeps the command and the
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
    ap.add_argument("--from-json", action="store_true", help="re-render the saved --json run")
    args = ap.parse_args()
    if args.from_json and not args.json:
        ap.error("--from-json re-renders a saved run: name it with --json PATH")
    if args.from_json and not Path(args.json).is_file():
        ap.error(f"--from-json: no saved run at {args.json} (run without --from-json first)")
    if args.section != "speed" and args.plot_name == ap.get_default("plot_name"):
        args.plot_name = f"{args.section}_step_latency.png"
    if args.write_results and not args.plot_dir:
        args.plot_dir = str(Path(__file__).resolve().parents[1] / "docs" / "img")
    if args.from_json:
        result = json.loads(Path(args.json).read_text())
        cmd, where = result.get("command", "?"), result.get("machine", "?")
        args.plot_name = result["args"].get("plot_name", args.plot_name)
        args.title = args.title or result["args"].get("title", "")
        if args.plot_dir:
            plot(result, Path(args.plot_dir) / args.plot_name)
    else:
        cmd, where = command(), machine()
        result = run_bench(args, meta={"command": cmd, "machine": where})  # kept for --from-json
    md = render(result, cmd, where, title=args.title,
                image=args.plot_name if args.plot_dir else None,
                rendered_by=command() if args.from_json else "")
    print(md)
    if args.write_results:
        write_section(args.section, md)
