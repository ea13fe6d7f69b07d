"""The ops of fastvlm_kernels: one public function each, with backends chosen by device."""
from . import _library  # loads fastvlm_kernels._C (or says why not) before any op is used
from .verify_attention import verify_attention
from .kv_cache import kv_append, kv_compact

__all__ = ["verify_attention", "kv_compact", "kv_append"]
