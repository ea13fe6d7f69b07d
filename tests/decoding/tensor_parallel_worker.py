"""One rank of the tensor-parallel tests (tests/decoding/test_tensor_parallel.py): run as
``python -m tests.decoding.tensor_parallel_worker SPEC OUT`` with torch.distributed's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one process per rank.

SPEC is a JSON list of runs: a model folder saved by the test (``model_class``, ``inputs.pt``), the decoder's
arguments and the generate keywords. Each model is loaded once with ``from_pretrained(folder, tp_plan=...)``
(gloo, one thread). OUT gets, per run, this rank's tokens, its collectives per step and how the model was
sharded here, or the ``ValueError`` the decoder's construction raised.
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
