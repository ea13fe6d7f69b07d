"""What verify_attention supports, how close each backend must come, and the shapes tests sweep."""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128, 256)
MAX_TREE_TOKENS = 64  # one int64 bitmask row per query

# Accuracy, measured against the reference in fp64: a backend's max abs error on `out` may be at most
# SDPA_ERROR_FACTOR times that of torch's scaled_dot_product_attention in the same dtype, plus a floor
# (about one rounding of an O(1) output) so that an SDPA error of exactly zero does not fail a backend.
SDPA_ERROR_FACTOR = 3.0
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# The log-sum-exp is fp32 in every backend: relative error against fp64.
LSE_RTOL = 1e-4
TOLERANCES = {
    backend: {dtype: (SDPA_ERROR_FACTOR, ERROR_FLOOR[dtype]) for dtype in SUPPORTED_DTYPES}
    for backend in ("torch", "cpu", "cuda", "triton")
}

# (B, Hq, Hkv, T, D, prefix_lens, tree): the sweep of the CPU and GPU tests. Prefixes are ragged across
# the batch; "tree" draws a random valid draft tree, "self" a mask where each query sees only itself.
TEST_SHAPES = [
    (1, 1, 1, 1, 64, (0,), "chain"),
    (1, 4, 4, 1, 128, (1,), "chain"),
    (2, 6, 2, 3, 64, (799, 0), "chain"),
    (3, 7, 1, 17, 80, (1, 4097, 30), "tree"),
    (2, 12, 4, 64, 96, (799, 1), "tree"),
    (1, 8, 8, 5, 128, (4097,), "self"),
    (2, 28, 4, 17, 128, (4097, 799), "tree"),
    (1, 2, 2, 3, 256, (799,), "chain"),
    (2, 3, 1, 64, 64, (0, 5), "chain"),
    (1, 4, 2, 257, 64, (0,), "chain"),  # a prefill: any T with a causal chain
    (1, 28, 4, 4, 128, (1500,), "chain"),  # Qwen2-VL-7B decode: 28 rows per KV head (2 x 2 warps, CUDA)
    (2, 32, 32, 4, 128, (2048, 1500), "chain"),  # 2 splits of >= 512 positions: Triton's 128-position tiles
    (3, 32, 32, 3, 128, (600, 0, 17), "chain"),  # one split of 603 positions: the same, writing out directly
    (2, 14, 2, 6, 256, (700, 33), "tree"),  # D = 256, 42 rows: a row group of the CUDA block left idle
    (2, 24, 4, 5, 64, (300, 77), "tree"),  # 30 rows per KV head: the CPU's two-tile few-row AMX path
]

# Small shapes for the Triton interpreter (TRITON_INTERPRET=1 runs kernels on the CPU, slowly).
INTERPRETER_SHAPES = [
    (1, 1, 1, 1, 64, (0,), "chain"),
    (2, 6, 2, 3, 64, (37, 0), "chain"),
    (3, 7, 1, 17, 80, (1, 130, 30), "tree"),
    (1, 3, 3, 5, 96, (70,), "self"),
    (2, 4, 2, 64, 64, (5, 0), "tree"),
    (3, 32, 32, 3, 128, (600, 0, 17), "chain"),   # one split of >= 512 positions: 128-position tiles
    (1, 32, 32, 2, 128, (2100,), "chain"),        # four such splits, merged
    (1, 2, 1, 40, 128, (0,), "chain"),
]
