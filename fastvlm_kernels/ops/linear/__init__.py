"""skinny_linear: ``x @ weight.T + bias`` for a few rows (M <= 16), reading the weight once.

A decoder step multiplies a handful of token rows (a draft tree's depth, a verification pass, one plain token)
by every weight matrix of the layers it runs. On a CPU such a product is bound by reading the weight, and the
BLAS GEMMs torch calls are tuned for large M: on an AVX-512 EPYC (one thread, SmolLM2's layer, weights cold)
MKL took 1.33 ms at M = 1, 1.90 at M = 2, 2.14 at M = 3 and 1.64 at M = 4, where one pass over the weight
takes about 1.1 ms whatever M (``bench/linear.py``). The "cpu" backend (csrc/cpu/linear.cpp, AVX-512 or
AVX2 chosen at run time) streams each weight row once and multiplies it by all M rows; larger M, other dtypes
and other devices run the reference, ``torch.nn.functional.linear`` (cuBLAS handles small M well on a GPU).

Results agree with the reference to fp32 rounding, not bitwise (another summation order).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks
from .._dispatch import Backend, always_supported, extension_reasons, device_reasons, select

__all__ = ["skinny_linear", "skinny_linear_plan", "skinny_linear_reference", "SkinnyLinearPlan", "MAX_ROWS",
           "BACKENDS", "PRIORITY"]

# Rows the public function sends to the kernel (it takes up to csrc/ops.h's kSkinnyMaxRows = 16): past 14 rows its
# blocks hold one weight row and torch's GEMM caught up (bench/results/cpu-2026-12-07-linear.md).
MAX_ROWS = 14
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The specification: ``torch.nn.functional.linear``."""
    return F.linear(x, weight, bias)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T (+ bias)`` like ``F.linear``, with one pass over the weight when x has few rows (<= 14).

    Args:
        x: ``[..., I]`` fp32, bf16 or fp16; its rows (the product of the leading dims) are M.
        weight: ``[O, I]`` in x's dtype and on its device (an ``nn.Linear``'s weight).
        bias: ``[O]`` or None.
        backend: "auto" (the "cpu" kernel for fp32 CPU tensors with M <= 16, else the reference), "cpu" or
            "torch" (the reference).

    Returns:
        ``[..., O]`` in x's dtype.
    """
    plan = skinny_linear_plan(x, weight, bias, backend=backend)
    return plan.run(x, weight, bias)


class SkinnyLinearPlan:
    """The backend chosen for inputs of one kind. ``run(x, weight, bias)`` takes tensors of the planned dtype,
    device and I, any M and O (rows above :data:`MAX_ROWS` go to the reference) and checks nothing."""

    __slots__ = ("backend",)

    def __init__(self, backend: Backend):
        self.backend = backend

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backend.run(x, weight, bias)

    def __repr__(self) -> str:
        return f"SkinnyLinearPlan(backend={self.backend.name!r})"


def skinny_linear_plan(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                       backend: str = "auto") -> SkinnyLinearPlan:
    """Checks the arguments (TypeError / ValueError naming them) and chooses the backend, once."""
    x = _checks.check_tensor("x", x, dtypes=SUPPORTED_DTYPES, shape_doc="[..., I]")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., I], got a 0-d tensor")
    weight = _checks.check_tensor("weight", weight, ndim=2, shape_doc="[O, I]")
    _checks.check_same_dtype("weight", weight, "x", x)
    _checks.check_same_device("weight", weight, "x", x)
    _checks.check_size("weight", weight, 1, x.shape[-1], "the input features I of x")
    if bias is not None:
        bias = _checks.check_tensor("bias", bias, ndim=1, shape_doc="[O]")
        _checks.check_same_dtype("bias", bias, "x", x)
        _checks.check_same_device("bias", bias, "x", x)
        _checks.check_size("bias", bias, 0, weight.shape[0], "the output features O of weight")
    chosen = select("skinny_linear", BACKENDS, PRIORITY.get(x.device.type, ("torch",)), backend, x)
    return SkinnyLinearPlan(chosen)


def _cpu_reasons(x: torch.Tensor, *others) -> list:
    reasons = device_reasons(x.device, "cpu") + extension_reasons(x.device)
    if x.dtype != torch.float32:
        reasons.append(f"the CPU kernel takes fp32, x is {x.dtype}")
    return reasons


def _run_cpu(x, weight, bias):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > MAX_ROWS or rows == 0 or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return skinny_linear_reference(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = flat.new_empty((rows, weight.shape[0]))
    torch.ops.fastvlm.skinny_linear(flat, weight, bias, out)
    return out.view(*x.shape[:-1], weight.shape[0])


BACKENDS = (
    Backend("cpu", _run_cpu, _cpu_reasons),
    Backend("torch", skinny_linear_reference, always_supported),
)
PRIORITY = {"cpu": ("cpu", "torch")}


def cpu_isa() -> int:
    """The vector width (bits) the CPU kernel runs with here: 512, 256, or 0 (its scalar loop)."""
    return int(torch.ops.fastvlm.skinny_linear_isa())
