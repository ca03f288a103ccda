"""Retention gates: the small learned scorers of TRIM-KV (arXiv 2512.03324, section 3).

One :class:`RetentionGate` per decoder layer maps the attention block's input hidden state (after
the layer's input norm, before q/k/v and RoPE) to one retention score per KV head, returned as
``log beta = logsigmoid(W2 silu(W1 x + c) + b)`` with shape ``(B, H_kv, S)``. A token's importance
at step ``t`` is ``beta^(t - i)``; the cache evicts the tokens with the smallest one.

:class:`RetentionGates` is the per-model set: it attaches to a stock transformers model through
forward pre-hooks (see :mod:`kvbound.hooks`), detaches cleanly, and saves/loads as
``gates.safetensors`` + ``gates.json``. Official TRIM-KV checkpoints (``trimkv_weights.pth``) can be
imported with :meth:`RetentionGates.from_official`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kvbound.architectures import evicted_layers, model_fingerprint
from kvbound.errors import IncompatibleGatesError, KVBoundError

GATES_FILE = "gates.safetensors"
META_FILE = "gates.json"
FORMAT = "kvbound-gates"
#: formats written before the rename to kvbound (same layout), still loaded
LEGACY_FORMATS = ("trimkv-gates",)
FORMAT_VERSION = 1


#: per-token outputs a gate may give the cache (per KV head): log retention, and with
#: ``log_alpha`` gates the log initial importance (:class:`RetentionGate`)
GATE_OUTPUTS = ("log_beta", "log_alpha")

#: scales s of the gate's optional position features 1 / (1 + p / s): large for the first tokens
#: of a sequence, ~0 far from its start, so they tell a gate "this token is early" without
#: letting it extrapolate a trend past the lengths it was trained on
POSITION_SCALES = (1.0, 4.0, 16.0, 64.0)


def position_features(positions: torch.Tensor) -> torch.Tensor:
    """(..., S) token positions (-1 = padding, read as 0) -> (..., S, len(POSITION_SCALES))."""
    p = positions.clamp(min=0).to(torch.float32)[..., None]
    scales = torch.tensor(POSITION_SCALES, dtype=torch.float32, device=positions.device)
    return 1.0 / (1.0 + p / scales)


class RetentionGate(nn.Module):
    """Per-layer gate: Linear(hidden -> I, bias) -> SiLU -> Linear(I -> H_kv) + per-head bias.

    Parameters
    ----------
    hidden_size, num_kv_heads, intermediate_size:
        Shapes. The paper uses I = 512 for 2-8B models; small models do well with 64-256.
    bias_init:
        Initial per-head bias. Large means beta ~ 1 (no forgetting) at the start. The paper uses 18,
        released checkpoints 8-10; 18 leaves gradients ~1e-8 that AdamW cannot move in a short run.
    init_std:
        Std of the normal init of both linear weights.
    position_input:
        Also feed :func:`position_features` of each token's position into the hidden layer
        (a kvbound extension, not in the paper: the layer-0 gate otherwise sees only the token
        embedding and cannot tell the first token, the attention sink, from any other).
        Zero-initialised, so a fresh gate computes exactly what it would without it.
    log_alpha:
        Also output a log initial importance ``log alpha_i`` per KV head (a kvbound extension,
        not in the paper): a token's importance at step ``t`` becomes ``alpha_i beta_i^(t - i)``
        instead of ``beta_i^(t - i)``, i.e. the cache scores ``log alpha_i + (t - i) log beta_i``.
        With the paper's form every token starts equally important and only its decay rate
        differs, so a token that matters briefly but much and one that matters little but long
        cannot both be ranked right; fitted to the future attention, the two-number form ranks
        almost exactly as the future does (``benchmarks/oracle_headroom.py --variants
        fit-256,fit-256+offset``). A linear read-out of the gate's hidden layer,
        zero-initialised (log alpha = 0: exactly the paper's score).
    """

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        intermediate_size: int = 128,
        bias_init: float = 8.0,
        init_std: float = 0.02,
        position_input: bool = False,
        log_alpha: bool = False,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.linear2 = nn.Linear(intermediate_size, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((num_kv_heads,), float(bias_init)))
        nn.init.normal_(self.linear1.weight, std=init_std)
        nn.init.zeros_(self.linear1.bias)
        nn.init.normal_(self.linear2.weight, std=init_std)
        self.position = None
        if position_input:
            self.position = nn.Linear(len(POSITION_SCALES), intermediate_size, bias=False)
            nn.init.zeros_(self.position.weight)
        self.alpha = None
        if log_alpha:
            self.alpha = nn.Linear(intermediate_size, num_kv_heads, bias=True)
            nn.init.zeros_(self.alpha.weight)
            nn.init.zeros_(self.alpha.bias)

    @property
    def uses_positions(self) -> bool:
        return self.position is not None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The per-token values this gate gives the cache (names of :data:`GATE_OUTPUTS`)."""
        return GATE_OUTPUTS if self.alpha is not None else GATE_OUTPUTS[:1]

    def forward(self, hidden_states: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Return log beta, shape (B, H_kv, S), float32, computed with autocast off.
        ``positions`` (B, S) are needed when the gate has a position input."""
        return self.retention(hidden_states, positions)["log_beta"]

    def retention(self, hidden_states: torch.Tensor,
                  positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every output of :attr:`outputs` by name, each (B, H_kv, S) float32."""
        if self.position is not None and positions is None:
            raise KVBoundError("This retention gate reads token positions: pass positions "
                               "(B, S) with the hidden states.")
        if torch.is_autocast_enabled(hidden_states.device.type):
            with torch.autocast(device_type=hidden_states.device.type, enabled=False):
                return self._retention(hidden_states, positions)
        return self._retention(hidden_states, positions)

    def _retention(self, hidden_states: torch.Tensor,
                   positions: torch.Tensor | None) -> dict[str, torch.Tensor]:
        x = hidden_states.to(self.linear1.weight.dtype)
        h = self.linear1(x)
        if self.position is not None:
            h = h + self.position(position_features(positions).to(h.dtype))
        h = F.silu(h)
        out = {"log_beta": F.logsigmoid(F.linear(h, self.linear2.weight, self.bias)).transpose(1, 2)}
        if self.alpha is not None:
            out["log_alpha"] = self.alpha(h).transpose(1, 2)
        return out


@dataclass
class GateConfig:
    """Hyper-parameters and the architecture fingerprint a gate set was made for."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    gated_layers: list[int]
    intermediate_size: int = 128
    bias_init: float = 8.0
    init_std: float = 0.02
    base_model: str | None = None
    position_input: bool = False
    log_alpha: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_kv_heads": self.num_kv_heads,
        }


@dataclass
class GateMetadata:
    """Free-form provenance stored next to the weights (training command, data, losses...)."""

    training: dict[str, Any] = field(default_factory=dict)
    recommended: dict[str, Any] = field(default_factory=dict)


class RetentionGates(nn.Module):
    """The set of retention gates for one model (one gate per evicted attention layer)."""

    def __init__(self, config: GateConfig, metadata: GateMetadata | None = None) -> None:
        super().__init__()
        self.config = config
        self.metadata = metadata or GateMetadata()
        self.gates = nn.ModuleDict(
            {
                str(i): RetentionGate(
                    config.hidden_size,
                    config.num_kv_heads,
                    config.intermediate_size,
                    config.bias_init,
                    config.init_std,
                    config.position_input,
                    config.log_alpha,
                )
                for i in config.gated_layers
            }
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        intermediate_size: int = 128,
        bias_init: float = 8.0,
        init_std: float = 0.02,
        seed: int | None = 0,
        position_input: bool = False,
        log_alpha: bool = False,
    ) -> RetentionGates:
        """Fresh (untrained) gates shaped for ``model``; deterministic for a given ``seed``
        (``position_input``, ``log_alpha``: see :class:`RetentionGate`)."""
        fp = model_fingerprint(model)
        config = GateConfig(
            model_type=fp["model_type"],
            num_layers=fp["num_layers"],
            hidden_size=fp["hidden_size"],
            num_kv_heads=fp["num_kv_heads"],
            gated_layers=evicted_layers(model),
            intermediate_size=intermediate_size,
            bias_init=bias_init,
            init_std=init_std,
            base_model=getattr(model, "kvbound_model_name", None)
            or getattr(model.config, "_name_or_path", None),
            position_input=position_input,
            log_alpha=log_alpha,
        )
        if seed is None:
            return cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def __contains__(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.gates

    def __getitem__(self, layer_idx: int) -> RetentionGate:
        return self.gates[str(layer_idx)]

    @property
    def uses_positions(self) -> bool:
        return self.config.position_input

    @property
    def outputs(self) -> tuple[str, ...]:
        """The per-token values these gates give the cache (:attr:`RetentionGate.outputs`)."""
        return GATE_OUTPUTS if self.config.log_alpha else GATE_OUTPUTS[:1]

    def forward(self, layer_idx: int, hidden_states: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.gates[str(layer_idx)](hidden_states, positions)

    def retention(self, layer_idx: int, hidden_states: torch.Tensor,
                  positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every output of layer ``layer_idx``'s gate by name (:meth:`RetentionGate.retention`)."""
        return self.gates[str(layer_idx)].retention(hidden_states, positions)

    # ------------------------------------------------------------------ model wiring
    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`IncompatibleGatesError` if these gates were made for another model."""
        fp = model_fingerprint(model)
        mine = self.config.fingerprint()
        diffs = [f"{k}: gates {mine[k]} vs model {fp[k]}" for k in mine if mine[k] != fp[k]]
        if diffs:
            raise IncompatibleGatesError(
                f"These retention gates were made for another model ({self.config.base_model or '?'},"
                f" {self.config.model_type}): " + "; ".join(diffs) + ". Train gates for this model "
                "with `kvbound train --model ...` or load the gates that match it."
            )

    def attach(self, model: nn.Module) -> RetentionGates:
        """Wire the gates into ``model`` (forward pre-hooks); returns self. See :func:`detach`."""
        from kvbound.hooks import attach

        self.check_compatible(model)
        ref = next(model.parameters())
        self.to(device=ref.device)
        attach(model, gates=self)
        return self

    def detach(self, model: nn.Module) -> None:
        """Remove every hook kvbound installed; the model computes exactly as before."""
        from kvbound.hooks import detach

        detach(model)

    # ------------------------------------------------------------------ persistence
    def digest(self) -> str:
        """Short content hash of the weights (recorded in results and in ``gates.json``)."""
        return _digest(self.state_dict())

    def ref(self) -> str:
        """``BASE_MODEL@DIGEST``: how results name the gates they ran with."""
        return f"{self.config.base_model}@{self.digest()}"

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``gates.safetensors`` + ``gates.json`` atomically into ``directory``.

        ``dtype`` (e.g. ``torch.float16``) shrinks the file; gates are loaded back as float32.
        """
        from safetensors.torch import save_file

        from kvbound.io import atomic_dir_write

        state = {k: v.detach().contiguous().cpu().to(dtype or v.dtype)
                 for k, v in self.state_dict().items()}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "metadata": asdict(self.metadata),
            # the digest of the weights as stored (and loaded back as float32), so that the
            # digest in gates.json is the one results report for these gates
            "digest": _digest(state),
            "digest_of": "stored",
            "dtype": str(dtype or torch.float32).replace("torch.", ""),
        }

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / GATES_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

        return atomic_dir_write(Path(directory), write, files=(GATES_FILE, META_FILE))

    @classmethod
    def load(cls, source: str | os.PathLike, model: nn.Module | None = None) -> RetentionGates:
        """Load gates from a directory written by :meth:`save`, a shipped name, or an official
        TRIM-KV checkpoint directory. With ``model`` the fingerprint is checked."""
        path = resolve_gates_path(source)
        if not (path / META_FILE).exists() and (path / "trimkv_weights.pth").exists():
            if model is None:
                raise KVBoundError("Importing an official TRIM-KV checkpoint needs the model.")
            return cls.from_official(path, model)
        gates = _load_native(path)
        if model is not None:
            gates.check_compatible(model)
        return gates

    @classmethod
    def from_official(
        cls, directory: str | os.PathLike, model: nn.Module, *, bias_init: float | None = None
    ) -> RetentionGates:
        """Import an official TRIM-KV checkpoint (``config.json`` + ``trimkv_weights.pth``).

        The weights file is read with ``torch.load(weights_only=True)`` (no code execution).
        Keys: ``model.layers.{l}.self_attn.retention_gate.{linear1.weight, linear1.bias,
        linear2.weight, bias}``.
        """
        directory = Path(directory)
        cfg_path, weights_path = directory / "config.json", directory / "trimkv_weights.pth"
        if not weights_path.exists():
            raise KVBoundError(f"{weights_path} not found: an official checkpoint has "
                              "config.json and trimkv_weights.pth.")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        try:
            raw = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise KVBoundError(f"Cannot read {weights_path}: {exc}. The file is corrupt, truncated or "
                              "not a weights-only checkpoint.") from exc
        prefix = "model.layers."
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            if ".retention_gate." not in key or not key.startswith(prefix):
                continue
            layer = int(key[len(prefix):].split(".")[0])
            layers.setdefault(layer, {})[key.split(".retention_gate.")[1]] = tensor
        if not layers:
            raise KVBoundError(f"{weights_path} holds no retention_gate tensors.")
        first = layers[min(layers)]
        inter, hidden = first["linear1.weight"].shape
        kv_heads = first["linear2.weight"].shape[0]
        fp = model_fingerprint(model)
        if hidden != fp["hidden_size"] or kv_heads != fp["num_kv_heads"] or max(layers) >= fp[
            "num_layers"
        ]:
            raise IncompatibleGatesError(
                f"Official checkpoint {directory} is for another model (hidden {hidden}, KV heads "
                f"{kv_heads}, {max(layers) + 1}+ layers; model has {fp['hidden_size']}, "
                f"{fp['num_kv_heads']}, {fp['num_layers']}). Base model per its config: "
                f"{cfg.get('base_model', '?')}."
            )
        config = GateConfig(
            model_type=fp["model_type"],
            num_layers=fp["num_layers"],
            hidden_size=hidden,
            num_kv_heads=kv_heads,
            gated_layers=sorted(layers),
            intermediate_size=inter,
            bias_init=float(bias_init if bias_init is not None
                            else cfg.get("retention_gate_bias_init", 8.0)),
            base_model=cfg.get("base_model"),
        )
        gates = cls(config, GateMetadata(training={"imported_from": str(directory),
                                                   "official_config": cfg}))
        state = {f"gates.{layer}.{name}": t.float() for layer, d in layers.items()
                 for name, t in d.items()}
        missing, unexpected = gates.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KVBoundError(f"Official checkpoint {directory}: missing {missing}, "
                              f"unexpected {unexpected}.")
        return gates


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def shipped_gates_dir(name: str) -> Path | None:
    """Directory of the gates shipped inside the package for model ``name``, if any."""
    root = resources.files("kvbound") / "shipped_gates" / name
    path = Path(str(root))
    return path if (path / META_FILE).exists() else None


def resolve_gates_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    shipped = shipped_gates_dir(str(source))
    if shipped is not None:
        return shipped
    raise KVBoundError(
        f"No gates at {source!r}: give a directory written by `kvbound train` (gates.json + "
        f"gates.safetensors), an official TRIM-KV checkpoint directory, or a shipped name "
        f"({', '.join(list_shipped_gates()) or 'none installed'})."
    )


def list_shipped_gates() -> list[str]:
    root = Path(str(resources.files("kvbound") / "shipped_gates"))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / META_FILE).exists())


def _load_native(path: Path) -> RetentionGates:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVBoundError(f"Cannot read {path / META_FILE}: {exc}. The checkpoint is corrupt or "
                          "incomplete; re-train or re-download it.") from exc
    if meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise KVBoundError(f"{path / META_FILE} is not a kvbound gate checkpoint.")
    try:
        config = GateConfig(**meta["config"])
        metadata = GateMetadata(**meta.get("metadata", {}))
        state = load_file(str(path / GATES_FILE))
    except (OSError, TypeError, KeyError, SafetensorError) as exc:
        raise KVBoundError(f"Cannot load gates from {path}: {exc}. The checkpoint is corrupt or "
                          "truncated; re-train or re-download it.") from exc
    gates = RetentionGates(config, metadata)
    state = {k: v.float() for k, v in state.items()}
    # older files hashed the float32 weights before a cast to float16: checkable when float32
    if meta.get("digest_of") == "stored" or meta.get("dtype", "float32") == "float32":
        if meta.get("digest") is not None and _digest(state) != meta["digest"]:
            raise KVBoundError(
                f"{path / GATES_FILE} does not match {META_FILE} (digest {_digest(state)}, "
                f"expected {meta['digest']}): the directory holds weights and metadata of two "
                "different saves, e.g. a writer killed between its two renames. Save the gates "
                "again (or resume training, which rewrites them)."
            )
    try:
        gates.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise KVBoundError(f"Gate weights in {path} do not match gates.json: {exc}") from exc
    return gates
