"""trimkv: memory-bounded KV cache for Hugging Face LLMs with learned token retention.

Implements TRIM-KV ("Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs",
arXiv 2512.03324) and the main eviction baselines inside one transformers ``Cache``.
"""

from trimkv.cache import CacheStats, EvictionCache, TrimKVCache
from trimkv.errors import TrimKVError
from trimkv.gates import RetentionGate, RetentionGates
from trimkv.generation import GenerationResult, generate
from trimkv.hooks import attach, detach
from trimkv.models import load_model, tiny_model
from trimkv.policies import METHODS, POLICIES, Policy, get_policy

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "POLICIES",
    "CacheStats",
    "EvictionCache",
    "GenerationResult",
    "Policy",
    "RetentionGate",
    "RetentionGates",
    "TrimKVCache",
    "TrimKVError",
    "attach",
    "detach",
    "generate",
    "get_policy",
    "load_model",
    "tiny_model",
]
