"""The ``fastvlm`` command: argparse over library functions only.

    fastvlm generate --model DIR [--image FILE] --prompt TEXT [--exit-layer E] [--imitation DIR]
                     [--draft-len K|adaptive] [--max-new-tokens N] [--sample --temperature T --top-k K --top-p P]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="Self-speculative decoding for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer one prompt (and image) with a local checkpoint, streamed")
    generate.add_argument("--model", type=Path, required=True, help="a local transformers checkpoint folder")
    generate.add_argument("--image", type=Path, help="an image file (VLMs)")
    generate.add_argument("--prompt", required=True, help="the prompt, formatted as the model expects")
    generate.add_argument("--exit-layer", type=int, help="E: the draft runs layers [0, E)")
    generate.add_argument("--imitation", type=Path, help="a trained imitation network's folder")
    generate.add_argument("--draft-len", type=_draft_len, default=4, help="k >= 0, or 'adaptive' (default 4)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
