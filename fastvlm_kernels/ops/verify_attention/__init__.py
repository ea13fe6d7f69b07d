"""verify_attention: T new tokens (a chain or a flattened draft tree) attend to their row's cached prefix
and to the new tokens their mask allows, reading the cache in place."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks
from .._dispatch import (Backend, always_supported, call_custom_op, compiled_backend_reasons, select_by_device,
                         triton_backend_reasons)
from .reference import verify_attention_reference
from .spec import HEAD_DIMS, MAX_TREE_TOKENS, SUPPORTED_DTYPES

__all__ = ["verify_attention", "verify_attention_reference", "BACKENDS", "PRIORITY"]


def verify_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
                     tree_mask: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
                     return_lse: bool = False, out: Optional[torch.Tensor] = None,
                     out_lse: Optional[torch.Tensor] = None, validate: bool = True,
                     backend: str = "auto") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of T new tokens over a KV cache that already holds them.

    Args:
        q: ``[B, Hq, T, D]`` queries of the new tokens, rotary applied; fp32, fp16 or bf16; last dim
            contiguous (a transposed view of ``[B, T, Hq, D]`` is fine).
        k_cache, v_cache: ``[B, Hkv, L_max, D]``, q's dtype and device, last dim contiguous (a transformers
            cache layer, read in place). Row b holds its prefix at positions ``[0, prefix_lens[b])`` and
            the T new tokens' keys and values at ``prefix_lens[b] + i``. ``Hq`` must be a multiple of
            ``Hkv`` (query head h reads KV head ``h // (Hq // Hkv)``); D in 64, 80, 96, 128, 256.
        prefix_lens: ``[B]`` int32 or int64, each in ``[0, L_max - T]``.
        tree_mask: ``None`` for a causal chain (query j sees new tokens ``i <= j``; any T, so it serves
            prefill too), or ``[B, T]`` int64 with T <= 64: query j sees new token i when bit i of
            ``tree_mask[b, j]`` is set. Each query must see itself and no later token.
        sm_scale: softmax scale; default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled scores, ``[B, Hq, T]`` fp32 (natural log).
        out: optional ``[B, Hq, T, D]`` output in q's dtype, written in place (last dim contiguous).
        out_lse: optional ``[B, Hq, T]`` fp32 contiguous tensor for the log-sum-exp (implies return_lse).
        validate: check the values of prefix_lens and tree_mask (a device-to-host read on a GPU). Callers
            that know them valid (the decoder) pass False; kernels clamp prefix_lens either way, so no
            value reads outside the cache. Skipped automatically under torch.compile.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        ``out`` ``[B, Hq, T, D]``, or ``(out, lse)`` when return_lse or out_lse is given.
    """
    if (out is None and out_lse is None and not return_lse and backend == "auto" and _CPU_ENTRY is not None and
            isinstance(q, torch.Tensor) and q.is_cpu and not _is_compiling()):
        try:  # the whole call in C++ (~30-50 us less than the checks below right after a cache-streaming kernel)
            return _CPU_ENTRY(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, validate)
        except NotImplementedError:
            pass  # an argument it does not take: the checks below name it, or another backend runs
    if not _inputs_look_valid(q, k_cache, v_cache, prefix_lens, tree_mask):
        _check_inputs(q, k_cache, v_cache, prefix_lens, tree_mask)  # raises, naming the bad argument
    num_new, head_dim = q.shape[2], q.shape[3]
    cache_len = k_cache.shape[2]
    if validate and not torch.compiler.is_compiling():
        _check_values(prefix_lens, tree_mask, num_new, cache_len)
    if sm_scale is None:
        sm_scale = head_dim ** -0.5

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _checks.check_tensor("out", out, ndim=4, dtypes=(q.dtype,), shape_doc="[B, Hq, T, D]")
        _checks.check_same_device("out", out, "q", q)
        if out.shape != q.shape:
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        _checks.check_last_dim_contiguous("out", out)
    if out_lse is not None:
        _checks.check_tensor("out_lse", out_lse, ndim=3, dtypes=(torch.float32,), shape_doc="[B, Hq, T]")
        _checks.check_same_device("out_lse", out_lse, "q", q)
        if out_lse.shape != q.shape[:3] or not out_lse.is_contiguous():
            raise ValueError(f"out_lse must be contiguous with shape {tuple(q.shape[:3])}, "
                             f"got shape {tuple(out_lse.shape)} and strides {tuple(out_lse.stride())}")
        return_lse = True
    elif return_lse:
        out_lse = q.new_empty(q.shape[:3], dtype=torch.float32)

    if prefix_lens.dtype != torch.int32 or not prefix_lens.is_contiguous():
        prefix_lens = prefix_lens.to(torch.int32).contiguous()
    if tree_mask is not None and not tree_mask.is_contiguous():
        tree_mask = tree_mask.contiguous()
    if q.shape[0] > 0:
        chosen = select_by_device("verify_attention", BACKENDS, PRIORITY.get(q.device.type, ("torch",)), backend, q)
        chosen.run(q, k_cache, v_cache, prefix_lens, tree_mask, float(sm_scale), out, out_lse)
    return (out, out_lse) if return_lse else out


def _inputs_look_valid(q, k_cache, v_cache, prefix_lens, tree_mask) -> bool:
    """Every shape, dtype, device and layout check of ``_check_inputs`` as one expression, for the common
    valid call: ``_check_inputs`` costs ~10 us of Python a call, paid per layer in the decoder (and several
    times that right after a kernel has streamed a cache through the CPU's caches). False sends the call
    through ``_check_inputs``, which raises naming the bad argument."""
    try:
        batch, num_q_heads, num_new, head_dim = q.shape
        shape = k_cache.shape
        device = q.device
        return (isinstance(q, torch.Tensor) and q.dtype in SUPPORTED_DTYPES and len(shape) == 4
                and v_cache.shape == shape and shape[0] == batch and shape[3] == head_dim
                and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
                and k_cache.device == device and v_cache.device == device and head_dim in HEAD_DIMS
                and shape[1] > 0 and num_q_heads % shape[1] == 0 and 0 < num_new <= shape[2]
                and q.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
                and prefix_lens.dtype in (torch.int32, torch.int64) and prefix_lens.shape == (batch,)
                and prefix_lens.device == device
                and (tree_mask is None or (tree_mask.dtype == torch.int64 and tree_mask.shape == (batch, num_new)
                                           and tree_mask.device == device and num_new <= MAX_TREE_TOKENS)))
    except (AttributeError, TypeError, ValueError):  # not tensors, or q of another rank
        return False


def _check_inputs(q, k_cache, v_cache, prefix_lens, tree_mask) -> None:
    """The argument checks, each raising a ValueError / TypeError that names the argument."""
    q = _checks.check_tensor("q", q, ndim=4, dtypes=SUPPORTED_DTYPES, shape_doc="[B, Hq, T, D]")
    batch, num_q_heads, num_new, head_dim = q.shape
    k_cache = _checks.check_tensor("k_cache", k_cache, ndim=4, shape_doc="[B, Hkv, L_max, D]")
    v_cache = _checks.check_tensor("v_cache", v_cache, ndim=4, shape_doc="[B, Hkv, L_max, D]")
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_same_dtype(name, tensor, "q", q)
        _checks.check_same_device(name, tensor, "q", q)
        _checks.check_size(name, tensor, 0, batch, "the batch size B of q")
        _checks.check_size(name, tensor, 3, head_dim, "the head dim D of q")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q has head dim D={head_dim}, which is not supported (supported: {HEAD_DIMS})")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's Hq={num_q_heads} must be a multiple of k_cache's Hkv={num_kv_heads} "
                         "(grouped-query attention)")
    if num_new == 0:
        raise ValueError("q has T=0 new tokens; T must be at least 1")
    if num_new > cache_len:
        raise ValueError(f"q has T={num_new} new tokens but k_cache holds only L_max={cache_len} positions")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_last_dim_contiguous(name, tensor)

    prefix_lens = _checks.check_tensor("prefix_lens", prefix_lens, ndim=1, dtypes=(torch.int32, torch.int64),
                                       shape_doc="[B]")
    _checks.check_same_device("prefix_lens", prefix_lens, "q", q)
    _checks.check_size("prefix_lens", prefix_lens, 0, batch, "the batch size B of q")
    if tree_mask is not None:
        tree_mask = _checks.check_tensor("tree_mask", tree_mask, ndim=2, dtypes=(torch.int64,), shape_doc="[B, T]")
        _checks.check_same_device("tree_mask", tree_mask, "q", q)
        _checks.check_size("tree_mask", tree_mask, 0, batch, "the batch size B of q")
        _checks.check_size("tree_mask", tree_mask, 1, num_new, "the number of new tokens T of q")
        if num_new > MAX_TREE_TOKENS:
            raise ValueError(f"tree_mask covers T={num_new} tokens; a tree holds at most {MAX_TREE_TOKENS} "
                             "(one int64 bitmask per query); pass tree_mask=None for a causal chain")


def _check_values(prefix_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], num_new: int,
                  cache_len: int) -> None:
    """The checks that read tensor values: lengths in range, each query sees itself and no later token."""
    if prefix_lens.numel() == 0:
        low, high = 0, 0
    elif prefix_lens.device.type == "cpu":  # one call instead of four tensor ops (~40 us on cold caches)
        values = prefix_lens.tolist()
        low, high = min(values), max(values)
    else:                                   # one device-to-host read
        low, high = (int(value) for value in torch.stack([prefix_lens.min(), prefix_lens.max()]).tolist())
    if low < 0:
        raise ValueError(f"prefix_lens must be >= 0, got a row with {low}")
    if high + num_new > cache_len:
        raise ValueError(f"prefix_lens[b] + T must be <= L_max: a row has prefix {high} + T={num_new} = "
                         f"{high + num_new} > L_max={cache_len} (the cache is full)")
    if tree_mask is None or tree_mask.numel() == 0:
        return
    query = torch.arange(num_new, device=tree_mask.device)
    sees_itself = ((tree_mask >> query) & 1).bool()                                   # [B, T]
    later_bits = torch.tensor([0 if j == 63 else -(1 << (j + 1)) for j in range(num_new)],
                              dtype=torch.int64, device=tree_mask.device)             # bits above j
    sees_later = (tree_mask & later_bits) != 0                                        # [B, T]
    bad_self, bad_later = (int(flag) for flag in torch.stack([(~sees_itself).any(), sees_later.any()]).tolist())
    if bad_self:
        row, col = (~sees_itself).nonzero()[0].tolist()
        raise ValueError(f"tree_mask[{row}, {col}] does not let query {col} see itself (bit {col} must be set)")
    if bad_later:
        row, col = sees_later.nonzero()[0].tolist()
        raise ValueError(f"tree_mask[{row}, {col}] lets query {col} see a later token "
                         f"(bits above {col} must be clear; nodes are in topological order)")


# ---- backends ----------------------------------------------------------------------------------------

def _run_reference(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse) -> None:
    result, result_lse = verify_attention_reference(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale)
    out.copy_(result)
    if lse is not None:
        lse.copy_(result_lse)


def _run_extension(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse) -> None:
    torch.ops.fastvlm.verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse)


def _run_triton(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse) -> None:
    from .triton import verify_attention_triton_op
    call_custom_op(verify_attention_triton_op, q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse)


BACKENDS = (
    Backend("cuda", _run_extension, compiled_backend_reasons("cuda")),
    Backend("triton", _run_triton, triton_backend_reasons),
    Backend("cpu", _run_extension, compiled_backend_reasons("cpu")),
    Backend("torch", _run_reference, always_supported),
)
# `auto` order per device type (Triton on CPU tensors is for tests under the interpreter only).
# GPU order measured on an H100 and an H200 (bench/results/NVIDIA-H100-80GB-HBM3-2026-11-25-{verify_attention,
# profile}*, NVIDIA-H200-2026-11-26-{verify_attention,tuned-verify_attention}*, device time per call): Triton
# reads the cache at 92-105% of what a plain read of the same bytes takes for MHA at prefix >= 2048 and
# T <= 16 (1.1-4.1x SDPA with a mask) and is 1.3-9.4x faster than SDPA at GQA 28/4; the CUDA C++ kernel
# (mma.sync, cp.async pipeline, split-KV) is 1.2-3.6x slower than tuned Triton at those shapes, so it comes second.
PRIORITY = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def _cpu_entry():
    """The extension's whole-call CPU op (``verify_attention_checked``, csrc/ops.h) when "auto" picks the CPU
    kernel for CPU tensors, else None (no extension, or one built before the op existed)."""
    cpu = next(backend for backend in BACKENDS if backend.name == "cpu")
    if PRIORITY["cpu"][0] != "cpu" or cpu.not_supported_reasons(torch.empty(0)):
        return None
    return getattr(torch.ops.fastvlm, "verify_attention_checked", None)


# The public function's fast path on CPU tensors; torch.compile traces the checked path and the plain op instead.
_CPU_ENTRY = _cpu_entry()
_is_compiling = torch.compiler.is_compiling
