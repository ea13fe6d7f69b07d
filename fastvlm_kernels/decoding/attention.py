"""The decoder's attention: one function registered with transformers' ``AttentionInterface``.

The decoder calls the model's own decoder layers with no transformers cache and passes a
:class:`StepState` through the layers' ``**kwargs`` (transformers forwards them to the attention
function). The function receives the new tokens' queries, keys and values with rotary applied, appends the
keys and values to the package's :class:`~fastvlm_kernels.KVCache` at ``module.layer_idx`` and runs
:func:`~fastvlm_kernels.verify_attention` over that layer's cache. Calls without a state (the vision
tower, a later ``model.generate``) go to transformers' SDPA function, so registering the name changes
nothing for anyone else.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

from ..cache import KVCache
from ..ops.verify_attention import VerifyAttentionPlan, verify_attention_plan
from ..ops.verify_attention.reference import verify_attention_reference

ATTENTION_NAME = "fastvlm_kernels"
STATE_KWARG = "fastvlm_state"


@dataclass
class StepState:
    """What one pass over some layers needs: the cache, where each row's new tokens start (``[B]`` int32
    on the cache's device; every layer of one pass starts at the same lengths) and an optional tree mask.

    ``query_offset`` > 0 (a draft tree's later depth): the new tokens of this pass are the last ones of a
    window that starts at ``prefix_lens`` and whose first ``query_offset`` tokens (the earlier depths) are
    already in the cache; ``tree_mask`` ``[B, query_offset + T]`` covers the whole window. The pass's queries
    go to ``verify_attention`` behind ``query_offset`` zero rows (their outputs are dropped), so each new
    token sees exactly its ancestors among the earlier depths."""
    cache: KVCache
    prefix_lens: torch.Tensor
    tree_mask: Optional[torch.Tensor] = None
    query_offset: int = 0
    calls: Optional[dict] = None   # layer_idx -> number of tokens attended, when counting (tests)
    plan: Optional[VerifyAttentionPlan] = None   # made at the first attention call (inputs checked once)
    requested_backend: str = "auto"   # "auto" or a verify_attention backend name; "reference": plain PyTorch
    # the decoder's plain steps not yet through the imitation layers: (layer-E states [B, 1, H], positions
    # [B, 1], lengths [B] before the step, their host copy), caught up in one pass before the next draft
    imitation_lag: list = field(default_factory=list)


def fastvlm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [B, Hq, T, D]``, ``key``/``value [B, Hkv, T, D]`` -> ``([B, T, Hq, D], None)``."""
    state = kwargs.pop(STATE_KWARG, None)
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(state, module.layer_idx, query, key, value, sm_scale), None


def attend(state: StepState, layer: int, query, key, value, sm_scale: float) -> torch.Tensor:
    """Appends ``key``/``value [B, Hkv, T, D]`` to cache layer ``layer`` and attends the new tokens' ``query
    [B, Hq, T, D]`` to that layer's cache; returns ``[B, T, Hq, D]`` (what the attention module reshapes)."""
    if state.calls is not None:
        state.calls[layer] = state.calls.get(layer, 0) + query.shape[0] * query.shape[2]
    offset = state.query_offset
    if offset:   # the earlier depths' rows of the window: zero queries, outputs dropped
        batch, num_heads, num_new, head_dim = query.shape
        padded = query.new_zeros((batch, num_heads, offset + num_new, head_dim))
        padded[:, :, offset:] = query
        query = padded
    if state.requested_backend == "reference":   # a head dim the kernels do not take: the op's plain-PyTorch form
        state.cache.append(layer, key, value)
        keys, values = state.cache.layer(layer)
        out = verify_attention_reference(query, keys, values, state.prefix_lens, state.tree_mask, sm_scale)[0]
        out = out.transpose(1, 2)
        return out[:, offset:] if offset else out
    plan = state.plan
    if plan is None or plan.sm_scale != sm_scale:
        # The first call of a generate (or a layer with another scale): the cache append and the plan check
        # everything once; later calls of the same generate run the plan's kernel with no checks. The decoder
        # launches once per layer per step, eagerly: a host-bound caller (see HOST_BOUND_PRIORITY).
        state.cache.append(layer, key, value)
        keys, values = state.cache.layer(layer)
        plan = state.plan = verify_attention_plan(query, keys, values, state.prefix_lens, state.tree_mask,
                                                  sm_scale=sm_scale, validate=False,
                                                  backend=state.requested_backend, host_bound=True)
    else:
        state.cache.append_unchecked(layer, key, value)
        keys, values = state.cache.layer_unchecked(layer)
    batch, num_heads, num_rows, head_dim = query.shape
    out = query.new_empty((batch, num_rows, num_heads, head_dim))
    plan.run(query, keys, values, state.prefix_lens, state.tree_mask, out=out.transpose(1, 2))
    return out[:, offset:] if offset else out


_registered = False


def register() -> None:
    """Registers :data:`ATTENTION_NAME` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, fastvlm_attention)
    _registered = True


@contextlib.contextmanager
def attention_implementation(configs: Iterable) -> Iterator[None]:
    """Sets the decoder's attention on these config objects for the duration of the block (try/finally)."""
    register()
    configs = list({id(config): config for config in configs}.values())
    previous = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = ATTENTION_NAME
        yield
    finally:
        for config, value in zip(configs, previous):
            config._attn_implementation_internal = value
