import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastvlm_kernels.ops import _dispatch, _library
from fastvlm_kernels.ops.verify_attention import BACKENDS, verify_attention, verify_attention_reference
from fastvlm_kernels.ops.verify_attention.reference import visibility_mask
from fastvlm_kernels.ops.verify_attention.spec import HEAD_DIMS, INTERPRETER_SHAPES, LSE_RTOL, TEST_SHAPES, TOLERANCES

from ..helpers import (REQUIRE_CUDA, REQUIRE_EXTENSION, backend_skipper, extension_or_skip, make_inputs,
                       poisoned_like, seed_from)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def shape_id(shape):
    batch, num_q_heads, num_kv_heads, num_new, head_dim, prefix_lens, tree = shape
    return f"B{batch}-Hq{num_q_heads}-Hkv{num_kv_heads}-T{num_new}-D{head_dim}-P{'_'.join(map(str, prefix_lens))}-{tree}"


def _probe(device, dtype):
    """What the backends' reasons look at: q's device and dtype (a q of head dim 64)."""
    return (torch.empty(1, 1, 1, 64, device=device, dtype=dtype),)


backend_or_skip = backend_skipper(BACKENDS, _probe)


def case_inputs(shape, dtype, salt: int, transposed_q: bool):
    """A test case's inputs, seeded from its shape (the same in every process: see seed_from)."""
    return make_inputs(*shape, dtype=dtype, seed=seed_from(shape, salt), transposed_q=transposed_q)


def sdpa_error(q, k_cache, v_cache, prefix_lens, tree_mask, expected):
    """Max abs error of PyTorch SDPA with an explicit boolean mask (in q's dtype) against fp64."""
    visible = visibility_mask(prefix_lens, tree_mask, q.shape[2], k_cache.shape[2])
    worst = 0.0
    for row in range(q.shape[0]):
        got = F.scaled_dot_product_attention(q[row:row + 1], k_cache[row:row + 1], v_cache[row:row + 1],
                                             attn_mask=visible[row:row + 1, None], enable_gqa=True)
        worst = max(worst, (got.double() - expected[row:row + 1]).abs().max().item())
    return worst


def check_against_reference(backend: str, inputs, dtype):
    q, k_cache, v_cache, prefix_lens, tree_mask = inputs
    expected, expected_lse = verify_attention_reference(q.double(), k_cache.double(), v_cache.double(),
                                                        prefix_lens, tree_mask)
    out = poisoned_like(q)
    out_lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, out=out, out_lse=out_lse, backend=backend)
    assert not out.isnan().any(), "unwritten (or NaN) output elements"
    assert not out_lse.isnan().any(), "unwritten (or NaN) log-sum-exp elements"
    factor, floor = TOLERANCES[backend][dtype]
    bound = factor * sdpa_error(q, k_cache, v_cache, prefix_lens, tree_mask, expected) + floor
    error = (out.double() - expected).abs().max().item()
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g} (3 x SDPA's error + floor)"
    lse_error = ((out_lse.double() - expected_lse.double()).abs() / expected_lse.double().abs().clamp_min(1)).max()
    assert lse_error.item() <= LSE_RTOL, f"log-sum-exp relative error {lse_error.item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_backends_match_reference(backend, shape, dtype):
    backend_or_skip(backend, "cpu", dtype)
    inputs = case_inputs(shape, dtype, salt=0, transposed_q=shape[3] % 2 == 1)
    check_against_reference(backend, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=shape_id)
def test_cpu_entry_of_the_public_function_matches_reference(shape, dtype, monkeypatch):
    """A plain call on CPU tensors (auto, no out) runs whole in C++ (verify_attention_checked): it must really
    be the path taken, give what the reference gives, and be bit-identical to the CPU backend's call with a
    poisoned out (the same kernel), with int64 lengths, a transposed q and a given scale too."""
    backend_or_skip("cpu", "cpu", dtype)
    module = importlib.import_module("fastvlm_kernels.ops.verify_attention")  # the package attribute is the function
    assert module._CPU_ENTRY is not None, "the extension is loaded but its CPU entry is missing"
    calls = []
    entry = module._CPU_ENTRY
    monkeypatch.setattr(module, "_CPU_ENTRY", lambda *args: calls.append(args) or entry(*args))
    q, k_cache, v_cache, prefix_lens, tree_mask = case_inputs(shape, dtype, salt=1, transposed_q=shape[3] % 2 == 0)
    expected, _ = verify_attention_reference(q.double(), k_cache.double(), v_cache.double(), prefix_lens, tree_mask)
    out = verify_attention(q, k_cache, v_cache, prefix_lens.long(), tree_mask)
    assert len(calls) == 1
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    factor, floor = TOLERANCES["cpu"][dtype]
    bound = factor * sdpa_error(q, k_cache, v_cache, prefix_lens, tree_mask, expected) + floor
    error = (out.double() - expected).abs().max().item()
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g} (3 x SDPA's error + floor)"
    for scale in (None, 0.37):
        got = verify_attention(q, k_cache, v_cache, prefix_lens.long(), tree_mask, sm_scale=scale)
        backend = verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale=scale, backend="cpu",
                                   out=poisoned_like(q))
        assert torch.equal(got, backend), f"sm_scale={scale}: the C++ entry differs from the CPU backend"
    assert len(calls) == 3


def test_cpu_entry_refuses_what_it_does_not_take():
    """Every argument the C++ entry does not take is refused before anything runs (NotImplementedError, which
    hands the call to the Python checks): bad values included, whatever validate says about the kernel."""
    module = importlib.import_module("fastvlm_kernels.ops.verify_attention")  # the package attribute is the function
    extension_or_skip()
    assert module._CPU_ENTRY is not None, "the extension is loaded but its CPU entry is missing"
    q, k_cache, v_cache, prefix_lens, tree_mask = _good()
    entry = module._CPU_ENTRY
    refused = [
        (q[0], k_cache, v_cache, prefix_lens, tree_mask), (q.double(), k_cache, v_cache, prefix_lens, tree_mask),
        (q, k_cache.half(), v_cache, prefix_lens, tree_mask), (q, k_cache[:, :, :, ::2], v_cache, prefix_lens, tree_mask),
        (q, k_cache[:, :1], v_cache[:, :1], prefix_lens, tree_mask),                      # Hq=4 over Hkv=1 is fine...
        (q[:, :3], k_cache, v_cache, prefix_lens, tree_mask),                              # ...3 over 2 is not
        (q, k_cache, v_cache, prefix_lens.float(), tree_mask), (q, k_cache, v_cache, prefix_lens[:1], tree_mask),
        (q, k_cache, v_cache, torch.tensor([5, 11], dtype=torch.int32), tree_mask),
        (q, k_cache, v_cache, torch.tensor([-1, 0], dtype=torch.int32), tree_mask),
        (q, k_cache, v_cache, torch.tensor([2 ** 32 + 5, 7]), tree_mask),         # int64 past int32: never narrowed
        (q, k_cache, v_cache, prefix_lens, tree_mask.int()), (q, k_cache, v_cache, prefix_lens, tree_mask | 4),
        (q, k_cache, v_cache, prefix_lens, tree_mask & ~2), (q, k_cache.to("meta"), v_cache, prefix_lens, tree_mask),
    ]
    for index, args in enumerate(refused):
        if index == 4:
            assert entry(*args, None, True).shape == q.shape
            continue
        with pytest.raises(NotImplementedError):
            entry(*args, None, True)
    # The head dims it takes are spec.HEAD_DIMS (csrc keeps its own list): each taken, others refused.
    for head_dim in (*HEAD_DIMS, 32, 48, 112):
        q_d, k_d, v_d, lens_d, mask_d = make_inputs(1, 2, 1, 2, head_dim, (4,), "tree", torch.float32)
        if head_dim in HEAD_DIMS:
            assert entry(q_d, k_d, v_d, lens_d, mask_d, None, True).shape == q_d.shape
        else:
            with pytest.raises(NotImplementedError):
                entry(q_d, k_d, v_d, lens_d, mask_d, None, True)
    # validate=False: values are the caller's promise; the kernel clamps lengths and never reads outside.
    out = entry(q, k_cache, v_cache, torch.tensor([5, 11], dtype=torch.int32), tree_mask, None, False)
    assert out.shape == q.shape and not out.isnan().any()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=shape_id)
def test_triton_interpreter_matches_reference(shape, dtype):
    if not _dispatch.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is not set (a GPU is present: the GPU tests cover Triton)")
    backend_or_skip("triton", "cpu", dtype)
    inputs = make_inputs(*shape, dtype=dtype, seed=7, transposed_q=True)
    check_against_reference("triton", inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(backend, shape, dtype):
    backend_or_skip(backend, "cuda", dtype)
    inputs = make_inputs(*shape, dtype=dtype, device="cuda", seed=3, transposed_q=shape[3] % 2 == 0)
    check_against_reference(backend, inputs, dtype)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_out_may_be_a_transposed_view(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    q, k_cache, v_cache, prefix_lens, tree_mask = make_inputs(2, 8, 2, 5, 64, (40, 9), "tree", torch.float32)
    storage = torch.full((2, 5, 8, 64), float("nan"))                      # [B, T, Hq, D], what transformers wants
    verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, out=storage.transpose(1, 2), backend=backend)
    expected, _ = verify_attention_reference(q, k_cache, v_cache, prefix_lens, tree_mask)
    torch.testing.assert_close(storage.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_prefill_chain_equals_sdpa_causal(backend):
    """With no prefix and no mask the op is plain causal attention: what prefill needs."""
    backend_or_skip(backend, "cpu", torch.float32)
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 4, 4, 300, 64, (0,), "chain", torch.float32, spare=0)
    got = verify_attention(q, k_cache, v_cache, prefix_lens, backend=backend)
    expected = F.scaled_dot_product_attention(q, k_cache, v_cache, is_causal=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_empty_batch_returns_empty():
    q = torch.randn(0, 4, 3, 64)
    cache = torch.randn(0, 2, 10, 64)
    out = verify_attention(q, cache, cache, torch.zeros(0, dtype=torch.int32))
    assert out.shape == q.shape


# ---- bad input: a ValueError / TypeError naming the argument -----------------------------------------

def _good():
    return make_inputs(2, 4, 2, 3, 64, (5, 7), "tree", torch.float32)


@pytest.mark.parametrize("mutate, error, name", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    (lambda a: a.update(q=a["q"].double()), TypeError, "q"),
    (lambda a: a.update(q=a["q"].tolist()), TypeError, "q"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :1]), ValueError, "v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :, :32], v_cache=a["v_cache"][:, :, :, :32]), ValueError, "k_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :, ::2]), ValueError, "k_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :1].expand(2, 3, -1, -1),
                        v_cache=a["v_cache"][:, :1].expand(2, 3, -1, -1)), ValueError, "Hq"),
    (lambda a: a.update(prefix_lens=a["prefix_lens"].float()), TypeError, "prefix_lens"),
    (lambda a: a.update(prefix_lens=a["prefix_lens"][:1]), ValueError, "prefix_lens"),
    (lambda a: a.update(prefix_lens=torch.tensor([5, 11], dtype=torch.int32)), ValueError, "prefix_lens"),
    (lambda a: a.update(prefix_lens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, "prefix_lens"),
    (lambda a: a.update(tree_mask=a["tree_mask"].int()), TypeError, "tree_mask"),
    (lambda a: a.update(tree_mask=a["tree_mask"][:, :2]), ValueError, "tree_mask"),
    (lambda a: a.update(tree_mask=a["tree_mask"] | 4), ValueError, "tree_mask"),        # query 0 sees token 2
    (lambda a: a.update(tree_mask=a["tree_mask"] & ~2), ValueError, "tree_mask"),       # query 1 misses itself
    (lambda a: a.update(out=torch.empty(2, 4, 3, 64, dtype=torch.float16)), TypeError, "out"),
    (lambda a: a.update(out=torch.empty(2, 4, 4, 64)), ValueError, "out"),
    (lambda a: a.update(backend="cuda"), ValueError, "cuda"),
    (lambda a: a.update(backend="fast"), ValueError, "backend"),
], ids=["q-rank", "q-dtype", "q-list", "k-dtype", "v-shape", "head-dim-32", "k-strided", "gqa-3-of-4",
        "lens-dtype", "lens-size", "cache-full", "lens-negative", "mask-dtype", "mask-size", "mask-sees-later",
        "mask-misses-self", "out-dtype", "out-shape", "backend-cuda-on-cpu", "backend-unknown"])
def test_bad_input_names_the_argument(mutate, error, name):
    q, k_cache, v_cache, prefix_lens, tree_mask = _good()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, prefix_lens=prefix_lens, tree_mask=tree_mask)
    mutate(args)
    with pytest.raises(error, match=name):
        verify_attention(**args)


def test_tree_longer_than_64_tokens_is_refused():
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 2, 2, 65, 64, (3,), "chain", torch.float32)
    with pytest.raises(ValueError, match="tree_mask"):
        verify_attention(q, k_cache, v_cache, prefix_lens, torch.ones(1, 65, dtype=torch.int64))
    verify_attention(q, k_cache, v_cache, prefix_lens)  # a chain of 65 is fine


def test_device_mismatch_is_refused():
    q, k_cache, v_cache, prefix_lens, tree_mask = _good()
    with pytest.raises(ValueError, match="k_cache"):
        verify_attention(q, k_cache.to("meta"), v_cache, prefix_lens, tree_mask)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_unvalidated_lengths_never_read_outside_the_cache(backend):
    """validate=False with a length past the cache: kernels clamp, results stay finite, nothing crashes."""
    backend_or_skip(backend, "cpu", torch.float32)
    q, k_cache, v_cache, _, tree_mask = _good()
    prefix_lens = torch.tensor([10**6, -50], dtype=torch.int32)
    out = verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, validate=False, backend=backend)
    assert torch.isfinite(out).all()


# ---- build, registration, compile --------------------------------------------------------------------

def test_extension_state_is_reported():
    if REQUIRE_EXTENSION:
        assert _library.EXTENSION.loaded, _library.EXTENSION.error
    if REQUIRE_CUDA:
        assert _library.EXTENSION.build_info.get("with_cuda"), \
            f"the CUDA kernels were not built ({_library.EXTENSION.error or 'built without CUDA'})"
    result = subprocess.run([sys.executable, "-m", "fastvlm_kernels.info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f" {name} " in result.stdout


def test_import_does_not_initialise_cuda():
    code = "import torch, fastvlm_kernels; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_import_without_extension_falls_back(tmp_path):
    """A copy of the package without _C imports, warns once, and still computes with the reference."""
    import shutil
    import fastvlm_kernels
    package = os.path.dirname(fastvlm_kernels.__file__)
    shutil.copytree(package, tmp_path / "fastvlm_kernels", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastvlm_kernels\n"
            "assert sum('not built' in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]\n"
            "q = torch.randn(1, 2, 3, 64); cache = torch.randn(1, 2, 8, 64)\n"
            "out = fastvlm_kernels.verify_attention(q, cache, cache, torch.tensor([5]))\n"
            "assert torch.isfinite(out).all(); print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    q, k_cache, v_cache, prefix_lens, tree_mask = _good()

    def step(q, k_cache, v_cache, prefix_lens, tree_mask):
        out, lse = verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, return_lse=True, backend=backend)
        return out * 2, lse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager" if backend == "torch" else "aot_eager")
    out, lse = compiled(q, k_cache, v_cache, prefix_lens, tree_mask)
    expected, expected_lse = step(q, k_cache, v_cache, prefix_lens, tree_mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
