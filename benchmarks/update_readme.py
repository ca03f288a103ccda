"""Copy the headline results from docs/RESULTS.md into README.md (between the results markers).

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("gate-quality", "fidelity-sweep-decode", "task-sweep-summary", "speed",
            "speed-llama-1b", "how-many-fit", "chat-session")


def main() -> None:
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    parts = []
    for name in SECTIONS:
        m = re.search(rf"<!-- BEGIN {re.escape(name)} -->\n(.*?)<!-- END {re.escape(name)} -->",
                      results, re.S)
        if m:
            body = m.group(1).replace("(img/", "(docs/img/").replace("## ", "### ", 1)
            body = body.split("\nStructure of the learned scores")[0]  # details stay in RESULTS
            parts.append(body.strip())
    readme = (ROOT / "README.md").read_text()
    block = ("<!-- BEGIN results (copied from docs/RESULTS.md by benchmarks/update_readme.py) -->\n"
             + "\n\n".join(parts) + "\n<!-- END results -->")
    readme = re.sub(r"<!-- BEGIN results.*?<!-- END results -->", lambda _: block, readme,
                    flags=re.S)
    (ROOT / "README.md").write_text(readme)
    print(f"README results updated from {len(parts)} sections")


if __name__ == "__main__":
    main()
