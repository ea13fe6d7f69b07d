"""Every Triton kernel configuration compiles ahead of time for sm_90 (no GPU needed), within the
register budget, with its registers and spills reported in the test summary."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from fastvlm_kernels.ops import _dispatch

# Spills a configuration may have (bytes of spill stores): none. A spill in the inner loop of a
# bandwidth-bound kernel costs more than the smaller tile it would take to avoid it.
SPILL_BUDGET_BYTES = 0

REPORT = []  # printed by conftest's pytest_terminal_summary

_COMPILE_ALL = r"""
import json, os
from concurrent.futures import ProcessPoolExecutor
from fastvlm_kernels.ops.verify_attention.triton import KERNEL_CONFIGS, compile_for_sm90
with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    print(json.dumps(list(pool.map(compile_for_sm90, KERNEL_CONFIGS))))
"""


def _ptxas():
    return shutil.which("ptxas") or next((p for p in ("/usr/local/cuda/bin/ptxas",) if os.path.exists(p)), None)


@pytest.mark.compile
def test_triton_configs_compile_for_sm90_without_spills():
    if _dispatch.triton_import_error():
        pytest.skip(_dispatch.triton_import_error())
    if _ptxas() is None:
        pytest.skip("ptxas (CUDA toolkit) not found")
    # A fresh interpreter without TRITON_INTERPRET: under the interpreter kernels are not compilable.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports, "KERNEL_CONFIGS is empty"
    REPORT.extend(reports)
    over = [r for r in reports if r["spill_stores"] > SPILL_BUDGET_BYTES or r["spill_loads"] > SPILL_BUDGET_BYTES]
    assert not over, f"configurations spill registers: {over}"


# ---- acceptance kernels (accept_greedy / accept_sampling, chains and trees) --------------------------

_COMPILE_ACCEPTANCE = r"""
import json
from fastvlm_kernels.ops.acceptance.triton import KERNEL_CONFIGS, compile_for_sm90
print(json.dumps([compile_for_sm90(config) for config in KERNEL_CONFIGS]))
"""


@pytest.mark.compile
def test_acceptance_triton_kernels_compile_for_sm90_without_spills():
    if _dispatch.triton_import_error():
        pytest.skip(_dispatch.triton_import_error())
    if _ptxas() is None:
        pytest.skip("ptxas (CUDA toolkit) not found")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_ACCEPTANCE], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports, "the acceptance KERNEL_CONFIGS is empty"
    REPORT.extend(reports)
    over = [r for r in reports if r["spill_stores"] > SPILL_BUDGET_BYTES or r["spill_loads"] > SPILL_BUDGET_BYTES]
    assert not over, f"configurations spill registers: {over}"
