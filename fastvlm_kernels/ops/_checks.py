"""Argument checks shared by the ops: each raises a TypeError / ValueError naming the argument, what was
expected and what was found. They read shapes, dtypes and devices only (free); checks that read tensor
values live with their op and can be skipped by callers that already know the values are valid.

Two forms of each rule, one message: ``check_*`` tests and raises; the ``*_error`` builders only make the
exception, for an op whose checks run on every call and are written as one ``if`` per rule (no function call
on the valid path; see verify_attention's ``check_arguments``)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)


def _shape_doc(shape_doc: str) -> str:
    return f" {shape_doc}" if shape_doc else ""


# ---- the messages -----------------------------------------------------------------------------------

def not_a_tensor_error(name: str, value, shape_doc: str = "") -> TypeError:
    return TypeError(f"{name} must be a torch.Tensor{_shape_doc(shape_doc)}, got {type(value).__name__}")


def rank_error(name: str, value: torch.Tensor, ndim: int, shape_doc: str = "") -> ValueError:
    return ValueError(f"{name} must have {ndim} dimensions{_shape_doc(shape_doc)}, got shape {tuple(value.shape)}")


def dtype_error(name: str, value: torch.Tensor, dtypes: Sequence[torch.dtype]) -> TypeError:
    return TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(value.dtype).replace('torch.', '')}")


def size_error(name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> ValueError:
    return ValueError(f"{name}.shape[{dim}] must be {expected} ({meaning}), got {value.shape[dim]} "
                      f"(shape {tuple(value.shape)})")


def same_dtype_error(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> TypeError:
    return TypeError(f"{name} must have the dtype of {reference_name} "
                     f"({str(reference.dtype).replace('torch.', '')}), got {str(value.dtype).replace('torch.', '')}")


def same_device_error(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> ValueError:
    return ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}: "
                      "all tensors must be on one device")


def last_dim_contiguous_error(name: str, value: torch.Tensor) -> ValueError:
    return ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                      f"{tuple(value.stride())}; pass {name}.contiguous()")


# ---- the checks -------------------------------------------------------------------------------------

def check_tensor(name: str, value, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
                 shape_doc: str = "") -> torch.Tensor:
    """`value` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(value, torch.Tensor):
        raise not_a_tensor_error(name, value, shape_doc)
    if ndim is not None and value.dim() != ndim:
        raise rank_error(name, value, ndim, shape_doc)
    if dtypes is not None and value.dtype not in dtypes:
        raise dtype_error(name, value, dtypes)
    return value


def check_size(name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise size_error(name, value, dim, expected, meaning)


def check_same_dtype(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.dtype != reference.dtype:
        raise same_dtype_error(name, value, reference_name, reference)


def check_same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise same_device_error(name, value, reference_name, reference)


def last_dim_is_contiguous(value: torch.Tensor) -> bool:
    # stride first: it is 1 on the hot path
    return value.dim() == 0 or value.stride(-1) == 1 or value.shape[-1] <= 1


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> None:
    if not last_dim_is_contiguous(value):
        raise last_dim_contiguous_error(name, value)
