"""kv_compact: every runnable backend against the reference (bit for bit), untouched positions checked
untouched, non-contiguous buffers, bad input, and the Triton kernel compiled for sm_90."""

import pytest
import torch

from fastvlm_kernels.ops import kv_compact
from fastvlm_kernels.ops.kv_cache import BACKENDS
from fastvlm_kernels.ops.kv_cache.spec import INTERPRETER_SHAPES, SUPPORTED_DTYPES, TEST_SHAPES

from ..helpers import backend_skipper, extension_or_skip

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_BITS = {2: torch.int16, 4: torch.int32}


def _shape_id(shape):
    num_layers, batch, heads, cache_len, head_dim = shape[:5]
    return f"L{num_layers}-B{batch}-H{heads}-Lmax{cache_len}-D{head_dim}"


def _probe(device, dtype):
    """What the backends' reasons look at: the buffer's (or cache's) device and dtype."""
    return (torch.empty(1, device=device, dtype=dtype),)


backend_or_skip = backend_skipper(BACKENDS, _probe)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view, so that NaN poison compares bit for bit."""
    return tensor.view(_BITS[tensor.element_size()])


def _inputs(shape, dtype, device, seed=0, index_dtype=torch.int32):
    num_layers, batch, heads, cache_len, head_dim, starts, accepted = shape
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn(num_layers, 2, batch, heads, cache_len, head_dim, generator=generator).to(dtype)
    return (buffer.to(device), torch.tensor(starts, dtype=index_dtype, device=device),
            torch.tensor(accepted, dtype=index_dtype, device=device).reshape(batch, -1))


def _destinations(shape) -> torch.Tensor:
    """[B, L_max] bool: the positions kv_compact may write."""
    _, batch, _, cache_len, _, starts, accepted = shape
    mask = torch.zeros(batch, cache_len, dtype=torch.bool)
    for b in range(batch):
        for j, node in enumerate(accepted[b]):
            if node >= 0 and node != j:
                mask[b, starts[b] + j] = True
    return mask


def _check_backend(backend, shape, dtype, device, index_dtype=torch.int32):
    backend_or_skip(backend, device, dtype)
    buffer, start, accepted = _inputs(shape, dtype, device, index_dtype=index_dtype)
    # Poison every position that is neither a destination nor a source: it must come back unchanged.
    _, batch, _, cache_len, _, starts, nodes = shape
    keep = _destinations(shape)
    for b in range(batch):
        for node in nodes[b]:
            if node >= 0:
                keep[b, starts[b] + node] = True
    untouched = ~keep.to(device)                                              # [B, L_max]
    poisoned = buffer.clone()
    poisoned.masked_fill_(untouched[None, None, :, None, :, None], float("nan"))
    expected = poisoned.clone()
    kv_compact(expected, start, accepted, backend="torch")
    result = poisoned.clone()
    returned = kv_compact(result, start, accepted, backend=backend)
    assert returned is result
    assert torch.equal(_bits(result), _bits(expected))
    # Untouched positions: still the poison, bit for bit; destinations: not NaN (real data moved there).
    region = untouched[None, None, :, None, :, None].expand_as(result)
    assert torch.equal(_bits(result)[region], _bits(poisoned)[region])
    moved = _destinations(shape).to(device)[None, None, :, None, :, None].expand_as(result)
    assert not result[moved].isnan().any()


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_backends_match_reference(backend, shape, dtype):
    _check_backend(backend, shape, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=_shape_id)
def test_triton_interpreter_matches_reference(shape, dtype):
    if torch.cuda.is_available():
        pytest.skip("the interpreter tier runs without a GPU")
    _check_backend("triton", shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(backend, shape, dtype):
    _check_backend(backend, shape, dtype, "cuda")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_index_dtypes(index_dtype):
    _check_backend("cpu", TEST_SHAPES[3], torch.float32, "cpu", index_dtype=index_dtype)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_non_contiguous_buffer(backend):
    """A view with a padded head dim and an offset window of positions; the bytes around it stay put."""
    shape = TEST_SHAPES[2]
    num_layers, batch, heads, cache_len, head_dim, starts, nodes = shape
    generator = torch.Generator().manual_seed(3)
    big = torch.randn(num_layers, 2, batch, heads + 1, cache_len + 7, head_dim, generator=generator)
    view = big[:, :, :, 1:, 4:4 + cache_len]
    backend_or_skip(backend, "cpu", view.dtype)
    start = torch.tensor(starts)
    accepted = torch.tensor(nodes)
    expected = view.clone()
    kv_compact(expected, start, accepted, backend="torch")
    before = big.clone()
    kv_compact(view, start, accepted, backend=backend)
    assert torch.equal(view, expected)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, :, :, 1:, 4:4 + cache_len] = False
    assert torch.equal(big[outside], before[outside])


def test_chain_accepts_move_nothing():
    buffer, start, accepted = _inputs((2, 2, 2, 16, 64, (3, 0), ((0, 1, 2), (0, 1, -1))), torch.float16, "cpu")
    before = buffer.clone()
    kv_compact(buffer, start, accepted)
    assert torch.equal(buffer, before)


# ---- bad input -------------------------------------------------------------------------------------------

def _good():
    return _inputs(TEST_SHAPES[1], torch.float32, "cpu")


@pytest.mark.parametrize("mutate, error, match", [
    (lambda b, s, a: (b[0], s, a), ValueError, "buffer must have 6 dimensions"),
    (lambda b, s, a: (b.expand(-1, 2, -1, -1, -1, -1)[:, :1], s, a), ValueError, r"buffer.shape\[1\] must be 2"),
    (lambda b, s, a: (b.to(torch.float64), s, a), TypeError, "buffer must have dtype"),
    (lambda b, s, a: (b.transpose(4, 5), s, a), ValueError, "contiguous last dimension"),
    (lambda b, s, a: (b, s.float(), a), TypeError, "start must have dtype"),
    (lambda b, s, a: (b, s[:1], a), ValueError, r"start.shape\[0\] must be 2"),
    (lambda b, s, a: (b, s, a[0]), ValueError, "accepted must have 2 dimensions"),
    (lambda b, s, a: (b, s, a[:1]), ValueError, r"accepted.shape\[0\] must be 2"),
    (lambda b, s, a: (b, s.to("meta"), a), ValueError, "start is on meta"),
    (lambda b, s, a: (b, s, "nodes"), TypeError, "accepted must be a torch.Tensor"),
    (lambda b, s, a: (b, torch.tensor([-1, 0], dtype=torch.int32), a), ValueError, "start must be >= 0"),
    (lambda b, s, a: (b, s, torch.tensor([[0, 2, 1, 3], [1, 2, 3, -1]])), ValueError, "not strictly increasing"),
    (lambda b, s, a: (b, s, torch.tensor([[0, 1, 1, 3], [1, 2, 3, -1]])), ValueError, "not strictly increasing"),
    (lambda b, s, a: (b, s, torch.tensor([[0, -1, 2, 3], [1, 2, 3, -1]])), ValueError, "after -1 padding"),
    (lambda b, s, a: (b, s, torch.tensor([[0, 1, 2, 3], [1, 2, -3, -1]])), ValueError, "below -1"),
    (lambda b, s, a: (b, s, torch.tensor([[0, 1, 2, 35], [1, 2, 3, -1]])), ValueError, "points past the cache"),
], ids=["ndim", "not-kv", "dtype", "last-dim", "start-dtype", "start-batch", "accepted-ndim", "accepted-batch",
        "device", "not-tensor", "negative-start", "not-increasing", "repeated", "padding-first", "below-minus-one",
        "out-of-range"])
def test_bad_input(mutate, error, match):
    buffer, start, accepted = _good()
    before = buffer.clone()
    args = mutate(buffer, start, accepted)
    with pytest.raises(error, match=match):
        kv_compact(*args)
    assert torch.equal(buffer, before)


def test_backend_errors():
    buffer, start, accepted = _good()
    with pytest.raises(ValueError, match="not a backend of kv_compact"):
        kv_compact(buffer, start, accepted, backend="metal")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run kv_compact here"):
            kv_compact(buffer, start, accepted, backend="cuda")


# ---- kv_append ---------------------------------------------------------------------------------------------

from fastvlm_kernels.ops.kv_cache import APPEND_BACKENDS, kv_append  # noqa: E402

append_backend_or_skip = backend_skipper(APPEND_BACKENDS, _probe)

# (B, Hkv, L_max, D, T, lengths): ragged rows, a row that ends exactly at L_max, T = 1 (a draft step), a
# prefill-sized T, D whose rows are not a multiple of 16 bytes.
APPEND_SHAPES = [
    (1, 1, 8, 64, 1, (0,)),
    (2, 3, 40, 64, 4, (0, 36)),
    (3, 4, 70, 128, 1, (69, 5, 33)),
    (2, 2, 300, 80, 257, (0, 40)),
    (4, 2, 30, 5, 3, (1, 2, 3, 27)),
    (2, 7, 50, 96, 17, (10, 0)),
]
APPEND_INTERPRETER_SHAPES = [APPEND_SHAPES[i] for i in (0, 1, 2, 4)]


def _append_id(shape):
    return f"B{shape[0]}-H{shape[1]}-Lmax{shape[2]}-D{shape[3]}-T{shape[4]}"


def _check_append(backend, shape, dtype, device, transposed=False):
    batch, heads, cache_len, head_dim, num_new, lens = shape
    append_backend_or_skip(backend, device, dtype)
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(batch, num_new, heads, head_dim, generator=generator).to(device, dtype)
    keys = keys.transpose(1, 2) if transposed else keys.transpose(1, 2).contiguous()       # [B, Hkv, T, D]
    values = torch.randn(batch, heads, num_new, head_dim, generator=generator).to(device, dtype)
    lengths = torch.tensor(lens, dtype=torch.int32, device=device)
    k_cache = torch.full((batch, heads, cache_len, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    kv_append(k_cache, v_cache, lengths, keys, values, backend=backend)
    written = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
    for b, length in enumerate(lens):
        assert torch.equal(_bits(k_cache[b, :, length:length + num_new]), _bits(keys[b]))
        assert torch.equal(_bits(v_cache[b, :, length:length + num_new]), _bits(values[b]))
        written[b, length:length + num_new] = True
    region = (~written)[:, None, :, None].expand_as(k_cache)
    assert k_cache[region].isnan().all() and v_cache[region].isnan().all()   # the rest: untouched poison


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", APPEND_SHAPES, ids=_append_id)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_append_cpu_backends(backend, shape, dtype):
    _check_append(backend, shape, dtype, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_append_transposed_keys(backend):
    _check_append(backend, APPEND_SHAPES[5], torch.float32, "cpu", transposed=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", APPEND_INTERPRETER_SHAPES, ids=_append_id)
def test_append_triton_interpreter(shape, dtype):
    if torch.cuda.is_available():
        pytest.skip("the interpreter tier runs without a GPU")
    _check_append("triton", shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", APPEND_SHAPES, ids=_append_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_append_gpu_backends(backend, shape, dtype):
    _check_append(backend, shape, dtype, "cuda")
    _check_append(backend, shape, dtype, "cuda", transposed=True)


def _append_good():
    cache = torch.zeros(2, 2, 10, 4)
    generator = torch.Generator().manual_seed(5)
    return (cache, cache.clone(), torch.tensor([0, 3], dtype=torch.int32),
            torch.randn(2, 2, 3, 4, generator=generator), torch.randn(2, 2, 3, 4, generator=generator))


@pytest.mark.parametrize("mutate, error, match", [
    (lambda k, v, n, a, b: (k[0], v, n, a, b), ValueError, "k_cache must have 4 dimensions"),
    (lambda k, v, n, a, b: (k, v[:, :, :5], n, a, b), ValueError, "v_cache must have the shape of k_cache"),
    (lambda k, v, n, a, b: (k, v, n, a.half(), b), TypeError, "keys must have the dtype of k_cache"),
    (lambda k, v, n, a, b: (k, v, n, a[:1], b), ValueError, r"keys must have shape \[B=2"),
    (lambda k, v, n, a, b: (k, v, n, a, b[:, :, :2]), ValueError, "values must have the shape of keys"),
    (lambda k, v, n, a, b: (k, v, n, a.to("meta"), b), ValueError, "keys is on meta"),
    (lambda k, v, n, a, b: (k, v, n.float(), a, b), TypeError, "lengths must have dtype"),
    (lambda k, v, n, a, b: (k, v, n[:1], a, b), ValueError, r"lengths.shape\[0\] must be 2"),
    (lambda k, v, n, a, b: (k, v, torch.tensor([0, 8], dtype=torch.int32), a, b), ValueError, "the cache is full"),
    (lambda k, v, n, a, b: (k, v, torch.tensor([-1, 0], dtype=torch.int32), a, b), ValueError, "lengths must be >= 0"),
    (lambda k, v, n, a, b: (k, v, n, a.transpose(2, 3).contiguous().transpose(2, 3), b), ValueError,
     "keys must have a contiguous last dimension"),
], ids=["ndim", "v-shape", "dtype", "batch", "values-shape", "device", "lengths-dtype", "lengths-batch", "full",
        "negative", "last-dim"])
def test_append_bad_input(mutate, error, match):
    k_cache, v_cache, lengths, keys, values = _append_good()
    args = mutate(k_cache, v_cache, lengths, keys, values)
    with pytest.raises(error, match=match):
        kv_append(*args)
    assert not k_cache.any() and not v_cache.any()


# ---- torch.library registration: schemas, mutation annotations and fake implementations --------------------

@pytest.mark.parametrize("op_name", ["kv_compact", "kv_compact_triton", "kv_append", "kv_append_triton"])
def test_opcheck(op_name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if op_name.endswith("triton"):
        backend_or_skip("triton", device)
        import fastvlm_kernels.ops.kv_cache.triton  # noqa: F401  (registers the custom ops)
    else:
        extension_or_skip(device)
    if op_name.startswith("kv_compact"):
        buffer, start, accepted = _inputs(TEST_SHAPES[1], torch.float32, device)
        args = (buffer, start, accepted)
    else:
        k_cache, v_cache, lengths, keys, values = (t.to(device) for t in _append_good())
        args = (k_cache, v_cache, lengths, keys, values)
    torch.library.opcheck(getattr(torch.ops.fastvlm, op_name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
