"""Plain PyTorch verify_attention: the specification every backend is tested against.

Slow and obvious on purpose: build the boolean visibility mask, expand the KV heads to the query
heads, softmax in fp32 (fp64 when the inputs are fp64, which the tests use as ground truth).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def visibility_mask(prefix_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], num_new: int,
                    cache_len: int) -> torch.Tensor:
    """[B, T, L_max] bool: may query j of row b read cache position p?

    Position p < prefix_lens[b] is the row's prefix (always visible); p = prefix_lens[b] + i for
    0 <= i < T is new token i, visible when bit i of tree_mask[b, j] is set (i <= j for a chain);
    nothing past the new tokens is visible.
    """
    device = prefix_lens.device
    prefix = prefix_lens.to(torch.int64)[:, None, None]                      # [B, 1, 1]
    pos = torch.arange(cache_len, device=device)[None, None, :]               # [1, 1, L]
    query = torch.arange(num_new, device=device)[None, :, None]               # [1, T, 1]
    new_index = pos - prefix                                                  # [B, 1, L]
    is_new = (new_index >= 0) & (new_index < num_new)
    if tree_mask is None:
        new_visible = new_index <= query                                       # [B, T, L]
    else:
        shift = new_index.clamp(0, 63)
        new_visible = ((tree_mask.to(torch.int64)[:, :, None] >> shift) & 1).bool()
    return (pos < prefix) | (is_new & new_visible)


def verify_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               prefix_lens: torch.Tensor, tree_mask: Optional[torch.Tensor] = None,
                               sm_scale: Optional[float] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32, natural log).

    A query that sees no position gets out = 0 and lse = -inf.
    """
    batch, num_q_heads, num_new, head_dim = q.shape
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    keys = k_cache.to(compute_dtype).repeat_interleave(group, dim=1)          # [B, Hq, L, D]
    values = v_cache.to(compute_dtype).repeat_interleave(group, dim=1)        # [B, Hq, L, D]
    scores = torch.einsum("bhtd,bhld->bhtl", q.to(compute_dtype), keys) * sm_scale  # [B, Hq, T, L]
    visible = visibility_mask(prefix_lens, tree_mask, num_new, cache_len)[:, None]  # [B, 1, T, L]
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)                                     # [B, Hq, T]
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(compute_dtype).min))
    probs = probs.masked_fill(~visible, 0.0)
    out = torch.einsum("bhtl,bhld->bhtd", probs, values)                      # [B, Hq, T, D]
    return out.to(q.dtype), lse.to(torch.float32)
