"""The CUDA path (issue 20), run where a GPU exists (``pytest -m cuda``; skipped elsewhere):
bf16 bounded decoding, SDPA kernels over the bounded cache, no host syncs in a decode step,
static cache + torch.compile(mode="reduce-overhead") (CUDA graphs). benchmarks/gpu_check.sh runs
these first."""

from __future__ import annotations

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.gates import RetentionGates
from kvbound.generation import build_cache, compile_config
from kvbound.testing import tiny_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(dtype=torch.bfloat16, **kw):
    model = tiny_model("llama", seed=0, dtype=dtype, **kw).to("cuda")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=0).attach(model)
    return model


def _ids(b, n, seed=0):
    return torch.randint(3, 100, (b, n), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("method", ["trimkv", "streaming", "snapkv", "h2o"])
def test_bf16_bounded_generation_on_gpu(method):
    model = _model()
    cache = EvictionCache(model, method, budget=16, buffer=4)
    out = model.generate(_ids(2, 40), do_sample=False, max_new_tokens=30, cache=cache,
                         prefill_chunk_size=16)
    st = cache.stats()
    assert out.shape == (2, 70) and out.is_cuda
    assert st.evictions > 0 and st.peak_tokens_per_head <= 16 + 4 + 16
    assert cache.layers[0].keys.is_cuda and cache.layers[0].keys.dtype == torch.bfloat16


def test_gpu_fp32_matches_cpu():
    """Same tiny model in fp32 on GPU and CPU: the same kept tokens and close logits."""
    cpu = tiny_model("llama", seed=0)
    gpu = tiny_model("llama", seed=0).to("cuda")
    ids = _ids(1, 48).cpu()
    out = {}
    for name, model in (("cpu", cpu), ("gpu", gpu)):
        cache = EvictionCache(model, "knorm", budget=12, buffer=4)
        x = ids.to(model.device)
        with torch.no_grad():
            logits = [model(x[:, s:s + 8], cache=cache).logits for s in range(0, 48, 8)]
        out[name] = (torch.cat(logits, 1).cpu(), cache.resident_positions(0).cpu())
    torch.testing.assert_close(out["gpu"][0], out["cpu"][0], rtol=1e-3, atol=1e-3)
    assert torch.equal(out["gpu"][1], out["cpu"][1])


def test_flash_sdpa_over_the_bounded_cache():
    """An unpadded single-token step hands SDPA no mask: the flash kernel can run it."""
    model = _model(dtype=torch.float16)
    cache = EvictionCache(model, "trimkv", budget=16, buffer=4)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        model(_ids(2, 32), cache=cache)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run
            logits = model(_ids(2, 1, seed=1), cache=cache).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["trimkv", "streaming", "h2o"])
def test_no_host_sync_in_a_decode_step(method):
    """torch.cuda.set_sync_debug_mode("error") raises at any host sync."""
    model = _model()
    cache, _, _ = build_cache(model, method, budget=12, buffer=4, sinks=2)
    ids = _ids(2, 24)
    with torch.no_grad():
        model(ids, cache=cache)
        nxt = ids[:, -1:]
        model(nxt, cache=cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(9):  # evictions included
                model(nxt, cache=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.stats().evictions > 0


def test_cuda_graphs_static_decoding_matches_eager():
    """Static cache + torch.compile(mode="reduce-overhead") via generate(): the tokens of eager
    static decoding, and the cache stays bounded."""
    model = _model(dtype=torch.float32)
    ids = _ids(2, 30)
    eager = model.generate(ids, do_sample=False, max_new_tokens=40, disable_compile=True,
                           cache=EvictionCache(model, "trimkv", budget=8, buffer=4, static=True))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4, static=True)
    cfg = compile_config(torch.device("cuda"))
    assert cfg.mode == "reduce-overhead"
    graphs = model.generate(ids, do_sample=False, max_new_tokens=40, cache=cache,
                            compile_config=cfg)
    assert torch.equal(graphs, eager)
    assert cache.stats().peak_tokens_per_head <= 8 + 4 + 30
    torch._dynamo.reset()
