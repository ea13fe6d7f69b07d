"""The ``fastvlm`` command: argparse over library functions only.

    fastvlm generate --model DIR [--image FILE] --prompt TEXT [--exit-layer E] [--imitation DIR]
                     [--draft-len K|adaptive] [--max-new-tokens N] [--sample --temperature T --top-k K --top-p P]
    fastvlm train-imitation --model DIR --data DIR --exit-layer E --out DIR [--target-layer T] [--layers n]
                     [--kind layers|mlp] [--steps N] [--resume | --overwrite] [...]
    fastvlm pick-exit-layer --model DIR --data DIR --out DIR [--candidates 2,4,6] [--steps N] [...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _draft_len(value: str):
    if value == "adaptive":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--draft-len must be an int >= 0 or 'adaptive', got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"--draft-len must be >= 0, got {number}")
    return number


def load_local(model_dir: Path, dtype: str = "auto"):
    """(model, processor or tokenizer) from a local transformers checkpoint, offline."""
    import torch
    import transformers

    if not model_dir.is_dir():
        raise SystemExit(f"fastvlm: --model {model_dir} is not a folder")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    is_vlm = hasattr(config, "vision_config")
    loader = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    model = loader.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype).eval()
    if is_vlm:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, processor


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .decoding import SelfSpeculativeDecoder
    from .imitation import ImitationNetwork

    model, processor = load_local(args.model, args.dtype)
    if args.image is not None:
        from PIL import Image
        if not hasattr(processor, "image_processor"):
            raise SystemExit(f"fastvlm: --image given but {args.model} is a text-only model")
        image = Image.open(args.image).convert("RGB")
        inputs = processor(images=image, text=args.prompt, return_tensors="pt")
    else:
        inputs = processor(text=args.prompt, return_tensors="pt") if hasattr(processor, "image_processor") \
            else processor(args.prompt, return_tensors="pt")
    inputs = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
    imitation = ImitationNetwork.from_pretrained(args.imitation, model) if args.imitation else None
    exit_layer = args.exit_layer if args.exit_layer is not None else (
        imitation.config.exit_layer if imitation is not None else None)
    if exit_layer is None:
        raise SystemExit("fastvlm: give --exit-layer (or --imitation, whose config records one)")
    decoder = SelfSpeculativeDecoder(model, exit_layer=exit_layer, imitation=imitation, draft_len=args.draft_len)
    streamer = TextStreamer(_tokenizer_of(processor), skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=args.max_new_tokens, streamer=streamer)
    if args.sample:
        generator = torch.Generator().manual_seed(args.seed)
        options.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       generator=generator)
    else:
        options.update(do_sample=False)
    out = decoder.generate(**inputs, **options)
    print(out.stats.summary(), file=sys.stderr)
    return 0


# ---- train-imitation, pick-exit-layer --------------------------------------------------------------------------------


def _init_layer(value: str):
    if value == "fresh":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--init-layer must be a layer index or 'fresh', got {value!r}") from None


def _candidates(value: str):
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--candidates must be comma-separated layer indices, got {value!r}") from None


def _add_training_arguments(parser: argparse.ArgumentParser, with_exit_layer: bool, **overrides) -> None:
    """One flag per TrainConfig field, of the same name (``overrides``: other defaults for this command)."""
    from dataclasses import replace

    from .imitation import TrainConfig
    defaults = replace(TrainConfig(exit_layer=1), **overrides)
    parser.add_argument("--model", type=Path, required=True, help="a local transformers checkpoint folder")
    parser.add_argument("--data", type=Path, required=True,
                        help="a folder of images and .jsonl files of prompts (and optional responses)")
    parser.add_argument("--out", type=Path, required=True, help="the run's output folder")
    if with_exit_layer:
        parser.add_argument("--exit-layer", type=int, required=True, help="E: the network starts from layer E's input")
    parser.add_argument("--target-layer", type=int, help="the layer whose output is imitated (default: the last)")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers in the network (default 1)")
    parser.add_argument("--kind", choices=("layers", "mlp"), default=defaults.kind)
    parser.add_argument("--init-layer", type=_init_layer, default=defaults.init_layer,
                        help="backbone layer the network's layers start from (default -1: the last), or 'fresh'")
    parser.add_argument("--init-from", type=str, default=None,
                        help="start from the weights of a saved network (a run's imitation/ folder): fine-tuning")
    parser.add_argument("--identity-init", action="store_true",
                        help="zero the layers' output projections: the untrained network drafts as plain early exit")
    for name, kind, text in (
            ("steps", int, "optimizer steps"), ("batch_size", int, "sequences per step"), ("lr", float, "peak learning rate"),
            ("weight_decay", float, "AdamW weight decay"), ("warmup_steps", int, "linear warmup steps"),
            ("min_lr_ratio", float, "the cosine decay ends at lr * this"), ("grad_clip", float, "max gradient norm (0: off)"),
            ("cosine_weight", float, "weight of the cosine loss"), ("kd_weight", float, "weight of the distillation loss"),
            ("temperature", float, "distillation temperature"), ("seed", int, "seed of the data order and fresh weights"),
            ("eval_fraction", float, "share of the prompts held out to measure the accepted length"),
            ("max_eval_examples", int, "at most this many held-out prompts"),
            ("eval_every", int, "measure the accepted length every N steps (0: start and end only)"),
            ("eval_max_new_tokens", int, "tokens generated per held-out prompt"),
            ("draft_len", int, "the decoder's draft length k when measuring"),
            ("checkpoint_every", int, "save a checkpoint every N steps (0: at the end only)"),
            ("max_new_tokens", int, "length of the model's generated responses"),
            ("response_batch_size", int, "prompts answered together when generating responses (1: each alone)"),
            ("max_response_tokens", int, "truncate responses to this many tokens"),
            ("draft_vocab", int, "draft over the N most frequent answer tokens (0: the whole vocabulary)")):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help=f"{text} (default {getattr(defaults, name)})")
    parser.add_argument("--skip-malformed", action="store_true", help="skip malformed JSONL lines instead of failing")
    if with_exit_layer:
        parser.add_argument("--responses-cache", type=Path, default=None,
                            help="where the model's generated answers are kept (default: <out>/responses.jsonl; "
                                 "runs on the same model and data may share one)")
        parser.add_argument("--teacher-cache", type=Path, default=None,
                            help="store the model's outputs over the training examples in this folder once and "
                                 "train from them (no model forward per step; ~(4 H + 2 R) bytes a token, H the "
                                 "width, R the rotary table per token)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run already in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args, exit_layer: int):
    from .imitation import TrainConfig
    return TrainConfig(
        exit_layer=exit_layer, target_layer=args.target_layer, layers=args.layers, kind=args.kind,
        init_layer=args.init_layer, identity_init=args.identity_init, init_from=args.init_from, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip, cosine_weight=args.cosine_weight, kd_weight=args.kd_weight,
        temperature=args.temperature, seed=args.seed, eval_fraction=args.eval_fraction,
        max_eval_examples=args.max_eval_examples, eval_every=args.eval_every,
        eval_max_new_tokens=args.eval_max_new_tokens, draft_len=args.draft_len,
        checkpoint_every=args.checkpoint_every, max_new_tokens=args.max_new_tokens,
        max_response_tokens=args.max_response_tokens, response_batch_size=args.response_batch_size,
        draft_vocab=args.draft_vocab, skip_malformed=args.skip_malformed)


def _load_for_training(args):
    import torch
    model, processor = load_local(args.model, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), processor


def cmd_train_imitation(args) -> int:
    from .imitation import DataError, train_imitation
    model, processor = _load_for_training(args)
    try:
        result = train_imitation(model, processor, args.data, args.out, _train_config(args, args.exit_layer),
                                 resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                                 responses_cache=args.responses_cache, teacher_cache=args.teacher_cache)
    except (ValueError, TypeError, DataError) as error:
        raise SystemExit(f"fastvlm: {error}") from None
    if result.final is not None and result.baseline is not None:
        print(f"exit layer {result.config.exit_layer}: {result.final.mean_accepted:.2f} drafted tokens accepted per "
              f"step with the network, {result.baseline.mean_accepted:.2f} with plain early exit "
              f"(held-out prompts, draft length {result.config.draft_len})")
    print(f"imitation network: {result.out_dir / 'imitation'}")
    return 0


def cmd_pick_exit_layer(args) -> int:
    from .imitation import DataError, pick_exit_layer
    from .imitation.exit_layer import format_table
    model, processor = _load_for_training(args)
    try:
        config = _train_config(args, exit_layer=1)
        reports = pick_exit_layer(model, processor, args.data, args.out, config, args.candidates,
                                  resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, TypeError, DataError) as error:
        raise SystemExit(f"fastvlm: {error}") from None
    print(format_table(reports, config.draft_len))
    return 0


def cmd_demo(args) -> int:
    """New scenes answered by model.generate and by the decoder: both answers (identical), accepted tokens per
    step and the speedup; ``--save DIR`` writes the images and a markdown report."""
    import time

    import torch

    from .decoding import SelfSpeculativeDecoder
    from .models import tiny

    torch.set_num_threads(args.threads)
    try:
        model, processor = tiny.load(args.model)
    except FileNotFoundError as error:
        raise SystemExit(f"fastvlm demo: {error}") from None
    imitation = None
    exit_layer = args.exit_layer or tiny.EXIT_LAYER
    if not args.no_imitation:
        try:
            name = tiny.IMITATION_NETWORKS.get(exit_layer, "imitation")
            folder = None if args.model is None else Path(args.model) / name
            imitation = tiny.load_imitation(model, folder, exit_layer=args.exit_layer)
            exit_layer = imitation.config.exit_layer
        except FileNotFoundError as error:
            print(f"fastvlm demo: {str(error).split(':')[0]}; drafting with plain early exit", file=sys.stderr)
        except ValueError as error:  # no network shipped for --exit-layer
            print(f"fastvlm demo: {error}; drafting with plain early exit", file=sys.stderr)
    decoder = SelfSpeculativeDecoder(model, exit_layer=exit_layer, imitation=imitation, draft_len=args.draft_len)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    tokenizer = _tokenizer_of(processor)
    rows = []
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    for index in range(args.scenes):
        seed = args.seed + index
        image, prompt = tiny.scene(seed)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        if index == 0:   # warm-up, not timed
            model.generate(**inputs, **options)
            decoder.generate(**inputs, **options)
        start = time.perf_counter()
        expected = model.generate(**inputs, **options)
        generate_s = time.perf_counter() - start
        out = decoder.generate(**inputs, **options)
        prompt_len = inputs["input_ids"].shape[1]
        answer = tokenizer.decode(expected[0, prompt_len:], skip_special_tokens=True).strip()
        ours = tokenizer.decode(out.sequences[0, prompt_len:], skip_special_tokens=True).strip()
        identical = torch.equal(out.sequences, expected)
        speedup = generate_s / out.stats.total_time
        truth = tiny.answer(seed)
        rows.append(dict(seed=seed, prompt=prompt, answer=answer, ours=ours, identical=identical,
                         accepted=out.stats.mean_accepted, speedup=speedup, truth=truth))
        print(f"[{index + 1}/{args.scenes}] scene {seed}: {prompt!r}\n  generate: {answer}\n  decoder:  {ours}\n"
              f"  (the scene's true answer: {truth})\n"
              f"  identical: {'yes' if identical else 'NO'}; {out.stats.mean_accepted:.2f} drafted tokens accepted "
              f"per step; {speedup:.2f}x model.generate", flush=True)
        if args.save is not None:
            image.save(args.save / f"scene-{seed}.png")
    mean_speedup = sum(row["speedup"] for row in rows) / len(rows)
    print(f"mean speedup {mean_speedup:.2f}x, {sum(row['identical'] for row in rows)}/{len(rows)} identical "
          f"(exit layer {exit_layer}, {'imitation network' if imitation is not None else 'plain early exit'}, "
          f"draft_len={args.draft_len})")
    if args.save is not None:
        lines = ["# fastvlm demo", "", f"exit layer {exit_layer}, "
                 f"{'imitation network' if imitation is not None else 'plain early exit'}, draft_len={args.draft_len}",
                 "", "| scene | prompt | answer (generate) | true answer | identical | accepted / step | speedup |",
                 "|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| ![](scene-{row['seed']}.png) | {row['prompt']} | {row['answer']} | {row['truth']} | "
                         f"{'yes' if row['identical'] else 'NO'} | {row['accepted']:.2f} | {row['speedup']:.2f}x |")
        (args.save / "report.md").write_text("\n".join(lines) + "\n")
        print(f"report: {args.save / 'report.md'}")
    return 0 if all(row["identical"] for row in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="Self-speculative decoding for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer one prompt (and image) with a local checkpoint, streamed")
    generate.add_argument("--model", type=Path, required=True, help="a local transformers checkpoint folder")
    generate.add_argument("--image", type=Path, help="an image file (VLMs)")
    generate.add_argument("--prompt", required=True, help="the prompt, formatted as the model expects")
    generate.add_argument("--exit-layer", type=int, help="E: the draft runs layers [0, E)")
    generate.add_argument("--imitation", type=Path, help="a trained imitation network's folder")
    generate.add_argument("--draft-len", type=_draft_len, default="adaptive",
                          help="'adaptive' (the default: each step's k chosen from the measured step costs and "
                               "the acceptance so far; 0 where drafting does not pay), or a fixed k >= 0")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=cmd_generate)

    demo = commands.add_parser("demo", help="the embedded tiny VLM: model.generate against the decoder on new scenes")
    demo.add_argument("--scenes", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--draft-len", type=_draft_len, default=8)
    demo.add_argument("--exit-layer", type=int,
                      help="default: the exit the tiny VLM was trained to draft from (3); its shipped imitation "
                           "network is used (exit layers 3 and 1 have one)")
    demo.add_argument("--no-imitation", action="store_true", help="draft with plain early exit")
    demo.add_argument("--max-new-tokens", type=int, default=80)
    demo.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this model)")
    demo.add_argument("--model", type=Path, help="another build of the tiny VLM (default: the shipped one)")
    demo.add_argument("--save", type=Path, help="write the scenes and a markdown report here")
    demo.set_defaults(handler=cmd_demo)

    train = commands.add_parser("train-imitation", help="train an imitation network for a local checkpoint")
    _add_training_arguments(train, with_exit_layer=True)
    train.set_defaults(handler=cmd_train_imitation)

    pick = commands.add_parser("pick-exit-layer",
                               help="train briefly at a few exit layers and report accepted length and speedup")
    _add_training_arguments(pick, with_exit_layer=False, steps=200, eval_every=0)
    pick.add_argument("--candidates", type=_candidates, default=None,
                      help="comma-separated exit layers (default: about N/8, N/4, 3N/8, N/2)")
    pick.set_defaults(handler=cmd_pick_exit_layer)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
