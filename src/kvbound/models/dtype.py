"""Which dtype to run in: bf16 where the hardware computes it natively, fp32 elsewhere.

Measured in docs/RESULTS.md ("bf16 vs fp32 on CPU", ``benchmarks/cpu_dtype.py``): on a CPU with
AVX512-BF16 bf16 decodes and prefills faster than fp32 at equal fidelity; without native bf16
(AVX2-only CPUs) its matmuls are emulated and prefill is several times slower.
"""

from __future__ import annotations

import torch

from kvbound.errors import KVBoundError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"``: bfloat16 where :func:`native_bf16`, else float32; or a dtype by name."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise KVBoundError(f"Unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}.")
    return DTYPES[name]
