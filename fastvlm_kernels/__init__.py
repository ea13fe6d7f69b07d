"""fastvlm_kernels: self-speculative decoding for vision-language models, with its own kernels.

Importing the package never initialises CUDA and works without the compiled extension
(`python -m fastvlm_kernels.info` says what is built and usable here).
"""
from .ops import verify_attention
from .ops import early_exit_head, verify_head, vocab_subset_from_counts

__version__ = "0.1.0"
__all__ = ["verify_attention", "__version__"]
__all__ += ["early_exit_head", "verify_head", "vocab_subset_from_counts"]
