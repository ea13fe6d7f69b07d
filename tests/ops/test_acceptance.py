"""accept_greedy / accept_sampling and their tree versions: every backend against the reference (integer
outputs equal exactly, outputs poisoned with -7 first), chains as trees, the sampled distribution against
the target's (chi-square), a biased sampler caught by the same test, and bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvlm_kernels.ops.acceptance import (BACKENDS, Acceptance, accept_greedy, accept_greedy_reference,
                                            accept_greedy_tree, accept_greedy_tree_reference, accept_sampling,
                                            accept_sampling_reference, accept_sampling_tree,
                                            accept_sampling_tree_reference)
from fastvlm_kernels.ops.acceptance.reference import sample_index
from fastvlm_kernels.ops.acceptance.spec import (INTERPRETER_SAMPLING_SHAPES, INTERPRETER_TREE_SHAPES,
                                                 SAMPLING_SHAPES, TREE_SAMPLING_SHAPES)

from ..helpers import backend_skipper, extension_or_skip

PROB_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POISON = -7


def _probe(device, dtype):
    """What the backends' reasons look at: the draft tokens' device and the probabilities' dtype."""
    return torch.empty(1, 1, dtype=torch.int64, device=device), torch.empty(1, 1, 1, dtype=dtype, device=device)


backend_or_skip = backend_skipper(BACKENDS, _probe)


def poisoned(batch: int, num_nodes: int, device, with_path: bool):
    accept_len = torch.full((batch,), POISON, dtype=torch.int32, device=device)
    emitted = torch.full((batch, num_nodes), POISON, dtype=torch.int64, device=device)
    if not with_path:
        return accept_len, emitted
    return accept_len, torch.full((batch, num_nodes), POISON, dtype=torch.int64, device=device), emitted


def assert_equal_results(got, expected):
    for name, got_tensor, expected_tensor in zip(got._fields, got, expected):
        assert not (got_tensor == POISON).any(), f"{name}: unwritten elements"
        assert torch.equal(got_tensor.cpu(), expected_tensor.cpu()), \
            f"{name} differs:\n got {got_tensor.cpu()}\nwant {expected_tensor.cpu()}"


def random_parents(batch: int, num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """[B, N] random trees in topological order: parents[0] = -1, parents[j] uniform in [0, j)."""
    rows = [[-1] + [int(torch.randint(0, j, (1,), generator=generator)) for j in range(1, num_nodes)]
            for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int64)


def random_probs(shape, generator, sharpness: float) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=generator, dtype=torch.float64) * sharpness, -1)


def sampling_inputs(batch, num_drafted, vocab, dtype, device, seed, parents=None):
    """Draft and target probabilities that agree in part (so both acceptances and rejections happen), draft
    tokens drawn from the draft distribution of each node's parent, uniforms from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    num_nodes = num_drafted + 1
    shared = random_probs((batch, num_nodes, vocab), generator, 3.0)
    target = 0.6 * shared + 0.4 * random_probs((batch, num_nodes, vocab), generator, 3.0)
    draft = 0.6 * shared[:, :num_drafted] + 0.4 * random_probs((batch, num_drafted, vocab), generator, 3.0)
    draft, target = draft.to(dtype), target.to(dtype)          # what a model hands over, rounded
    parent_index = parents if parents is not None else torch.arange(-1, num_drafted).expand(batch, num_nodes)
    tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for node in range(1, num_nodes):
        rows = draft[torch.arange(batch), parent_index[:, node]].double().clamp_min(0)
        tokens[:, node] = torch.multinomial(rows, 1, generator=generator)[:, 0]
    uniforms = torch.rand(batch, num_nodes, generator=generator)
    drafts = tokens if parents is not None else tokens[:, 1:].contiguous()
    return drafts.to(device), draft.to(device), target.to(device), uniforms.to(device)


def greedy_inputs(batch, num_drafted, seed, parents=None, vocab=5):
    """Tokens from a small vocabulary so that drafts often agree with the target."""
    generator = torch.Generator().manual_seed(seed)
    num_nodes = num_drafted + 1
    drafts = torch.randint(0, vocab, (batch, num_nodes if parents is not None else num_drafted), generator=generator)
    targets = torch.randint(0, vocab, (batch, num_nodes), generator=generator)
    if parents is None:   # a chain: let targets copy the drafts often, so long prefixes are accepted
        copy = torch.rand(batch, num_drafted, generator=generator) < 0.7
        targets[:, :num_drafted] = torch.where(copy, drafts, targets[:, :num_drafted])
    return drafts, targets


def gpu_devices():
    return ["cuda"] if torch.cuda.is_available() else []


# ---- greedy: every backend vs the reference ---------------------------------------------------------

CPU_BACKENDS = ["cpu", "torch", "triton"]


def run_backends(device):
    return ["cuda", "triton"] if device == "cuda" else CPU_BACKENDS


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("num_drafted", [0, 1, 3, 8])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_chain_matches_reference(backend, num_drafted, batch):
    backend_or_skip(backend, "cpu")
    drafts, targets = greedy_inputs(batch, num_drafted, seed=batch * 10 + num_drafted)
    expected = accept_greedy_reference(drafts, targets)
    got = accept_greedy(drafts, targets, out=poisoned(batch, num_drafted + 1, "cpu", False), backend=backend)
    assert_equal_results(got, expected)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("num_nodes", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_tree_matches_reference(backend, num_nodes, batch):
    backend_or_skip(backend, "cpu")
    parents = random_parents(batch, num_nodes, torch.Generator().manual_seed(num_nodes))
    drafts, targets = greedy_inputs(batch, num_nodes - 1, seed=num_nodes + batch, parents=parents, vocab=3)
    expected = accept_greedy_tree_reference(drafts, parents, targets)
    got = accept_greedy_tree(drafts, parents.to(torch.int32), targets.to(torch.int32),
                             out=poisoned(batch, num_nodes, "cpu", True), backend=backend)
    assert_equal_results(got, expected)


def test_greedy_reference_by_hand():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 3]])
    targets = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [4, 2, 3, 0]])
    accept_len, emitted = accept_greedy_reference(drafts, targets)
    assert accept_len.tolist() == [3, 1, 0]
    assert emitted.tolist() == [[5, 6, 7, 8], [5, 9, -1, -1], [4, -1, -1, -1]]
    # A tree: root 0 with children 1 (token 3) and 2 (token 4); node 3 (token 9) under node 2.
    parents = torch.tensor([[-1, 0, 0, 2]])
    accept_len, path, emitted = accept_greedy_tree_reference(torch.tensor([[0, 3, 4, 9]]), parents,
                                                             torch.tensor([[4, 1, 9, 6]]))
    assert (accept_len.tolist(), path.tolist(), emitted.tolist()) == ([2], [[0, 2, 3, -1]], [[4, 9, 6, -1]])


# ---- sampling: every backend vs the reference -------------------------------------------------------

def sampling_shape_id(shape):
    return "B{}-k{}-V{}".format(*shape)


def check_sampling_chain(backend, shape, dtype, device, seed):
    batch, num_drafted, vocab = shape
    drafts, draft_probs, target_probs, uniforms = sampling_inputs(batch, num_drafted, vocab, dtype, device, seed)
    expected = accept_sampling_reference(drafts, draft_probs, target_probs, uniforms)
    got = accept_sampling(drafts, draft_probs, target_probs, uniforms=uniforms,
                          out=poisoned(batch, num_drafted + 1, device, False), backend=backend)
    assert_equal_results(got, expected)


def check_sampling_tree(backend, shape, dtype, device, seed):
    batch, num_nodes, vocab = shape
    parents = random_parents(batch, num_nodes, torch.Generator().manual_seed(seed))
    drafts, draft_probs, target_probs, uniforms = sampling_inputs(batch, num_nodes - 1, vocab, dtype, device, seed,
                                                                  parents=parents)
    parents = parents.to(device)
    expected = accept_sampling_tree_reference(drafts, parents, draft_probs, target_probs, uniforms)
    got = accept_sampling_tree(drafts, parents, draft_probs, target_probs, uniforms=uniforms,
                               out=poisoned(batch, num_nodes, device, True), backend=backend)
    assert_equal_results(got, expected)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", PROB_DTYPES.values(), ids=PROB_DTYPES.keys())
@pytest.mark.parametrize("shape", SAMPLING_SHAPES, ids=sampling_shape_id)
@pytest.mark.parametrize("backend", ["cpu"])
def test_sampling_chain_matches_reference(backend, shape, dtype, seed):
    backend_or_skip(backend, "cpu", dtype)
    check_sampling_chain(backend, shape, dtype, "cpu", seed)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", PROB_DTYPES.values(), ids=PROB_DTYPES.keys())
@pytest.mark.parametrize("shape", TREE_SAMPLING_SHAPES, ids=sampling_shape_id)
@pytest.mark.parametrize("backend", ["cpu"])
def test_sampling_tree_matches_reference(backend, shape, dtype, seed):
    backend_or_skip(backend, "cpu", dtype)
    check_sampling_tree(backend, shape, dtype, "cpu", seed)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", INTERPRETER_SAMPLING_SHAPES, ids=sampling_shape_id)
def test_sampling_chain_triton_interpreter(shape, dtype):
    backend_or_skip("triton", "cpu", dtype)
    check_sampling_chain("triton", shape, dtype, "cpu", seed=11)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", INTERPRETER_TREE_SHAPES, ids=sampling_shape_id)
def test_sampling_tree_triton_interpreter(shape, dtype):
    backend_or_skip("triton", "cpu", dtype)
    check_sampling_tree("triton", shape, dtype, "cpu", seed=12)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", PROB_DTYPES.values(), ids=PROB_DTYPES.keys())
@pytest.mark.parametrize("shape", SAMPLING_SHAPES, ids=sampling_shape_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_sampling_chain_matches_reference(backend, shape, dtype, seed):
    backend_or_skip(backend, "cuda", dtype)
    check_sampling_chain(backend, shape, dtype, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", PROB_DTYPES.values(), ids=PROB_DTYPES.keys())
@pytest.mark.parametrize("shape", TREE_SAMPLING_SHAPES, ids=sampling_shape_id)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_sampling_tree_matches_reference(backend, shape, dtype, seed):
    backend_or_skip(backend, "cuda", dtype)
    check_sampling_tree(backend, shape, dtype, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, num_nodes", [(1, 1), (3, 9), (5, 33)], ids=["B1-N1", "B3-N9", "B5-N33"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_greedy_matches_reference(backend, batch, num_nodes):
    backend_or_skip(backend, "cuda")
    drafts, targets = greedy_inputs(batch, num_nodes - 1, seed=num_nodes)
    got = accept_greedy(drafts.cuda(), targets.cuda(), out=poisoned(batch, num_nodes, "cuda", False),
                        backend=backend)
    assert_equal_results(got, accept_greedy_reference(drafts, targets))
    parents = random_parents(batch, num_nodes, torch.Generator().manual_seed(num_nodes))
    drafts, targets = greedy_inputs(batch, num_nodes - 1, seed=num_nodes, parents=parents, vocab=3)
    got = accept_greedy_tree(drafts.cuda(), parents.cuda(), targets.cuda(),
                             out=poisoned(batch, num_nodes, "cuda", True), backend=backend)
    assert_equal_results(got, accept_greedy_tree_reference(drafts, parents, targets))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_sampling_captures_in_a_cuda_graph(backend):
    """No host synchronisation inside: the op records into a CUDA graph and replays with new uniforms."""
    backend_or_skip(backend, "cuda")
    drafts, draft_probs, target_probs, uniforms = sampling_inputs(4, 5, 507, torch.float32, "cuda", seed=5)
    static_uniforms = uniforms.clone()
    out = poisoned(4, 6, "cuda", False)
    accept_sampling(drafts, draft_probs, target_probs, uniforms=static_uniforms, out=out, validate=False,
                    backend=backend)   # warm-up (compiles Triton kernels outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        accept_sampling(drafts, draft_probs, target_probs, uniforms=static_uniforms, out=out, validate=False,
                        backend=backend)
    for seed in range(3):
        fresh = torch.rand(4, 6, generator=torch.Generator().manual_seed(seed)).cuda()
        static_uniforms.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_equal_results(Acceptance(*out), accept_sampling_reference(drafts, draft_probs, target_probs, fresh))


@st.composite
def trees(draw):
    """(B, parents [B, N], node tokens [B, N], targets [B, N], V): shallow and deep trees, small vocabularies
    (so that drafts often match), duplicate siblings included."""
    batch = draw(st.integers(1, 3))
    num_nodes = draw(st.integers(1, 12))
    vocab = draw(st.integers(1, 4))
    parents = [[-1] + [draw(st.integers(max(0, j - draw(st.integers(1, j))), j - 1)) for j in range(1, num_nodes)]
               for _ in range(batch)]
    tokens = [[draw(st.integers(0, vocab - 1)) for _ in range(num_nodes)] for _ in range(batch)]
    targets = [[draw(st.integers(0, vocab - 1)) for _ in range(num_nodes)] for _ in range(batch)]
    return batch, torch.tensor(parents), torch.tensor(tokens), torch.tensor(targets), vocab


@settings(max_examples=60, deadline=None)
@given(tree=trees(), seed=st.integers(0, 1000))
def test_cpu_kernels_match_reference_on_random_trees(tree, seed):
    extension_or_skip()
    batch, parents, tokens, targets, vocab = tree
    num_nodes = parents.shape[1]
    assert_equal_results(accept_greedy_tree(tokens, parents, targets, backend="cpu"),
                         accept_greedy_tree_reference(tokens, parents, targets))
    generator = torch.Generator().manual_seed(seed)
    draft_probs = torch.softmax(torch.randn(batch, num_nodes - 1, vocab, generator=generator) * 2, -1)
    target_probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=generator) * 2, -1)
    uniforms = torch.rand(batch, num_nodes, generator=generator)
    got = accept_sampling_tree(tokens, parents, draft_probs, target_probs, uniforms=uniforms, backend="cpu")
    assert_equal_results(got, accept_sampling_tree_reference(tokens, parents, draft_probs, target_probs, uniforms))


# ---- a chain is a tree; generator handling ----------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chain_tree_equals_chain(backend):
    backend_or_skip(backend, "cpu")
    batch, num_drafted, vocab = 4, 5, 111
    drafts, draft_probs, target_probs, uniforms = sampling_inputs(batch, num_drafted, vocab, torch.float32, "cpu", 3)
    chain_parents = torch.arange(-1, num_drafted).expand(batch, num_drafted + 1).contiguous()
    node_tokens = torch.cat([torch.full((batch, 1), 42), drafts], dim=1)
    chain = accept_sampling(drafts, draft_probs, target_probs, uniforms=uniforms, backend=backend)
    tree = accept_sampling_tree(node_tokens, chain_parents, draft_probs, target_probs, uniforms=uniforms,
                                backend=backend)
    assert torch.equal(chain.accept_len, tree.accept_len) and torch.equal(chain.emitted, tree.emitted)
    for row in range(batch):
        length = int(tree.accept_len[row])
        assert tree.path[row].tolist() == list(range(length + 1)) + [-1] * (num_drafted - length)
    targets = torch.randint(0, 2, (batch, num_drafted + 1), generator=torch.Generator().manual_seed(1))
    greedy_chain = accept_greedy(targets[:, :-1] * 0 + 1, targets, backend=backend)
    greedy_tree = accept_greedy_tree(torch.cat([node_tokens[:, :1], targets[:, :-1] * 0 + 1], 1), chain_parents,
                                     targets, backend=backend)
    assert torch.equal(greedy_chain.accept_len, greedy_tree.accept_len)
    assert torch.equal(greedy_chain.emitted, greedy_tree.emitted)


def test_generator_draws_the_uniforms_once():
    drafts, draft_probs, target_probs, _ = sampling_inputs(3, 4, 111, torch.float32, "cpu", seed=8)
    got = accept_sampling(drafts, draft_probs, target_probs, generator=torch.Generator().manual_seed(99))
    uniforms = torch.rand(3, 5, generator=torch.Generator().manual_seed(99))
    assert_equal_results(got, accept_sampling_reference(drafts, draft_probs, target_probs, uniforms))
    again = accept_sampling(drafts, draft_probs, target_probs, generator=torch.Generator().manual_seed(99))
    assert_equal_results(again, got)


# ---- exactness: the emitted tokens follow the target distribution (chi-square) ----------------------

def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value of integer samples against `probs` [V] (bins with an
    expected count below 5 are pooled)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * tokens.numel()
    large = expected >= 5
    observed_bins = torch.cat([counts[large], counts[~large].sum().view(1)])
    expected_bins = torch.cat([expected[large], expected[~large].sum().view(1)])
    keep = expected_bins > 0
    if bool((counts[expected == 0] > 0).any()):
        return 0.0     # a token with zero probability was drawn
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


# A toy pair: the target's next-token distribution depends only on the position (a valid, if dull,
# language model), the draft's is different at every position.
TOY_TARGET = torch.tensor([[0.40, 0.05, 0.25, 0.10, 0.20, 0.00],
                           [0.10, 0.30, 0.05, 0.05, 0.30, 0.20],
                           [0.25, 0.25, 0.20, 0.10, 0.10, 0.10],
                           [0.05, 0.05, 0.50, 0.20, 0.10, 0.10]], dtype=torch.float64)
TOY_DRAFT = torch.tensor([[0.10, 0.30, 0.20, 0.20, 0.10, 0.10],
                          [0.30, 0.10, 0.25, 0.05, 0.10, 0.20],
                          [0.05, 0.35, 0.10, 0.30, 0.10, 0.10]], dtype=torch.float64)
DRAWS = 40000
P_VALUE_FLOOR = 1e-4     # a correct sampler fails one check in 10,000; a biased one gives p ~ 0


def toy_chain(device):
    generator = torch.Generator().manual_seed(2024)
    num_drafted = TOY_DRAFT.shape[0]
    drafts = torch.stack([torch.multinomial(TOY_DRAFT[i], DRAWS, replacement=True, generator=generator)
                          for i in range(num_drafted)], dim=1)                               # [DRAWS, k]
    draft_probs = TOY_DRAFT.float().expand(DRAWS, -1, -1).contiguous()
    target_probs = TOY_TARGET.float().expand(DRAWS, -1, -1).contiguous()
    uniforms = torch.rand(DRAWS, num_drafted + 1, generator=generator)
    return drafts.to(device), draft_probs.to(device), target_probs.to(device), uniforms.to(device)


def biased_sampling(drafts, draft_probs, target_probs, uniforms):
    """A deliberately wrong sampler: accepts like the real one but draws the correction from p instead of
    max(0, p - q)."""
    accept_len, emitted = accept_sampling_reference(drafts, draft_probs, target_probs, uniforms)
    rejected = (accept_len < drafts.shape[1]).nonzero()[:, 0].tolist()
    for row in rejected:
        position = int(accept_len[row])
        emitted[row, position] = sample_index(target_probs[row, position].double(), float(uniforms[row, -1]))
    return accept_len, emitted


def check_follows_target(accept_len, emitted, drafts, draft_probs):
    """Every emitted position follows the target's distribution and not the draft's; the token drawn at a
    rejection follows the residual max(0, p - q) normalised."""
    num_drafted = drafts.shape[1]
    p_values = {}
    for position in range(num_drafted + 1):
        present = accept_len >= position
        tokens = emitted[present, position]
        p_values[f"position {position}"] = chi_square_p_value(tokens, TOY_TARGET[position])
        if position < num_drafted:
            assert chi_square_p_value(tokens, TOY_DRAFT[position]) < 1e-6, f"position {position} looks like the draft"
        if position < num_drafted:
            at_rejection = emitted[accept_len == position, position]
            residual = (TOY_TARGET[position] - TOY_DRAFT[position]).clamp_min(0)
            p_values[f"after a rejection at {position}"] = chi_square_p_value(at_rejection, residual)
    failed = {name: value for name, value in p_values.items() if value < P_VALUE_FLOOR}
    assert not failed, f"the emitted tokens do not follow the target distribution: p-values {failed}"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rejection_sampling_preserves_the_target_distribution(backend):
    backend_or_skip(backend, "cpu")
    drafts, draft_probs, target_probs, uniforms = toy_chain("cpu")
    if backend == "torch":   # the reference is a Python loop: a fifth of the draws keeps the test short
        drafts, draft_probs, target_probs, uniforms = (t[:DRAWS // 5] for t in (drafts, draft_probs, target_probs,
                                                                                uniforms))
    accept_len, emitted = accept_sampling(drafts, draft_probs, target_probs, uniforms=uniforms, backend=backend)
    check_follows_target(accept_len, emitted, drafts, draft_probs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_rejection_sampling_preserves_the_target_distribution(backend):
    backend_or_skip(backend, "cuda")
    drafts, draft_probs, target_probs, uniforms = toy_chain("cuda")
    accept_len, emitted = accept_sampling(drafts, draft_probs, target_probs, uniforms=uniforms, backend=backend)
    check_follows_target(accept_len.cpu(), emitted.cpu(), drafts.cpu(), draft_probs.cpu())


def test_biased_sampler_is_caught():
    drafts, draft_probs, target_probs, uniforms = (t[:DRAWS // 4] for t in toy_chain("cpu"))
    accept_len, emitted = biased_sampling(drafts, draft_probs, target_probs, uniforms)
    with pytest.raises(AssertionError, match="do not follow the target distribution"):
        check_follows_target(accept_len, emitted, drafts, draft_probs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_tree_rejection_sampling_preserves_the_target_distribution(backend):
    """A tree with three i.i.d. children of the root and two i.i.d. children under each of them: the first
    emitted token follows p_0, the second (when the first was a draft) follows p_1; both differ from q."""
    backend_or_skip(backend, "cpu")
    draws = DRAWS if backend == "cpu" else DRAWS // 8
    generator = torch.Generator().manual_seed(7)
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]).expand(draws, -1).contiguous()
    depth = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    num_nodes = parents.shape[1]
    tokens = torch.zeros(draws, num_nodes, dtype=torch.int64)
    for node in range(1, num_nodes):   # each child drawn from its parent's depth's q, independently
        tokens[:, node] = torch.multinomial(TOY_DRAFT[depth[node] - 1], draws, replacement=True, generator=generator)
    draft_probs = TOY_DRAFT[depth[:num_nodes - 1]].float().expand(draws, -1, -1).contiguous()
    target_probs = TOY_TARGET[depth].float().expand(draws, -1, -1).contiguous()
    result = accept_sampling_tree(tokens, parents, draft_probs, target_probs, generator=generator, backend=backend)
    first = result.emitted[:, 0]
    assert chi_square_p_value(first, TOY_TARGET[0]) > P_VALUE_FLOOR
    assert chi_square_p_value(first, TOY_DRAFT[0]) < 1e-6
    second = result.emitted[result.accept_len >= 1, 1]
    assert chi_square_p_value(second, TOY_TARGET[1]) > P_VALUE_FLOOR
    # Path consistency: each accepted node's parent is the previous path entry, its token the emitted one.
    for row in range(0, draws, max(1, draws // 200)):
        length = int(result.accept_len[row])
        path = result.path[row, :length + 1].tolist()
        assert path[0] == 0 and all(parents[row, path[i + 1]] == path[i] for i in range(length))
        assert result.emitted[row, :length].tolist() == [int(tokens[row, node]) for node in path[1:]]


@pytest.mark.parametrize("siblings", ["independent", "without_replacement"])
def test_tree_sampling_needs_independent_siblings(siblings):
    """The documented assumption, shown: two children of the root drawn independently from q give p's
    distribution; drawn without replacement (always two distinct tokens) they do not. With p = (.6, .2, .2)
    and q = (.5, .5, 0), distinct siblings emit token 0 with probability .7 instead of .6."""
    backend_or_skip("cpu", "cpu")
    draws = 20000
    generator = torch.Generator().manual_seed(3)
    target = torch.tensor([0.6, 0.2, 0.2])
    draft = torch.tensor([0.5, 0.5, 0.0])
    first = torch.multinomial(draft, draws, replacement=True, generator=generator)
    second = (torch.multinomial(draft, draws, replacement=True, generator=generator) if siblings == "independent"
              else 1 - first)
    tokens = torch.stack([torch.zeros_like(first), first, second], dim=1)
    parents = torch.tensor([-1, 0, 0]).expand(draws, -1).contiguous()
    draft_probs = draft.expand(draws, 2, -1).contiguous()
    target_probs = target.expand(draws, 3, -1).contiguous()
    result = accept_sampling_tree(tokens, parents, draft_probs, target_probs, generator=generator, backend="cpu")
    p_value = chi_square_p_value(result.emitted[:, 0], target.double())
    if siblings == "independent":
        assert p_value > P_VALUE_FLOOR
    else:
        assert p_value < 1e-6
        assert abs(float((result.emitted[:, 0] == 0).double().mean()) - 0.7) < 0.02


# ---- bad input: a ValueError / TypeError naming the argument -----------------------------------------

def valid_chain(batch=2, num_drafted=3, vocab=11):
    return sampling_inputs(batch, num_drafted, vocab, torch.float32, "cpu", seed=0)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(draft_tokens=a["draft_tokens"].float()), TypeError, "draft_tokens"),
    (lambda a: a.update(draft_tokens=a["draft_tokens"][0]), ValueError, "draft_tokens"),
    (lambda a: a.update(draft_tokens=a["draft_tokens"] + 100), ValueError, r"draft_tokens\[0, 0\].*vocabulary"),
    (lambda a: a.update(draft_tokens=a["draft_tokens"] - 100), ValueError, "draft_tokens.*vocabulary"),
    (lambda a: a.update(draft_probs=a["draft_probs"][:, :2]), ValueError, r"draft_probs.shape\[1\]"),
    (lambda a: a.update(draft_probs=a["draft_probs"][..., :5]), ValueError, r"draft_probs.shape\[2\]"),
    (lambda a: a.update(target_probs=a["target_probs"][:, :3]), ValueError, r"target_probs.shape\[1\]"),
    (lambda a: a.update(target_probs=a["target_probs"][:1]), ValueError, r"target_probs.shape\[0\]"),
    (lambda a: a.update(target_probs=a["target_probs"].double()), TypeError, "target_probs"),
    (lambda a: a.update(draft_probs=a["draft_probs"].half()), TypeError, "draft_probs"),
    (lambda a: a.update(draft_probs=a["draft_probs"].to("meta")), ValueError, "draft_probs is on meta"),
    (lambda a: a.update(target_probs=-a["target_probs"]), ValueError, "target_probs.*negative"),
    (lambda a: a.update(draft_probs=a["draft_probs"] * float("nan")), ValueError, "draft_probs.*NaN"),
    (lambda a: a.update(uniforms=a["uniforms"] + 1), ValueError, "uniforms"),
    (lambda a: a.update(uniforms=a["uniforms"][:, :2]), ValueError, r"uniforms.shape\[1\]"),
    (lambda a: a.update(uniforms=a["uniforms"].double()), TypeError, "uniforms"),
    (lambda a: a.update(out=(torch.empty(2, dtype=torch.int64), torch.empty(2, 4, dtype=torch.int64))),
     TypeError, "accept_len"),
    (lambda a: a.update(out=(torch.empty(2, dtype=torch.int32), torch.empty(2, 3, dtype=torch.int64))),
     ValueError, "emitted"),
    (lambda a: a.update(backend="nope"), ValueError, "backend='nope'"),
], ids=["tokens-dtype", "tokens-rank", "token-too-large", "token-negative", "draft-probs-k", "draft-probs-V",
        "target-probs-k", "target-probs-B", "probs-dtype", "probs-dtype-mismatch", "probs-device", "negative-probs",
        "nan-probs", "uniforms-range", "uniforms-shape", "uniforms-dtype", "out-dtype", "out-shape", "backend"])
def test_sampling_bad_input(change, error, match):
    drafts, draft_probs, target_probs, uniforms = valid_chain()
    arguments = dict(draft_tokens=drafts, draft_probs=draft_probs, target_probs=target_probs, uniforms=uniforms)
    change(arguments)
    with pytest.raises(error, match=match):
        accept_sampling(**arguments)


def test_generator_on_another_device_is_named():
    drafts, draft_probs, target_probs, _ = valid_chain()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA generator to mismatch the CPU tensors")
    with pytest.raises(ValueError, match="generator"):
        accept_sampling(drafts, draft_probs, target_probs, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("targets, error, match", [
    (torch.zeros(2, 3, dtype=torch.int64), ValueError, r"target_tokens.shape\[1\] must be 4"),
    (torch.zeros(3, 4, dtype=torch.int64), ValueError, r"target_tokens.shape\[0\]"),
    (torch.zeros(2, 4), TypeError, "target_tokens"),
    (torch.zeros(2, 4, dtype=torch.int64, device="meta"), ValueError, "target_tokens is on meta"),
    ("not a tensor", TypeError, "target_tokens must be a torch.Tensor"),
], ids=["k", "batch", "dtype", "device", "type"])
def test_greedy_bad_input(targets, error, match):
    with pytest.raises(error, match=match):
        accept_greedy(torch.zeros(2, 3, dtype=torch.int64), targets)


@pytest.mark.parametrize("parents, match", [
    ([[0, 0, 1], [-1, 0, 1]], r"parents\[0, 0\] = 0 must be -1"),
    ([[-1, 0, 1], [-1, 2, 1]], r"parents\[1, 1\] = 2 must be in \[0, 0\]"),
    ([[-1, 0, 2], [-1, 0, 1]], r"parents\[0, 2\] = 2 must be in \[0, 1\]"),
    ([[-1, 0, -1], [-1, 0, 1]], r"parents\[0, 2\] = -1"),
], ids=["root", "forward-edge", "self-loop", "second-root"])
def test_tree_parents_must_be_a_tree(parents, match):
    parents = torch.tensor(parents)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        accept_greedy_tree(tokens, parents, tokens)
    probs = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match=match):
        accept_sampling_tree(tokens, parents, probs[:, :2], probs)


def test_tree_bad_shapes():
    tokens = torch.zeros(2, 4, dtype=torch.int64)
    parents = torch.tensor([[-1, 0, 0, 1]] * 2)
    with pytest.raises(ValueError, match=r"parents.shape\[1\] must be 4"):
        accept_greedy_tree(tokens, parents[:, :3], tokens)
    with pytest.raises(ValueError, match=r"draft_tokens has N=0"):
        accept_greedy_tree(tokens[:, :0], parents[:, :0], tokens[:, :0])
    probs = torch.full((2, 4, 5), 0.2)
    with pytest.raises(ValueError, match=r"draft_probs.shape\[1\] must be 3"):
        accept_sampling_tree(tokens, parents, probs, probs)
    with pytest.raises(ValueError, match=r"draft_tokens\[0, 1\] = 9 is outside the vocabulary"):
        accept_sampling_tree(torch.tensor([[0, 9, 0, 0]] * 2), parents, probs[:, :3], probs)


def test_root_token_is_not_checked_or_read():
    """Node 0 is the last accepted token; its draft_tokens entry may hold anything."""
    tokens = torch.tensor([[-5, 1, 2], [123456, 1, 2]])
    parents = torch.tensor([[-1, 0, 1]] * 2)
    probs = torch.full((2, 3, 4), 0.25)
    result = accept_sampling_tree(tokens, parents, probs[:, :2], probs, uniforms=torch.full((2, 3), 0.5))
    assert result.accept_len.tolist() == [2, 2]


def test_empty_batch():
    result = accept_sampling(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, 7), torch.zeros(0, 4, 7))
    assert result.accept_len.shape == (0,) and result.emitted.shape == (0, 4)


# ---- the compiled ops' schemas and fake implementations ---------------------------------------------

def test_extension_ops_pass_opcheck():
    extension_or_skip()
    drafts, draft_probs, target_probs, uniforms = valid_chain()
    outputs = (torch.empty(2, dtype=torch.int32), None, torch.empty(2, 4, dtype=torch.int64))
    torch.library.opcheck(torch.ops.fastvlm.accept_sampling.default,
                          (drafts, None, draft_probs, target_probs, uniforms, *outputs))
    torch.library.opcheck(torch.ops.fastvlm.accept_greedy.default,
                          (drafts, None, torch.zeros(2, 4, dtype=torch.int64), *outputs))


def test_torch_compile_fullgraph():
    """The public ops trace into one graph (fake implementations, no host reads with validate=False)."""
    extension_or_skip()
    drafts, draft_probs, target_probs, uniforms = sampling_inputs(3, 4, 111, torch.float32, "cpu", seed=1)
    compiled = torch.compile(lambda d, q, p, u: accept_sampling(d, q, p, uniforms=u, validate=False, backend="cpu"),
                             fullgraph=True)
    assert_equal_results(compiled(drafts, draft_probs, target_probs, uniforms),
                         accept_sampling_reference(drafts, draft_probs, target_probs, uniforms))
