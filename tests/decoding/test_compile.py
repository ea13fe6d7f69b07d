"""The decoder's step functions trace whole under torch.compile(fullgraph=True) (issue 24's CPU part): no host
sync, no data-dependent Python control flow and no untraceable call inside a step, which is what capturing a
step in a CUDA graph needs. Traced with the aot_eager backend, which also runs every custom op's fake
implementation; the compiled step gives the eager step's outcome (greedy), and a valid one when sampling."""
from __future__ import annotations

import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.attention import attention_implementation
from fastvlm_kernels.decoding.options import resolve

from .models import build, sharpen

STEPS = ("plain", "chain", "tree")


def _run_step(case, kind: str, sampling: bool, compiled: bool):
    """A fresh decoder's prefill, then one step of ``kind`` (eager or compiled): (accept_len, emitted)."""
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3, tree="dynamic" if kind == "tree" else None)
    inputs = dict(case.inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    options, _ = resolve(case.model, ids, mask, {"max_new_tokens": 20, "do_sample": sampling, "top_k": 0})
    decoder._processing = None
    with torch.no_grad(), attention_implementation(decoder._attention_configs()):
        decoder._prepare_lean()
        rows, state = decoder.prefill(ids, mask, inputs, options, None, None)
        subset = decoder._subset_head(ids.device, options.sampling)
        # generator=None: dynamo cannot trace a torch.Generator argument (torch 2.14); the compiled step draws
        # from the default generator
        step = {"plain": lambda: decoder.plain_step(rows, state, options.sampling, None),
                "chain": lambda: decoder.speculative_step(rows, state, 3, options.sampling, None, subset),
                "tree": lambda: decoder.tree_step(rows, state, 3, options.sampling, None, subset)[:2]}[kind]
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        return step()


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("kind", STEPS)
@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_every_step_compiles_whole(family, kind, sampling):
    case = build(family, seed=0, batch=2)
    sharpen(case.model, 1, scale=0.1)
    accept_len, emitted = _run_step(case, kind, sampling, compiled=True)
    if not sampling:
        want_len, want_emitted = _run_step(case, kind, sampling, compiled=False)
        assert torch.equal(emitted, want_emitted)
        assert (accept_len is None and want_len is None) or torch.equal(accept_len, want_len)
        if kind != "plain":
            assert int(accept_len.max()) > 0       # the sharpened model keeps drafts: acceptance was exercised
    kept = emitted if accept_len is None else emitted.gather(1, accept_len.long()[:, None])
    assert ((kept >= 0) & (kept < case.model.get_output_embeddings().weight.shape[0])).all()


COMPILED = {"backend": "aot_eager"}      # compile_steps on the CPU: the same tracing as a CUDA capture, no graphs


@pytest.mark.parametrize("config", [dict(draft_len=3), dict(draft_len="adaptive"), dict(draft_len=0),
                                    dict(draft_len=3, tree="dynamic"), dict(draft_len=2, imitation=True)],
                         ids=["k3", "adaptive", "plain", "tree", "imitation"])
def test_generate_with_compiled_steps_is_identical(config):
    from fastvlm_kernels.imitation import ImitationNetwork
    case = build("qwen2_vl", seed=0, batch=2)
    sharpen(case.model, 1, scale=0.1)
    expected = case.model.generate(**case.inputs, max_new_tokens=16, do_sample=False)
    config = dict(config)
    if config.pop("imitation", False):
        torch.manual_seed(3)
        config["imitation"] = ImitationNetwork.from_model(case.model, exit_layer=1, kind="layers", num_layers=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, compile_steps=COMPILED, **config)
    for _ in range(2):                                  # the second call replays what the first compiled
        out = decoder.generate(**case.inputs, max_new_tokens=16)
        assert decoder.cuda_graphs_reason is None and torch.equal(out.sequences, expected)
    assert decoder._compiled, "nothing was compiled"


PIECES = pytest.mark.parametrize("config", [dict(draft_len=3), dict(draft_len="adaptive"), dict(draft_len=0),
                                            dict(draft_len=3, tree="dynamic"), dict(draft_len=2, imitation=True)],
                                 ids=["k3", "adaptive", "plain", "tree", "imitation"])
MODELS = pytest.mark.parametrize("family,batch", [("llama", 1), ("qwen2_vl", 2)], ids=["llama-b1", "qwen2_vl-b2"])


def _sharpened(family: str, batch: int, config: dict):
    """A test model whose exit after layer 1 keeps drafts, and the decoder's keywords (``imitation=True``: a
    one-layer network of its own); dynamo's caches emptied."""
    from fastvlm_kernels.imitation import ImitationNetwork
    case = build(family, seed=0, batch=batch)
    sharpen(case.model, 1, scale=0.1)
    config = dict(config)
    if config.pop("imitation", False):
        torch.manual_seed(3)
        config["imitation"] = ImitationNetwork.from_model(case.model, exit_layer=1, kind="layers", num_layers=1)
    torch._dynamo.reset()
    return case, config


class GraphLog:
    """A torch.compile backend that traces as aot_eager does and keeps, for every graph compiled, the graph's
    inputs that it writes in place without being static inputs: a CUDA graph refuses to capture such a graph
    ("skipping cudagraphs due to mutated inputs") and would copy a non-static input at every replay."""

    def __init__(self):
        self.graphs: list = []      # per graph: the names of its non-static inputs it writes

    def __call__(self, graph_module, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch._guards import TracingContext
        names = [node.name for node in graph_module.graph.nodes if node.op == "placeholder"]

        def forward_compiler(forward, inputs):
            metadata = TracingContext.try_get().fw_metadata
            static = set(metadata.static_input_indices)
            self.graphs.append([names[i] if i < len(names) else str(i) for i, info in enumerate(metadata.input_info)
                                if (info.mutates_data or info.mutates_metadata) and i not in static])
            return make_boxed_func(forward.forward)
        return aot_autograd(fw_compiler=forward_compiler)(graph_module, example_inputs)


@MODELS
@PIECES
def test_each_piece_compiles_once_and_writes_only_static_inputs(config, family, batch):
    """One graph per piece and shape, not one per step: a step's graph must not hold the cache's lengths (or
    anything else that changes every step) as constants, and may write in place only static inputs (the
    cache's buffer and lengths, marked so), which is what capturing it in a CUDA graph needs."""
    case, config = _sharpened(family, batch, config)
    log = GraphLog()
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, compile_steps={"backend": log}, **config)
    expected = case.model.generate(**case.inputs, max_new_tokens=24, do_sample=False)
    steps = 0
    for _ in range(2):          # the second call replays the first one's graphs: nothing new is compiled
        out = decoder.generate(**case.inputs, max_new_tokens=24)
        assert torch.equal(out.sequences, expected)
        steps += out.stats.steps + out.stats.plain_steps
        assert len(log.graphs) == len(decoder._compiled), "a piece was compiled more than once"
    if config.get("draft_len") != "adaptive":       # (adaptive's pieces depend on the policy's choices)
        assert steps > 2 * len(decoder._compiled) > 0, "too few steps to tell a graph per step from one per piece"
    assert all(not written for written in log.graphs), log.graphs


def test_compiled_steps_check_the_room_before_writing():
    """A compiled step's appends skip the cache's host-side check: the step checks first, and a full cache
    raises before anything is written."""
    case = build("llama", seed=0, batch=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2, compile_steps=COMPILED)
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    options, _ = resolve(case.model, ids, mask, {"max_new_tokens": 4})
    decoder._choose_compilation(options.sampling, None)
    decoder._processing = None
    with torch.no_grad(), attention_implementation(decoder._attention_configs()):
        decoder._prepare_lean()
        rows, state = decoder.prefill(ids, mask, {}, options, None, None)
        assert rows.cache.max_len >= 256           # compiled steps: the cache grows in powers of two
        cache = rows.cache
        cache.rollback_unchecked(torch.full((1,), cache.max_len - 2, dtype=torch.int32),
                                 [cache.max_len - 2])    # room for 2 positions, the step needs 3
        rows.lengths, rows.host_lengths = cache.lengths[0].clone(), [cache.max_len - 2]
        before = cache.buffer.clone()
        with pytest.raises(ValueError, match="the cache is full: appending T=3 positions"):
            decoder.speculative_step(rows, state, 2, options.sampling, None)
        assert torch.equal(cache.buffer, before) and cache.host_lengths[0] == [cache.max_len - 2]


@MODELS
@PIECES
def test_generate_with_captured_steps_is_identical(config, family, batch):
    """cuda_graphs' capture backend, emulated on the CPU with a capture's contract (inputs copied into the graph's
    own, static inputs read where they were captured, outputs overwritten at every replay): identical to
    model.generate over two calls, one capture per piece."""
    case, config = _sharpened(family, batch, config)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, **config)
    decoder.compile_steps = {"backend": decoder._capture}
    expected = case.model.generate(**case.inputs, max_new_tokens=24, do_sample=False)
    for _ in range(2):
        out = decoder.generate(**case.inputs, max_new_tokens=24)
        assert decoder.cuda_graphs_reason is None and torch.equal(out.sequences, expected)
    assert len(decoder._capture.graphs) == len(decoder._compiled) > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [dict(draft_len=3), dict(draft_len=3, tree="dynamic")], ids=["k3", "tree"])
def test_captured_steps_on_the_triton_backends(config, monkeypatch):
    """What a GPU without the compiled extension runs: every op on its Triton backend (here under the
    interpreter), traced through the Triton custom ops' fake implementations, replayed under the capture's
    contract: identical to model.generate."""
    import importlib
    if torch.cuda.is_available():
        pytest.skip("the interpreter tier runs without a GPU")
    for name in ("acceptance", "kv_cache", "lm_head", "verify_attention"):
        module = importlib.import_module(f"fastvlm_kernels.ops.{name}")
        monkeypatch.setitem(module.PRIORITY, "cpu", ("triton", "torch"))
    verify_attention = importlib.import_module("fastvlm_kernels.ops.verify_attention")
    monkeypatch.setitem(verify_attention.HOST_BOUND_PRIORITY, "cpu", ("triton", "torch"))
    case, config = _sharpened("qwen2_vl", 2, config)
    expected = case.model.generate(**case.inputs, max_new_tokens=12, do_sample=False)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, **config)
    decoder.compile_steps = {"backend": decoder._capture}
    for _ in range(2):
        out = decoder.generate(**case.inputs, max_new_tokens=12)
        assert decoder.cuda_graphs_reason is None and torch.equal(out.sequences, expected)
    assert len(decoder._compiled) == 2
    assert all(plan.backend.name == "triton" for plan in decoder._plans.values()), decoder._plans


def test_capture_contract():
    """GraphCapture's replays: non-static inputs are copied in, static ones read in place (a new address captures
    again), and the outputs are the same tensors, overwritten at every call."""
    from fastvlm_kernels.decoding.capture import GraphCapture
    backend = GraphCapture()
    state = torch.zeros(3)
    torch._dynamo.mark_static_address(state)

    def step(x):
        state.add_(x)
        return state * 2, x + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    first = compiled(torch.ones(3))
    kept = first[1]
    second = compiled(torch.full((3,), 2.0))
    assert second[1] is kept and torch.equal(kept, torch.full((3,), 3.0))      # overwritten in place
    assert torch.equal(state, torch.full((3,), 3.0)) and torch.equal(second[0], torch.full((3,), 6.0))
    assert len(backend.graphs) == 1 and sorted(backend.graphs[0].static) == [False, True]


def test_a_failed_capture_runs_eagerly_and_says_why(monkeypatch):
    from fastvlm_kernels.decoding import capture
    case = build("llama", seed=0, batch=1)
    sharpen(case.model, 1, scale=0.1)
    expected = case.model.generate(**case.inputs, max_new_tokens=16, do_sample=False)

    def fail(self, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(capture._Replay, "_capture", fail)
    torch._dynamo.reset()
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3)
    decoder.compile_steps = {"backend": decoder._capture}
    with pytest.warns(RuntimeWarning, match="capturing the (draft|verify)3 piece failed"):
        out = decoder.generate(**case.inputs, max_new_tokens=16)
    assert torch.equal(out.sequences, expected) and "operation not permitted" in decoder.cuda_graphs_reason
    out = decoder.generate(**case.inputs, max_new_tokens=16)       # later calls: eager, the reason kept
    assert torch.equal(out.sequences, expected) and "capturing the" in decoder.cuda_graphs_reason
    strict = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3, cuda_graphs=True)
    strict.compile_steps = {"backend": strict._capture}
    with pytest.raises(RuntimeError, match="operation not permitted"):
        strict.generate(**case.inputs, max_new_tokens=16)


def test_calls_that_cannot_be_compiled_run_eagerly_and_say_why():
    case = build("llama", seed=0, batch=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2, compile_steps=COMPILED)
    decoder.generate(**case.inputs, max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert "torch.Generator" in decoder.cuda_graphs_reason
    decoder.generate(**case.inputs, max_new_tokens=4, repetition_penalty=1.3)
    assert "logits processors" in decoder.cuda_graphs_reason
    decoder.generate(**case.inputs, max_new_tokens=4, do_sample=True)                 # the default generator
    assert decoder.cuda_graphs_reason is None
    plain = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)               # cuda_graphs="auto"
    plain.generate(**case.inputs, max_new_tokens=4)
    assert "not a CUDA device" in plain.cuda_graphs_reason and not plain._compiled
    with pytest.raises(ValueError, match="cuda_graphs=True: this call cannot be captured: the model is on cpu"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, cuda_graphs=True).generate(**case.inputs, max_new_tokens=4)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, cuda_graphs="yes")
    with pytest.raises(TypeError, match="compile_steps must be a dict"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, compile_steps="inductor")
