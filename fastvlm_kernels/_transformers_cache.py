"""The transformers ``Cache`` view of a KVCache (imported only by ``KVCache.as_transformers_cache``, so that
the package imports without transformers).

Written against transformers 5.17 and later (``CacheLayerMixin`` / ``Cache(layers=...)``, checked in the
5.17 and 5.24 sources): a model's attention modules call ``cache.update(k, v, layer_idx)``, which appends in
place into the KVCache's buffer and returns ``[B, Hkv, length, D]`` views of it; ``get_seq_length``,
``get_mask_sizes``, ``crop``, ``reset`` and ``reorder_cache`` work on the KVCache's lengths and buffer.
"""
from __future__ import annotations

from typing import Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVCacheLayer(CacheLayerMixin):
    """One layer of a KVCache as a transformers cache layer (all rows must have the same length)."""

    is_compileable = False  # lengths live on the host: a compiled forward would bake them in
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, kv_cache, layer_idx: int):
        # CacheLayerMixin.__init__ would assign `keys` / `values`, which are views of the buffer here.
        self.kv_cache = kv_cache
        self.layer_idx = layer_idx
        self.is_initialized = True
        self.device = kv_cache.device
        self.dtype = kv_cache.dtype

    def __repr__(self) -> str:
        return f"KVCacheLayer(layer_idx={self.layer_idx}, length={self.get_seq_length()})"

    @property
    def keys(self) -> torch.Tensor:
        return self.kv_cache.buffer[self.layer_idx, 0, :, :, :self.get_seq_length()]

    @property
    def values(self) -> torch.Tensor:
        return self.kv_cache.buffer[self.layer_idx, 1, :, :, :self.get_seq_length()]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the KVCache was allocated once, up front."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        self.kv_cache.seq_length(self.layer_idx)  # raises on ragged rows
        self.kv_cache.append(self.layer_idx, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.kv_cache.seq_length(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.kv_cache.max_len

    def get_max_cache_shape(self) -> int:  # transformers <= 5.17
        return self.kv_cache.max_len

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` drops the last n positions; ``crop(n)`` with n > 0 (transformers <= 5.17's legacy
        form) keeps the first n. Metadata only."""
        length = self.get_seq_length()
        if tokens_to_remove > 0:
            new_length = min(length, tokens_to_remove)
        else:
            new_length = max(0, length + tokens_to_remove)
        self.kv_cache._set_layer_length(self.layer_idx, new_length)

    def reset(self) -> None:
        self.kv_cache._set_layer_length(self.layer_idx, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows reordered in place (the buffer keeps its batch size)."""
        layer = self.kv_cache.buffer[self.layer_idx]                     # [2, B, Hkv, max_len, D]
        layer.copy_(layer.index_select(1, beam_idx.to(self.device)))

    def _fixed_batch(self, what: str):
        raise NotImplementedError(f"{what} changes the batch size, but a KVCache is preallocated for "
                                  f"B={self.kv_cache.batch}: build the KVCache with the batch you need")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            self._fixed_batch("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._fixed_batch("batch_select_indices")

    def offload(self):
        raise NotImplementedError("a KVCache stays on its device; offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("a KVCache stays on its device; offloading is not supported")


class TransformersKVCache(Cache):
    """A ``transformers.Cache`` whose layers are a KVCache's layers (same buffer, same lengths)."""

    def __init__(self, kv_cache):
        super().__init__(layers=[KVCacheLayer(kv_cache, index) for index in range(kv_cache.num_layers)])
        self.kv_cache = kv_cache

    @property
    def max_batch_size(self) -> int:
        return self.kv_cache.batch

    @property
    def max_cache_len(self) -> int:
        return self.kv_cache.max_len
