import os

import pytest
import torch
from hypothesis import settings

# Triton reads TRITON_INTERPRET when a kernel is defined: without a GPU, run its kernels on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis draws its examples from a seed derived from each test (not a fresh one per run), so that a failure
# reruns from its test id like every other test's. `pytest --hypothesis-profile=explore` draws fresh examples.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("reproducible")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter):
    from tests.ops.test_triton_compile import REPORT
    if REPORT:
        terminalreporter.section("Triton kernels compiled for sm_90 (ptxas -v)")
        for report in REPORT:
            terminalreporter.write_line(
                f"{report['name']:70s} {report['registers']:4d} registers, "
                f"spill stores {report['spill_stores']} B, spill loads {report['spill_loads']} B")
