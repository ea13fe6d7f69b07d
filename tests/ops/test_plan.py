"""Plan/run: the checks and the backend choice happen once, in the plan; run calls the chosen kernel."""
import importlib

import pytest
import torch

from fastvlm_kernels.ops import _dispatch
from fastvlm_kernels.ops.verify_attention import (BACKENDS, HOST_BOUND_PRIORITY, PRIORITY, verify_attention,
                                                  verify_attention_plan)
from fastvlm_kernels.ops.verify_attention.spec import HEAD_DIMS

from ..helpers import backend_skipper, make_inputs, skip_unless_runnable

# the module, not the package attribute of the same name (the function)
attention_module = importlib.import_module("fastvlm_kernels.ops.verify_attention")


backend_or_skip = backend_skipper(BACKENDS, lambda device, dtype: (torch.empty(1, 1, 1, 64, device=device,
                                                                                  dtype=dtype),))


def skip_without_triton():
    error = _dispatch.triton_import_error()
    skip_unless_runnable("triton", [error] if error else [])


# (B, Hq, Hkv, T, D, prefix_lens, tree)
PLAN_SHAPES = [
    (1, 4, 2, 1, 64, (16,), "chain"),
    (2, 6, 2, 5, 80, (9, 0), "tree"),
    (3, 8, 8, 17, 128, (40, 3, 21), "chain"),
]


@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=lambda s: f"B{s[0]}-Hq{s[1]}-Hkv{s[2]}-T{s[3]}-D{s[4]}-{s[6]}")
@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_plan_then_run_is_the_public_call(name, shape):
    backend_or_skip(name, "cpu")
    q, k_cache, v_cache, prefix_lens, tree_mask = make_inputs(*shape, dtype=torch.float32, seed=7)
    plan = verify_attention_plan(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale=0.3, return_lse=True,
                                 backend=name)
    assert plan.backend.name == name and plan.sm_scale == 0.3 and plan.return_lse
    out, lse = plan.run(q, k_cache, v_cache, prefix_lens, tree_mask)
    expected, expected_lse = verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale=0.3,
                                              return_lse=True, backend=name)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_run_checks_nothing(name, monkeypatch):
    """After the plan, run reaches the kernel with no check in front: the decoder's hot path. Inputs of the
    planned kind with another T (a draft step after the prefill) give the public function's result."""
    backend_or_skip(name, "cpu")
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(2, 4, 2, 9, 64, (3, 11), "chain", torch.float32, seed=3)
    plan = verify_attention_plan(q, k_cache, v_cache, prefix_lens, validate=False, backend=name)
    step_q, step_lens = q[:, :, :2], prefix_lens + 9
    expected = verify_attention(step_q, k_cache, v_cache, step_lens, backend=name)

    def refuse(*args, **kwargs):
        raise AssertionError("run checked its arguments")
    monkeypatch.setattr(attention_module, "check_arguments", refuse)
    monkeypatch.setattr(attention_module, "_check_values", refuse)
    monkeypatch.setattr(attention_module, "select_remembered", refuse)
    monkeypatch.setattr(_dispatch, "select", refuse)
    out = torch.full((2, 2, 4, 64), float("nan")).transpose(1, 2)        # [B, Hq, T, D] view, as the decoder's
    assert plan.run(step_q, k_cache, v_cache, step_lens, out=out) is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mutate, error, name", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache"),
    (lambda a: a.update(prefix_lens=torch.tensor([5, 11], dtype=torch.int32)), ValueError, "prefix_lens"),
    (lambda a: a.update(tree_mask=a["tree_mask"] | 4), ValueError, "tree_mask"),
    (lambda a: a.update(out=torch.empty(2, 4, 3, 64).transpose(2, 3)), ValueError, "out"),
    (lambda a: a.update(out_lse=torch.empty(2, 4, 3, dtype=torch.float16)), TypeError, "out_lse"),
    (lambda a: a.update(backend="fast"), ValueError, "backend"),
], ids=["q-rank", "k-dtype", "cache-full", "mask-sees-later", "out-strided", "lse-dtype", "backend-unknown"])
def test_plan_refuses_bad_arguments_by_name(mutate, error, name):
    q, k_cache, v_cache, prefix_lens, tree_mask = make_inputs(2, 4, 2, 3, 64, (5, 7), "tree", torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, prefix_lens=prefix_lens, tree_mask=tree_mask)
    mutate(args)
    with pytest.raises(error, match=name):
        verify_attention_plan(**args)


def test_plan_of_an_empty_batch_runs_nothing():
    q, cache = torch.randn(0, 4, 3, 64), torch.randn(0, 2, 10, 64)
    plan = verify_attention_plan(q, cache, cache, torch.zeros(0, dtype=torch.int32), return_lse=True)
    out, lse = plan.run(q, cache, cache, torch.zeros(0, dtype=torch.int32))
    assert out.shape == q.shape and lse.shape == (0, 4, 3)


def test_host_bound_callers_take_the_host_bound_order(monkeypatch):
    """One order per kind of caller, both defined by the op: host_bound=True reads HOST_BOUND_PRIORITY."""
    assert HOST_BOUND_PRIORITY["cuda"][0] == "cuda" and PRIORITY["cuda"][0] == "triton"
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 2, 2, 1, 64, (4,), "chain", torch.float32)
    other = next((b.name for b in BACKENDS if b.name != "torch" and not b.not_supported_reasons(q)), None)
    skip_unless_runnable("cpu", [] if other else ["only the reference runs CPU tensors here"])
    monkeypatch.setitem(PRIORITY, "cpu", ("torch", other))
    monkeypatch.setitem(HOST_BOUND_PRIORITY, "cpu", (other, "torch"))
    assert verify_attention_plan(q, k_cache, v_cache, prefix_lens).backend.name == "torch"
    assert verify_attention_plan(q, k_cache, v_cache, prefix_lens, host_bound=True).backend.name == other


def test_the_decoder_attention_plans_once_per_generate(monkeypatch):
    """attend: the first call plans (host-bound), later calls of the same state run that plan; each layer's
    output is the public function's."""
    from fastvlm_kernels import KVCache
    from fastvlm_kernels.decoding import attention as decoder_attention
    from fastvlm_kernels.decoding.attention import StepState, attend

    batch, num_q_heads, num_kv_heads, head_dim, num_layers = 2, 4, 2, 64, 3
    cache = KVCache(num_layers, batch, num_kv_heads, head_dim, 32, torch.float32, "cpu")
    reference = KVCache(num_layers, batch, num_kv_heads, head_dim, 32, torch.float32, "cpu")
    state = StepState(cache, torch.zeros(batch, dtype=torch.int32))
    plans = []
    make_plan = decoder_attention.verify_attention_plan
    monkeypatch.setattr(decoder_attention, "verify_attention_plan",
                        lambda *args, **kwargs: plans.append(kwargs) or make_plan(*args, **kwargs))
    generator = torch.Generator().manual_seed(5)
    for num_new in (6, 1, 3):                                # a prefill, then two steps
        for layer in range(num_layers):
            query = torch.randn(batch, num_q_heads, num_new, head_dim, generator=generator)
            key, value = (torch.randn(batch, num_kv_heads, num_new, head_dim, generator=generator) for _ in "kv")
            got = attend(state, layer, query, key, value, 0.125)
            reference.append(layer, key, value)
            keys, values = reference.layer(layer)
            expected = verify_attention(query, keys, values, state.prefix_lens, sm_scale=0.125)
            assert torch.equal(got, expected.transpose(1, 2)), (num_new, layer)
        state.prefix_lens = state.prefix_lens + num_new
    assert len(plans) == 1 and plans[0]["host_bound"] is True and plans[0]["validate"] is False


def test_triton_on_cpu_follows_the_interpreter_setting(monkeypatch):
    """The remembered backend choice still sees TRITON_INTERPRET where it matters (Triton asked on CPU)."""
    skip_without_triton()
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 2, 2, 1, 64, (4,), "chain", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert verify_attention_plan(q, k_cache, v_cache, prefix_lens, backend="triton").backend.name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        verify_attention_plan(q, k_cache, v_cache, prefix_lens, backend="triton")


def test_head_dims_are_defined_once():
    """spec.HEAD_DIMS is what the checks take and what the Triton backend has configurations for."""
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 2, 1, 2, 48, (4,), "chain", torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        verify_attention_plan(q, k_cache, v_cache, prefix_lens)
    for head_dim in HEAD_DIMS:
        q, k_cache, v_cache, prefix_lens, _ = make_inputs(1, 2, 1, 2, head_dim, (4,), "chain", torch.float32)
        verify_attention_plan(q, k_cache, v_cache, prefix_lens)
    skip_without_triton()
    from fastvlm_kernels.ops.verify_attention.triton import KERNEL_CONFIGS
    assert sorted({config["head_dim"] for config in KERNEL_CONFIGS}) == sorted(HEAD_DIMS)


# ---- the heads and the acceptance ops: the same shape ----------------------------------------------------

def _forbid_checks(monkeypatch, module):
    """After this, any argument check or backend choice in `module` raises."""
    from fastvlm_kernels.ops import _checks

    def refuse(*args, **kwargs):
        raise AssertionError("run checked its arguments or chose a backend")
    monkeypatch.setattr(module, "select_remembered", refuse)
    monkeypatch.setattr(_dispatch, "select", refuse)
    for name in ("check_tensor", "check_size", "check_same_device", "check_same_dtype", "check_last_dim_contiguous"):
        monkeypatch.setattr(_checks, name, refuse)


@pytest.mark.parametrize("mode", ["argmax", "sample", "topk", "verify"])
def test_head_plans_run_what_the_public_functions_return(mode, monkeypatch):
    from fastvlm_kernels.ops import lm_head
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(5, 48, generator=generator)
    norm_weight, weight = torch.rand(48, generator=generator) + 0.5, torch.randn(301, 48, generator=generator)
    step = torch.randn(3, 48, generator=generator)                       # another M, as a later step has
    subset = torch.arange(0, 301, 3)
    if mode == "verify":
        drafts, step_drafts = torch.tensor([3, 7, 0, 300, -1]), torch.tensor([5, 9, -1])
        expected = lm_head.verify_head(step, norm_weight, weight, step_drafts, eps=1e-5, temperature=0.7,
                                       prob_rows=torch.tensor([2]))
        plan = lm_head.verify_head_plan(hidden, norm_weight, weight, drafts, eps=1e-5, temperature=0.7,
                                        prob_rows=torch.tensor([4]))
        _forbid_checks(monkeypatch, lm_head)
        got = plan.run(step, step_drafts, prob_rows=torch.tensor([2]))
    else:
        options = dict(eps=1e-5, mode=mode, temperature=0.7, vocab_subset=subset,
                       top_k=4 if mode == "topk" else None)
        seed = 17 if mode == "sample" else None
        expected = lm_head.early_exit_head(step, norm_weight, weight, seed=seed, **options)
        plan = lm_head.early_exit_head_plan(hidden, norm_weight, weight, seed=seed, **options)
        _forbid_checks(monkeypatch, lm_head)
        got = plan.run(step, seed=seed)
    assert isinstance(plan, lm_head.VerifyHeadPlan if mode == "verify" else lm_head.EarlyExitHeadPlan)
    for name, value in got._asdict().items():
        assert torch.equal(value, getattr(expected, name)), name


@pytest.mark.parametrize("op", ["greedy", "sampling", "greedy_tree", "sampling_tree"])
def test_acceptance_plans_run_what_the_public_functions_return(op, monkeypatch):
    from fastvlm_kernels.ops import acceptance
    generator = torch.Generator().manual_seed(13)
    batch, vocab = 3, 37

    def inputs(num_nodes):            # a chain of num_nodes - 1 drafts, or a tree; as run takes them (contiguous)
        tokens = torch.randint(0, vocab, (batch, num_nodes), generator=generator)
        parents = torch.tensor([[-1] + [max(j - 1 - (j % 2), 0) for j in range(1, num_nodes)]] * batch)
        draft_probs = torch.softmax(torch.randn(batch, num_nodes - 1, vocab, generator=generator), -1)
        target_probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=generator), -1)
        targets = torch.where(torch.rand(batch, num_nodes, generator=generator) < 0.7, tokens.roll(-1, 1), 0)
        uniforms = torch.rand(batch, num_nodes, generator=generator)
        if op == "greedy":
            return (tokens[:, 1:].contiguous(), targets), {}
        if op == "sampling":
            return (tokens[:, 1:].contiguous(), draft_probs, target_probs), {"uniforms": uniforms}
        if op == "greedy_tree":
            return (tokens, parents, targets), {}
        return (tokens, parents, draft_probs, target_probs), {"uniforms": uniforms}

    public, make_plan = getattr(acceptance, f"accept_{op}"), getattr(acceptance, f"accept_{op}_plan")
    planned_args, planned_options = inputs(6)
    step_args, step_options = inputs(4)                       # fewer drafts at a later step
    expected = public(*step_args, **step_options)
    plan = make_plan(*planned_args, **planned_options)
    _forbid_checks(monkeypatch, acceptance)
    got = plan.run(*step_args, **step_options)
    assert type(got) is type(expected)
    for value, wanted in zip(got, expected):
        assert torch.equal(value, wanted)


def test_remembered_choices_key_on_what_the_reasons_read():
    """The backend choice is remembered per device type and the options the backends' reasons read: a call
    that one backend cannot take (top_p without top_k: not the CPU kernel) does not inherit another's choice,
    and tensors on another device type (meta) do not inherit the CPU's."""
    from fastvlm_kernels.ops import acceptance, lm_head
    backend_or_skip("cpu", "cpu")
    hidden, norm_weight, weight = torch.randn(2, 32), torch.ones(32), torch.randn(50, 32)
    assert lm_head.early_exit_head_plan(hidden, norm_weight, weight, eps=1e-6).backend.name == "cpu"
    top_p = lm_head.early_exit_head_plan(hidden, norm_weight, weight, eps=1e-6, mode="sample", top_p=0.9, seed=1)
    assert top_p.backend.name == "torch"
    tokens, targets = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64)
    assert acceptance.accept_greedy_plan(tokens, targets).backend.name == "cpu"
    assert acceptance.accept_greedy_plan(tokens.to("meta"), targets.to("meta")).backend.name == "torch"
