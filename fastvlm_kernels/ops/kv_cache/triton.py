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
