"""Per-tile partials of the LM head and their merge, in plain PyTorch: what the Triton kernel ("topk") and the
CPU's chunked-GEMM path reduce a vocabulary tile to, and how tiles combine into the op's outputs."""
from __future__ import annotations

import torch


def merge_partials(tile_max, tile_arg, tile_sum, tile_best, tile_best_arg, tile_best_score, tile_draft,
                   subset, sample: bool, tokens, max_logit, lse, logprob, draft_logprob,
                   cand_score=None, cand_col=None) -> None:
    """Reduces [M, num_tiles] partials in vocabulary order (ties to the lowest tile) into the outputs;
    for "topk", the [M, num_tiles * k] candidates (tile order, best first within a tile) by a stable sort,
    which keeps equal scores in column order."""
    row_max, first_tile = tile_max.max(dim=1)              # max returns the first maximal tile
    total = (tile_sum * torch.exp(tile_max - row_max[:, None])).sum(dim=1)
    row_lse = row_max + torch.log(total)
    max_logit.copy_(row_max)
    lse.copy_(row_lse)
    if cand_score is not None:
        top_k = tokens.shape[1]
        order = torch.sort(cand_score, dim=1, descending=True, stable=True).indices[:, :top_k]
        col = cand_col.gather(1, order)
        tokens.copy_(subset[col] if subset is not None else col)
        logprob.copy_(cand_score.gather(1, order) - row_lse[:, None])
        return
    if sample:
        best, best_tile = tile_best.max(dim=1)
        col = tile_best_arg.gather(1, best_tile[:, None])[:, 0]
        logprob.copy_(tile_best_score.gather(1, best_tile[:, None])[:, 0] - row_lse)
    else:
        col = tile_arg.gather(1, first_tile[:, None])[:, 0]
        logprob.copy_(row_max - row_lse)
    tokens.copy_(subset[col] if subset is not None else col)
    if draft_logprob is not None:
        draft_logprob.copy_(tile_draft.max(dim=1).values - row_lse)


def probs_from_logits_(probs: torch.Tensor, lse: torch.Tensor, prob_rows: torch.Tensor) -> None:
    """Turns ``probs`` (the requested rows' scaled logits, written tile by tile) into softmax rows in place,
    with the rows' merged log-sum-exp."""
    probs.sub_(lse[prob_rows][:, None]).exp_()
