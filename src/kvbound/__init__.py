"""kvbound: memory-bounded KV cache for Hugging Face LLMs with learned token retention.

Implements TRIM-KV ("Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs",
arXiv 2512.03324) and the main eviction baselines inside one transformers ``Cache``.
"""

from kvbound.cache import CacheStats, EvictionCache, TrimKVCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGate, RetentionGates
from kvbound.generation import GenerationResult, generate
from kvbound.hooks import attach, attached, detach
from kvbound.models import load_model
from kvbound.policies import METHODS, POLICIES, Policy, get_policy

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
    "KVBoundError",
    "attach",
    "attached",
    "detach",
    "generate",
    "get_policy",
    "load_model",
]
