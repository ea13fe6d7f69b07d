"""Triton backend of the acceptance ops: one program per batch row walks the row's nodes (reference.py).

This module holds the kernels, their launchers accept_greedy_triton / accept_sampling_triton and torch
custom ops (``torch.ops.fastvlm.accept_greedy_triton`` / ``accept_sampling_triton``), and KERNEL_CONFIGS /
compile_for_sm90 for the ahead-of-time sm_90 compile test.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .._aot import compile_sm90

_BLOCK_V = 2048       # vocabulary tile of the sampling passes
_SAMPLING_WARPS = 8


@triton.jit
def _node_parent(Parents, row, child, num_nodes, HAS_PARENTS: tl.constexpr):
    if HAS_PARENTS:
        parent = tl.load(Parents + row * num_nodes + child)
    else:
        parent = child - 1
    return parent


@triton.jit
def _finish_row(AcceptLen, Path, Emitted, row, accepted, num_nodes, HAS_PATH: tl.constexpr, BLOCK_N: tl.constexpr):
    """-1 past the valid entries, the length, and the root in the path."""
    tl.store(AcceptLen + row, accepted.to(tl.int32))
    for start in range(0, num_nodes, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        pad = (offs > accepted) & (offs < num_nodes)
        tl.store(Emitted + row * num_nodes + offs, tl.full([BLOCK_N], -1, tl.int64), mask=pad)
        if HAS_PATH:
            tl.store(Path + row * num_nodes + offs, tl.full([BLOCK_N], -1, tl.int64), mask=pad)
    if HAS_PATH:
        tl.store(Path + row * num_nodes, 0)


@triton.jit
def _accept_greedy_kernel(DraftTokens, Parents, TargetTokens, AcceptLen, Path, Emitted,
                          num_nodes, cols, node_offset,
                          HAS_PARENTS: tl.constexpr, HAS_PATH: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (B,). A program owns one row and walks its N nodes in index order with scalar loads: it moves
    # to a child of the current node whose token equals the target's token after that node. Integer
    # work only, O(N) per row: latency bound (a launch's worth of time).
    row = tl.program_id(0).to(tl.int64)
    cur = tl.zeros([], tl.int64)
    accepted = tl.zeros([], tl.int64)
    for child in range(1, num_nodes):
        child64 = child + tl.zeros([], tl.int64)
        parent = _node_parent(Parents, row, child64, num_nodes, HAS_PARENTS)
        if parent == cur:
            token = tl.load(DraftTokens + row * cols + child64 - node_offset)
            if token == tl.load(TargetTokens + row * num_nodes + cur):
                accepted += 1
                if HAS_PATH:
                    tl.store(Path + row * num_nodes + accepted, child64)
                tl.store(Emitted + row * num_nodes + accepted - 1, token)
                cur = child64
    tl.store(Emitted + row * num_nodes + accepted, tl.load(TargetTokens + row * num_nodes + cur))
    _finish_row(AcceptLen, Path, Emitted, row, accepted, num_nodes, HAS_PATH, BLOCK_N)


@triton.jit
def _load_prob(ptrs, mask):
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)


@triton.jit
def _accept_sampling_kernel(DraftTokens, Parents, DraftProbs, TargetProbs, Uniforms, Residual,
                            AcceptLen, Path, Emitted,
                            num_nodes, cols, node_offset, vocab,
                            HAS_PARENTS: tl.constexpr, HAS_PATH: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    # Grid (B,). A program owns one row: it walks the nodes with scalar loads of p and q at the drafted
    # tokens; a rejection is one pass over V in BLOCK_V tiles (residual r <- max(0, r - Z q) into the fp64
    # workspace row, and its sum Z); the final draw is a sum pass and a prefix-scan pass (tl.cumsum per
    # tile, stopping at the tile that crosses u * Z). Memory bound on those passes.
    row = tl.program_id(0).to(tl.int64)
    target_row = TargetProbs + row * num_nodes * vocab
    draft_row = DraftProbs + row * (num_nodes - 1) * vocab
    residual = Residual + row * vocab
    cur = tl.zeros([], tl.int64)
    accepted = tl.zeros([], tl.int64)
    has_residual = tl.zeros([], tl.int32)     # 0: the residual is p_cur itself, with Z = 1
    z = tl.full([], 1.0, tl.float64)
    for child in range(1, num_nodes):
        child64 = child + tl.zeros([], tl.int64)
        parent = _node_parent(Parents, row, child64, num_nodes, HAS_PARENTS)
        if parent == cur:
            token = tl.load(DraftTokens + row * cols + child64 - node_offset)
            index = tl.minimum(tl.maximum(token, 0), vocab - 1)     # valid tokens are unchanged
            p_token = tl.load(target_row + cur * vocab + index).to(tl.float32).to(tl.float64)
            q_token = tl.load(draft_row + cur * vocab + index).to(tl.float32).to(tl.float64)
            r_token = tl.where(has_residual != 0, tl.load(residual + index), p_token)
            u = tl.load(Uniforms + row * num_nodes + child64 - 1).to(tl.float64)
            if u * q_token * z < r_token:
                accepted += 1
                if HAS_PATH:
                    tl.store(Path + row * num_nodes + accepted, child64)
                tl.store(Emitted + row * num_nodes + accepted - 1, token)
                cur = child64
                has_residual = tl.zeros([], tl.int32)
                z = tl.full([], 1.0, tl.float64)
            else:
                total = tl.zeros([], tl.float64)
                for start in range(0, vocab, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    mask = offs < vocab
                    if has_residual != 0:
                        base = tl.load(residual + offs, mask=mask, other=0.0)
                    else:
                        base = _load_prob(target_row + cur * vocab + offs, mask)
                    r = tl.maximum(base - z * _load_prob(draft_row + cur * vocab + offs, mask), 0.0)
                    tl.store(residual + offs, r, mask=mask)
                    total += tl.sum(r, 0)
                tl.debug_barrier()
                has_residual = (total > 0.0).to(tl.int32)
                z = tl.where(total > 0.0, total, 1.0)

    # Inverse-CDF draw from the residual (or p_cur): the first j with cumsum[j] > u * sum.
    p_row = target_row + cur * vocab
    total = tl.zeros([], tl.float64)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < vocab
        if has_residual != 0:
            weights = tl.load(residual + offs, mask=mask, other=0.0)
        else:
            weights = _load_prob(p_row + offs, mask)
        total += tl.sum(weights, 0)
    threshold = tl.load(Uniforms + row * num_nodes + num_nodes - 1).to(tl.float64) * total
    running = tl.zeros([], tl.float64)
    found = tl.full([], -1, tl.int64)
    last_positive = tl.full([], -1, tl.int64)
    for start in range(0, vocab, BLOCK_V):
        if found < 0:
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < vocab
            if has_residual != 0:
                weights = tl.load(residual + offs, mask=mask, other=0.0)
            else:
                weights = _load_prob(p_row + offs, mask)
            cumulative = running + tl.cumsum(weights, 0)
            hit = (cumulative > threshold) & mask
            first = tl.min(tl.where(hit, offs, 2147483647), 0)
            found = tl.where(first < 2147483647, first.to(tl.int64), found)
            positive = tl.max(tl.where((weights > 0.0) & mask, offs, -1), 0)
            last_positive = tl.maximum(last_positive, positive.to(tl.int64))
            running += tl.sum(weights, 0)
    choice = tl.where(found >= 0, found, tl.maximum(last_positive, 0))
    tl.store(Emitted + row * num_nodes + accepted, choice)
    _finish_row(AcceptLen, Path, Emitted, row, accepted, num_nodes, HAS_PATH, BLOCK_N)


def _block_n(num_nodes: int) -> int:
    return min(triton.next_power_of_2(max(num_nodes, 16)), 1024)


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def accept_greedy_triton(draft_tokens: torch.Tensor, parents: Optional[torch.Tensor], target_tokens: torch.Tensor,
                         accept_len: torch.Tensor, path: Optional[torch.Tensor], emitted: torch.Tensor) -> None:
    """Writes accept_greedy(_tree) into accept_len / path / emitted; inputs assumed valid and contiguous:
    draft_tokens [B, N - 1] (chain, parents None) or [B, N] (tree), target_tokens [B, N] int64."""
    batch, num_nodes = target_tokens.shape
    if batch == 0:
        return
    cols = draft_tokens.shape[1]
    with _device_guard(draft_tokens):
        _accept_greedy_kernel[(batch,)](
            draft_tokens, parents if parents is not None else draft_tokens, target_tokens, accept_len,
            path if path is not None else emitted, emitted, num_nodes, cols, num_nodes - cols,
            HAS_PARENTS=parents is not None, HAS_PATH=path is not None, BLOCK_N=_block_n(num_nodes), num_warps=1)


def accept_sampling_triton(draft_tokens: torch.Tensor, parents: Optional[torch.Tensor], draft_probs: torch.Tensor,
                           target_probs: torch.Tensor, uniforms: torch.Tensor, accept_len: torch.Tensor,
                           path: Optional[torch.Tensor], emitted: torch.Tensor) -> None:
    """Writes accept_sampling(_tree) into accept_len / path / emitted; inputs assumed valid and contiguous:
    draft_probs [B, N - 1, V], target_probs [B, N, V] (one dtype), uniforms [B, N] fp32."""
    batch, num_nodes, vocab = target_probs.shape
    if batch == 0:
        return
    cols = draft_tokens.shape[1]
    residual = torch.empty((batch, vocab), dtype=torch.float64, device=target_probs.device)
    # No FMA contraction: r - Z * q must round like the reference's separate multiply and subtract.
    options = {} if not target_probs.is_cuda else {"enable_fp_fusion": False}
    with _device_guard(draft_tokens):
        _accept_sampling_kernel[(batch,)](
            draft_tokens, parents if parents is not None else draft_tokens, draft_probs, target_probs, uniforms,
            residual, accept_len, path if path is not None else emitted, emitted,
            num_nodes, cols, num_nodes - cols, vocab,
            HAS_PARENTS=parents is not None, HAS_PATH=path is not None, BLOCK_N=_block_n(num_nodes),
            BLOCK_V=_BLOCK_V, num_warps=_SAMPLING_WARPS, **options)


accept_greedy_triton_op = torch.library.custom_op(
    "fastvlm::accept_greedy_triton", mutates_args=("accept_len", "path", "emitted"))(accept_greedy_triton)
accept_sampling_triton_op = torch.library.custom_op(
    "fastvlm::accept_sampling_triton", mutates_args=("accept_len", "path", "emitted"))(accept_sampling_triton)


@accept_greedy_triton_op.register_fake
def _accept_greedy_triton_fake(draft_tokens, parents, target_tokens, accept_len, path, emitted) -> None:
    return None


@accept_sampling_triton_op.register_fake
def _accept_sampling_triton_fake(draft_tokens, parents, draft_probs, target_probs, uniforms, accept_len, path,
                                 emitted) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed): every kernel variant the launchers can pick.

KERNEL_CONFIGS = tuple(
    [dict(kernel="greedy", dtype="i64", tree=tree, BLOCK_N=16) for tree in (False, True)]
    + [dict(kernel="sampling", dtype=dtype, tree=tree, BLOCK_N=16) for dtype in ("fp32", "fp16", "bf16")
       for tree in (False, True)])


def config_name(config: dict) -> str:
    return f"accept_{config['kernel']}_{config['dtype']}_{'tree' if config['tree'] else 'chain'}"


def compile_for_sm90(config: dict) -> dict:
    """Compiles one KERNEL_CONFIGS entry for sm_90 and returns ptxas's figures (registers, spills)."""
    tree = config["tree"]
    if config["kernel"] == "greedy":
        types = {"DraftTokens": "*i64", "Parents": "*i64", "TargetTokens": "*i64", "AcceptLen": "*i32",
                 "Path": "*i64", "Emitted": "*i64"}
        constexprs = {"HAS_PARENTS": tree, "HAS_PATH": tree, "BLOCK_N": config["BLOCK_N"]}
        return compile_sm90(_accept_greedy_kernel, types, constexprs, 1, 1, config_name(config))
    dtype = config["dtype"]
    types = {"DraftTokens": "*i64", "Parents": "*i64", "DraftProbs": f"*{dtype}", "TargetProbs": f"*{dtype}",
             "Uniforms": "*fp32", "Residual": "*fp64", "AcceptLen": "*i32", "Path": "*i64", "Emitted": "*i64"}
    constexprs = {"HAS_PARENTS": tree, "HAS_PATH": tree, "BLOCK_N": config["BLOCK_N"], "BLOCK_V": _BLOCK_V}
    return compile_sm90(_accept_sampling_kernel, types, constexprs, _SAMPLING_WARPS, 1, config_name(config))
