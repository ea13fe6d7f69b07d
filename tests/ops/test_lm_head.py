"""early_exit_head / verify_head: every runnable backend against the reference (fp64 logits), poisoned
outputs, exact integer outputs, ties, statistical tests of the samplers, bad input."""
import math

import pytest
import torch

from fastvlm_kernels.ops import _dispatch
from fastvlm_kernels.ops.lm_head import (BACKENDS, _prepare, early_exit_head, verify_head,
                                         vocab_subset_from_counts)
from fastvlm_kernels.ops.lm_head.reference import filter_scores, gumbel_noise, lm_head_reference, normed_hidden
from fastvlm_kernels.ops.lm_head.spec import INTERPRETER_SHAPES, LARGE_HEAD, SAFE_GAP, TEST_SHAPES, TOLERANCES

from ..helpers import backend_skipper

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EPS = 1e-6


def shape_id(shape):
    return "M{}-H{}-V{}".format(*shape)


def make_head(num_rows, hidden_size, vocab, dtype, device="cpu", seed=0):
    """Random hidden rows, norm weight around 1 and a head whose logits spread over a few units."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=generator) * 3
    norm_weight = torch.rand(hidden_size, generator=generator) + 0.5
    weight = torch.randn(vocab, hidden_size, generator=generator) * (2.0 / math.sqrt(hidden_size))
    return (hidden.to(device, dtype), norm_weight.to(device, dtype), weight.to(device, dtype))


def fp64_scores(hidden, norm_weight, weight, temperature=1.0, vocab_subset=None, chunk=8192, **kwargs):
    """[M, V] fp64 scores of the same rounded inputs, computed in vocabulary chunks (large heads)."""
    normed = normed_hidden(hidden, norm_weight, EPS, kwargs.get("norm_offset", 0.0), torch.float64)
    if vocab_subset is not None:
        weight = weight[vocab_subset]
    parts = [normed @ weight[start:start + chunk].double().T for start in range(0, weight.shape[0], chunk)]
    logits = torch.cat(parts, dim=1) * kwargs.get("logit_scale", 1.0)
    if kwargs.get("logit_softcap"):
        logits = kwargs["logit_softcap"] * torch.tanh(logits / kwargs["logit_softcap"])
    return logits / temperature


def _probe(device, dtype):
    """What the backends' reasons look at: a prepared argmax call on tensors of this device and dtype."""
    hidden, norm_weight, weight = make_head(1, 16, 32, dtype, device="cpu")
    call = _prepare(hidden.to(device), norm_weight.to(device), weight.to(device), eps=EPS, mode="argmax",
                    temperature=1.0, top_k=None, top_p=None, vocab_subset=None, generator=None, seed=None,
                    norm_offset=0.0, logit_scale=1.0, logit_softcap=None, draft_tokens=None, prob_rows=None,
                    validate=False)
    return (call,)


backend_or_skip = backend_skipper(BACKENDS, _probe)


def run_poisoned(backend_name, hidden, norm_weight, weight, *, mode="argmax", draft_tokens=None, prob_rows=None,
                 seed=None, **kwargs):
    """Runs one backend on outputs pre-filled with NaN / -7 sentinels, so unwritten elements fail."""
    backend = {b.name: b for b in BACKENDS}[backend_name]
    call = _prepare(hidden, norm_weight, weight, eps=EPS, mode=mode, temperature=kwargs.pop("temperature", 1.0),
                    top_k=kwargs.pop("top_k", None), top_p=kwargs.pop("top_p", None),
                    vocab_subset=kwargs.pop("vocab_subset", None), generator=None, seed=seed,
                    norm_offset=kwargs.pop("norm_offset", 0.0), logit_scale=kwargs.pop("logit_scale", 1.0),
                    logit_softcap=kwargs.pop("logit_softcap", None), draft_tokens=draft_tokens, prob_rows=prob_rows,
                    validate=True, verify=draft_tokens is not None)
    assert not kwargs, kwargs
    reasons = backend.not_supported_reasons(call)
    assert not reasons, reasons
    call.tokens.fill_(-7)
    for tensor in (call.max_logit, call.lse, call.logprob, call.draft_logprob, call.probs):
        if tensor is not None:
            tensor.fill_(float("nan"))
    backend.run(call)
    for name in ("max_logit", "lse", "logprob", "draft_logprob", "probs"):
        tensor = getattr(call, name)
        if tensor is not None:
            assert not tensor.isnan().any(), f"{name}: unwritten (or NaN) elements"
    assert (call.tokens != -7).all(), "tokens: unwritten elements"
    return call


def value_bound(dtype, hidden_size, backend):
    atol, floor = TOLERANCES[backend][dtype]
    if backend == "triton" and dtype == torch.float16:
        atol *= 5   # the interpreter's fp16 tl.dot rounds its products
    return atol * math.sqrt(hidden_size) + floor


def assert_tokens_match(got, scores, chosen_value, dtype, what="argmax"):
    """Exact equality on every row where the reference's winner leads the runner-up by more than rounding."""
    top2 = torch.topk(scores, 2, dim=-1).values if scores.shape[-1] > 1 else None
    expected = scores.argmax(dim=-1)
    if top2 is None:
        assert torch.equal(got.cpu(), expected.cpu())
        return
    safe = (top2[:, 0] - top2[:, 1]) > SAFE_GAP[dtype]
    assert safe.float().mean() > 0.5, "test inputs too close to ties to check exactness"
    mismatch = safe.cpu() & (got.cpu() != expected.cpu())
    assert not mismatch.any(), f"{what} differs from the reference on rows {mismatch.nonzero().flatten().tolist()}"


def check_verify(backend, shape, dtype, device):
    num_rows, hidden_size, vocab = shape
    hidden, norm_weight, weight = make_head(num_rows, hidden_size, vocab, dtype, device, seed=sum(shape))
    generator = torch.Generator().manual_seed(1)
    draft = torch.randint(0, vocab, (num_rows,), generator=generator)
    draft[-1] = -1                                                      # the bonus row has no draft
    prob_rows = torch.tensor(sorted({num_rows - 1, 0}), dtype=torch.int64)
    temperature = 0.8
    call = run_poisoned(backend, hidden, norm_weight, weight, draft_tokens=draft.to(device),
                        prob_rows=prob_rows.to(device), temperature=temperature)
    scores = fp64_scores(hidden, norm_weight, weight, temperature)
    lse = torch.logsumexp(scores, dim=-1)
    bound = value_bound(dtype, hidden_size, backend)
    assert_tokens_match(call.tokens, scores, None, dtype)
    torch.testing.assert_close(call.max_logit.cpu().double(), scores.max(-1).values.cpu(), atol=bound, rtol=0)
    torch.testing.assert_close(call.lse.cpu().double(), lse.cpu(), atol=bound, rtol=0)
    expected_draft = scores.gather(1, draft.clamp_min(0)[:, None].to(scores.device))[:, 0] - lse
    expected_draft = torch.where(draft.to(scores.device) >= 0, expected_draft, float("-inf"))
    torch.testing.assert_close(call.draft_logprob.cpu().double(), expected_draft.cpu(), atol=bound, rtol=0)
    expected_probs = torch.softmax(scores[prob_rows.to(scores.device)], dim=-1)
    torch.testing.assert_close(call.probs.cpu().double(), expected_probs.cpu(), atol=bound * 1e-1 + 1e-6, rtol=bound)


def check_sample(backend, shape, dtype, device, subset=False):
    num_rows, hidden_size, vocab = shape
    hidden, norm_weight, weight = make_head(num_rows, hidden_size, vocab, dtype, device, seed=sum(shape) + 5)
    vocab_subset = torch.arange(1, vocab, 3, device=device) if subset else None
    seed = torch.tensor([2024, 7], dtype=torch.int64, device=device)
    call = run_poisoned(backend, hidden, norm_weight, weight, mode="sample", temperature=0.7, seed=seed,
                        vocab_subset=vocab_subset)
    scores = fp64_scores(hidden, norm_weight, weight, 0.7, vocab_subset=vocab_subset)
    cols = vocab_subset if vocab_subset is not None else torch.arange(vocab, device=device)
    perturbed = scores + gumbel_noise(2024, 7, torch.arange(num_rows), cols).to(device)
    top2 = torch.topk(perturbed, 2, dim=-1).values
    safe = (top2[:, 0] - top2[:, 1]) > SAFE_GAP[dtype]
    expected = cols[perturbed.argmax(-1)]
    assert not (safe & (call.tokens != expected)).any(), "sampled ids differ from the reference's"
    lse = torch.logsumexp(scores, -1)
    bound = value_bound(dtype, hidden_size, backend)
    torch.testing.assert_close(call.lse.double(), lse, atol=bound, rtol=0)
    index = torch.searchsorted(cols, call.tokens)
    # logprob = logit - lse: two values, each within the bound (an H100 run missed a single bound by 1.7x)
    torch.testing.assert_close(call.logprob.double(), scores.gather(1, index[:, None])[:, 0] - lse, atol=2 * bound,
                               rtol=0)


# ---- backends against the reference ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_backends_verify_head(backend, shape, dtype):
    if shape[1] * shape[2] > LARGE_HEAD and dtype != torch.bfloat16:
        pytest.skip("large heads run in bf16 only (test time)")
    backend_or_skip(backend, "cpu", dtype)
    check_verify(backend, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [s for s in TEST_SHAPES if s[1] * s[2] < LARGE_HEAD], ids=shape_id)
@pytest.mark.parametrize("subset", [False, True], ids=["full", "subset"])
def test_cpu_kernel_sample(shape, dtype, subset):
    backend_or_skip("cpu", "cpu", dtype)
    check_sample("cpu", shape, dtype, "cpu", subset)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=shape_id)
def test_triton_interpreter(shape, dtype):
    if not _dispatch.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is not set (a GPU is present: the GPU tests cover Triton)")
    backend_or_skip("triton", "cpu", dtype)
    check_verify("triton", shape, dtype, "cpu")
    check_sample("triton", shape, dtype, "cpu", subset=shape[0] == 17)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends(backend, shape, dtype):
    backend_or_skip(backend, "cuda", dtype)
    check_verify(backend, shape, dtype, "cuda")
    check_sample(backend, shape, dtype, "cuda", subset=shape[0] == 17)


def check_topk(backend, dtype, device):
    hidden, norm_weight, weight = make_head(17, 59, 507, dtype, device)
    call = run_poisoned(backend, hidden, norm_weight, weight, mode="topk", top_k=8, temperature=1.3)
    scores = fp64_scores(hidden, norm_weight, weight, 1.3)
    values, indices = torch.topk(scores, 9, dim=-1)
    gaps = (values[:, :-1] - values[:, 1:]).min(dim=-1).values
    safe = gaps > SAFE_GAP[dtype]
    assert safe.any()
    assert torch.equal(call.tokens[safe], indices[safe, :8])
    bound = value_bound(dtype, 59, backend)
    torch.testing.assert_close(call.logprob.double(), values[:, :8] - torch.logsumexp(scores, -1, keepdim=True),
                               atol=bound, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_topk_mode(backend, dtype):
    backend_or_skip(backend, "cpu", dtype)
    check_topk(backend, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_topk_mode_triton_gpu(dtype):
    backend_or_skip("triton", "cuda", dtype)
    check_topk("triton", dtype, "cuda")


@pytest.mark.parametrize("top_k, top_p", [(5, None), (40, 0.8), (507, 0.5)], ids=["k5", "k40-p0.8", "kall-p0.5"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sample_with_top_k_top_p_matches_reference(backend, top_k, top_p):
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(65, 64, 507, torch.float32, seed=3)
    seed = torch.tensor([99, 1])
    call = run_poisoned(backend, hidden, norm_weight, weight, mode="sample", top_k=top_k, top_p=top_p, seed=seed,
                        temperature=0.9)
    expected = lm_head_reference(hidden, norm_weight, weight, eps=EPS, mode="sample", temperature=0.9, top_k=top_k,
                                 top_p=top_p, seed=99, offset=1, compute_dtype=torch.float64)
    assert (call.tokens == expected["tokens"]).float().mean() > 0.95
    filtered = filter_scores(fp64_scores(hidden, norm_weight, weight, 0.9), top_k, top_p)
    allowed = torch.isfinite(filtered.gather(1, call.tokens[:, None]))
    assert allowed.all(), "a filtered-out token was sampled"
    torch.testing.assert_close(call.lse.double(), torch.logsumexp(filtered, -1), atol=1e-4, rtol=0)


# ---- ties: the lowest index wins in every backend -------------------------------------------------

def tied_head(dtype, device, vocab=1000, hidden_size=64):
    """A head where rows 5, 70, 600 and V-1 are one vector that beats every other row for all 3 rows."""
    hidden, norm_weight, weight = make_head(3, hidden_size, vocab, torch.float32, seed=11)
    normed = normed_hidden(hidden.to(dtype), norm_weight.to(dtype), EPS, 0.0)
    winner = normed.sum(0) / normed.sum(0).norm() * 0.5
    weight = weight * 0.01
    for index in (5, 70, 600, vocab - 1):
        weight[index] = winner
    return hidden.to(device, dtype), norm_weight.to(device, dtype), weight.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_ties_break_to_the_lowest_index(backend, dtype):
    backend_or_skip(backend, "cpu", dtype)
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the interpreter case runs once, in fp32")
    hidden, norm_weight, weight = tied_head(dtype, "cpu")
    draft = torch.tensor([70, 5, 600])
    call = run_poisoned(backend, hidden, norm_weight, weight, draft_tokens=draft)
    assert call.tokens.tolist() == [5, 5, 5]
    assert torch.equal(call.draft_logprob, call.logprob)      # the tied draft scores are bit-identical
    torch.testing.assert_close(call.draft_logprob, call.max_logit - call.lse)
    top = run_poisoned(backend, hidden, norm_weight, weight, mode="topk", top_k=4)
    assert top.tokens.tolist() == [[5, 70, 600, 999]] * 3


def test_cpu_chunked_gemm_path():
    """fp32 argmax / verify with many rows runs as GEMMs over vocabulary chunks: checked against fp64 across
    three chunks with an odd tail, with ties that straddle a chunk boundary, and with the scale / soft-cap /
    Gemma options."""
    from fastvlm_kernels.ops import lm_head as lm_head_ops

    backend_or_skip("cpu", "cpu", torch.float32)
    num_rows, vocab = lm_head_ops.CPU_GEMM_MIN_ROWS + 1, 2 * lm_head_ops._GEMM_CHUNK + 809
    check_verify("cpu", (num_rows, 64, vocab), torch.float32, "cpu")
    hidden, norm_weight, weight = make_head(num_rows, 64, vocab, torch.float32, seed=4)
    call = _prepare(hidden, norm_weight, weight, eps=EPS, mode="argmax", temperature=1.0, top_k=None, top_p=None,
                    vocab_subset=None, generator=None, seed=None, norm_offset=0.0, logit_scale=1.0,
                    logit_softcap=None, draft_tokens=None, prob_rows=None, validate=True, verify=False)
    assert lm_head_ops._uses_chunked_gemm(call)
    # Ties across chunks: every row's best token is one vector placed at ids 9, 4096 + 3 and the last id.
    normed = normed_hidden(hidden, norm_weight, EPS, 0.0)
    winner = torch.linalg.lstsq(normed.double(), torch.ones(num_rows, 1, dtype=torch.float64)).solution[:, 0]
    tied = weight * 0.01                                         # normed @ winner = 1 on every row
    for index in (9, lm_head_ops._GEMM_CHUNK + 3, vocab - 1):
        tied[index] = (winner * 4).float()
    ties = run_poisoned("cpu", hidden, norm_weight, tied)
    expected = run_poisoned("torch", hidden, norm_weight, tied)
    assert torch.equal(ties.tokens, expected.tokens) and ties.tokens.eq(9).all()
    options = dict(norm_offset=1.0, logit_scale=0.7, logit_softcap=3.0, temperature=0.9)
    call = run_poisoned("cpu", hidden, norm_weight, weight, draft_tokens=torch.arange(num_rows) * 97 - 1, **options)
    scores = fp64_scores(hidden, norm_weight, weight, **options)
    assert_tokens_match(call.tokens, scores, None, torch.float32)
    torch.testing.assert_close(call.lse.double(), torch.logsumexp(scores, -1), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ties_break_to_the_lowest_index_gpu(backend, dtype):
    backend_or_skip(backend, "cuda", dtype)
    hidden, norm_weight, weight = tied_head(dtype, "cuda", vocab=151936, hidden_size=128)
    call = run_poisoned(backend, hidden, norm_weight, weight, draft_tokens=torch.tensor([70, 5, 600], device="cuda"))
    assert call.tokens.tolist() == [5, 5, 5]
    if backend == "triton":
        top = run_poisoned(backend, hidden, norm_weight, weight, mode="topk", top_k=4)
        assert top.tokens.tolist() == [[5, 70, 600, 151935]] * 3


# ---- samplers, statistically ------------------------------------------------------------------------

def chi_square_rejects(samples: torch.Tensor, probs: torch.Tensor, z: float = 3.719) -> bool:
    """Pearson's chi-square test at p ~ 1e-4 (Wilson-Hilferty critical value): True if samples do not
    follow probs. Bins with small expected counts are pooled into one."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = ((counts - expected) ** 2 / expected.clamp_min(1e-12)).sum().item()
    dof = counts.numel() - 1
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return statistic > critical


def draw_many(backend, hidden, norm_weight, weight, draws, temperature, **kwargs):
    """Draws with one hidden row repeated over M rows and fresh (seed, offset) per call."""
    rows = hidden.expand(64, -1).contiguous()
    samples = []
    for step in range(draws // 64):
        out = early_exit_head(rows, norm_weight, weight, eps=EPS, mode="sample", temperature=temperature,
                              seed=torch.tensor([12345, step]), backend=backend, **kwargs)
        samples.append(out.tokens)
    return torch.cat(samples)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sampler_matches_softmax_and_a_biased_sampler_is_caught(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(1, 32, 24, torch.float32, seed=5)
    temperature = 0.8
    probs = torch.softmax(fp64_scores(hidden, norm_weight, weight, temperature)[0], -1)
    samples = draw_many(backend, hidden, norm_weight, weight, 64 * 160, temperature)
    assert not chi_square_rejects(samples, probs)
    # The same test must fail a sampler that is slightly off (temperature 10% low).
    biased = draw_many(backend, hidden, norm_weight, weight, 64 * 160, temperature * 0.9)
    assert chi_square_rejects(biased, probs)


def test_sampler_with_top_k_top_p_matches_the_filtered_softmax():
    backend = "cpu"
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(1, 32, 40, torch.float32, seed=8)
    filtered = filter_scores(fp64_scores(hidden, norm_weight, weight, 1.0), 12, 0.9)
    probs = torch.softmax(filtered[0], -1)
    samples = draw_many(backend, hidden, norm_weight, weight, 64 * 120, 1.0, top_k=12, top_p=0.9)
    assert probs[samples].min() > 0, "a filtered-out token was sampled"
    assert not chi_square_rejects(samples, probs)


def test_gumbel_noise_is_standard_gumbel():
    noise = gumbel_noise(3, 0, torch.arange(4), torch.arange(50_000)).flatten()
    assert abs(noise.mean().item() - 0.5772156649) < 0.02
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.05


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_seed_reproducible_and_generator(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(33, 48, 300, torch.float32)
    run = lambda **kw: early_exit_head(hidden, norm_weight, weight, eps=EPS, mode="sample", backend=backend, **kw)  # noqa: E731
    assert torch.equal(run(seed=7).tokens, run(seed=7).tokens)
    assert not torch.equal(run(seed=torch.tensor([7, 0])).tokens, run(seed=torch.tensor([7, 1])).tokens)
    first = run(generator=torch.Generator().manual_seed(4)).tokens
    assert torch.equal(first, run(generator=torch.Generator().manual_seed(4)).tokens)


# ---- vocab_subset -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_vocab_subset_argmax(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(17, 59, 507, torch.float32)
    subset = torch.tensor([0, 3, 4, 100, 101, 250, 506])
    call = run_poisoned(backend, hidden, norm_weight, weight, vocab_subset=subset)
    scores = fp64_scores(hidden, norm_weight, weight, vocab_subset=subset)
    assert torch.equal(call.tokens, subset[scores.argmax(-1)])
    torch.testing.assert_close(call.lse.double(), torch.logsumexp(scores, -1), atol=1e-4, rtol=0)


def test_vocab_subset_from_counts():
    corpus = torch.tensor([[5, 5, 5, 2, 2, 9], [9, 9, 1, 7, 7, 7]])
    subset = vocab_subset_from_counts(corpus, vocab_size=12, size=3, always_include=torch.tensor([11]))
    assert subset.tolist() == [5, 7, 9, 11]          # counts 3, 3, 3; ties to the lower id; then EOS
    assert vocab_subset_from_counts(corpus, 12, 4).tolist() == [2, 5, 7, 9]
    with pytest.raises(ValueError, match="token_ids"):
        vocab_subset_from_counts(torch.tensor([12]), 12, 3)
    with pytest.raises(ValueError, match="size"):
        vocab_subset_from_counts(corpus, 12, 0)


# ---- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gemma_norm_scale_and_softcap(backend):
    backend_or_skip(backend, "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(5, 64, 300, torch.float32, seed=2)
    options = dict(norm_offset=1.0, logit_scale=0.7, logit_softcap=3.0)
    call = run_poisoned(backend, hidden, norm_weight, weight, draft_tokens=torch.tensor([1, 2, 3, 4, -1]), **options)
    scores = fp64_scores(hidden, norm_weight, weight, **options)
    assert_tokens_match(call.tokens, scores, None, torch.float32)
    torch.testing.assert_close(call.lse.double(), torch.logsumexp(scores, -1), atol=1e-4, rtol=0)


def test_empty_rows():
    hidden, norm_weight, weight = make_head(1, 16, 32, torch.float32)
    out = early_exit_head(hidden[:0], norm_weight, weight, eps=EPS)
    assert out.tokens.shape == (0,) and out.lse.shape == (0,)


# ---- bad input: an error naming the argument --------------------------------------------------------

def _good():
    hidden, norm_weight, weight = make_head(3, 16, 40, torch.float32)
    return dict(hidden=hidden, norm_weight=norm_weight, lm_head_weight=weight, eps=EPS)


@pytest.mark.parametrize("mutate, error, name", [
    (lambda a: a.update(hidden=a["hidden"][0]), ValueError, "hidden"),
    (lambda a: a.update(hidden=a["hidden"].double()), TypeError, "hidden"),
    (lambda a: a.update(hidden=a["hidden"].tolist()), TypeError, "hidden"),
    (lambda a: a.update(norm_weight=a["norm_weight"].half()), TypeError, "norm_weight"),
    (lambda a: a.update(norm_weight=a["norm_weight"][:5]), ValueError, "norm_weight"),
    (lambda a: a.update(lm_head_weight=a["lm_head_weight"][:, :8]), ValueError, "lm_head_weight"),
    (lambda a: a.update(lm_head_weight=a["lm_head_weight"].bfloat16()), TypeError, "lm_head_weight"),
    (lambda a: a.update(lm_head_weight=a["lm_head_weight"].to("meta")), ValueError, "lm_head_weight"),
    (lambda a: a.update(lm_head_weight=torch.randn(16, 40).T), ValueError, "lm_head_weight"),
    (lambda a: a.update(mode="greedy"), ValueError, "mode"),
    (lambda a: a.update(mode="sample", temperature=0.0), ValueError, "temperature"),
    (lambda a: a.update(mode="sample", temperature=-1.0), ValueError, "temperature"),
    (lambda a: a.update(mode="sample", top_p=0.0), ValueError, "top_p"),
    (lambda a: a.update(mode="sample", top_p=1.5), ValueError, "top_p"),
    (lambda a: a.update(mode="sample", top_k=0), ValueError, "top_k"),
    (lambda a: a.update(mode="topk"), ValueError, "top_k"),
    (lambda a: a.update(mode="topk", top_k=41), ValueError, "top_k"),
    (lambda a: a.update(vocab_subset=torch.zeros(0, dtype=torch.int64)), ValueError, "vocab_subset"),
    (lambda a: a.update(vocab_subset=torch.tensor([1, 40])), ValueError, "vocab_subset"),
    (lambda a: a.update(vocab_subset=torch.tensor([-1, 3])), ValueError, "vocab_subset"),
    (lambda a: a.update(vocab_subset=torch.tensor([3, 1])), ValueError, "vocab_subset"),
    (lambda a: a.update(vocab_subset=torch.tensor([1, 3], dtype=torch.int32)), TypeError, "vocab_subset"),
    (lambda a: a.update(mode="sample", seed=torch.tensor([1, 2, 3])), ValueError, "seed"),
    (lambda a: a.update(mode="sample", seed=1.5), TypeError, "seed"),
    (lambda a: a.update(seed=3), ValueError, "seed"),
    (lambda a: a.update(eps=-1.0), ValueError, "eps"),
    (lambda a: a.update(logit_softcap=0.0), ValueError, "logit_softcap"),
    (lambda a: a.update(backend="cuda"), ValueError, "cuda"),
    (lambda a: a.update(backend="fast"), ValueError, "backend"),
], ids=["hidden-rank", "hidden-dtype", "hidden-list", "norm-dtype", "norm-size", "head-hidden-size", "head-dtype",
        "head-device", "head-strided", "mode", "temperature-0", "temperature-neg", "top_p-0", "top_p-1.5", "top_k-0",
        "topk-without-k", "topk-too-many", "subset-empty", "subset-out-of-range", "subset-negative",
        "subset-unsorted", "subset-dtype", "seed-shape", "seed-float", "seed-with-argmax", "eps", "softcap",
        "backend-cuda-on-cpu", "backend-unknown"])
def test_early_exit_head_bad_input_names_the_argument(mutate, error, name):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=name):
        early_exit_head(**args)


@pytest.mark.parametrize("mutate, error, name", [
    (lambda a: a.update(draft_tokens=torch.tensor([1, 2])), ValueError, "draft_tokens"),
    (lambda a: a.update(draft_tokens=torch.tensor([1, 2, 40])), ValueError, "draft_tokens"),
    (lambda a: a.update(draft_tokens=torch.tensor([1, 2, -2])), ValueError, "draft_tokens"),
    (lambda a: a.update(draft_tokens=torch.tensor([1.0, 2.0, 3.0])), TypeError, "draft_tokens"),
    (lambda a: a.update(prob_rows=torch.tensor([3])), ValueError, "prob_rows"),
    (lambda a: a.update(prob_rows=torch.tensor([1, 1])), ValueError, "prob_rows"),
    (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
], ids=["draft-size", "draft-range", "draft-negative", "draft-dtype", "prob-rows-range", "prob-rows-repeated",
        "temperature"])
def test_verify_head_bad_input_names_the_argument(mutate, error, name):
    args = _good()
    args["draft_tokens"] = torch.tensor([1, 2, -1])
    mutate(args)
    with pytest.raises(error, match=name):
        verify_head(**args)


def test_cpu_kernel_refuses_top_p_without_top_k_and_auto_falls_back():
    hidden, norm_weight, weight = make_head(2, 16, 40, torch.float32)
    out = early_exit_head(hidden, norm_weight, weight, eps=EPS, mode="sample", top_p=0.9, seed=1)   # auto: torch
    assert out.tokens.shape == (2,)
    backend_or_skip("cpu", "cpu", torch.float32)
    with pytest.raises(ValueError, match="top_p"):
        early_exit_head(hidden, norm_weight, weight, eps=EPS, mode="sample", top_p=0.9, seed=1, backend="cpu")


# ---- registration: schema, fake implementation, torch.compile ---------------------------------------

@pytest.mark.parametrize("mode", ["argmax", "sample", "verify"])
def test_opcheck_cpu_op(mode):
    backend_or_skip("cpu", "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(3, 64, 100, torch.float32)
    call = _prepare(hidden, norm_weight, weight, eps=EPS, mode="sample" if mode == "sample" else "argmax",
                    temperature=0.9, top_k=None, top_p=None, vocab_subset=None, generator=None,
                    seed=3 if mode == "sample" else None, norm_offset=0.0, logit_scale=1.0, logit_softcap=None,
                    draft_tokens=torch.tensor([1, 2, -1]) if mode == "verify" else None,
                    prob_rows=torch.tensor([2]) if mode == "verify" else None, validate=False,
                    verify=mode == "verify")
    torch.library.opcheck(torch.ops.fastvlm.lm_head.default, call.op_args())


def test_compiles_in_one_graph():
    backend_or_skip("cpu", "cpu", torch.float32)
    hidden, norm_weight, weight = make_head(3, 64, 100, torch.float32)
    draft = torch.tensor([1, 2, -1])
    head = lambda h: verify_head(h, norm_weight, weight, draft, eps=EPS, validate=False, backend="cpu")  # noqa: E731
    compiled = torch.compile(head, fullgraph=True)
    expected, got = head(hidden), compiled(hidden)
    assert torch.equal(got.tokens, expected.tokens)
    torch.testing.assert_close(got.draft_logprob, expected.draft_logprob)
