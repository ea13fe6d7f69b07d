"""The ops of fastvlm_kernels: one public function each, with backends chosen by device."""
from . import _library  # loads fastvlm_kernels._C (or says why not) before any op is used
from .verify_attention import verify_attention
from .kv_cache import kv_append, kv_compact

from .acceptance import accept_greedy, accept_greedy_tree, accept_sampling, accept_sampling_tree

from .lm_head import early_exit_head, verify_head, vocab_subset_from_counts

__all__ = ["verify_attention", "kv_compact", "kv_append",
           "accept_greedy", "accept_sampling", "accept_greedy_tree", "accept_sampling_tree",
           "early_exit_head", "verify_head", "vocab_subset_from_counts"]
