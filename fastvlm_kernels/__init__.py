"""fastvlm_kernels: self-speculative decoding for vision-language models, with its own kernels.

Importing the package never initialises CUDA and works without the compiled extension
(`python -m fastvlm_kernels.info` says what is built and usable here).
"""
from .ops import verify_attention
from .ops import kv_append, kv_compact
from .cache import KVCache

from .ops import accept_greedy, accept_greedy_tree, accept_sampling, accept_sampling_tree

__version__ = "0.1.0"
__all__ = ["verify_attention", "kv_compact", "kv_append", "KVCache",
           "accept_greedy", "accept_sampling", "accept_greedy_tree", "accept_sampling_tree", "__version__"]
