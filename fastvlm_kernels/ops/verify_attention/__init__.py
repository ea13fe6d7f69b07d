"""verify_attention: T new tokens (a chain or a flattened draft tree) attend to their row's cached prefix
and to the new tokens their mask allows, reading the cache in place.

One way through: :func:`verify_attention_plan` checks the arguments and chooses the backend once and returns
a :class:`VerifyAttentionPlan`, whose ``run`` calls the chosen kernel with nothing in front of it;
:func:`verify_attention` is plan then run (FlashInfer's plan/run split). A caller that attends many times
over inputs of one kind (the decoder: every layer of every step) makes the plan once and calls ``run``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from .. import _checks
from .._dispatch import (Backend, always_supported, call_custom_op, compiled_backend_reasons, select_remembered,
                         triton_backend_reasons)
from .reference import verify_attention_reference
from .spec import HEAD_DIMS, MAX_TREE_TOKENS, SUPPORTED_DTYPES

__all__ = ["verify_attention", "verify_attention_plan", "VerifyAttentionPlan", "verify_attention_reference",
           "check_arguments", "BACKENDS", "PRIORITY", "HOST_BOUND_PRIORITY"]

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def verify_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
                     tree_mask: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
                     return_lse: bool = False, out: Optional[torch.Tensor] = None,
                     out_lse: Optional[torch.Tensor] = None, validate: bool = True,
                     backend: str = "auto") -> Output:
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
        try:  # plan and run of the CPU kernel in one C++ call: see _cpu_entry
            return _CPU_ENTRY(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, validate)
        except NotImplementedError:
            pass  # an argument it does not take: the plan's checks name it, or another backend runs
    plan = verify_attention_plan(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale=sm_scale,
                                 return_lse=return_lse or out_lse is not None, out=out, out_lse=out_lse,
                                 validate=validate, backend=backend)
    if prefix_lens.dtype != torch.int32 or not prefix_lens.is_contiguous():
        prefix_lens = prefix_lens.to(torch.int32).contiguous()
    if tree_mask is not None and not tree_mask.is_contiguous():
        tree_mask = tree_mask.contiguous()
    return plan.run(q, k_cache, v_cache, prefix_lens, tree_mask, out=out, out_lse=out_lse)


class VerifyAttentionPlan:
    """The backend and softmax scale :func:`verify_attention_plan` chose for inputs of one kind.

    ``run`` checks nothing: it takes tensors of the kind the plan was made for, which may differ from the
    planned ones only in T (any T in [1, L_max], T <= 64 with a tree mask), in their values and in which
    cache layer they are (the same shape). Precisely: q ``[B, Hq, T, D]``, k_cache and v_cache ``[B, Hkv,
    L_max, D]`` with the planned B, Hq, Hkv, L_max, D, dtype and device, last dim contiguous; prefix_lens
    ``[B]`` int32 contiguous; tree_mask None or ``[B, T]`` int64 contiguous; out (optional) ``[B, Hq, T, D]``
    in q's dtype, last dim contiguous; out_lse (optional) ``[B, Hq, T]`` fp32 contiguous. The kernels clamp
    prefix_lens into the cache, so unchecked lengths never read outside it.
    """

    __slots__ = ("backend", "sm_scale", "return_lse", "_kernel")

    def __init__(self, backend: Backend, sm_scale: float, return_lse: bool, batch: int):
        self.backend = backend                  # the chosen Backend (its name says which)
        self.sm_scale = float(sm_scale)
        self.return_lse = bool(return_lse)
        self._kernel: Callable = backend.run if batch > 0 else _run_nothing

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
            tree_mask: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
            out_lse: Optional[torch.Tensor] = None) -> Output:
        """The chosen kernel on these inputs (see the class): ``out``, or ``(out, lse)`` when the plan was made
        with return_lse (a given out_lse is written either way)."""
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if out_lse is None and self.return_lse:
            out_lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        self._kernel(q, k_cache, v_cache, prefix_lens, tree_mask, self.sm_scale, out, out_lse)
        return (out, out_lse) if self.return_lse else out

    def __repr__(self) -> str:
        return (f"VerifyAttentionPlan(backend={self.backend.name!r}, sm_scale={self.sm_scale}, "
                f"return_lse={self.return_lse})")


def verify_attention_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
                          tree_mask: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
                          return_lse: bool = False, out: Optional[torch.Tensor] = None,
                          out_lse: Optional[torch.Tensor] = None, validate: bool = True, backend: str = "auto",
                          host_bound: bool = False) -> VerifyAttentionPlan:
    """Checks these arguments (as :func:`verify_attention` documents them) and chooses the backend, once.

    Args:
        q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, return_lse, validate, backend: as in
            :func:`verify_attention`. out, out_lse: the outputs ``run`` will be given, checked here if given
            (out_lse implies return_lse).
        host_bound: the caller launches this op eagerly many times per step, once per layer (a decoder):
            host launch time, not device time, then bounds it, and ``auto`` takes :data:`HOST_BOUND_PRIORITY`
            (the backend with the cheapest launch first) instead of :data:`PRIORITY`.

    Returns:
        a :class:`VerifyAttentionPlan`; ``plan.run(q, k_cache, v_cache, prefix_lens, tree_mask, out=...)``
        runs the kernel on inputs of the planned kind (prefix_lens int32 and tree_mask contiguous there).

    Raises:
        TypeError / ValueError naming the argument; ValueError with every backend's reasons when none can run.
    """
    check_arguments(q, k_cache, v_cache, prefix_lens, tree_mask, out, out_lse)
    num_new, head_dim = q.shape[2], q.shape[3]
    if validate and not torch.compiler.is_compiling():
        _check_values(prefix_lens, tree_mask, num_new, k_cache.shape[2])
    device_type = q.device.type
    priority = (HOST_BOUND_PRIORITY if host_bound else PRIORITY).get(device_type, ("torch",))
    chosen = select_remembered("verify_attention", BACKENDS, priority, backend, device_type, q.dtype, q)
    return VerifyAttentionPlan(chosen, head_dim ** -0.5 if sm_scale is None else sm_scale,
                               return_lse or out_lse is not None, q.shape[0])


_Q_SHAPE, _CACHE_SHAPE = "[B, Hq, T, D]", "[B, Hkv, L_max, D]"


def check_arguments(q, k_cache, v_cache, prefix_lens, tree_mask, out=None, out_lse=None) -> None:
    """Every check of verify_attention's shapes, dtypes, devices and layouts (its values: ``_check_values``),
    each raising a TypeError / ValueError that names the argument. The one copy of these rules in Python
    (csrc's entries keep the checks that guard memory). One ``if`` per rule and no call on the valid path:
    it runs on every public call, where helper calls would cost ~3x as much."""
    if not isinstance(q, torch.Tensor):
        raise _checks.not_a_tensor_error("q", q, _Q_SHAPE)
    if q.dim() != 4:
        raise _checks.rank_error("q", q, 4, _Q_SHAPE)
    if q.dtype not in SUPPORTED_DTYPES:
        raise _checks.dtype_error("q", q, SUPPORTED_DTYPES)
    shape = q.shape
    batch, num_q_heads, num_new, head_dim = shape
    dtype, device = q.dtype, q.device
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor):
            raise _checks.not_a_tensor_error(name, cache, _CACHE_SHAPE)
        if cache.dim() != 4:
            raise _checks.rank_error(name, cache, 4, _CACHE_SHAPE)
        if cache.dtype != dtype:
            raise _checks.same_dtype_error(name, cache, "q", q)
        if cache.device != device:
            raise _checks.same_device_error(name, cache, "q", q)
        if cache.shape[0] != batch:
            raise _checks.size_error(name, cache, 0, batch, "the batch size B of q")
        if cache.shape[3] != head_dim:
            raise _checks.size_error(name, cache, 3, head_dim, "the head dim D of q")
    cache_shape = k_cache.shape
    if v_cache.shape != cache_shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(cache_shape)}, got {tuple(v_cache.shape)}")
    num_kv_heads, cache_len = cache_shape[1], cache_shape[2]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q has head dim D={head_dim}, which is not supported (supported: {HEAD_DIMS})")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's Hq={num_q_heads} must be a multiple of k_cache's Hkv={num_kv_heads} "
                         "(grouped-query attention)")
    if num_new == 0:
        raise ValueError("q has T=0 new tokens; T must be at least 1")
    if num_new > cache_len:
        raise ValueError(f"q has T={num_new} new tokens but k_cache holds only L_max={cache_len} positions")
    # D >= 64 from here: "last dim contiguous" is stride 1
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.stride(3) != 1:
            raise _checks.last_dim_contiguous_error(name, tensor)

    if not isinstance(prefix_lens, torch.Tensor):
        raise _checks.not_a_tensor_error("prefix_lens", prefix_lens, "[B]")
    if prefix_lens.dim() != 1:
        raise _checks.rank_error("prefix_lens", prefix_lens, 1, "[B]")
    if prefix_lens.dtype not in _LENGTH_DTYPES:
        raise _checks.dtype_error("prefix_lens", prefix_lens, _LENGTH_DTYPES)
    if prefix_lens.device != device:
        raise _checks.same_device_error("prefix_lens", prefix_lens, "q", q)
    if prefix_lens.shape[0] != batch:
        raise _checks.size_error("prefix_lens", prefix_lens, 0, batch, "the batch size B of q")
    if tree_mask is not None:
        _checks.check_tensor("tree_mask", tree_mask, ndim=2, dtypes=(torch.int64,), shape_doc="[B, T]")
        _checks.check_same_device("tree_mask", tree_mask, "q", q)
        _checks.check_size("tree_mask", tree_mask, 0, batch, "the batch size B of q")
        _checks.check_size("tree_mask", tree_mask, 1, num_new, "the number of new tokens T of q")
        if num_new > MAX_TREE_TOKENS:
            raise ValueError(f"tree_mask covers T={num_new} tokens; a tree holds at most {MAX_TREE_TOKENS} "
                             "(one int64 bitmask per query); pass tree_mask=None for a causal chain")

    if out is not None:
        _checks.check_tensor("out", out, ndim=4, dtypes=(dtype,), shape_doc=_Q_SHAPE)
        _checks.check_same_device("out", out, "q", q)
        if out.shape != shape:
            raise ValueError(f"out must have q's shape {tuple(shape)}, got {tuple(out.shape)}")
        if out.stride(3) != 1:
            raise _checks.last_dim_contiguous_error("out", out)
    if out_lse is not None:
        _checks.check_tensor("out_lse", out_lse, ndim=3, dtypes=(torch.float32,), shape_doc="[B, Hq, T]")
        _checks.check_same_device("out_lse", out_lse, "q", q)
        if out_lse.shape != shape[:3] or not out_lse.is_contiguous():
            raise ValueError(f"out_lse must be contiguous with shape {tuple(shape[:3])}, "
                             f"got shape {tuple(out_lse.shape)} and strides {tuple(out_lse.stride())}")


_LENGTH_DTYPES = (torch.int32, torch.int64)


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

def _run_nothing(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse) -> None:
    """The plan of an empty batch (B = 0): nothing to compute, and no kernel is asked to launch an empty grid."""


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
# `auto` order per device type (Triton on CPU tensors is for tests under the interpreter only), for a call
# whose cost is the kernel's device time (the default). GPU order measured on an H100 and an H200
# (bench/results/NVIDIA-H100-80GB-HBM3-2026-11-25-{verify_attention,profile}*, NVIDIA-H200-2026-11-26-
# {verify_attention,tuned-verify_attention}*, device time per call): Triton reads the cache at 92-105% of what
# a plain read of the same bytes takes for MHA at prefix >= 2048 and T <= 16 (1.1-4.1x SDPA with a mask) and is
# 1.3-9.4x faster than SDPA at GQA 28/4; the CUDA C++ kernel (mma.sync, cp.async pipeline, split-KV) is
# 1.2-3.6x slower than tuned Triton at those shapes, so it comes second.
PRIORITY = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# The order for a host-bound caller (``verify_attention_plan(host_bound=True)``): one that launches eagerly
# once per layer per step, as the decoder does, waits on the host, not on the device. On an H100 the CUDA
# C++ kernel's launch takes ~40 us of host time against ~130-220 us for Triton's launcher, and the decoder
# ran 15-18% faster end to end with it although Triton's kernel is faster on the device
# (bench/results/NVIDIA-H100-80GB-HBM3-2026-11-25-e2e-attention-backends.md). A step captured in a CUDA graph
# replays without host launches: it plans with host_bound=False.
HOST_BOUND_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _cpu_entry():
    """The extension's whole-call CPU op (``verify_attention_checked``, csrc/ops.h) when "auto" picks the CPU
    kernel for CPU tensors, else None (no extension, or one built before the op existed).

    It is plan and run of the CPU kernel in one C++ call, for the plain public call (auto, no out, no lse):
    after a kernel has streamed a cache through the CPU's caches the Python plan costs tens of microseconds,
    more than the kernel at a few thousand positions. It refuses (NotImplementedError) every argument it does
    not take, bad ones included, and the public function then plans in Python, whose checks name the
    argument: the rules stay those of ``check_arguments`` (tests/ops/test_verify_attention.py holds the C++
    entry to them, head dims included)."""
    cpu = next(backend for backend in BACKENDS if backend.name == "cpu")
    if PRIORITY["cpu"][0] != "cpu" or cpu.not_supported_reasons(torch.empty(0)):
        return None
    return getattr(torch.ops.fastvlm, "verify_attention_checked", None)


# The public function's fast path on CPU tensors; torch.compile traces the checked path and the plain op instead.
_CPU_ENTRY = _cpu_entry()
_is_compiling = torch.compiler.is_compiling
