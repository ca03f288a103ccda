"""Write a benchmark's section into docs/RESULTS.md (replacing the previous version of it).

Sections are delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers, so every
benchmark owns its section and results are never typed by hand.
"""

from __future__ import annotations

import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEADER = """# Results

Every number here was written by the benchmark named in its section, with the command that
produced it. Re-run the command to reproduce; do not edit numbers by hand.
"""


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent.parent).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{cpu}, {torch.get_num_threads()} threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}; commit {commit}")


def command() -> str:
    """The command line that ran, quoted so that it can be pasted into a shell."""
    return "python " + shlex.join(sys.argv)


def replace_block(path: Path, name: str, body: str, *, default: str | None = None) -> Path:
    """Put ``body`` between the ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers of the
    document ``path`` (atomically). A document without them (or missing, read as ``default``)
    gets the block appended when ``default`` is given; otherwise that is an error."""
    text = path.read_text() if path.exists() else (default or "")
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->",
                         re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif default is not None:
        text = text.rstrip() + "\n\n" + block + "\n"
    else:
        raise SystemExit(f"{path} has no {name} markers")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_section(name: str, body: str) -> Path:
    return replace_block(RESULTS, name, body, default=HEADER)


def publish(res: dict, json_path, section: str, render, write_results: bool) -> str:
    """Save a benchmark's result JSON, print its rendered section and, with ``write_results``,
    write that section into docs/RESULTS.md; returns the markdown."""
    import json

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1))
    md = render(res)
    print(md)
    if write_results:
        write_section(section, md)
    return md


def run_worker(cmd: list[str], what: str, cwd=None) -> dict:
    """Run a benchmark worker process; its last stdout line is its JSON record. On failure, print
    the end of its stderr and stop with ``worker failed: WHAT``."""
    import json

    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or RESULTS.parents[1])
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker failed: {what}")
    return json.loads(out.stdout.strip().splitlines()[-1])

