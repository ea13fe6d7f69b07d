"""One rank of the tensor-parallel tests (tests/decoding/test_tensor_parallel.py): run as
``python -m tests.decoding.tensor_parallel_worker SPEC OUT`` with torch.distributed's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one process per rank.

SPEC is a JSON list of runs: a model folder saved by the test (``model_class``, ``inputs.pt``), the decoder's
arguments and the generate keywords. Each model is loaded once with ``from_pretrained(folder, tp_plan=...)``
(gloo, one thread). OUT gets, per run, this rank's tokens, its collectives per step and how the model was
sharded here, or the ``ValueError`` the decoder's construction raised.

A run with ``samples`` (``rounds``, ``rows``) samples instead: ``rounds`` calls over ``rows`` copies of the
prompt, through one ``torch.Generator`` seeded ``seed + 1000 * rank`` (the decoder must draw rank 0's stream
on every rank), and returns the new tokens of every row; ``broken`` ("accept_everything", "no_residual")
replaces the acceptance rule by a wrong one the test must catch.
"""
from __future__ import annotations

import datetime
import json
import sys

import torch


def _load(folder: str, model_class: str, tp_plan):
    import transformers
    model = getattr(transformers, model_class).from_pretrained(folder, tp_plan=tp_plan)
    return model.eval()


def decoder_arguments(spec: dict) -> dict:
    """The decoder's keyword arguments from their JSON form (a tree's paths as tuples, draft_vocab a tensor)."""
    arguments = dict(spec)
    if isinstance(arguments.get("tree"), list):
        arguments["tree"] = [tuple(path) for path in arguments["tree"]]
    if "draft_vocab" in arguments:
        arguments["draft_vocab"] = torch.tensor(arguments["draft_vocab"])
    return arguments


def _run(run: dict, model, plain_model, rank: int) -> dict:
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.imitation import ImitationNetwork

    imitation = None
    if "smollm2" in run:     # SmolLM2-135M-Instruct and its shipped network (loaded on the sharded model)
        from fastvlm_kernels.models import smollm2
        model, tokenizer = model
        inputs = dict(smollm2.chat_inputs(tokenizer, run["smollm2"]))
        imitation = smollm2.load_imitation(model)
    else:
        inputs = torch.load(f"{run['folder']}/inputs.pt")
    if run.get("imitation") and imitation is None:
        imitation = ImitationNetwork.from_model(plain_model, run["exit_layer"], num_layers=1, init_layer=-1).eval()
    try:
        decoder = SelfSpeculativeDecoder(model, run["exit_layer"], imitation,
                                         **decoder_arguments(run.get("decoder", {})))
    except ValueError as error:
        return {"error": str(error)}
    keywords = dict(run.get("generate", {}))
    if "samples" in run:
        return _sample(run, decoder, inputs, keywords, rank)
    if "seed" in run:     # a different seed on every rank: the decoder must draw rank 0's stream everywhere
        torch.manual_seed(run["seed"] + 1000 * rank)
    out = decoder.generate(**inputs, **keywords)
    attention = decoder.adapter.layers[0].self_attn
    return {"tokens": out.sequences.tolist(), "step_collectives": out.stats.step_collectives,
            "step_draft_lens": out.stats.step_draft_lens, "lean": decoder.lean_reason is None,
            "mean_accepted": out.stats.mean_accepted,
            "cache_kv_heads": decoder._cache.num_kv_heads, "embedding_sharded": decoder._parallel.embedding_sharded,
            "local_kv_rows": attention.k_proj.weight.to_local().shape[0],
            "local_head_rows": decoder.adapter.lm_head.weight.to_local().shape[0]
            if hasattr(decoder.adapter.lm_head.weight, "to_local") else None}


def _accept_everything(drafts, draft_probs, target_probs, generator=None):
    """A wrong acceptance rule: every draft kept, the bonus token drawn from the last position's target."""
    batch, k = drafts.shape
    bonus = torch.multinomial(target_probs[:, k], 1, generator=generator)
    return torch.full((batch,), k, dtype=torch.int32, device=drafts.device), torch.cat([drafts, bonus], 1)


def _accept_without_residual(drafts, draft_probs, target_probs, generator=None):
    """A wrong acceptance rule: draft d_i kept with probability min(1, p_i(d_i) / q_i(d_i)) as it should be,
    but the token after the first rejection drawn from the target p instead of the residual max(p - q, 0)."""
    batch, k = drafts.shape
    target = target_probs[:, :k].gather(2, drafts[:, :, None])[..., 0]           # [B, k] p_i(d_i)
    draft = draft_probs.gather(2, drafts[:, :, None])[..., 0]                    # [B, k] q_i(d_i)
    uniforms = torch.rand(batch, k, generator=generator, dtype=target.dtype)
    accept_len = (uniforms * draft <= target).int().cumprod(1).sum(1)           # [B]
    last = target_probs[torch.arange(batch), accept_len.long()]                  # [B, V] p at the first rejection
    tokens = torch.cat([drafts, torch.multinomial(last, 1, generator=generator)], 1)
    tokens[torch.arange(batch), accept_len.long()] = tokens[:, k]
    return accept_len.int(), tokens


BROKEN_ACCEPTANCE = {"accept_everything": _accept_everything, "no_residual": _accept_without_residual}


def _sample(run: dict, decoder, inputs: dict, keywords: dict, rank: int) -> dict:
    """``rounds`` sampling calls over ``rows`` copies of the prompt: every row's new tokens, and how many
    drafted tokens the steps kept (both acceptance and rejection must have run)."""
    import fastvlm_kernels.decoding.decoder as chain

    rounds, rows = run["samples"]["rounds"], run["samples"]["rows"]
    batch = {name: value.repeat(rows, *([1] * (value.dim() - 1))) for name, value in inputs.items()}
    prompt_len = batch["input_ids"].shape[1]
    generator = torch.Generator().manual_seed(run["seed"] + 1000 * rank)
    real = chain.accept_sampling_plan
    if run.get("broken"):
        rule = BROKEN_ACCEPTANCE[run["broken"]]

        class Broken:       # the decoder's accept_sampling plan, replaced by the wrong rule
            def __init__(self, *args, **kwargs):
                pass

            def run(self, drafts, draft_probs, target_probs, generator=None, **_):
                return rule(drafts, draft_probs, target_probs, generator)
        chain.accept_sampling_plan = Broken
    samples, kept, drafted = [], 0, 0
    try:
        for _ in range(rounds):
            out = decoder.generate(**batch, **keywords, generator=generator)
            samples += out.sequences[:, prompt_len:].tolist()
            kept += sum(a for step in out.stats.accepted for a in step)
            drafted += out.stats.drafted
    finally:
        chain.accept_sampling_plan = real
    return {"samples": samples, "kept": kept, "drafted": drafted}


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    # ranks that diverge (a bug) wait on each other's collectives: fail in a minute instead of hanging
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with open(spec_path) as f:
        runs = json.load(f)
    results, models = [], {}
    for run in runs:
        key = (run.get("folder"), json.dumps(run.get("tp_plan", "auto")))
        if key not in models:
            models.clear()        # the runs of one model are consecutive: keep one loaded at a time
            if "smollm2" in run:
                from fastvlm_kernels.models import smollm2
                models[key] = smollm2.load(tp_plan=run.get("tp_plan", "auto"))
            else:
                models[key] = _load(run["folder"], run["model_class"], run.get("tp_plan", "auto"))
        plain = _load(run["folder"], run["model_class"], None) if run.get("imitation") and "smollm2" not in run \
            else None
        results.append(_run(run, models[key], plain, rank))
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
