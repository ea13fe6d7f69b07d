"""skinny_linear: the CPU kernel against the reference for every row count it takes, odd shapes, with and
without bias, poisoned outputs; its AVX2 and scalar paths in subprocesses; the public function's backend
choice and bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastvlm_kernels.ops import skinny_linear, skinny_linear_plan
from fastvlm_kernels.ops.linear import BACKENDS, MAX_ROWS, cpu_isa

from ..helpers import backend_skipper, extension_or_skip, poisoned_like, seed_from

backend_or_skip = backend_skipper(BACKENDS, lambda device, dtype: (torch.empty(1, device=device, dtype=dtype),))

SHAPES = [(1, 1), (7, 3), (16, 5), (17, 8), (64, 13), (100, 1), (129, 37), (576, 192), (256, 1024)]   # (I, O)


def _expected(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def _tolerance(in_features: int) -> float:
    return 2e-6 * (in_features ** 0.5) * 4


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", range(1, 17))
def test_cpu_kernel_matches_the_reference(rows, with_bias):
    """Every row count the kernel takes (each its own code), input sizes around the vector width (tails),
    output counts around the row blocks; the raw op writes every element of a NaN-poisoned output."""
    backend_or_skip("cpu", "cpu")
    for in_features, out_features in SHAPES:
        generator = torch.Generator().manual_seed(seed_from(rows, with_bias, in_features, out_features))
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator) if with_bias else None
        out = poisoned_like(torch.empty(rows, out_features))
        torch.ops.fastvlm.skinny_linear(x, weight, bias, out)
        expected = _expected(x, weight, bias)
        assert torch.isfinite(out).all()
        error = float((out.double() - expected).abs().max())
        assert error <= _tolerance(in_features), (rows, in_features, out_features, error)


def test_public_function_flattens_leading_dims_and_falls_back_past_the_row_limit():
    backend_or_skip("cpu", "cpu")
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator)
    assert MAX_ROWS == 14
    for shape in ((2, 3, 24), (1, 14, 24), (1, 15, 24), (3, 7, 24), (24,), (0, 24)):
        x = torch.randn(*shape, generator=generator)
        out = skinny_linear(x, weight, bias)
        assert out.shape == (*shape[:-1], 40)
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, 24, generator=generator)[:, ::2]                    # not contiguous
    torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    plan = skinny_linear_plan(torch.empty(1, 24), weight)
    assert plan.backend.name == "cpu"


def test_other_dtypes_and_backends():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(9, 16, generator=generator).to(torch.bfloat16)
    x = torch.randn(3, 16, generator=generator).to(torch.bfloat16)
    assert skinny_linear_plan(x, weight).backend.name == "torch"                # bf16: the reference
    assert torch.equal(skinny_linear(x, weight), F.linear(x, weight))
    with pytest.raises(ValueError, match="fp32"):
        skinny_linear(x, weight, backend="cpu")
    x32, w32 = x.float(), weight.float()
    assert torch.equal(skinny_linear(x32, w32, backend="torch"), F.linear(x32, w32))
    with pytest.raises(ValueError, match="backend"):
        skinny_linear(x32, w32, backend="cuda")


def test_bad_input_names_the_argument():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    cases = [
        (([1.0, 2.0], weight), TypeError, "x must be a torch.Tensor"),
        ((x.long(), weight), TypeError, "x must have dtype"),
        ((torch.tensor(1.0), weight), ValueError, "x must have at least 1 dimension"),
        ((x, torch.randn(8)), ValueError, "weight must have 2"),
        ((x, torch.randn(4, 9)), ValueError, "weight.shape\\[1\\]"),
        ((x, weight.double()), TypeError, "weight"),
        ((x, weight, torch.randn(5)), ValueError, "bias.shape\\[0\\]"),
        ((x, weight, torch.randn(4, 1)), ValueError, "bias must have 1"),
        ((x, torch.empty(4, 8, device="meta")), ValueError, "weight is on meta"),
    ]
    for args, error, words in cases:
        with pytest.raises(error, match=words):
            skinny_linear(*args)


_SUBPROCESS_CHECK = """
import torch, torch.nn.functional as F
from fastvlm_kernels.ops.linear import cpu_isa
print(cpu_isa())
for rows in range(1, 17):
    for i, o in ((7, 3), (17, 9), (100, 13)):
        g = torch.Generator().manual_seed(rows * 1000 + i)
        x, w, b = torch.randn(rows, i, generator=g), torch.randn(o, i, generator=g), torch.randn(o, generator=g)
        out = torch.full((rows, o), float('nan'))
        torch.ops.fastvlm.skinny_linear(x, w, b, out)
        err = (out.double() - F.linear(x.double(), w.double(), b.double())).abs().max().item()
        assert err < 1e-4, (rows, i, o, err)
print("ok")
"""


@pytest.mark.parametrize("capability, width", [("avx2", 256), ("default", 0)])
def test_narrower_instruction_sets(capability, width):
    """The AVX2 and scalar code, chosen with torch's own ATEN_CPU_CAPABILITY (the kernel never runs wider
    code than torch does)."""
    extension_or_skip("cpu")
    if width == 256 and cpu_isa() < 256:
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split()
    assert lines[-1] == "ok" and int(lines[0]) == width, result.stdout
