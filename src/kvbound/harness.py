"""lm-evaluation-harness model type ``kvbound``: any task, any method, under a bounded cache.

lm-eval 0.4.x finds model types in its own registry only (no entry-point discovery), so kvbound
registers ``kvbound`` when this module is imported, and ships ``kvbound-lm-eval``: lm-eval's own
command line with the model type registered (every lm-eval option works unchanged)::

    kvbound-lm-eval --model kvbound \\
        --model_args pretrained=smollm2-135m,method=trimkv,budget=128,buffer=16,sinks=4 \\
        --tasks gsm8k --limit 50

or from Python: ``import kvbound.harness`` then ``lm_eval.simple_evaluate(model="kvbound",
model_args=...)``. ``pretrained`` is anything :func:`kvbound.load_model` takes (embedded name,
local directory or .gguf, Hub id); ``method=full`` is the uncompressed baseline.

What the bounded cache means for each request type:

* ``generate_until``: ``model.generate`` with a fresh bounded cache per batch; the prompt is
  prefilled in chunks of ``chunk`` tokens (evicting after each), so memory is bounded from the
  first prompt token, as with ``kvbound generate``.
* ``loglikelihood`` / ``loglikelihood_rolling``: context and continuation are fed through a fresh
  bounded cache in chunks of ``chunk`` tokens; each token is scored with the keys the cache holds
  when its chunk arrives plus the tokens of its own chunk, i.e. with the memory the model would
  have while reading that text. ``chunk=1`` is token-by-token decoding (exact, slow); the default
  is the prefill chunk of generation (128). A request shorter than ``budget + buffer + chunk``
  tokens is never compressed.
"""

from __future__ import annotations

import torch

from kvbound.errors import KVBoundError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("kvbound.harness needs lm-evaluation-harness: pip install "
                      "'kvbound[lm-eval]' (or pip install lm-eval).") from exc


@register_model("kvbound")
class KVBoundLM(HFLM):
    """An ``HFLM`` whose generation and scoring run under a kvbound cache."""

    def __init__(self, pretrained: str | None = None, method: str = "trimkv", budget: int = 256,
                 buffer: int = 32, sinks: int | None = None, gates: str | None = None,
                 chunk: int = 128, positions: str = "auto", dtype: str = "float32",
                 **kwargs) -> None:
        from kvbound.generation import build_cache
        from kvbound.models import load_model
        from kvbound.policies import check_method

        self.method = check_method(method)
        for name, value, low in (("budget", budget, 1), ("buffer", buffer, 0), ("chunk", chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KVBoundError(f"model_args {name} must be an integer >= {low}, got {value!r}.")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise KVBoundError(f"model_args dtype must be float32, bfloat16 or float16, got {dtype!r}.")
        model, tok = load_model(None if pretrained in (None, "", "default") else pretrained,
                                dtype=getattr(torch, dtype), device=_device(kwargs.pop("device", None)))
        self.kvbound_settings = {"budget": budget, "buffer": buffer, "sinks": sinks, "chunk": chunk,
                         "positions": positions}
        self._build = lambda: build_cache(model, self.method, budget=budget, buffer=buffer,
                                          sinks=sinks, gates=gates, positions=positions)[0]
        if self.method != "full":
            self.cache_settings = self._build().settings()  # fails early on bad settings / gates
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", **kwargs)

    # ------------------------------------------------------------------ scoring
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.method == "full" or attn_mask is not None:
            return super()._model_call(inps, attn_mask, labels)
        cache, step = self._build(), self.kvbound_settings["chunk"]
        with torch.no_grad():
            return torch.cat([self.model(inps[:, a:a + step], cache=cache).logits
                              for a in range(0, inps.shape[1], step)], dim=1)

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.method == "full":
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        from kvbound.generation import prefill_chunk_size

        s = self.kvbound_settings
        generation_kwargs["cache"] = self._build()
        generation_kwargs["prefill_chunk_size"] = prefill_chunk_size(
            self.method, s["chunk"], context.shape[1], s["budget"])
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["kvbound"] = {"method": self.method, **self.kvbound_settings,
                           **({"cache": self.cache_settings} if self.method != "full" else {})}
        return info


def _device(requested: str | None) -> str:
    """lm-eval's command line asks for ``cuda`` unless told otherwise: without a GPU that
    default means the CPU (said in the log); any other device is taken as given."""
    requested = None if requested is None else str(requested)
    if (requested is None or requested.startswith("cuda")) and not torch.cuda.is_available():
        if requested is not None:
            import logging

            logging.getLogger(__name__).warning("no CUDA device: kvbound runs on the CPU")
        return "cpu"
    return requested or "cuda"


def main() -> None:
    """``kvbound-lm-eval``: lm-eval's command line with the ``kvbound`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
