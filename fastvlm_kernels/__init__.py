"""fastvlm_kernels: self-speculative decoding for vision-language models, with its own kernels.

Importing the package never initialises CUDA and works without the compiled extension
(`python -m fastvlm_kernels.info` says what is built and usable here).
"""
from .ops import verify_attention
from .ops import kv_append, kv_compact
from .cache import KVCache

from .ops import accept_greedy, accept_greedy_tree, accept_sampling, accept_sampling_tree
from .ops import early_exit_head, verify_head, vocab_subset_from_counts
from .decoding import GenerateOutput, GenerateStats, SelfSpeculativeDecoder
from .imitation import ImitationConfig, ImitationNetwork

__version__ = "0.1.0"
__all__ = ["verify_attention", "kv_compact", "kv_append", "KVCache",
           "accept_greedy", "accept_sampling", "accept_greedy_tree", "accept_sampling_tree",
           "early_exit_head", "verify_head", "vocab_subset_from_counts",
           "SelfSpeculativeDecoder", "GenerateOutput", "GenerateStats", "ImitationNetwork", "ImitationConfig",
           "__version__"]
