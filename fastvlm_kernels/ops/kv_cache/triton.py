"""Triton backend of kv_compact: one program per (layer, keys|values, row, KV head) slice moves that
slice's accepted positions, every layer in one launch.

The semantics are those of reference.py. This module holds the kernel, its launcher kv_compact_triton, the
torch custom op kv_compact_triton_op (``torch.ops.fastvlm.kv_compact_triton``) and KERNEL_CONFIGS with
compile_for_sm90 for the ahead-of-time compile test.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_A, BLOCK_D] tile held in registers: 16 KiB, 32 registers a thread at 4 warps.
_TILE_BYTES = 16384
_MAX_BLOCK_A = 64
_NUM_WARPS = 4


@triton.jit
def _kv_compact_kernel(Buffer, Start, Accepted,
                       stride_layer, stride_kv, stride_b, stride_h, stride_pos,
                       batch, num_kv_heads, cache_len, num_accepted,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
    # Grid: (num_layers * 2 * B * Hkv,). One program owns one [L_max, D] slice and walks its accepted
    # nodes in chunks of BLOCK_A: load every moving row of the chunk into registers, barrier, store. Later
    # chunks' sources lie at or after this chunk's destinations (accepted[j] >= j), and the barrier orders
    # this chunk's loads before its stores, so overlapping sources and destinations are safe.
    # Memory bound: each moved row is read once and written once; rows that stay put are not touched.
    slice_id = tl.program_id(0)
    head = slice_id % num_kv_heads
    row = (slice_id // num_kv_heads) % batch
    kv = (slice_id // (num_kv_heads * batch)) % 2
    layer = slice_id // (num_kv_heads * batch * 2)
    base = (Buffer + layer.to(tl.int64) * stride_layer + kv.to(tl.int64) * stride_kv
            + row.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h)
    start = tl.load(Start + row)
    offs_d = tl.arange(0, BLOCK_D)
    for chunk in range(0, num_accepted, BLOCK_A):
        j = chunk + tl.arange(0, BLOCK_A)
        node = tl.load(Accepted + row * num_accepted + j, mask=j < num_accepted, other=-1)
        source = start + node
        destination = start + j
        moves = (node >= 0) & (node != j) & (source < cache_len) & (destination >= 0)
        mask = moves[:, None] & (offs_d[None, :] < HEAD_DIM)
        rows = tl.load(base + source[:, None].to(tl.int64) * stride_pos + offs_d[None, :], mask=mask)
        tl.debug_barrier()
        tl.store(base + destination[:, None].to(tl.int64) * stride_pos + offs_d[None, :], rows, mask=mask)


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def block_a_for(dtype: str, block_d: int) -> int:
    """Nodes per chunk: as many as fit the register tile, at most 64 (one chunk for any draft tree)."""
    return max(1, min(_MAX_BLOCK_A, _TILE_BYTES // (block_d * _DTYPE_BYTES[dtype])))


def kv_compact_triton(buffer: torch.Tensor, start: torch.Tensor, accepted: torch.Tensor) -> None:
    """kv_compact in place; inputs are assumed valid. buffer [num_layers, 2, B, Hkv, L_max, D] fp32, fp16
    or bf16 with last-dim stride 1; start [B] int32 contiguous; accepted [B, A] int32 contiguous."""
    num_layers, _, batch, num_kv_heads, cache_len, head_dim = buffer.shape
    num_accepted = accepted.shape[1]
    num_slices = num_layers * 2 * batch * num_kv_heads
    if num_slices == 0 or num_accepted == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_a = block_a_for(_DTYPE_NAMES[buffer.dtype], block_d)
    device_guard = torch.cuda.device(buffer.device) if buffer.is_cuda else contextlib.nullcontext()
    with device_guard:
        _kv_compact_kernel[(num_slices,)](
            buffer, start, accepted, *buffer.stride()[:5],
            batch, num_kv_heads, cache_len, num_accepted,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_A=block_a, num_warps=_NUM_WARPS,
        )


kv_compact_triton_op = torch.library.custom_op(
    "fastvlm::kv_compact_triton", mutates_args=("buffer",))(kv_compact_triton)


@kv_compact_triton_op.register_fake
def _kv_compact_triton_fake(buffer, start, accepted) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed): the compile test tier.

KERNEL_CONFIGS = [{"dtype": dtype, "head_dim": head_dim}
                  for dtype in ("fp32", "fp16", "bf16") for head_dim in (64, 128)] + \
                 [{"dtype": "fp16", "head_dim": 80}, {"dtype": "fp32", "head_dim": 256}]


def config_name(config: dict) -> str:
    return f"kv_compact_{config['dtype']}_d{config['head_dim']}"


def compile_for_sm90(config: dict) -> dict:
    """Compiles one KERNEL_CONFIGS entry for sm_90 and returns ptxas's figures (see verify_attention)."""
    from ..verify_attention.triton import _compile_sm90

    block_d = triton.next_power_of_2(config["head_dim"])
    types = {"Buffer": f"*{config['dtype']}", "Start": "*i32", "Accepted": "*i32"}
    constexprs = {"HEAD_DIM": config["head_dim"], "BLOCK_D": block_d,
                  "BLOCK_A": block_a_for(config["dtype"], block_d)}
    return _compile_sm90(_kv_compact_kernel, types, constexprs, _NUM_WARPS, 1, config_name(config))


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
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_NUM_WARPS,
        )


kv_append_triton_op = torch.library.custom_op(
    "fastvlm::kv_append_triton", mutates_args=("k_cache", "v_cache"))(kv_append_triton)


@kv_append_triton_op.register_fake
def _kv_append_triton_fake(k_cache, v_cache, lengths, keys, values) -> None:
    return None


APPEND_KERNEL_CONFIGS = [{"dtype": dtype, "head_dim": 128, "block_t": block_t}
                         for dtype in ("fp32", "bf16") for block_t in (1, 8)]


def compile_append_for_sm90(config: dict) -> dict:
    from ..verify_attention.triton import _compile_sm90

    block_d = triton.next_power_of_2(config["head_dim"])
    types = {name: f"*{config['dtype']}" for name in ("KCache", "VCache", "Keys", "Values")}
    types["Lengths"] = "*i32"
    constexprs = {"HEAD_DIM": config["head_dim"], "BLOCK_D": block_d, "BLOCK_T": config["block_t"]}
    return _compile_sm90(_kv_append_kernel, types, constexprs, _NUM_WARPS, 1,
                         f"kv_append_{config['dtype']}_d{config['head_dim']}_t{config['block_t']}")
