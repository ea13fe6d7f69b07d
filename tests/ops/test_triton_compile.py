"""Every Triton kernel configuration of every op compiles ahead of time for sm_90 (no GPU needed), within
the register budget, with its registers and spills reported in the test summary."""
import json
import os
import subprocess
import sys

import pytest

from fastvlm_kernels.ops import _aot, _dispatch

from ..helpers import skip_unless_runnable

# Spills a configuration may have (bytes of spill stores): none. A spill in the inner loop of a
# bandwidth-bound kernel costs more than the smaller tile it would take to avoid it.
SPILL_BUDGET_BYTES = 0

REPORT = []  # printed by conftest's pytest_terminal_summary

# (op folder, its table of configurations, the function that compiles one for sm_90): each op's triton.py.
KERNEL_TABLES = [
    ("verify_attention", "KERNEL_CONFIGS", "compile_for_sm90"),
    ("kv_cache", "KERNEL_CONFIGS", "compile_for_sm90"),
    ("kv_cache", "APPEND_KERNEL_CONFIGS", "compile_append_for_sm90"),
    ("acceptance", "KERNEL_CONFIGS", "compile_for_sm90"),
    ("lm_head", "KERNEL_CONFIGS", "compile_for_sm90"),
]

_COMPILE_ALL = r"""
import json, os, sys
from concurrent.futures import ProcessPoolExecutor
from importlib import import_module
module = import_module(f"fastvlm_kernels.ops.{sys.argv[1]}.triton")
configs, compile_one = getattr(module, sys.argv[2]), getattr(module, sys.argv[3])
with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    print(json.dumps(list(pool.map(compile_one, configs))))
"""


def _ptxas():
    try:
        return _aot.ptxas_path()
    except FileNotFoundError:
        return None


@pytest.mark.compile
@pytest.mark.parametrize("op, table, compile_one", KERNEL_TABLES, ids=[f"{op}-{table}" for op, table, _ in KERNEL_TABLES])
def test_triton_configs_compile_for_sm90_without_spills(op, table, compile_one):
    # The sm_90 tools are part of the CUDA build CI checks (FASTVLM_REQUIRE_CUDA=1): there, missing is a failure.
    skip_unless_runnable("sm90-compile", [_dispatch.triton_import_error()] if _dispatch.triton_import_error() else [])
    skip_unless_runnable("sm90-compile", [] if _ptxas() else ["ptxas (CUDA toolkit) not found"])
    # A fresh interpreter without TRITON_INTERPRET: under the interpreter kernels are not compilable.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_ALL, op, table, compile_one], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports, f"{op}: {table} is empty"
    REPORT.extend(reports)
    over = [r for r in reports if r["spill_stores"] > SPILL_BUDGET_BYTES or r["spill_loads"] > SPILL_BUDGET_BYTES]
    assert not over, f"configurations spill registers: {over}"


_PTXAS_REPORT = """ptxas info    : Compiling entry function '_accept_greedy_kernel' for 'sm_90a'
ptxas info    : Function properties for _accept_greedy_kernel
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers, 392 bytes cmem[0]
"""


def test_ptxas_report_is_read():
    assert _aot.parse_ptxas_report(_PTXAS_REPORT) == {"registers": 38, "spill_stores": 8, "spill_loads": 12}
    with pytest.raises(ValueError, match="no register"):
        _aot.parse_ptxas_report("ptxas fatal   : Unresolved extern function")
