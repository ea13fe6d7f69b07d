"""The ops of fastvlm_kernels: one public function each, with backends chosen by device."""
from . import _library  # loads fastvlm_kernels._C (or says why not) before any op is used
from .verify_attention import verify_attention
from .lm_head import early_exit_head, verify_head, vocab_subset_from_counts

__all__ = ["verify_attention"]
__all__ += ["early_exit_head", "verify_head", "vocab_subset_from_counts"]
