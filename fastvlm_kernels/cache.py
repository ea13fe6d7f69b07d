"""KVCache: the key/value cache that drafting and verification share.

One preallocated buffer ``[num_layers, 2, B, Hkv, max_len, D]`` holds every layer (the backbone's and the
imitation network's: pass ``num_layers = N + imitation layers``), keys at index 0 of dim 1 and values at 1.
Each layer and row has its own length (``lengths``, ``[num_layers, B]`` int32 on the device, mirrored on the
host so that the "cache full" check costs no synchronisation). Appends write in place, a chain rollback
only sets lengths, a tree rollback moves the accepted path with one ``kv_compact`` launch for all layers.
``as_transformers_cache()`` wraps the same buffer as a ``transformers.Cache``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .ops import _checks
from .ops.kv_cache import check_compact_values, kv_append, kv_compact
from .ops.kv_cache.spec import INDEX_DTYPES, SUPPORTED_DTYPES

__all__ = ["KVCache"]

Lengths = Union[torch.Tensor, Sequence[int]]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.shape[-1] <= 1 or tensor.stride(-1) == 1 else tensor.contiguous()


class KVCache:
    """A preallocated, ragged, in-place KV cache for self-speculative decoding.

    Args:
        num_layers: cache layers: the model's decoder layers plus the imitation network's attention layers
            (whose ``layer_idx`` are N, N+1, ...), so one rollback covers all of them.
        batch: rows B. num_kv_heads: Hkv. head_dim: D. max_len: positions per row (prompt + new tokens
            + the largest draft).
        dtype: fp32, fp16 or bf16. device: where the buffer and ``lengths`` live.

    Attributes:
        buffer: ``[num_layers, 2, B, Hkv, max_len, D]``, allocated once (``nbytes`` never grows).
        lengths: ``[num_layers, B]`` int32 on ``device``: how many positions each layer holds per row.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float16, device: Union[str, torch.device] = "cpu"):
        self.num_layers = _positive_int("num_layers", num_layers)
        self.batch = _positive_int("batch", batch)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.max_len = _positive_int("max_len", max_len)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device)
        # Zeroed once, so that stale positions never hold NaN/Inf garbage a masked kernel might touch.
        self.buffer = torch.zeros((num_layers, 2, batch, num_kv_heads, max_len, head_dim), dtype=dtype,
                                  device=self.device)
        self.device = self.buffer.device   # with its index ("cuda" -> "cuda:0"), as tensors report theirs
        self.lengths = torch.zeros((num_layers, batch), dtype=torch.int32, device=self.device)
        # The host mirror of `lengths`: kept exact by every method, so reading it never synchronises.
        self._host_lengths: List[List[int]] = [[0] * batch for _ in range(num_layers)]

    # ---- views and metadata ------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (buffer and lengths); fixed at construction."""
        return sum(t.numel() * t.element_size() for t in (self.buffer, self.lengths))

    @property
    def host_lengths(self) -> List[List[int]]:
        """``lengths`` as ``[num_layers][B]`` Python ints (a copy; no device read)."""
        return [list(row) for row in self._host_lengths]

    def layer(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (keys, values), each ``[B, Hkv, max_len, D]``: views of ``buffer``, the layout
        ``verify_attention`` reads. Positions at or past ``lengths[index, b]`` hold stale data."""
        self._check_layer_index(index)
        return self.buffer[index, 0], self.buffer[index, 1]

    def seq_length(self, layer: int = 0) -> int:
        """Layer ``layer``'s length when all rows hold the same number of positions (raises otherwise)."""
        self._check_layer_index(layer)
        return self._uniform_length(layer)

    # ---- append ----------------------------------------------------------------------------------------------

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes T new positions per row at that layer's row lengths, in place, and advances them.

        keys, values: ``[B, Hkv, T, D]`` in the cache's dtype and on its device, any strides. Row b's new
        positions are ``lengths[layer, b] + t``. Raises before writing anything when a row would pass
        ``max_len``. Equal row lengths take a slice copy per tensor (torch's copy kernel, at copy bandwidth,
        the least host overhead); ragged rows one ``kv_append`` launch for keys and values, which reads the
        row offsets on the device (1.5x to 4x faster than index_put on the CPU; bench/kv_cache.py).
        """
        self._check_layer_index(layer)
        for name, tensor in (("keys", keys), ("values", values)):
            _checks.check_tensor(name, tensor, ndim=4, shape_doc="[B, Hkv, T, D]")
            if tensor.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {tensor.dtype} but the cache holds {self.dtype}")
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device} but the cache is on {self.device}")
            expected = (self.batch, self.num_kv_heads, tensor.shape[2], self.head_dim)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} must have shape [B={self.batch}, Hkv={self.num_kv_heads}, T, "
                                 f"D={self.head_dim}], got {tuple(tensor.shape)}")
        if values.shape != keys.shape:
            raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
        self.append_unchecked(layer, keys, values)

    def append_unchecked(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`append` without the tensor checks, for a caller that has passed the same kind of tensors
        to :meth:`append` before (the decoder, once per generate). The full-cache check stays: it reads only
        the host lengths, and nothing is written when it fails.

        Inside a compiled (captured) step (``torch.compiler.is_compiling()``) the host lengths are neither read
        nor written: a read would become a guard on their values, so every length would be a graph of its
        own. There the positions go where the device lengths say (one ``kv_append``) and the caller checks the
        room before the step (:meth:`check_room`) and sets the lengths after it (:meth:`rollback_unchecked`
        or :meth:`compact`, as the decoder's rows do after every step)."""
        num_new = keys.shape[2]
        if torch.compiler.is_compiling():
            if num_new:
                kv_append(self.buffer[layer, 0], self.buffer[layer, 1], self.lengths[layer],
                          _last_dim_contiguous(keys), _last_dim_contiguous(values), validate=False)
                self.lengths[layer] += num_new
            return
        row_lengths = self._host_lengths[layer]
        longest = self._check_layer_room(layer, num_new)
        if num_new == 0:
            return
        key_view, value_view = self.buffer[layer, 0], self.buffer[layer, 1]         # [B, Hkv, max_len, D]
        if min(row_lengths) == longest:
            key_view[:, :, longest:longest + num_new].copy_(keys)
            value_view[:, :, longest:longest + num_new].copy_(values)
        else:
            kv_append(key_view, value_view, self.lengths[layer], _last_dim_contiguous(keys),
                      _last_dim_contiguous(values), validate=False)
        self.lengths[layer] += num_new
        self._host_lengths[layer] = [length + num_new for length in row_lengths]

    def check_room(self, num_new: int) -> None:
        """Raises (the error :meth:`append` raises) unless every layer can take ``num_new`` more positions in
        every row: the check a compiled step's appends leave to their caller, made on the host lengths
        before the step writes anything."""
        for layer in range(self.num_layers):
            self._check_layer_room(layer, num_new)

    def _check_layer_room(self, layer: int, num_new: int) -> int:
        """Raises unless layer ``layer`` can take ``num_new`` more positions in every row; returns its longest
        row's length (host lengths: no device read)."""
        row_lengths = self._host_lengths[layer]
        longest = max(row_lengths)
        if longest + num_new > self.max_len:
            raise ValueError(f"the cache is full: appending T={num_new} positions to layer {layer} would take row "
                             f"{row_lengths.index(longest)} from {longest} to {longest + num_new} > "
                             f"max_len={self.max_len}")
        return longest

    def layer_unchecked(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`layer` without the index check."""
        return self.buffer[index, 0], self.buffer[index, 1]

    # ---- rollback and compaction ----------------------------------------------------------------------

    def rollback(self, new_lens: Lengths, host_lens: Optional[Sequence[int]] = None) -> None:
        """Sets every layer's length of row b to ``new_lens[b]``: metadata only, no bytes move.

        new_lens: ``[B]`` ints (a tensor on the cache's device, a CPU tensor or a sequence). host_lens: the
        same values as Python ints, when the caller already has them on the host (the decoder reads
        accept_len once per step); without it a device ``new_lens`` is read back (one synchronisation).
        Each new length must be in ``[0, the row's shortest layer length]``: rollback never extends.
        """
        host, device_lens = self._lengths_argument("new_lens", new_lens, host_lens)
        for b, length in enumerate(host):
            shortest = min(layer_lengths[b] for layer_lengths in self._host_lengths)
            if length < 0 or length > shortest:
                raise ValueError(f"new_lens[{b}] = {length} is out of range: row {b} holds {shortest} positions "
                                 f"in its shortest layer, so a rollback may set 0..{shortest}")
        self._set_lengths(host, device_lens)

    def rollback_unchecked(self, new_lens: torch.Tensor, host_lens: List[int], layers: Optional[slice] = None) -> None:
        """:meth:`rollback` without the checks, for a caller that computed both forms itself (the decoder's
        :class:`~fastvlm_kernels.decoding.rows.Rows`): ``new_lens [B]`` int32 on the cache's device and the
        same values as host ints. ``layers``: only those layers (default all). The caller keeps each row's
        positions below the lengths it sets written (the decoder also sets a layer group's lengths back to
        where it lags, then appends the missing positions)."""
        self._set_lengths(host_lens, new_lens, layers)

    def compact(self, start: Lengths, accepted: torch.Tensor, host_lens: Optional[Sequence[int]] = None, *,
                validate: bool = True, backend: str = "auto", layers: Optional[slice] = None) -> None:
        """Rolls back to a draft tree's accepted path: moves each row's accepted nodes to ``start, start+1,
        ...`` in every layer with one ``kv_compact`` launch, then sets every layer's length of row b to
        ``start[b] + (number of accepted nodes of row b)``.

        start: ``[B]`` ints, where row b's tree was appended. accepted: ``[B, A]`` int32/int64 on the cache's
        device, node indices relative to start, strictly increasing, -1 padded. host_lens: the resulting
        lengths as Python ints if the caller has them. validate: check the values (reads start and
        accepted back: one synchronisation); with validate=False and host_lens given, nothing is read.
        layers: a ``slice`` of cache layers to move (default: all of them) when different layers hold the tree's
            nodes in different orders (the decoder's dynamic tree: its draft layers hold every drafted node,
            the layers above the exit only the verified ones); the lengths of every layer are set either way.
        """
        _checks.check_tensor("accepted", accepted, ndim=2, dtypes=INDEX_DTYPES, shape_doc="[B, A]")
        if accepted.device != self.device:
            raise ValueError(f"accepted is on {accepted.device} but the cache is on {self.device}")
        if accepted.shape[0] != self.batch:
            raise ValueError(f"accepted.shape[0] must be the cache's batch B={self.batch}, got {accepted.shape[0]}")
        if isinstance(start, torch.Tensor):
            _checks.check_tensor("start", start, ndim=1, dtypes=INDEX_DTYPES, shape_doc="[B]")
            start_device = start.to(self.device)
        else:
            start_device = torch.tensor(list(start), dtype=torch.int32).to(self.device)
        if start_device.shape != (self.batch,):
            raise ValueError(f"start must have shape [B={self.batch}], got {tuple(start_device.shape)}")
        counts = (accepted >= 0).sum(dim=1)
        new_lens = (start_device.long() + counts).to(torch.int32)                   # [B]
        if validate or host_lens is None:
            starts, nodes = start_device.tolist(), accepted.tolist()
        if validate:
            check_compact_values(start_device, accepted, self.max_len)
            for b in range(self.batch):
                shortest = min(layer_lengths[b] for layer_lengths in self._host_lengths)
                last = max(nodes[b], default=-1)
                if starts[b] > shortest or (last >= 0 and starts[b] + last >= shortest):
                    raise ValueError(f"accepted[{b}] = {nodes[b]} with start[{b}] = {starts[b]} reaches past row "
                                     f"{b}'s {shortest} positions (its shortest layer)")
        if host_lens is None:
            host_lens = [starts[b] + sum(1 for node in nodes[b] if node >= 0) for b in range(self.batch)]
        host = self._host_ints("host_lens", host_lens)
        if layers is not None and not isinstance(layers, slice):
            raise TypeError(f"layers must be a slice of cache layers or None, got {type(layers).__name__}")
        buffer = self.buffer if layers is None else self.buffer[layers]
        kv_compact(buffer, start_device, accepted, validate=False, backend=backend)
        self._set_lengths(host, new_lens)

    def reset(self) -> None:
        """Every layer and row back to length 0 (no bytes move)."""
        self._set_lengths([0] * self.batch, None)

    # ---- transformers ------------------------------------------------------------------------------------

    def as_transformers_cache(self):
        """A ``transformers.Cache`` over this buffer, for ``model(..., past_key_values=...)`` (``cache=`` in
        newer transformers) and ``model.generate``: its ``update()`` appends in place and returns the
        layer's views up to the current length. Needs equal lengths across rows in every layer (the
        transformers API has one sequence length per layer)."""
        for layer in range(self.num_layers):
            self._uniform_length(layer)
        from ._transformers_cache import TransformersKVCache
        return TransformersKVCache(self)

    # ---- internals -------------------------------------------------------------------------------------

    def _check_layer_index(self, index) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layer must be an int, got {type(index).__name__}")
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer={index} is out of range: the cache has {self.num_layers} layers "
                             f"(valid: 0..{self.num_layers - 1})")

    def _uniform_length(self, layer: int) -> int:
        row_lengths = self._host_lengths[layer]
        if min(row_lengths) != max(row_lengths):
            raise ValueError(f"layer {layer} holds rows of different lengths {row_lengths}; the transformers "
                             "Cache API needs equal lengths across rows (roll back or compact first)")
        return row_lengths[0]

    def _host_ints(self, name: str, values) -> List[int]:
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        values = [int(value) for value in values]
        if len(values) != self.batch:
            raise ValueError(f"{name} must hold B={self.batch} lengths, got {len(values)}")
        return values

    def _lengths_argument(self, name: str, lens: Lengths, host_lens) -> Tuple[List[int], Optional[torch.Tensor]]:
        """(host ints, device tensor or None) for a [B] lengths argument."""
        if isinstance(lens, torch.Tensor):
            _checks.check_tensor(name, lens, ndim=1, dtypes=INDEX_DTYPES, shape_doc="[B]")
            if lens.shape[0] != self.batch:
                raise ValueError(f"{name} must have shape [B={self.batch}], got {tuple(lens.shape)}")
            host = self._host_ints("host_lens", host_lens) if host_lens is not None else self._host_ints(name, lens)
            return host, lens
        host = self._host_ints(name, lens)
        if host_lens is not None and self._host_ints("host_lens", host_lens) != host:
            raise ValueError(f"host_lens {list(host_lens)} differs from {name} {host}")
        return host, None

    def _set_lengths(self, host: List[int], device_lens: Optional[torch.Tensor], layers: Optional[slice] = None) -> None:
        """Every row's length in every layer (or in ``layers`` only), on the device and in the host copy."""
        if device_lens is None:
            device_lens = torch.tensor(host, dtype=torch.int32).to(self.device, non_blocking=True)
        chosen = self.lengths if layers is None else self.lengths[layers]
        chosen.copy_(device_lens.to(device=self.device, dtype=torch.int32).expand_as(chosen))
        for index in range(self.num_layers)[layers or slice(None)]:
            self._host_lengths[index] = list(host)

    def _set_layer_length(self, layer: int, length: int) -> None:
        """One layer's length for all rows (the transformers layer's crop and reset)."""
        self.lengths[layer].fill_(length)
        self._host_lengths[layer] = [length] * self.batch

    def __repr__(self) -> str:
        return (f"KVCache(num_layers={self.num_layers}, batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, max_len={self.max_len}, dtype={self.dtype}, device={self.device})")
