"""Plain PyTorch oracle of the LM-head ops: RMSNorm, projection, then selection on the full logits.

Everything here materialises the ``[M, V]`` logits (the kernels never do). The semantics every backend
follows:

* normed = x * rsqrt(mean(x^2) + eps) * (norm_offset + w), in fp32 from the fp32 hidden state, then
  rounded to the hidden state's dtype (what the model's LM head receives);
* logits = (normed @ W^T) * logit_scale, then ``softcap * tanh(logits / softcap)`` when a soft-cap is set;
* scores = logits / temperature ("sample", "topk", verify_head; "argmax" uses temperature 1);
* "sample": top-k then top-p filtering (Hugging Face's order and rules), then the Gumbel-max draw
  argmax(scores + g) over the kept tokens, with g from :func:`gumbel_noise` (a counter-based hash of
  (seed, offset, row, token id), so every backend draws the same token from the same seed).
"""
from __future__ import annotations

from typing import Optional

import torch

_GOLDEN = -7046029254386353131           # 0x9E3779B97F4A7C15 as a signed int64
_MIX_1 = -4658895280553007687            # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685            # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 bit patterns (wrapping multiplication, as uint64 in C)."""
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def gumbel_noise(seed: int, offset: int, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[len(rows), len(token_ids)] fp64 standard Gumbel noise, a pure function of its arguments.

    stream = mix(seed ^ mix(offset + golden)); row_base = mix(stream + (row + 1) * golden);
    h = mix(row_base + (token + 1) * golden) (uint64 arithmetic); u = ((h >> 12) + 0.5) * 2^-52 in (0, 1);
    g = -log(-log(u)) in fp64. The kernels compute exactly this.
    """
    rows = rows.to(torch.int64).cpu()
    token_ids = token_ids.to(torch.int64).cpu()
    stream = splitmix64(torch.tensor(seed, dtype=torch.int64) ^ splitmix64(torch.tensor(offset, dtype=torch.int64)
                                                                             + _GOLDEN))
    row_base = splitmix64(stream + (rows + 1) * _GOLDEN)                                   # [M]
    h = splitmix64(row_base[:, None] + (token_ids[None, :] + 1) * _GOLDEN)                 # [M, S]
    u = (_shift_right(h, 12).double() + 0.5) * 2.0 ** -52
    return -torch.log(-torch.log(u))


def normed_hidden(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, norm_offset: float,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, H] RMS-normed hidden states in `compute_dtype`, rounded through hidden's dtype."""
    x = hidden.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * (norm_offset + norm_weight.float())
    return normed.to(hidden.dtype).to(compute_dtype)


def head_logits(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, *, eps: float,
                norm_offset: float = 0.0, logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
                vocab_subset: Optional[torch.Tensor] = None,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, V] (or [M, len(vocab_subset)]) logits in `compute_dtype` (fp64 for a tighter oracle)."""
    weight = lm_head_weight if vocab_subset is None else lm_head_weight[vocab_subset]
    logits = normed_hidden(hidden, norm_weight, eps, norm_offset, compute_dtype) @ weight.to(compute_dtype).T
    logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def filter_scores(scores: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Hugging Face's TopKLogitsWarper then TopPLogitsWarper: removed scores become -inf."""
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False                          # keep at least one token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def lm_head_reference(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, *,
                      eps: float, mode: str = "argmax", temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, vocab_subset: Optional[torch.Tensor] = None,
                      seed: int = 0, offset: int = 0, norm_offset: float = 0.0, logit_scale: float = 1.0,
                      logit_softcap: Optional[float] = None, draft_tokens: Optional[torch.Tensor] = None,
                      prob_rows: Optional[torch.Tensor] = None,
                      compute_dtype: torch.dtype = torch.float32) -> dict:
    """Every output of early_exit_head / verify_head, computed on materialised logits.

    Returns a dict with "tokens" ([M] int64, [M, k] for "topk"; vocabulary ids even with a subset),
    "max_logit", "lse" (of the processed scores), "logprob" (of the chosen tokens under the processed
    distribution), and, when draft_tokens is given, "draft_logprob" ([M]; -inf where the draft token is
    -1), and, when prob_rows is given, "probs" ([R, V] fp32 softmax rows).
    """
    logits = head_logits(hidden, norm_weight, lm_head_weight, eps=eps, norm_offset=norm_offset,
                         logit_scale=logit_scale, logit_softcap=logit_softcap, vocab_subset=vocab_subset,
                         compute_dtype=compute_dtype)
    num_rows, num_cols = logits.shape
    device = hidden.device
    col_ids = (vocab_subset.to(torch.int64) if vocab_subset is not None
               else torch.arange(num_cols, device=device))
    scores = logits / temperature                   # early_exit_head passes 1.0 in "argmax" mode
    if mode == "sample":
        scores = filter_scores(scores, top_k, top_p)
    max_logit = scores.max(dim=-1).values
    lse = torch.logsumexp(scores, dim=-1)
    result = {"max_logit": max_logit.float(), "lse": lse.float()}
    if mode == "argmax":
        choice = scores.argmax(dim=-1)
        result["logprob"] = (max_logit - lse).float()
    elif mode == "sample":
        noise = gumbel_noise(seed, offset, torch.arange(num_rows), col_ids).to(device)
        perturbed = scores.float() + noise.float()                     # the kernels' fp32 comparison
        choice = perturbed.argmax(dim=-1)
        result["logprob"] = (scores.gather(1, choice[:, None])[:, 0] - lse).float()
        result["perturbed"] = perturbed
    elif mode == "topk":
        # ties to the lower index: a stable sort of -scores keeps equal scores in index order
        order = torch.sort(-scores, dim=-1, stable=True).indices[:, :top_k]
        choice = order
        result["logprob"] = (scores.gather(1, order) - lse[:, None]).float()
    else:
        raise ValueError(f"mode must be 'argmax', 'sample' or 'topk', got {mode!r}")
    result["tokens"] = col_ids[choice]
    if draft_tokens is not None:
        full = scores if vocab_subset is None else None
        if full is None:
            raise ValueError("draft_tokens needs the full vocabulary (verify_head takes no vocab_subset)")
        has_draft = draft_tokens >= 0
        picked = full.gather(1, draft_tokens.clamp_min(0)[:, None])[:, 0]
        result["draft_logprob"] = torch.where(has_draft, picked - lse, float("-inf")).float()
    if prob_rows is not None:
        result["probs"] = torch.softmax(scores[prob_rows.to(torch.int64)], dim=-1).float()
    return result


__all__ = ["gumbel_noise", "splitmix64", "normed_hidden", "head_logits", "filter_scores", "lm_head_reference"]
