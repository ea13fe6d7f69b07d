"""The KV cache's two ops: kv_compact moves the accepted path of a draft tree to the front of the tree's
slots, in every layer of a KVCache's buffer at once; kv_append writes a layer's new keys and values at
each row's own length. Both in place."""
from __future__ import annotations

import torch

from .. import _checks
from .._dispatch import Backend, call_custom_op, always_supported, compiled_backend_reasons, select, triton_backend_reasons
from .reference import kv_append_reference, kv_compact_reference
from .spec import INDEX_DTYPES, SUPPORTED_DTYPES

__all__ = ["kv_compact", "kv_compact_reference", "kv_append", "kv_append_reference", "BACKENDS", "PRIORITY",
           "APPEND_BACKENDS"]


def kv_compact(buffer: torch.Tensor, start: torch.Tensor, accepted: torch.Tensor, *, validate: bool = True,
               backend: str = "auto") -> torch.Tensor:
    """Compacts a draft tree's accepted path in place: for every layer l, keys and values, row b, KV head h
    and ``j`` with ``accepted[b, j] >= 0``, position ``start[b] + accepted[b, j]`` moves to ``start[b] + j``.

    Args:
        buffer: ``[num_layers, 2, B, Hkv, L_max, D]`` (keys at index 0 of dim 1, values at 1; a KVCache's
            ``buffer``), fp32, fp16 or bf16, last dim contiguous, other strides arbitrary. Written in place.
        start: ``[B]`` int32 or int64: where row b's tree begins (its first node, the root, is at start[b]).
        accepted: ``[B, A]`` int32 or int64: node indices relative to start, strictly increasing, then -1
            padding (a row may be all -1: nothing moves). ``accepted[b, j] >= j`` follows, so every
            destination is at or before its source, and a destination may be another node's source: all
            backends read every source before overwriting it. ``start[b] + accepted[b, j] < L_max``.
        validate: check the values of start and accepted (a device-to-host read on a GPU); callers that
            know them valid (the decoder) pass False. Kernels skip any move that would leave the buffer.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Positions other than the destinations are untouched (sources past the path keep stale data: the cache's
    lengths, set by KVCache.compact, say where a row ends). Returns ``buffer``.
    """
    buffer = _checks.check_tensor("buffer", buffer, ndim=6, dtypes=SUPPORTED_DTYPES,
                                  shape_doc="[num_layers, 2, B, Hkv, L_max, D]")
    if buffer.shape[1] != 2:
        raise ValueError(f"buffer.shape[1] must be 2 (keys and values), got {buffer.shape[1]} "
                         f"(shape {tuple(buffer.shape)})")
    _checks.check_last_dim_contiguous("buffer", buffer)
    batch, cache_len = buffer.shape[2], buffer.shape[4]
    start = _checks.check_tensor("start", start, ndim=1, dtypes=INDEX_DTYPES, shape_doc="[B]")
    accepted = _checks.check_tensor("accepted", accepted, ndim=2, dtypes=INDEX_DTYPES, shape_doc="[B, A]")
    for name, tensor in (("start", start), ("accepted", accepted)):
        _checks.check_same_device(name, tensor, "buffer", buffer)
        _checks.check_size(name, tensor, 0, batch, "the batch size B of buffer")
    if validate and not torch.compiler.is_compiling():
        check_compact_values(start, accepted, cache_len)
    if buffer.numel() == 0 or accepted.shape[1] == 0:
        return buffer
    start = start.to(torch.int32).contiguous()
    accepted = accepted.to(torch.int32).contiguous()
    chosen = select("kv_compact", BACKENDS, PRIORITY.get(buffer.device.type, ("torch",)), backend, buffer)
    chosen.run(buffer, start, accepted)
    return buffer


def check_compact_values(start: torch.Tensor, accepted: torch.Tensor, cache_len: int) -> None:
    """The checks that read values: start >= 0, accepted strictly increasing, -1 only as trailing padding,
    every source inside the cache. One device-to-host read."""
    if accepted.numel() == 0:
        if start.numel() and int(start.min()) < 0:
            raise ValueError(f"start must be >= 0, got {start.tolist()}")
        return
    start64, accepted64 = start.long(), accepted.long()
    valid = accepted64 >= 0
    padding_before_node = (~valid[:, :-1]) & valid[:, 1:]                          # [B, A-1]
    not_increasing = valid[:, 1:] & (accepted64[:, 1:] <= accepted64[:, :-1])       # [B, A-1]
    below_minus_one = accepted64 < -1
    source = start64[:, None] + accepted64
    outside = valid & (source >= cache_len)
    flags = torch.stack([(start64 < 0).any(), below_minus_one.any(), padding_before_node.any(),
                         not_increasing.any(), outside.any()]).tolist()
    if not any(flags):
        return
    rows = accepted.tolist()
    if flags[0]:
        raise ValueError(f"start must be >= 0, got {start.tolist()}")
    if flags[1]:
        row = int(below_minus_one.any(dim=1).nonzero()[0])
        raise ValueError(f"accepted[{row}] = {rows[row]} holds a value below -1 (-1 is the only padding value)")
    if flags[2]:
        row = int(padding_before_node.any(dim=1).nonzero()[0])
        raise ValueError(f"accepted[{row}] = {rows[row]} has a node after -1 padding (padding must be trailing)")
    if flags[3]:
        row = int(not_increasing.any(dim=1).nonzero()[0])
        raise ValueError(f"accepted[{row}] = {rows[row]} is not strictly increasing")
    row = int(outside.any(dim=1).nonzero()[0])
    raise ValueError(f"accepted[{row}] = {rows[row]} with start[{row}] = {int(start[row])} points past the cache "
                     f"(L_max={cache_len})")


# ---- backends ----------------------------------------------------------------------------------------

def _run_reference(buffer, start, accepted) -> None:
    kv_compact_reference(buffer, start, accepted)


def _run_extension(buffer, start, accepted) -> None:
    torch.ops.fastvlm.kv_compact(buffer, start, accepted)


def _run_triton(buffer, start, accepted) -> None:
    from .triton import kv_compact_triton_op
    call_custom_op(kv_compact_triton_op, buffer, start, accepted)


BACKENDS = (
    Backend("cuda", _run_extension, compiled_backend_reasons("cuda")),
    Backend("triton", _run_triton, triton_backend_reasons),
    Backend("cpu", _run_extension, compiled_backend_reasons("cpu")),
    Backend("torch", _run_reference, always_supported),
)
# `auto` order per device type. One launch for all layers either way. In device time Triton's kernel (several
# heads per program since the H200 tuning: 2.9-13.8 us, bench/results/NVIDIA-H200-2026-11-26-tune*) is ahead
# of the CUDA one (4.3-30 us, one block per head slice, ...-kv_cache*), but its Python launch costs ~100 us
# more per eager call (bench/profile_gpu.py --host-profile), and the decoder calls it eagerly once per
# step, so CUDA comes first.
PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


# ---- kv_append -------------------------------------------------------------------------------------------

def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, *, validate: bool = True, backend: str = "auto") -> None:
    """Writes T new positions per row at that row's length, keys and values in one launch, in place.

    Args:
        k_cache, v_cache: ``[B, Hkv, L_max, D]`` (a KVCache layer's views), fp32, fp16 or bf16, last dim
            contiguous, other strides arbitrary. Written at ``[b, :, lengths[b] + t]`` for t < T.
        lengths: ``[B]`` int32 or int64 on the cache's device: where each row's new positions begin. Only
            read (the caller advances it), so rows may be ragged and nothing is read back to the host.
        keys, values: ``[B, Hkv, T, D]`` in the cache's dtype, last dim contiguous (a transposed view of
            ``[B, T, Hkv, D]`` is fine).
        validate: check ``0 <= lengths[b]`` and ``lengths[b] + T <= L_max`` (a device-to-host read on a GPU);
            KVCache checks its host copy instead and passes False. Kernels skip positions outside the cache.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).
    """
    k_cache = _checks.check_tensor("k_cache", k_cache, ndim=4, dtypes=SUPPORTED_DTYPES, shape_doc="[B, Hkv, L_max, D]")
    v_cache = _checks.check_tensor("v_cache", v_cache, ndim=4, shape_doc="[B, Hkv, L_max, D]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    batch, num_kv_heads, cache_len, head_dim = k_cache.shape
    for name, tensor in (("v_cache", v_cache), ("keys", keys), ("values", values)):
        _checks.check_tensor(name, tensor, ndim=4, shape_doc="[B, Hkv, T, D]" if name != "v_cache" else "")
        _checks.check_same_dtype(name, tensor, "k_cache", k_cache)
        _checks.check_same_device(name, tensor, "k_cache", k_cache)
    num_new = keys.shape[2]
    if tuple(keys.shape) != (batch, num_kv_heads, num_new, head_dim):
        raise ValueError(f"keys must have shape [B={batch}, Hkv={num_kv_heads}, T, D={head_dim}] like k_cache, "
                         f"got {tuple(keys.shape)}")
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache), ("keys", keys), ("values", values)):
        _checks.check_last_dim_contiguous(name, tensor)
    lengths = _checks.check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, shape_doc="[B]")
    _checks.check_same_device("lengths", lengths, "k_cache", k_cache)
    _checks.check_size("lengths", lengths, 0, batch, "the batch size B of k_cache")
    if validate and not torch.compiler.is_compiling() and batch > 0:
        low, high = (int(value) for value in torch.stack([lengths.min(), lengths.max()]).tolist())
        if low < 0:
            raise ValueError(f"lengths must be >= 0, got a row with {low}")
        if high + num_new > cache_len:
            raise ValueError(f"lengths[b] + T must be <= L_max: a row at {high} + T={num_new} = {high + num_new} > "
                             f"L_max={cache_len} (the cache is full)")
    if keys.numel() == 0:
        return
    lengths = lengths.to(torch.int32).contiguous()
    chosen = select("kv_append", APPEND_BACKENDS, PRIORITY.get(k_cache.device.type, ("torch",)), backend, k_cache)
    chosen.run(k_cache, v_cache, lengths, keys, values)


def _run_append_reference(k_cache, v_cache, lengths, keys, values) -> None:
    kv_append_reference(k_cache, v_cache, lengths, keys, values)


def _run_append_extension(k_cache, v_cache, lengths, keys, values) -> None:
    torch.ops.fastvlm.kv_append(k_cache, v_cache, lengths, keys, values)


def _run_append_triton(k_cache, v_cache, lengths, keys, values) -> None:
    from .triton import kv_append_triton_op
    call_custom_op(kv_append_triton_op, k_cache, v_cache, lengths, keys, values)


APPEND_BACKENDS = (
    Backend("cuda", _run_append_extension, compiled_backend_reasons("cuda")),
    Backend("triton", _run_append_triton, triton_backend_reasons),
    Backend("cpu", _run_append_extension, compiled_backend_reasons("cpu")),
    Backend("torch", _run_append_reference, always_supported),
)
