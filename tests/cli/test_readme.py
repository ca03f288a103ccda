"""The README's Python quick start, run as written (shorter generation) on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start (Python)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_readme_quick_start_runs_and_bounds_memory(capsys):
    code = _quick_start()
    assert "TrimKVCache(" in code and "max_new_tokens=1000" in code
    scope: dict = {}
    exec(compile(code.replace("max_new_tokens=1000", "max_new_tokens=60"), "README", "exec"),
         scope)
    cache, model = scope["cache"], scope["model"]
    stats = cache.stats()
    assert stats.policy == "trimkv" and stats.sinks == 4
    assert stats.peak_tokens_per_head <= 64 + 16 + 128
    assert stats.evictions > 0  # the chat prompt + 60 tokens overflow M + b
    assert "_kvbound_hooks" not in model.__dict__  # gates.detach(model) removed everything
    assert capsys.readouterr().out.strip()  # the story and the stats were printed
