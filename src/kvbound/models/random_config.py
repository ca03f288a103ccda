"""Models with random weights from real architectures' configs: speed at real sizes, no download.

Speed and memory do not depend on trained weights, so a model built from, say, Llama-3.2-1B's
config measures that model's decode speed honestly. Shipped configs (``models/configs/*.json``,
copied from the models' published ``config.json``): ``llama-3.2-1b``, ``qwen3-1.7b``,
``qwen3-4b``, ``qwen3-8b``; any other ``config.json`` path works too. Weights are drawn with
transformers' own initialisation from a seeded generator (the global RNG is left as it was).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvbound.errors import KVBoundError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config(name_or_path: str | Path) -> dict:
    """The config dict of a shipped name or a JSON file path."""
    path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise KVBoundError(f"No model config {name_or_path!r}: give a shipped name "
                           f"({', '.join(shipped_configs())}) or a config.json path.")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KVBoundError(f"Cannot read the model config {path}: {exc}") from exc
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise KVBoundError(f"{path} is not a transformers model config (no model_type).")
    return cfg


def random_model(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32,
                 seed: int = 0, device: str | torch.device = "cpu", **overrides):
    """A causal LM of that architecture with seeded random weights, in eval mode, sdpa attention;
    ``overrides`` replace config fields (e.g. ``num_hidden_layers=2`` for a quick check)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = read_config(name_or_path)
    fields = {k: v for k, v in {**cfg, **overrides}.items()
              if k not in ("model_type", "architectures", "transformers_version", "torch_dtype",
                           "dtype")}
    try:
        config = AutoConfig.for_model(cfg["model_type"], **fields)
    except (ValueError, KeyError) as exc:
        raise KVBoundError(f"transformers cannot build a {cfg['model_type']!r} config: {exc}") from exc
    config._attn_implementation = "sdpa"
    device = torch.device(device)
    # drawn where it will run: initialising a 4B model on the CPU first takes ~30 s per process
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.kvbound_model_name = f"random:{Path(str(name_or_path)).stem}"
    return model
