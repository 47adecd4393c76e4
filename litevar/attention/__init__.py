"""Attention processors (what is computed), backends (which kernel), the KV cache and the context."""
from .context import AttnContext
from .dense import DenseAttnProcessor
from .kv_cache import KVCache

__all__ = ["AttnContext", "DenseAttnProcessor", "KVCache"]
