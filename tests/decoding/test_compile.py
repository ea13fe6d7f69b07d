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
