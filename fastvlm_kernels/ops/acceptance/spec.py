"""What the acceptance ops support and the shapes the tests sweep."""
import torch

PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKEN_DTYPES = (torch.int32, torch.int64)
# A tree of N nodes is walked in O(N) per row; its node indices fit the int32 accept_len.
MAX_NODES = 1024

# Integer outputs (accept_len, path, emitted) must equal the reference's exactly for every backend.
# (B, k, V) for the chain sampling sweep: odd vocabularies, real models', every k in 0..8 (k = 0: p's draw).
SAMPLING_SHAPES = [
    (2, 0, 111), (1, 1, 111), (3, 2, 507), (5, 3, 111), (2, 4, 32064), (4, 5, 507), (1, 6, 151936), (2, 7, 111),
    (5, 8, 507), (3, 8, 32064),
]
# (B, N, V) for the tree sampling sweep (random trees, parents[j] < j).
TREE_SAMPLING_SHAPES = [(1, 2, 111), (3, 5, 507), (5, 9, 111), (2, 12, 32064), (1, 16, 151936), (4, 7, 507)]
# Small shapes for the Triton interpreter.
INTERPRETER_SAMPLING_SHAPES = [(2, 0, 111), (1, 1, 111), (3, 4, 507), (5, 8, 111)]
INTERPRETER_TREE_SHAPES = [(1, 2, 111), (3, 6, 507), (4, 9, 111)]
