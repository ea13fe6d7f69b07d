"""What the LM-head ops support, how close each backend must come, and the shapes tests sweep."""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("argmax", "sample", "topk")
MODE_CODES = {"argmax": 0, "sample": 1, "topk": 2}

# Per-row fp32 values (max logit, log-sum-exp, log-probs) against the fp64 reference on the same rounded
# inputs: absolute error, scaled by sqrt(H) (a dot product's rounding grows with its length) plus a floor.
VALUE_ATOL = {torch.float32: 2e-6, torch.float16: 2e-5, torch.bfloat16: 2e-5}   # times sqrt(H)
VALUE_FLOOR = 1e-4
# Integer outputs (argmax, top-k ids, sampled ids) must equal the reference's wherever the reference's
# gap between the chosen value and the runner-up exceeds this (the backends' rounding cannot swap them).
SAFE_GAP = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TOLERANCES = {backend: {dtype: (VALUE_ATOL[dtype], VALUE_FLOOR) for dtype in SUPPORTED_DTYPES}
              for backend in ("torch", "cpu", "cuda", "triton")}

# (M, H, V): rows, hidden size, vocabulary. Real heads: Phi-3 / LLaVA-1.5 (32064 x 4096), Qwen2-VL
# (151936 x 3584); odd sizes break tiling.
TEST_SHAPES = [
    (1, 59, 111),
    (17, 59, 507),
    (65, 64, 507),
    (5, 4096, 32064),
    (17, 3584, 151936),
    (1, 64, 151936),
]
# Heads above this many weights run in one dtype only in the CPU tests (time).
LARGE_HEAD = 50_000_000
# Small shapes for the Triton interpreter.
INTERPRETER_SHAPES = [(1, 59, 111), (17, 64, 507), (5, 96, 300)]
