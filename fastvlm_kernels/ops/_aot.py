"""Ahead-of-time compilation of the ops' Triton kernels for sm_90, with no GPU: the compile test tier.

Each op's ``triton.py`` describes its kernel configurations (``KERNEL_CONFIGS``) and compiles one with
:func:`compile_sm90`, which lowers the kernel to PTX for sm_90 and runs ``ptxas -v`` on it to read the
registers and spills that only a GPU load would otherwise report (tests/ops/test_triton_compile.py).
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import tempfile


def _ast_source(fn, types: dict, constexprs: dict):
    """An ASTSource for fn: pointers and strides marked 16-divisible, as runtime specialisation sees them.
    Arguments named in neither ``types`` nor ``constexprs`` are i32."""
    from triton.compiler import ASTSource

    signature, divisible = {}, []
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
            if signature[name].startswith("*") or name.startswith("stride_"):
                divisible.append(index)
    parameters = inspect.signature(ASTSource).parameters
    if "constexprs" in parameters:  # triton >= 3.3
        attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return ASTSource(fn=fn, signature=signature, constants=constexprs)  # triton 3.2


def ptxas_path() -> str:
    """The ptxas to run: the PATH's, the CUDA toolkit's, or the one Triton ships."""
    import triton

    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas",
                      os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("ptxas not found: put the CUDA toolkit's bin folder on PATH")


def parse_ptxas_report(report: str) -> dict:
    """{"registers", "spill_stores", "spill_loads"} from the output of ``ptxas -v`` for one kernel."""
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise ValueError(f"ptxas -v printed no register or spill figures:\n{report}")
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, name: str) -> dict:
    """Compiles the ``@triton.jit`` kernel ``fn`` for sm_90 and returns ptxas's figures: {"name",
    "registers", "spill_stores", "spill_loads", "shared_bytes"}.

    types: Triton types of the arguments that are not i32 (``"*fp16"``, ``"fp32"``, ...); constexprs: the
    values of its constexpr arguments."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(_ast_source(fn, types, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as folder:
        ptx_path = os.path.join(folder, "kernel.ptx")
        with open(ptx_path, "w") as ptx_file:
            ptx_file.write(compiled.asm["ptx"])
        result = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(folder, "k.cubin")],
                                capture_output=True, text=True, check=True)
    return {"name": name, **parse_ptxas_report(result.stdout + result.stderr),
            "shared_bytes": int(getattr(compiled.metadata, "shared", 0))}
