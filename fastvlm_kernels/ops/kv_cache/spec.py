"""What kv_compact supports and the shapes tests sweep. kv_compact moves bytes: every backend must match
the reference exactly, in every dtype."""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# (num_layers, B, Hkv, L_max, D, start per row, accepted per row (relative to start, -1 padded to A)).
# Rows cover: a chain (identity, moves nothing), a tree path whose destinations are other nodes' sources,
# an empty path, a path that ends at the last position of the cache, prefill-style compaction (start 0,
# hundreds of indices), D that is not a multiple of 8 elements (the vector width falls back).
TEST_SHAPES = [
    (1, 1, 1, 8, 64, (0,), ((0, 1, 2),)),
    (3, 2, 2, 40, 64, (5, 0), ((0, 1, 2, 3), (1, 2, 3, -1))),
    (2, 3, 4, 80, 128, (7, 13, 0), ((0, 3, 5, 9), (-1, -1, -1, -1), (2, 6, 7, -1))),
    (4, 2, 1, 99, 80, (30, 3), ((0, 2, 4, 6, 8, 10, 12, 14), (1, 5, 17, 40, 63, -1, -1, -1))),
    (2, 1, 3, 70, 96, (6,), ((1, 2, 3, 4, 63),)),     # the last node is at L_max - 1
    (1, 2, 2, 700, 64, (0, 0), (tuple(range(1, 700, 2)), tuple(range(0, 350)))),
    (2, 2, 2, 50, 5, (10, 2), ((0, 7, 39), (3, 4, -1))),  # D=5: odd row bytes
    (32, 1, 2, 80, 128, (9,), ((0, 4, 9, 12, 20, 21, 33, 63),)),
]

# The Triton interpreter runs every shape (all are small; the longest, 700 nodes in chunks, takes 0.3 s).
INTERPRETER_SHAPES = TEST_SHAPES
