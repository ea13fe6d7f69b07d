"""Triton backend of verify_attention: one pass over the KV cache per GQA group for all T new tokens.

The semantics are those of reference.py (the oracle). This module holds the kernels, the table of
configurations the launcher can pick (KERNEL_CONFIGS, compiled ahead of time for sm_90 by the tests
through compile_for_sm90), the launcher verify_attention_triton, and its torch custom op
verify_attention_triton_op (``torch.ops.fastvlm.verify_attention_triton``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._aot import compile_sm90
from .spec import HEAD_DIMS

# A split of a row's cache covers at least MIN_SPLIT_LEN positions (a multiple of _SPLIT_ALIGN, a
# constexpr of the kernels) and starts at a multiple of _SPLIT_ALIGN (a multiple of every BLOCK_N, so split
# boundaries fall on tile boundaries). The launcher splits until the grid holds about SPLIT_WAVES
# programs per multiprocessor.
MIN_SPLIT_LEN = 128
SPLIT_WAVES = 1
_SPLIT_ALIGN = tl.constexpr(128)
_MAX_SPLITS = 64
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)
_SM_COUNT_WITHOUT_GPU = 132  # an H100 SXM: the split heuristic's target when q is not on a GPU


@triton.jit
def _clamped_prefix_len(PrefixLens, row, num_new, cache_len):
    prefix_len = tl.load(PrefixLens + row)
    return tl.maximum(tl.minimum(prefix_len, cache_len - num_new), 0)


@triton.jit
def _split_len(kv_len, num_splits, min_split):
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return tl.maximum(per_split, min_split)


@triton.jit
def _load_kv_tile(ptrs, positions, kv_len, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr):
    if MASKED:
        tile = tl.load(ptrs, mask=(positions[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _visible(positions, prefix_len, num_new, query_token, tree_row, IS_TREE: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: may each query row read each cache position of this tile?"""
    new_index = positions - prefix_len
    is_new = (new_index >= 0) & (new_index < num_new)
    if IS_TREE:
        bit = tl.minimum(tl.maximum(new_index, 0), 63).to(tl.int64)
        sees_new = ((tree_row[:, None] >> bit[None, :]) & 1) != 0
    else:
        sees_new = new_index[None, :] <= query_token[:, None]
    return (new_index < 0)[None, :] | (is_new[None, :] & sees_new)


@triton.jit
def _attend_kv_tile(acc, row_max, row_sum, q, k_head, v_head, stride_kl, stride_vl, kv_start,
                    prefix_len, num_new, query_token, tree_row, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_TREE: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over cache positions [kv_start, kv_start + BLOCK_N), base-2 domain."""
    positions = kv_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_len = prefix_len + num_new
    k = _load_kv_tile(k_head + positions[:, None] * stride_kl + offs_d[None, :], positions, kv_len, offs_d,
                      HEAD_DIM, BLOCK_D, MASKED)
    v = _load_kv_tile(v_head + positions[:, None] * stride_vl + offs_d[None, :], positions, kv_len, offs_d,
                      HEAD_DIM, BLOCK_D, MASKED)

    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale         # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = _visible(positions, prefix_len, num_new, query_token, tree_row, IS_TREE)
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    if MASKED:  # a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf)
        new_max_safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max_safe = new_max
    probs = tl.exp2(scores - new_max_safe[:, None])
    rescale = tl.exp2(row_max - new_max_safe)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    acc = tl.dot(probs.to(v.dtype), v, acc * rescale[:, None], input_precision="ieee")
    return acc, new_max, row_sum


@triton.jit
def _verify_attention_kernel(
    Q, K, V, PrefixLens, TreeMask, Out, Lse,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ot, stride_os,
    stride_lb, stride_lh, stride_lt, stride_ls,
    qk_scale, num_new, cache_len, num_kv_heads, group_size, num_splits, store_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_TREE: tl.constexpr, MIN_SPLIT: tl.constexpr,
):
    # Grid (cdiv(T * G, BLOCK_M), B * Hkv, num_splits). A program owns BLOCK_M rows of one KV head's
    # flattened [T * G] query matrix (row m: token m // G, query head kv_head * G + m % G) and one split
    # of that row's cache, read in BLOCK_N tiles once for all its rows (tl.dot, fp32 accumulators,
    # online softmax in base 2). Aim: memory bound on the K/V bytes of the visible prefix.
    # Out/Lse are the final tensors (num_splits == 1) or fp32 per-split partials for the merge kernel.
    query_block = tl.program_id(0)
    row = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    split = tl.program_id(2)

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    query_token = offs_m // group_size
    query_head = kv_head * group_size + offs_m % group_size
    row_valid = offs_m < num_new * group_size
    dim_valid = offs_d < HEAD_DIM

    prefix_len = _clamped_prefix_len(PrefixLens, row, num_new, cache_len)
    kv_len = prefix_len + num_new
    split_len = _split_len(kv_len, num_splits, MIN_SPLIT)
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, kv_len)

    row64 = row.to(tl.int64)
    q_ptrs = (Q + row64 * stride_qb + query_head[:, None] * stride_qh + query_token[:, None] * stride_qt
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    k_head = K + row64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_head = V + row64 * stride_vb + kv_head.to(tl.int64) * stride_vh
    if IS_TREE:
        tree_row = tl.load(TreeMask + row64 * num_new + query_token, mask=row_valid, other=0)
    else:
        tree_row = query_token  # unused by the causal rule

    # Tiles below seen_by_all_end are visible to every row of this block (no masking); nothing at or
    # past seen_by_any_end is visible to any of them (not read).
    first_token = (query_block * BLOCK_M) // group_size
    last_token = tl.minimum((query_block * BLOCK_M + BLOCK_M - 1) // group_size, num_new - 1)
    if IS_TREE:
        seen_by_all_end = prefix_len
        seen_by_any_end = kv_len
    else:
        seen_by_all_end = prefix_len + first_token + 1
        seen_by_any_end = prefix_len + last_token + 1
    unmasked_tiles = tl.maximum(tl.minimum(split_end, seen_by_all_end) - split_start, 0) // BLOCK_N
    unmasked_end = split_start + unmasked_tiles * BLOCK_N
    masked_end = tl.minimum(split_end, seen_by_any_end)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kv_start in range(split_start, unmasked_end, BLOCK_N):
        acc, row_max, row_sum = _attend_kv_tile(
            acc, row_max, row_sum, q, k_head, v_head, stride_kl, stride_vl, kv_start,
            prefix_len, num_new, query_token, tree_row, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, IS_TREE, False)
    for kv_start in range(unmasked_end, masked_end, BLOCK_N):
        acc, row_max, row_sum = _attend_kv_tile(
            acc, row_max, row_sum, q, k_head, v_head, stride_kl, stride_vl, kv_start,
            prefix_len, num_new, query_token, tree_row, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, IS_TREE, True)

    has_mass = row_sum > 0.0
    out = acc / tl.where(has_mass, row_sum, 1.0)[:, None]
    lse = tl.where(has_mass, (row_max + tl.log2(row_sum)) * _LN2, float("-inf"))

    # A split that starts past this row's cache holds nothing: the merge does not read it.
    store_rows = row_valid & (split_start < kv_len)
    out_ptrs = (Out + row64 * stride_ob + query_head[:, None] * stride_oh + query_token[:, None] * stride_ot
                + split * stride_os + offs_d[None, :])
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=store_rows[:, None] & dim_valid[None, :])
    if store_lse:
        lse_ptrs = Lse + row64 * stride_lb + query_head * stride_lh + query_token * stride_lt + split * stride_ls
        tl.store(lse_ptrs, lse, mask=store_rows)


@triton.jit
def _verify_attention_merge_kernel(
    PartialOut, PartialLse, PrefixLens, Out, Lse,
    stride_ob, stride_oh, stride_ot,
    num_q_heads, num_new, cache_len, num_splits, store_lse,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MIN_SPLIT: tl.constexpr,
):
    # Grid (B * Hq * T,). A program owns one query: it log-sum-exp merges the per-split partials
    # ([B, Hq, T, num_splits, D] fp32 normalised outputs, [B, Hq, T, num_splits] natural-log lse) of the
    # splits that hold part of its row's cache, and writes out (q's dtype, any strides) and lse.
    query = tl.program_id(0)
    token = query % num_new
    head = (query // num_new) % num_q_heads
    row = query // (num_new * num_q_heads)
    offs_d = tl.arange(0, BLOCK_D)
    dim_valid = offs_d < HEAD_DIM

    kv_len = _clamped_prefix_len(PrefixLens, row, num_new, cache_len) + num_new
    num_active_splits = tl.cdiv(kv_len, _split_len(kv_len, num_splits, MIN_SPLIT))
    partial_lse = PartialLse + query.to(tl.int64) * num_splits
    partial_out = PartialOut + query.to(tl.int64) * num_splits * HEAD_DIM

    max_lse = float("-inf")
    for split in range(0, num_active_splits):
        max_lse = tl.maximum(max_lse, tl.load(partial_lse + split))
    max_lse_safe = tl.where(max_lse == float("-inf"), 0.0, max_lse)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    total = 0.0
    for split in range(0, num_active_splits):
        weight = tl.exp2((tl.load(partial_lse + split) - max_lse_safe) * _LOG2E)
        part = tl.load(partial_out + split * HEAD_DIM + offs_d, mask=dim_valid, other=0.0)
        acc += weight * tl.where(weight > 0.0, part, 0.0)
        total += weight

    has_mass = total > 0.0
    out = acc / tl.where(has_mass, total, 1.0)
    out_ptrs = Out + row.to(tl.int64) * stride_ob + head * stride_oh + token * stride_ot + offs_d
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=dim_valid)
    if store_lse:
        tl.store(Lse + query, tl.where(has_mass, max_lse_safe + tl.log(total), float("-inf")))


# ---------------------------------------------------------------------------------------------------
# Configurations: every (dtype, head_dim in spec.HEAD_DIMS, tree or chain, BLOCK_M, output dtype) the launcher
# can pick, with its tile sizes. "out_dtype" is q's dtype when the kernel writes out directly and fp32 when it
# writes per-split partials (the same kernel for fp32 inputs).

_LONG_CHAIN_ROWS = 512   # T * G above which a chain (prefill) that fills the GPU unsplit uses BLOCK_M = 128


def _block_m_choices(dtype: str, is_tree: bool) -> tuple:
    if is_tree or dtype == "fp32":   # a tree has T <= 64; fp32's FMA dot spills at BLOCK_M = 128
        return (16, 32, 64)
    return (16, 32, 64, 128)


_LONG_SPLIT = 512   # positions per split from which 16-bit D=128 programs take BLOCK_N=128 tiles


def _tile(dtype: str, head_dim: int, block_m: int, is_tree: bool, long_split: bool = False) -> dict:
    """BLOCK_N, num_warps and num_stages, chosen from ptxas's sm_90 figures to stay free of spills
    (with triton 3.6, what GPU machines carry, and 3.8). Programs that walk long splits of a D=128 cache
    take 128-position tiles at 8 warps: 3-11% faster than 64 on an H200 at LLaVA (MHA, B=1) and Qwen2-VL
    (GQA, B=4) shapes, slower on short splits (bench/results/NVIDIA-H200-2026-11-26-tune*)."""
    if long_split:
        return dict(BLOCK_N=128, num_warps=8, num_stages=3)
    if dtype == "fp32":       # the ieee fp32 dot runs on FMA units and holds whole rows in registers
        return dict(BLOCK_N=16, num_warps=8, num_stages=2)
    if head_dim > 128:        # triton 3.6 spills 16 bytes on the 16-bit tree kernel at BLOCK_M=32 with 2 stages
        return dict(BLOCK_N=32, num_warps=8, num_stages=1 if (is_tree and block_m == 32) else 2)
    return dict(BLOCK_N=64, num_warps=4 if block_m == 16 else 8, num_stages=3)


def _build_configs() -> tuple:
    configs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for head_dim in HEAD_DIMS:
            for is_tree in (False, True):
                for block_m in _block_m_choices(dtype, is_tree):
                    for out_dtype in dict.fromkeys((dtype, "fp32")):
                        for long_split in (False, True) if (dtype != "fp32" and head_dim == 128) else (False,):
                            configs.append(dict(
                                dtype=dtype, out_dtype=out_dtype, head_dim=head_dim, is_tree=is_tree,
                                BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim), long_split=long_split,
                                **_tile(dtype, head_dim, block_m, is_tree, long_split)))
    return tuple(configs)


KERNEL_CONFIGS = _build_configs()
_CONFIG_INDEX = {(c["dtype"], c["out_dtype"], c["head_dim"], c["is_tree"], c["BLOCK_M"], c["long_split"]): c
                 for c in KERNEL_CONFIGS}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def config_name(config: dict) -> str:
    mask = "tree" if config["is_tree"] else "chain"
    partials = "_fp32_partials" if config["out_dtype"] != config["dtype"] else ""
    return (f"{config['dtype']}_d{config['head_dim']}_{mask}_m{config['BLOCK_M']}_n{config['BLOCK_N']}"
            f"_w{config['num_warps']}_s{config['num_stages']}{partials}")


def _block_m_for(rows: int, dtype: str, is_tree: bool, grid_is_full: bool) -> int:
    """The smallest BLOCK_M holding all T * G query rows; 128 only for long chains that fill the GPU."""
    choices = _block_m_choices(dtype, is_tree)
    if 128 in choices and rows > _LONG_CHAIN_ROWS and grid_is_full:
        return 128
    return next((block_m for block_m in choices if block_m >= rows), 64)


def _merge_num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 128 else 8


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _SM_COUNT_WITHOUT_GPU
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(programs: int, cache_len: int, sm_count: int) -> int:
    """Split the cache until the grid holds about SPLIT_WAVES programs per multiprocessor, each split
    covering >= MIN_SPLIT_LEN positions."""
    by_length = cache_len // MIN_SPLIT_LEN
    return max(1, min(SPLIT_WAVES * sm_count // programs, by_length, _MAX_SPLITS))


def verify_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            prefix_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], sm_scale: float,
                            out: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
    """Writes verify_attention into ``out`` (and ``lse``) in place; inputs are assumed valid.

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, L_max, D]; all three fp32, fp16 or bf16, last dim
    stride 1, other strides arbitrary. prefix_lens [B] int32 contiguous. tree_mask None (causal
    chain) or [B, T] int64 contiguous, T <= 64. out [B, Hq, T, D] in q's dtype, last dim stride 1.
    lse None or [B, Hq, T] fp32 contiguous. See reference.py for the semantics.
    """
    batch, num_q_heads, num_new, head_dim = q.shape
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if batch == 0 or num_q_heads == 0:
        return
    group_size = num_q_heads // num_kv_heads
    rows = num_new * group_size
    is_tree = tree_mask is not None
    dtype = _DTYPE_NAMES[q.dtype]
    sm_count = _sm_count(q.device)

    block_m = _block_m_for(rows, dtype, is_tree, batch * num_kv_heads * triton.cdiv(rows, 128) >= sm_count)
    num_query_blocks = triton.cdiv(rows, block_m)
    num_splits = _num_splits(batch * num_kv_heads * num_query_blocks, cache_len, sm_count)
    key = (dtype, dtype if num_splits == 1 else "fp32", head_dim, is_tree, block_m)
    long_split = triton.cdiv(cache_len, num_splits) >= _LONG_SPLIT and (*key, True) in _CONFIG_INDEX
    config = _CONFIG_INDEX[(*key, long_split)]

    if num_splits == 1:   # the kernel writes out and lse itself
        dest_out, dest_lse = out, lse
        out_strides = (*out.stride()[:3], 0)
        lse_strides = (*lse.stride(), 0) if lse is not None else (0, 0, 0, 0)
    else:                 # fp32 partials, then the merge kernel writes out and lse
        dest_out = torch.empty((batch, num_q_heads, num_new, num_splits, head_dim),
                               dtype=torch.float32, device=q.device)
        dest_lse = torch.empty((batch, num_q_heads, num_new, num_splits), dtype=torch.float32, device=q.device)
        out_strides = dest_out.stride()[:4]
        lse_strides = dest_lse.stride()
    store_lse = dest_lse is not None
    if dest_lse is None:
        dest_lse = torch.empty(0, dtype=torch.float32, device=q.device)   # never written
    tree_arg = tree_mask if is_tree else prefix_lens                        # never read for a chain

    device_guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_guard:
        _verify_attention_kernel[(num_query_blocks, batch * num_kv_heads, num_splits)](
            q, k_cache, v_cache, prefix_lens, tree_arg, dest_out, dest_lse,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *out_strides, *lse_strides,
            sm_scale * _LOG2E.value, num_new, cache_len, num_kv_heads, group_size, num_splits, int(store_lse),
            HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"], BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"],
            IS_TREE=is_tree, MIN_SPLIT=MIN_SPLIT_LEN, num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
        if num_splits > 1:
            _verify_attention_merge_kernel[(batch * num_q_heads * num_new,)](
                dest_out, dest_lse, prefix_lens, out, lse if lse is not None else dest_lse,
                out.stride(0), out.stride(1), out.stride(2),
                num_q_heads, num_new, cache_len, num_splits, int(lse is not None),
                HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"], MIN_SPLIT=MIN_SPLIT_LEN,
                num_warps=_merge_num_warps(head_dim),
            )


verify_attention_triton_op = torch.library.custom_op(
    "fastvlm::verify_attention_triton", mutates_args=("out", "lse"))(verify_attention_triton)


@verify_attention_triton_op.register_fake
def _verify_attention_triton_fake(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed): the compile test tier.

def _main_kernel_types(config: dict) -> Tuple[dict, dict]:
    """(types of the non-constexpr arguments that are not i32, constexpr values) for one config."""
    dtype = config["dtype"]
    types = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "PrefixLens": "*i32",
             "TreeMask": "*i64" if config["is_tree"] else "*i32", "Out": f"*{config['out_dtype']}",
             "Lse": "*fp32", "qk_scale": "fp32"}
    constexprs = {"HEAD_DIM": config["head_dim"], "BLOCK_D": config["BLOCK_D"], "BLOCK_M": config["BLOCK_M"],
                  "BLOCK_N": config["BLOCK_N"], "IS_TREE": config["is_tree"], "MIN_SPLIT": MIN_SPLIT_LEN}
    return types, constexprs


def _merge_kernel_types(out_dtype: str, head_dim: int) -> Tuple[dict, dict]:
    types = {"PartialOut": "*fp32", "PartialLse": "*fp32", "PrefixLens": "*i32",
             "Out": f"*{out_dtype}", "Lse": "*fp32"}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim), "MIN_SPLIT": MIN_SPLIT_LEN}
    return types, constexprs


@functools.lru_cache(maxsize=None)
def _compile_merge_for_sm90(out_dtype: str, head_dim: int) -> dict:
    types, constexprs = _merge_kernel_types(out_dtype, head_dim)
    return compile_sm90(_verify_attention_merge_kernel, types, constexprs,
                        num_warps=_merge_num_warps(head_dim), num_stages=1,
                        name=f"merge_{out_dtype}_d{head_dim}")


def compile_for_sm90(config: dict) -> dict:
    """Compiles one KERNEL_CONFIGS entry for sm_90 (and, once per output dtype and head dim, the merge
    kernel) and returns ptxas's figures: {"name", "registers", "spill_stores", "spill_loads",
    "shared_bytes", "merge": the merge kernel's figures}."""
    types, constexprs = _main_kernel_types(config)
    result = compile_sm90(_verify_attention_kernel, types, constexprs, config["num_warps"],
                          config["num_stages"], config_name(config))
    result["merge"] = _compile_merge_for_sm90(config["dtype"], config["head_dim"])
    return result
