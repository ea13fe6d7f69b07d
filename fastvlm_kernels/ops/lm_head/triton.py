"""Triton backend of the LM-head ops (argmax, Gumbel-max sampling, "topk" with k <= 64, verify_head's draft
log-prob and probability rows; no top-k / top-p sampling: the dispatcher says so).

Three steps, none of which writes the [M, V] logits: _rms_norm_kernel writes the normed rows [M, H] in
hidden's dtype (what the model's LM head receives); _lm_head_tile_kernel computes a [BLOCK_M, BLOCK_V]
tile of scores per program with tl.dot over H and reduces it to per-(row, tile) partials (max, first
argmax, sum of exp, Gumbel-max winner, the draft token's score), writing only requested probability rows;
_merge_kernel reduces the partials over tiles in vocabulary order in one launch ("topk": merge_partials,
a stable sort in torch ops). No host synchronisation. The semantics are those of reference.py.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .._aot import compile_sm90

from .partials import merge_partials, probs_from_logits_

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX_1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX_2 = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def _splitmix64(x):
    x = (x ^ (x >> 30)) * _MIX_1
    x = (x ^ (x >> 27)) * _MIX_2
    return x ^ (x >> 31)


@triton.jit
def _rms_norm_kernel(Hidden, NormWeight, Out, stride_h, hidden_size, eps, norm_offset,
                     BLOCK_H: tl.constexpr):
    # Grid (M,). A program owns one row: sum of squares in fp32 over BLOCK_H chunks, then the normed,
    # weighted row rounded to hidden's dtype. Memory bound on M * H (tiny next to the head).
    row = tl.program_id(0).to(tl.int64)
    squares = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, hidden_size, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        x = tl.load(Hidden + row * stride_h + offs, mask=offs < hidden_size, other=0.0).to(tl.float32)
        squares += x * x
    inv = 1.0 / tl.sqrt(tl.sum(squares, 0) / hidden_size + eps)
    for start in range(0, hidden_size, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < hidden_size
        x = tl.load(Hidden + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(NormWeight + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * hidden_size + offs, (x * inv * (norm_offset + w)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _lm_head_tile_kernel(
    Normed, Weight, Subset, Draft, ProbIndex, Probs, Seed,
    TileMax, TileArg, TileSum, TileBest, TileBestArg, TileBestScore, TileDraft, CandScore, CandCol,
    stride_w, num_rows, hidden_size, num_cols, vocab, num_tiles,
    logit_scale, softcap, temperature,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SUBSET: tl.constexpr,
    SAMPLE: tl.constexpr, HAS_DRAFT: tl.constexpr, HAS_PROBS: tl.constexpr, SOFTCAP: tl.constexpr,
    FP32: tl.constexpr, TOPK: tl.constexpr,
):
    # Grid (cdiv(num_cols, BLOCK_V), cdiv(M, BLOCK_M)). A program owns BLOCK_V head rows (vocabulary
    # columns) and BLOCK_M hidden rows: scores = normed @ W^T by tl.dot over BLOCK_K slices of H (fp32
    # accumulation), then per-row partials of its tile. With M <= BLOCK_M each weight row is read once:
    # the kernel aims at the weight's memory bandwidth.
    tile = tl.program_id(0)
    row_block = tl.program_id(1)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    if HAS_SUBSET:
        token = tl.load(Subset + cols, mask=col_ok, other=0)
    else:
        token = cols.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = (k0 + offs_k) < hidden_size
        x = tl.load(Normed + rows[:, None].to(tl.int64) * hidden_size + k0 + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(Weight + token[None, :] * stride_w + k0 + offs_k[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if FP32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    scores = acc * logit_scale
    if SOFTCAP:
        scaled = scores / softcap
        scores = softcap * (2.0 / (1.0 + tl.exp(-2.0 * scaled)) - 1.0)     # tanh
    scores = scores / temperature
    scores = tl.where(col_ok[None, :], scores, float("-inf"))

    tile_max = tl.max(scores, 1)
    tile_arg = tl.argmax(scores, 1, tie_break_left=True)
    tile_sum = tl.sum(tl.exp(scores - tile_max[:, None]), 1)
    out = rows.to(tl.int64) * num_tiles + tile
    tl.store(TileMax + out, tile_max, mask=row_ok)
    tl.store(TileArg + out, tile * BLOCK_V + tile_arg.to(tl.int64), mask=row_ok)
    tl.store(TileSum + out, tile_sum, mask=row_ok)
    if SAMPLE:
        seed = tl.load(Seed).to(tl.uint64)
        offset = tl.load(Seed + 1).to(tl.uint64)
        stream = _splitmix64(seed ^ _splitmix64(offset + _GOLDEN))
        row_base = _splitmix64(stream + (rows.to(tl.uint64) + 1) * _GOLDEN)
        h = _splitmix64(row_base[:, None] + (token[None, :].to(tl.uint64) + 1) * _GOLDEN)
        u = ((h >> 12).to(tl.float64) + 0.5) * 2.220446049250313e-16
        noise = (-tl.log(-tl.log(u))).to(tl.float32)
        perturbed = scores + noise
        best = tl.max(perturbed, 1)
        best_arg = tl.argmax(perturbed, 1, tie_break_left=True)
        is_best = tl.arange(0, BLOCK_V)[None, :] == best_arg[:, None]
        best_score = tl.max(tl.where(is_best, scores, float("-inf")), 1)
        tl.store(TileBest + out, best, mask=row_ok)
        tl.store(TileBestArg + out, tile * BLOCK_V + best_arg.to(tl.int64), mask=row_ok)
        tl.store(TileBestScore + out, best_score, mask=row_ok)
    if HAS_DRAFT:
        draft = tl.load(Draft + rows, mask=row_ok, other=-1)
        is_draft = cols.to(tl.int64)[None, :] == draft[:, None]
        tl.store(TileDraft + out, tl.max(tl.where(is_draft, scores, float("-inf")), 1), mask=row_ok)
    if TOPK > 0:   # the tile's TOPK best (score, column), best first, ties to the lower column
        work = scores
        lanes = tl.arange(0, BLOCK_V)
        for i in tl.static_range(TOPK):
            pick = tl.argmax(work, 1, tie_break_left=True)
            tl.store(CandScore + out * TOPK + i, tl.max(work, 1), mask=row_ok)
            tl.store(CandCol + out * TOPK + i, tile * BLOCK_V + pick.to(tl.int64), mask=row_ok)
            work = tl.where(lanes[None, :] == pick[:, None], float("-inf"), work)
    if HAS_PROBS:
        prob_index = tl.load(ProbIndex + rows, mask=row_ok, other=-1)
        ptrs = Probs + prob_index[:, None].to(tl.int64) * vocab + cols[None, :]
        tl.store(ptrs, scores, mask=(prob_index >= 0)[:, None] & col_ok[None, :])


@triton.jit
def _merge_kernel(TileMax, TileArg, TileSum, TileBest, TileBestArg, TileBestScore, TileDraft, Subset,
                  Tokens, MaxLogit, Lse, Logprob, DraftLogprob, num_tiles,
                  SAMPLE: tl.constexpr, HAS_DRAFT: tl.constexpr, HAS_SUBSET: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    # Grid (M,). A program reduces one row's [num_tiles] partials in vocabulary order, in one launch (the
    # torch ops it replaces were a dozen launches of a few µs each, a fifth of the 32064-row head's time):
    # the max and the first tile holding it (ties to the lowest tile, so the token is the lowest index
    # among equal logits), the log-sum-exp as a running max and a rescaled running sum, the Gumbel-max
    # winner (first tile on ties) and the draft token's score. Writes tokens (through the vocabulary
    # subset), max_logit, lse, logprob and draft_logprob.
    row = tl.program_id(0).to(tl.int64)
    base = row * num_tiles
    offs = tl.arange(0, BLOCK_T)
    best_max = float("-inf")
    best_max_tile = 0
    running_sum = 0.0
    best_gumbel = float("-inf")
    best_gumbel_tile = 0
    draft_score = float("-inf")
    for first in range(0, num_tiles, BLOCK_T):
        tiles = first + offs
        valid = tiles < num_tiles
        tile_max = tl.load(TileMax + base + tiles, mask=valid, other=float("-inf"))
        block_max = tl.max(tile_max, 0)
        block_tile = first + tl.argmax(tile_max, 0, tie_break_left=True)
        new_max = tl.maximum(best_max, block_max)
        tile_sum = tl.load(TileSum + base + tiles, mask=valid, other=0.0)
        scaled = tl.where(valid, tile_sum * tl.exp(tile_max - new_max), 0.0)
        rescale = tl.where(best_max == new_max, 1.0, tl.exp(best_max - new_max))   # 1 also when both are -inf
        running_sum = running_sum * rescale + tl.sum(scaled, 0)
        best_max_tile = tl.where(block_max > best_max, block_tile, best_max_tile)
        best_max = new_max
        if SAMPLE:
            gumbel = tl.load(TileBest + base + tiles, mask=valid, other=float("-inf"))
            block_best = tl.max(gumbel, 0)
            best_gumbel_tile = tl.where(block_best > best_gumbel,
                                        first + tl.argmax(gumbel, 0, tie_break_left=True), best_gumbel_tile)
            best_gumbel = tl.maximum(best_gumbel, block_best)
        if HAS_DRAFT:
            draft_score = tl.maximum(draft_score, tl.max(tl.load(TileDraft + base + tiles, mask=valid,
                                                                 other=float("-inf")), 0))
    lse = best_max + tl.log(running_sum)
    tl.store(MaxLogit + row, best_max)
    tl.store(Lse + row, lse)
    if SAMPLE:
        col = tl.load(TileBestArg + base + best_gumbel_tile)
        tl.store(Logprob + row, tl.load(TileBestScore + base + best_gumbel_tile) - lse)
    else:
        col = tl.load(TileArg + base + best_max_tile)
        tl.store(Logprob + row, best_max - lse)
    if HAS_SUBSET:
        col = tl.load(Subset + col)
    tl.store(Tokens + row, col)
    if HAS_DRAFT:
        tl.store(DraftLogprob + row, draft_score - lse)


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_TOPK = 64   # "topk" unrolls k extraction steps per tile


def _tile_config(dtype: torch.dtype, num_rows: int, topk: bool = False, sample: bool = False) -> dict:
    """BLOCK_M holds every row up to 64 (fp32) or 128 (16-bit), so the weight is read once; fp32's FMA dot
    takes smaller tiles.

    16-bit argmax / verify tiles come from bench/tune_gpu.py on an H200 (bench/results/NVIDIA-H200-2026-11-26-
    tune*, triton 3.6), the fastest that ptxas compiles without spills (triton 3.8) with the draft and
    probability epilogue: BLOCK_K = 128 (within 0.3% of the best of 18 tiles on both heads at 16 rows, 2.3%
    at 32), and for 128 rows BLOCK_V = 128 at 8 warps (4.8% behind the best of 36, BLOCK_V = 256, which
    spills 1.7 KB with the epilogue). The sample and topk kernels keep their earlier tiles: Triton 3.6
    spills the BLOCK_M=16 sample kernel at 4 warps (128 registers) and the topk kernel at 8 (64
    registers); checked with 3.6 and 3.8."""
    if dtype == torch.float32:
        block_m = max(16, min(64, triton.next_power_of_2(num_rows)))
        return dict(BLOCK_M=block_m, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2)
    block_m = max(16, min(64 if topk else 128, triton.next_power_of_2(num_rows)))
    if block_m == 128:   # verification of a wide tree or a batch of drafts: one pass over the weight
        return dict(BLOCK_M=128, BLOCK_V=64 if sample else 128, BLOCK_K=64, num_warps=8, num_stages=3)
    if block_m <= 32 and not (topk or sample):
        return dict(BLOCK_M=block_m, BLOCK_V=128, BLOCK_K=128, num_warps=4 if block_m == 16 else 8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_V=128 if block_m <= 32 else 64, BLOCK_K=64,
                num_warps=8 if block_m == 16 and not topk else 4, num_stages=3)


# Every (dtype, BLOCK_M, mode flags) the launcher can pick, compiled ahead of time for sm_90 by the tests.
KERNEL_CONFIGS = tuple(
    dict(dtype=dtype_name, sample=sample, draft=not sample, probs=not sample, topk=0,
         **_tile_config(dtype, rows, sample=sample))
    for dtype, dtype_name in _DTYPE_NAMES.items() for rows in (16, 32, 64, 128) for sample in (False, True)
    if not (rows == 128 and dtype == torch.float32)) + tuple(
    dict(dtype=dtype_name, sample=False, draft=False, probs=False, topk=8, **_tile_config(dtype, 16, topk=True))
    for dtype, dtype_name in _DTYPE_NAMES.items())   # draft-tree widths: "topk" with k = 8, few rows


def lm_head_triton(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                   vocab_subset: Optional[torch.Tensor], draft_tokens: Optional[torch.Tensor],
                   prob_rows: Optional[torch.Tensor], seed: Optional[torch.Tensor], eps: float, norm_offset: float,
                   logit_scale: float, logit_softcap: float, temperature: float, selection: int, top_k: int, top_p: float,
                   tokens: torch.Tensor, max_logit: torch.Tensor, lse: torch.Tensor, logprob: torch.Tensor,
                   draft_logprob: Optional[torch.Tensor], probs: Optional[torch.Tensor]) -> None:
    """The lm_head op (schema of csrc/bindings.cpp) on Triton: selection 0 (argmax), 1 (sample, no top-k /
    top-p) or 2 (topk, k <= MAX_TOPK)."""
    num_rows, hidden_size = hidden.shape
    if num_rows == 0:
        return
    vocab = lm_head_weight.shape[0]
    num_cols = vocab_subset.numel() if vocab_subset is not None else vocab
    sample = selection == 1
    config = _tile_config(hidden.dtype, num_rows, topk=selection == 2, sample=sample)
    block_v = config["BLOCK_V"]
    num_tiles = triton.cdiv(num_cols, block_v)
    device = hidden.device
    partial = lambda dtype: torch.empty((num_rows, num_tiles), dtype=dtype, device=device)  # noqa: E731
    tile_max, tile_sum = partial(torch.float32), partial(torch.float32)
    tile_arg = partial(torch.int64)
    tile_best, tile_best_score = (partial(torch.float32), partial(torch.float32)) if sample else (tile_max, tile_max)
    tile_best_arg = partial(torch.int64) if sample else tile_arg
    has_draft = draft_tokens is not None
    tile_draft = partial(torch.float32) if has_draft else tile_max
    top_k = top_k if selection == 2 else 0
    cand_score = torch.empty((num_rows, num_tiles * top_k), dtype=torch.float32, device=device) if top_k else None
    cand_col = torch.empty((num_rows, num_tiles * top_k), dtype=torch.int64, device=device) if top_k else None
    has_probs = probs is not None and probs.numel() > 0
    prob_index = None
    if has_probs:
        prob_index = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
        prob_index.scatter_(0, prob_rows, torch.arange(prob_rows.numel(), dtype=torch.int32, device=device))
    normed = torch.empty((num_rows, hidden_size), dtype=hidden.dtype, device=device)
    dummy = tile_arg   # any tensor: pointers of disabled features are never read

    device_guard = torch.cuda.device(device) if hidden.is_cuda else contextlib.nullcontext()
    with device_guard:
        _rms_norm_kernel[(num_rows,)](hidden, norm_weight, normed, hidden.stride(0), hidden_size, eps, norm_offset,
                                      BLOCK_H=min(1024, triton.next_power_of_2(hidden_size)))
        grid = (num_tiles, triton.cdiv(num_rows, config["BLOCK_M"]))
        _lm_head_tile_kernel[grid](
            normed, lm_head_weight, vocab_subset if vocab_subset is not None else dummy,
            draft_tokens if has_draft else dummy, prob_index if has_probs else dummy,
            probs if has_probs else dummy, seed if sample else dummy,
            tile_max, tile_arg, tile_sum, tile_best, tile_best_arg, tile_best_score, tile_draft,
            cand_score if top_k else tile_max, cand_col if top_k else tile_arg,
            lm_head_weight.stride(0), num_rows, hidden_size, num_cols, vocab, num_tiles,
            logit_scale, logit_softcap if logit_softcap > 0 else 1.0, temperature,
            BLOCK_M=config["BLOCK_M"], BLOCK_V=block_v, BLOCK_K=config["BLOCK_K"],
            HAS_SUBSET=vocab_subset is not None, SAMPLE=sample, HAS_DRAFT=has_draft, HAS_PROBS=has_probs,
            SOFTCAP=logit_softcap > 0, FP32=hidden.dtype == torch.float32, TOPK=top_k,
            num_warps=config["num_warps"], num_stages=config["num_stages"])
        if not top_k:
            _merge_kernel[(num_rows,)](
                tile_max, tile_arg, tile_sum, tile_best, tile_best_arg, tile_best_score, tile_draft,
                vocab_subset if vocab_subset is not None else dummy, tokens, max_logit, lse, logprob,
                draft_logprob if has_draft else lse, num_tiles,
                SAMPLE=sample, HAS_DRAFT=has_draft, HAS_SUBSET=vocab_subset is not None,
                BLOCK_T=min(1024, triton.next_power_of_2(num_tiles)), num_warps=4)
    if top_k:
        merge_partials(tile_max, tile_arg, tile_sum, tile_best, tile_best_arg, tile_best_score, tile_draft,
                       vocab_subset, sample, tokens, max_logit, lse, logprob, draft_logprob, cand_score, cand_col)
    if has_probs:
        probs_from_logits_(probs, lse, prob_rows)


lm_head_triton_op = torch.library.custom_op(
    "fastvlm::lm_head_triton",
    mutates_args=("tokens", "max_logit", "lse", "logprob", "draft_logprob", "probs"))(lm_head_triton)


@lm_head_triton_op.register_fake
def _lm_head_triton_fake(hidden, norm_weight, lm_head_weight, vocab_subset, draft_tokens, prob_rows, seed, eps,
                         norm_offset, logit_scale, logit_softcap, temperature, selection, top_k, top_p, tokens,
                         max_logit, lse, logprob, draft_logprob, probs) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 (no GPU needed): the compile test tier.

def config_name(config: dict) -> str:
    kind = f"topk{config['topk']}" if config["topk"] else "sample" if config["sample"] else "argmax_draft_probs"
    return (f"lm_head_{config['dtype']}_{kind}_m{config['BLOCK_M']}_v{config['BLOCK_V']}_k{config['BLOCK_K']}"
            f"_w{config['num_warps']}_s{config['num_stages']}")


def compile_for_sm90(config: dict) -> dict:
    """Compiles one KERNEL_CONFIGS entry for sm_90 and returns ptxas's figures (see ops/_aot.py)."""
    dtype = config["dtype"]
    types = {"Normed": f"*{dtype}", "Weight": f"*{dtype}", "Subset": "*i64", "Draft": "*i64", "ProbIndex": "*i32",
             "Probs": "*fp32", "Seed": "*i64", "TileMax": "*fp32", "TileArg": "*i64", "TileSum": "*fp32",
             "TileBest": "*fp32", "TileBestArg": "*i64", "TileBestScore": "*fp32", "TileDraft": "*fp32",
             "CandScore": "*fp32", "CandCol": "*i64",
             "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32"}
    constexprs = {"BLOCK_M": config["BLOCK_M"], "BLOCK_V": config["BLOCK_V"], "BLOCK_K": config["BLOCK_K"],
                  "HAS_SUBSET": False, "SAMPLE": config["sample"], "HAS_DRAFT": config["draft"],
                  "HAS_PROBS": config["probs"], "SOFTCAP": False, "FP32": dtype == "fp32",
                  "TOPK": config["topk"]}
    return compile_sm90(_lm_head_tile_kernel, types, constexprs, config["num_warps"], config["num_stages"],
                        config_name(config))
