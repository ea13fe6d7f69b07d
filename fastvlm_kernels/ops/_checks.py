"""Argument checks shared by the ops: each raises a TypeError / ValueError naming the argument, what was
expected and what was found. They read shapes, dtypes and devices only (free); checks that read tensor
values live with their op and can be skipped by callers that already know the values are valid."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)


def check_tensor(name: str, value, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
                 shape_doc: str = "") -> torch.Tensor:
    """`value` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + shape_doc if shape_doc else ''}, "
                        f"got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{' ' + shape_doc if shape_doc else ''}, "
                         f"got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(value.dtype).replace('torch.', '')}")
    return value


def check_size(name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must be {expected} ({meaning}), got {value.shape[dim]} "
                         f"(shape {tuple(value.shape)})")


def check_same_dtype(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.dtype != reference.dtype:
        raise TypeError(f"{name} must have the dtype of {reference_name} ({str(reference.dtype).replace('torch.', '')}), "
                        f"got {str(value.dtype).replace('torch.', '')}")


def check_same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}: "
                         "all tensors must be on one device")


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> None:
    # stride first: it is 1 on the hot path, and this check runs on every call of every op
    if value.dim() > 0 and value.stride(-1) != 1 and value.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                         f"{tuple(value.stride())}; pass {name}.contiguous()")
