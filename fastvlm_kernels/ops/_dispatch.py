"""Backend choice in one place (the xformers way).

Each backend of an op is a `Backend`: a name, the function that runs it, and `not_supported_reasons`,
which returns sentences saying why it cannot run these inputs (an empty list means it can). `auto`
takes the first backend of the op's priority list with no reasons; an explicit backend that cannot run
raises with its reasons; when nothing fits, one error lists every backend's reasons.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from ._library import EXTENSION

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    not_supported_reasons: Callable[..., List[str]]


def extension_reasons(device: torch.device) -> List[str]:
    """Why the compiled extension cannot run on `device` (empty when it can)."""
    if not EXTENSION.loaded:
        return [EXTENSION.error]
    if device.type == "cuda" and not EXTENSION.with_cuda:
        return ["the extension was built without CUDA kernels"]
    return []


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str:
    """Empty when Triton imports, else why not (cached: importing triton is slow)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install must not break the package
        return f"triton failed to import: {error}"
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reasons(device: torch.device) -> List[str]:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    error = triton_import_error()
    if error:
        return [error]
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return []
    return [f"tensors are on {device.type}; Triton runs CUDA tensors "
            "(and CPU tensors only under TRITON_INTERPRET=1)"]


def device_reasons(device: torch.device, expected: str) -> List[str]:
    return [] if device.type == expected else [f"tensors are on {device.type}, this backend runs {expected}"]


def select(op_name: str, backends: Sequence[Backend], priority: Sequence[str], requested: str,
           *inputs, **options) -> Backend:
    """The backend that runs `op_name` on these inputs: `requested`, or the first of `priority`."""
    by_name = {backend.name: backend for backend in backends}
    if requested != "auto":
        if requested not in by_name:
            raise ValueError(f"backend={requested!r} is not a backend of {op_name}: "
                             f"choose 'auto' or one of {sorted(by_name)}")
        reasons = by_name[requested].not_supported_reasons(*inputs, **options)
        if reasons:
            raise ValueError(f"backend={requested!r} cannot run {op_name} here: " + "; ".join(reasons))
        return by_name[requested]
    all_reasons = []
    for name in priority:
        reasons = by_name[name].not_supported_reasons(*inputs, **options)
        if not reasons:
            return by_name[name]
        all_reasons.append(f"{name}: " + "; ".join(reasons))
    raise ValueError(f"no backend of {op_name} can run these inputs:\n  " + "\n  ".join(all_reasons))


_SELECTED: dict = {}


def select_remembered(op_name: str, backends: Sequence[Backend], priority: Sequence[str], requested: str,
                      device_type: str, options, *inputs) -> Backend:
    """`select`, remembered per (op, priority, request, device type, options), for ops whose backends' reasons
    read only the inputs' device type and `options` (a hashable of the dtypes and settings they read), besides
    the process's state (the extension, Triton's import, TRITON_INTERPRET): this takes the backend choice off
    the per-call cost of small calls. Refusals are not remembered, so a bad request raises every time."""
    # TRITON_INTERPRET decides only whether Triton runs CPU tensors: read it (~2 us) only when it can matter
    may_run_triton = requested == "triton" or (requested == "auto" and "triton" in priority)
    interpreting = device_type == "cpu" and may_run_triton and triton_interpreting()
    key = (op_name, tuple(priority), requested, device_type, options, interpreting)
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = select(op_name, backends, priority, requested, *inputs)
        _SELECTED[key] = chosen
    return chosen


# ---- the not_supported_reasons shared by the ops' backends (each asked of the op's first tensor) --------

def compiled_backend_reasons(device_type: str) -> Callable[..., List[str]]:
    """Reasons of the compiled `cpu` or `cuda` backend: the tensors' device and the extension's state."""
    def reasons(tensor: torch.Tensor, *others) -> List[str]:
        return device_reasons(tensor.device, device_type) + extension_reasons(tensor.device)
    return reasons


def triton_backend_reasons(tensor: torch.Tensor, data=None) -> List[str]:
    """Reasons of a Triton backend; `data` (default: `tensor`) is the floating-point input whose dtype the
    interpreter must handle."""
    data = tensor if data is None else data
    reasons = triton_device_reasons(tensor.device)
    if tensor.device.type == "cpu" and data.dtype == torch.bfloat16:
        reasons.append("the Triton interpreter does not run bf16 reliably on the CPU")
    return reasons


def always_supported(*inputs) -> List[str]:
    """Reasons of the PyTorch reference: none, it runs anywhere torch does."""
    return []


def call_custom_op(op, *args) -> None:
    """Calls a Python-defined ``torch.library.custom_op`` (the Triton launchers): through the op while
    torch.compile traces, so that the graph holds it, else the function itself, which skips the custom
    op's dispatch (tens of microseconds per call on a GPU host, more than a small kernel takes)."""
    function = getattr(op, "_init_fn", None)
    if function is None or torch.compiler.is_compiling():
        op(*args)
    else:
        function(*args)
