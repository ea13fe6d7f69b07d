"""Triton backend of kv_compact: one program per (layer, keys|values, row) and block of KV heads moves
those heads' accepted positions, every layer in one launch.

The semantics are those of reference.py. This module holds the kernel, its launcher kv_compact_triton, the
torch custom op kv_compact_triton_op (``torch.ops.fastvlm.kv_compact_triton``) and KERNEL_CONFIGS with
compile_for_sm90 for the ahead-of-time compile test.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._aot import compile_sm90

# Bytes of one [BLOCK_H * BLOCK_A, BLOCK_D] tile held in registers (16 KiB: 32 registers a thread at 4 warps).
# A program moves several heads at once: a path moves few rows per (layer, row, head) slice (a few hundred
# bytes to a few KiB), and one program per slice spent its time in dependent-load latency, not in moving
# (H200: 3.4-27 us for one program per slice, 2.5-14 us now). TILE_BYTES, NUM_WARPS and PATH_BLOCK_A are
# bench/tune_gpu.py's choice on an H200 (bench/results/NVIDIA-H200-2026-11-26-tune*): within 15% of the best
# of 24 settings at every LLaVA / Qwen2-VL shape.
TILE_BYTES = 16384
APPEND_TILE_BYTES = 16384   # kv_append's tile: the same size, kept apart because the sweep varies TILE_BYTES only
_MAX_BLOCK_A = 64
PATH_BLOCK_A = 16   # nodes per chunk: an accepted path is rarely longer (k + 1 tokens for a draft of k)
NUM_WARPS = 4


@triton.jit
def _kv_compact_kernel(Buffer, Start, Accepted,
                       stride_layer, stride_kv, stride_b, stride_h, stride_pos,
                       batch, num_kv_heads, cache_len, num_accepted,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_H: tl.constexpr, COUNT_BLOCK: tl.constexpr):
    # Grid: (num_layers * 2 * B, cdiv(Hkv, BLOCK_H)). A program owns BLOCK_H heads of one (layer, keys or
    # values, row) and walks the row's accepted nodes (not its padding) in chunks of BLOCK_A: load every
    # moving row of the chunk, for all its heads, into registers ([BLOCK_H * BLOCK_A, BLOCK_D], row r =
    # head r // BLOCK_A, node r % BLOCK_A), barrier, store. Later chunks' sources lie at or after this
    # chunk's destinations (accepted[j] >= j), and the barrier orders this chunk's loads before its stores,
    # so overlapping sources and destinations are safe; different heads never overlap. Memory bound: each
    # moved row is read once and written once; rows that stay put are not touched.
    slice_id = tl.program_id(0)
    row = slice_id % batch
    kv = (slice_id // batch) % 2
    layer = slice_id // (batch * 2)
    offs_r = tl.arange(0, BLOCK_H * BLOCK_A)
    head = tl.program_id(1) * BLOCK_H + offs_r // BLOCK_A
    base = (Buffer + layer.to(tl.int64) * stride_layer + kv.to(tl.int64) * stride_kv
            + row.to(tl.int64) * stride_b)
    head_base = head.to(tl.int64) * stride_h
    start = tl.load(Start + row)
    offs_d = tl.arange(0, BLOCK_D)
    # -1 padding is trailing: count the row's nodes first, so that a path of a few nodes in a wide,
    # mostly padded accepted row costs one chunk.
    num_nodes = 0
    for first in range(0, num_accepted, COUNT_BLOCK):
        offs = first + tl.arange(0, COUNT_BLOCK)
        nodes = tl.load(Accepted + row * num_accepted + offs, mask=offs < num_accepted, other=-1)
        num_nodes += tl.sum((nodes >= 0).to(tl.int32), 0)
    for chunk in range(0, num_nodes, BLOCK_A):
        j = chunk + offs_r % BLOCK_A
        node = tl.load(Accepted + row * num_accepted + j, mask=j < num_accepted, other=-1)
        source = start + node
        destination = start + j
        moves = (node >= 0) & (node != j) & (source < cache_len) & (destination >= 0) & (head < num_kv_heads)
        mask = moves[:, None] & (offs_d[None, :] < HEAD_DIM)
        rows = tl.load(base + (head_base + source.to(tl.int64) * stride_pos)[:, None] + offs_d[None, :], mask=mask)
        tl.debug_barrier()
        tl.store(base + (head_base + destination.to(tl.int64) * stride_pos)[:, None] + offs_d[None, :], rows,
                 mask=mask)


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def block_a_for(dtype: str, block_d: int, tile_bytes: int = APPEND_TILE_BYTES) -> int:
    """Nodes per chunk: as many as fit the register tile, at most 64 (one chunk for any draft tree)."""
    return max(1, min(_MAX_BLOCK_A, tile_bytes // (block_d * _DTYPE_BYTES[dtype])))


def compact_blocks(dtype: str, head_dim: int, num_accepted: int, num_kv_heads: int) -> tuple:
    """(BLOCK_A, BLOCK_H): a chunk of nodes as long as a typical accepted path (at most PATH_BLOCK_A; longer
    paths take more chunks), and as many heads as fill the rest of the TILE_BYTES tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_a = min(block_a_for(dtype, block_d, TILE_BYTES), PATH_BLOCK_A,
                  triton.next_power_of_2(max(num_accepted, 1)))
    room = max(1, TILE_BYTES // (block_a * block_d * _DTYPE_BYTES[dtype]))
    block_h = min(1 << (room.bit_length() - 1), triton.next_power_of_2(max(num_kv_heads, 1)))
    return block_a, block_h


def _count_block(num_accepted: int) -> int:
    return min(64, triton.next_power_of_2(max(num_accepted, 1)))


def kv_compact_triton(buffer: torch.Tensor, start: torch.Tensor, accepted: torch.Tensor) -> None:
    """kv_compact in place; inputs are assumed valid. buffer [num_layers, 2, B, Hkv, L_max, D] fp32, fp16
    or bf16 with last-dim stride 1; start [B] int32 contiguous; accepted [B, A] int32 contiguous."""
    num_layers, _, batch, num_kv_heads, cache_len, head_dim = buffer.shape
    num_accepted = accepted.shape[1]
    if num_layers * batch * num_kv_heads == 0 or num_accepted == 0:
        return
    block_a, block_h = compact_blocks(_DTYPE_NAMES[buffer.dtype], head_dim, num_accepted, num_kv_heads)
    device_guard = torch.cuda.device(buffer.device) if buffer.is_cuda else contextlib.nullcontext()
    with device_guard:
        _kv_compact_kernel[(num_layers * 2 * batch, triton.cdiv(num_kv_heads, block_h))](
            buffer, start, accepted, *buffer.stride()[:5],
            batch, num_kv_heads, cache_len, num_accepted,
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_A=block_a, BLOCK_H=block_h,
            COUNT_BLOCK=_count_block(num_accepted), num_warps=NUM_WARPS,
        )


kv_compact_triton_op = torch.library.custom_op(
    "fastvlm::kv_compact_triton", mutates_args=("buffer",))(kv_compact_triton)


@kv_compact_triton_op.register_fake
def _kv_compact_triton_fake(buffer, start, accepted) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed): the compile test tier.

# (dtype, head_dim, path width A, Hkv): the launcher's (BLOCK_A, BLOCK_H) for LLaVA (32 heads) and Qwen2-VL
# (4 heads) paths, a 64-node path and head sizes 80 and 256.
KERNEL_CONFIGS = [{"dtype": dtype, "head_dim": head_dim, "accepted": accepted, "kv_heads": kv_heads}
                  for dtype in ("fp32", "fp16", "bf16") for head_dim in (64, 128)
                  for accepted, kv_heads in ((4, 32), (10, 4), (64, 32))] + \
                 [{"dtype": "fp16", "head_dim": 80, "accepted": 8, "kv_heads": 8},
                  {"dtype": "fp32", "head_dim": 256, "accepted": 64, "kv_heads": 4}]


def config_name(config: dict) -> str:
    block_a, block_h = compact_blocks(config["dtype"], config["head_dim"], config["accepted"], config["kv_heads"])
    return f"kv_compact_{config['dtype']}_d{config['head_dim']}_a{block_a}_h{block_h}"


def compile_for_sm90(config: dict) -> dict:
    """Compiles one KERNEL_CONFIGS entry for sm_90 and returns ptxas's figures (see ops/_aot.py)."""
    block_a, block_h = compact_blocks(config["dtype"], config["head_dim"], config["accepted"], config["kv_heads"])
    types = {"Buffer": f"*{config['dtype']}", "Start": "*i32", "Accepted": "*i32"}
    constexprs = {"HEAD_DIM": config["head_dim"], "BLOCK_D": triton.next_power_of_2(config["head_dim"]),
                  "BLOCK_A": block_a, "BLOCK_H": block_h, "COUNT_BLOCK": _count_block(config["accepted"])}
    return compile_sm90(_kv_compact_kernel, types, constexprs, NUM_WARPS, 1, config_name(config))


# ---------------------------------------------------------------------------------------------------
# kv_append

@triton.jit
def _kv_append_kernel(KCache, VCache, Lengths, Keys, Values,
                      stride_cb, stride_ch, stride_cl, stride_vb, stride_vh, stride_vl,
                      stride_kb, stride_kh, stride_kt, stride_nb, stride_nh, stride_nt,
                      num_kv_heads, cache_len, num_new,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    # Grid: (B * Hkv, cdiv(T, BLOCK_T), 2). One program copies BLOCK_T new positions of one (row, KV head)
    # of the keys (axis 2 = 0) or the values (= 1) to the cache at lengths[row] + t. Sources and
    # destinations are different tensors, so no ordering is needed. Memory bound: read once, write once.
    pid = tl.program_id(0)
    row = pid // num_kv_heads
    head = pid % num_kv_heads
    is_values = tl.program_id(2)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    position = tl.load(Lengths + row) + t
    mask = ((t < num_new) & (position >= 0) & (position < cache_len))[:, None] & (offs_d[None, :] < HEAD_DIM)
    if is_values == 0:
        source = Keys + row.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh + t[:, None].to(tl.int64) * stride_kt
        target = KCache + row.to(tl.int64) * stride_cb + head.to(tl.int64) * stride_ch \
            + position[:, None].to(tl.int64) * stride_cl
    else:
        source = Values + row.to(tl.int64) * stride_nb + head.to(tl.int64) * stride_nh + t[:, None].to(tl.int64) * stride_nt
        target = VCache + row.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh \
            + position[:, None].to(tl.int64) * stride_vl
    tl.store(target + offs_d[None, :], tl.load(source + offs_d[None, :], mask=mask), mask=mask)


def kv_append_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> None:
    """kv_append in place; inputs are assumed valid (see kv_append). lengths [B] int32 contiguous."""
    batch, num_kv_heads, cache_len, head_dim = k_cache.shape
    num_new = keys.shape[2]
    if batch * num_kv_heads * num_new == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_t = min(block_a_for(_DTYPE_NAMES[k_cache.dtype], block_d), triton.next_power_of_2(num_new))
    device_guard = torch.cuda.device(k_cache.device) if k_cache.is_cuda else contextlib.nullcontext()
    with device_guard:
        _kv_append_kernel[(batch * num_kv_heads, triton.cdiv(num_new, block_t), 2)](
            k_cache, v_cache, lengths, keys, values,
            *k_cache.stride()[:3], *v_cache.stride()[:3], *keys.stride()[:3], *values.stride()[:3],
            num_kv_heads, cache_len, num_new,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=NUM_WARPS,
        )


kv_append_triton_op = torch.library.custom_op(
    "fastvlm::kv_append_triton", mutates_args=("k_cache", "v_cache"))(kv_append_triton)


@kv_append_triton_op.register_fake
def _kv_append_triton_fake(k_cache, v_cache, lengths, keys, values) -> None:
    return None


APPEND_KERNEL_CONFIGS = [{"dtype": dtype, "head_dim": 128, "block_t": block_t}
                         for dtype in ("fp32", "bf16") for block_t in (1, 8)]


def compile_append_for_sm90(config: dict) -> dict:
    block_d = triton.next_power_of_2(config["head_dim"])
    types = {name: f"*{config['dtype']}" for name in ("KCache", "VCache", "Keys", "Values")}
    types["Lengths"] = "*i32"
    constexprs = {"HEAD_DIM": config["head_dim"], "BLOCK_D": block_d, "BLOCK_T": config["block_t"]}
    return compile_sm90(_kv_append_kernel, types, constexprs, NUM_WARPS, 1,
                        f"kv_append_{config['dtype']}_d{config['head_dim']}_t{config['block_t']}")
