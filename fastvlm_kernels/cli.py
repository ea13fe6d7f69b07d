"""The ``fastvlm`` command: argparse over library functions only.

    fastvlm generate --model DIR [--image FILE] --prompt TEXT [--exit-layer E] [--imitation DIR]
                     [--draft-len K|adaptive] [--max-new-tokens N] [--sample --temperature T --top-k K --top-p P]
                     [--tp-plan auto]     (tensor parallel, under torchrun --nproc_per_node R -m fastvlm_kernels.cli)
    fastvlm train-imitation --model DIR --data DIR --exit-layer E --out DIR [--target-layer T] [--layers n]
                     [--kind layers|mlp] [--steps N] [--resume | --overwrite] [...]
    fastvlm pick-exit-layer --model DIR --data DIR --out DIR [--candidates 2,4,6] [--steps N] [...]

A user's mistake is reported in one line, ``fastvlm: <what is wrong, naming the option>``, exit status 1, no
traceback: before the model is loaded wherever the check needs no model (an empty prompt, a missing folder or
file, an image file PIL cannot read, out-of-range values), after loading for the checks that need it (an exit
layer out of range for this model, a network trained for another model). Only the library's argument errors
(a ``ValueError`` / ``TypeError`` raised by one of its checks) are reported so; any other error keeps its
traceback, as does every error with ``--debug`` (or ``FASTVLM_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import json
import linecache
import os
import re
import sys
from pathlib import Path
from typing import Dict, NoReturn, Optional, Sequence


def _fail(message: str) -> NoReturn:
    """Ends the command with ``fastvlm: <message>`` on stderr (exit status 1)."""
    raise SystemExit(f"fastvlm: {message}")


def _raised_by_a_check(error: BaseException) -> bool:
    """True when ``error`` comes from a ``raise`` statement (a check that refuses an argument), not from an
    operation that failed inside the code (``None - 1``, a bad index): only the former is a user's mistake."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    line = linecache.getline(traceback.tb_frame.f_code.co_filename, traceback.tb_lineno)
    return line.strip().startswith("raise")


def _as_flags(message: str, flags: Dict[str, str]) -> str:
    """The library's argument names in ``message`` as this command's flags: ``name=value`` -> ``--name value``
    for every flag, a bare snake_case ``name`` -> ``--name`` (a plain word such as "model" is left alone)."""
    for dest, flag in sorted(flags.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-]){dest}=", f"{flag} ", message)
        if "_" in dest:
            message = re.sub(rf"(?<![\w-]){dest}\b", flag, message)
    return message


class _ArgumentErrors:
    """``with _ArgumentErrors(args):`` around library calls: a ``ValueError`` / ``TypeError`` raised by one of
    the library's checks ends the command with its message on one line (names mapped to flags); anything else,
    and everything with ``--debug``, propagates with its traceback. ``loading``: around loading ``--model``,
    where an ``OSError`` a check raises (a file the checkpoint lacks) is the user's mistake too, and the
    message names the folder."""

    def __init__(self, args, loading: bool = False):
        self.args, self.loading = args, loading

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        kinds = (ValueError, TypeError, OSError) if self.loading else (ValueError, TypeError)
        if error is None or not isinstance(error, kinds):
            return False
        if _debug(self.args) or not _raised_by_a_check(error):
            return False
        message = str(error).strip()
        if not _is_listing(error):
            message = " ".join(part.strip() for part in message.splitlines())
        if self.loading:
            message = f"--model {self.args.model} cannot be loaded: {message}"
        _fail(_as_flags(message, getattr(self.args, "flags", {})))


def _is_listing(error: BaseException) -> bool:
    """A data error listing its lines (``file:line: reason`` one a line) keeps its lines."""
    from .imitation import DataError
    return isinstance(error, DataError) and "\n  " in str(error)


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("FASTVLM_DEBUG") == "1"


# ---- checks that need no model -----------------------------------------------------------------------------------


def _checkpoint_config(model_dir: Path) -> dict:
    """``--model``'s config.json as a dict, or a one-line error: no such folder, not a folder, no or an
    unreadable config.json."""
    if not model_dir.exists():
        _fail(f"--model {model_dir}: no such folder")
    if not model_dir.is_dir():
        _fail(f"--model {model_dir} is not a folder")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        _fail(f"--model {model_dir} holds no config.json: not a transformers checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        _fail(f"--model {model_dir}: config.json is unreadable ({error})")
    if not isinstance(config, dict):
        _fail(f"--model {model_dir}: config.json is not a JSON object")
    return config


def _num_layers(model_dir: Path) -> Optional[int]:
    """The checkpoint's decoder layer count (its text model's, for a VLM) from its config, without loading
    weights; None when the config does not say."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        _fail(f"--model {model_dir}: its config cannot be read by transformers ({' '.join(str(error).split())})")
    value = getattr(config.get_text_config(), "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def _open_image(path: Path):
    """``--image`` as an RGB PIL image, checked (``Image.verify``) before any model is loaded."""
    from PIL import Image
    if not path.exists():
        _fail(f"--image {path}: no such file")
    if not path.is_file():
        _fail(f"--image {path} is not a file")
    try:
        with Image.open(path) as handle:
            handle.verify()
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = "not an image file PIL can read" if isinstance(error, Image.UnidentifiedImageError) else \
            f"unreadable as an image ({' '.join(str(error).split())})"
        _fail(f"--image {path}: {reason}")


def _check_network_folder(flag: str, folder: Optional[Path]) -> None:
    if folder is None:
        return
    if not Path(folder).is_dir():
        _fail(f"{flag} {folder}: no such folder")
    if not (Path(folder) / "config.json").is_file():
        _fail(f"{flag} {folder} holds no saved imitation network (no config.json)")


def _check_launch(args) -> None:
    """``--tp-plan`` against the launch: it needs torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), and
    a launch of several processes needs it (each would otherwise load and run the whole model)."""
    launched = [name for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if name in os.environ]
    if args.tp_plan is not None and len(launched) < 3:
        _fail(f"--tp-plan {args.tp_plan} shards the model over the processes of a torchrun launch: run "
              f"`torchrun --nproc_per_node R -m fastvlm_kernels.cli generate ... --tp-plan {args.tp_plan}` "
              f"(RANK, LOCAL_RANK and WORLD_SIZE are not all set)")
    world_size = os.environ.get("WORLD_SIZE", "1")
    if args.tp_plan is None and world_size.isdigit() and int(world_size) > 1:
        _fail(f"this is one of {world_size} processes (WORLD_SIZE={world_size}) but --tp-plan is not given: each "
              f"would load and run the whole model; pass --tp-plan auto to shard it over them")


def _check_generate_arguments(args):
    """Everything ``generate`` can check without the model; returns ``--image`` opened (or None)."""
    _check_launch(args)
    if not args.prompt.strip():
        _fail("--prompt is empty")
    if args.max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.exit_layer is not None and args.exit_layer < 1:
        _fail(f"--exit-layer must be >= 1 (the draft runs layers [0, E)), got {args.exit_layer}")
    if args.exit_layer is None and args.imitation is None:
        _fail("give --exit-layer (or --imitation, whose config records one)")
    if args.sample:
        if not args.temperature > 0:
            _fail(f"--temperature must be > 0 with --sample, got {args.temperature}")
        if args.top_k is not None and args.top_k < 1:
            _fail(f"--top-k must be >= 1, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            _fail(f"--top-p must be in (0, 1], got {args.top_p}")
    config = _checkpoint_config(args.model)
    _check_network_folder("--imitation", args.imitation)
    if args.image is None:
        return None
    image = _open_image(args.image)
    if "vision_config" not in config:
        _fail(f"--image given but {args.model} is a text-only model (its config has no vision_config)")
    return image


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


def load_local(model_dir: Path, dtype: str = "auto", tp_plan: Optional[str] = None):
    """(model, processor or tokenizer) from a local transformers checkpoint, offline. ``tp_plan``: passed to
    ``from_pretrained`` ("auto": sharded by the model's tensor-parallel plan over the processes of a torchrun
    launch; transformers starts the process group, NCCL where there is a GPU, gloo on CPUs)."""
    import torch
    import transformers

    if not model_dir.is_dir():
        _fail(f"--model {model_dir} is not a folder")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    is_vlm = hasattr(config, "vision_config")
    loader = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    sharding = {} if tp_plan is None else {"tp_plan": tp_plan}
    model = loader.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype, **sharding).eval()
    if is_vlm:
        processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, processor


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def cmd_generate(args) -> int:
    image = _check_generate_arguments(args)

    import torch

    with _ArgumentErrors(args, loading=True):
        model, processor = load_local(args.model, args.dtype, args.tp_plan)
    try:
        return _generate(args, model, processor, image)
    finally:
        if args.tp_plan is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _generate(args, model, processor, image) -> int:
    """``generate`` on the loaded model. Tensor parallel: every rank runs the same calls and emits the same
    tokens; rank 0 alone prints them (and the notes and the summary)."""
    import torch
    from transformers import TextStreamer

    from .decoding import SelfSpeculativeDecoder
    from .imitation import ImitationNetwork
    from .imitation.data import chat_template_of, prompt_inputs

    speaks = args.tp_plan is None or torch.distributed.get_rank() == 0
    if image is not None and not hasattr(processor, "image_processor"):
        _fail(f"--image given but {args.model} is a text-only model (its processor takes no images)")
    templated = not args.raw and chat_template_of(processor) is not None
    image_token = getattr(processor, "image_token", None) if hasattr(processor, "image_processor") else None
    if templated and image is not None and image_token and image_token in args.prompt:
        _fail(f"--prompt holds the image placeholder {image_token!r}, which the chat template places itself; "
              "remove it, or pass --raw to send the prompt as written")
    with _ArgumentErrors(args):
        inputs = prompt_inputs(processor, args.prompt, image, chat_template=templated)
        inputs = {name: value.to(model.device) for name, value in inputs.items()}   # sharded on GPUs: this rank's
        imitation = ImitationNetwork.from_pretrained(args.imitation, model) if args.imitation else None
        exit_layer = args.exit_layer if args.exit_layer is not None else imitation.config.exit_layer
        decoder = SelfSpeculativeDecoder(model, exit_layer=exit_layer, imitation=imitation,
                                         draft_len=args.draft_len)
        if not args.raw and not templated and speaks:
            print(f"fastvlm: note: {args.model} has no chat template: the prompt goes to the model as written",
                  file=sys.stderr)
        streamer = TextStreamer(_tokenizer_of(processor), skip_prompt=True, skip_special_tokens=True) \
            if speaks else None
        options = dict(max_new_tokens=args.max_new_tokens, streamer=streamer)
        if args.sample:   # tensor parallel: rank 0's stream on every rank (the decoder shares it)
            generator = torch.Generator(device=model.device).manual_seed(args.seed)
            options.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           generator=generator)
        else:
            options.update(do_sample=False)
        out = decoder.generate(**inputs, **options)
    if speaks:
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
    parser.add_argument("--inherit-draft-vocab", action="store_true",
                        help="with --init-from: draft over that network's own draft vocabulary (not --draft-vocab)")
    parser.add_argument("--identity-init", action="store_true",
                        help="zero the layers' output projections: the untrained network drafts as plain early exit")
    for name, kind, text in (
            ("steps", int, "optimizer steps"), ("batch_size", int, "sequences per step"), ("lr", float, "peak learning rate"),
            ("weight_decay", float, "AdamW weight decay"),
            ("min_lr_ratio", float, "the cosine decay ends at lr * this"), ("grad_clip", float, "max gradient norm (0: off)"),
            ("cosine_weight", float, "weight of the cosine loss"), ("kd_weight", float, "weight of the distillation loss"),
            ("temperature", float, "distillation temperature"),
            ("agreement_weight", float, "weight of the cross-entropy against the full model's greedy token (0: off)"),
            ("seed", int, "seed of the data order and fresh weights"),
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
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="linear warm-up steps (default: a tenth of the run, at most 50; a value given is kept, "
                             "with a warning when it is not shorter than the run)")
    parser.add_argument("--skip-malformed", action="store_true", help="skip malformed JSONL lines instead of failing")
    parser.add_argument("--raw-prompts", action="store_true",
                        help="send the data lines' prompts as written (formatted by hand the way the model "
                             "expects, image placeholder included) instead of as user messages in the model's "
                             "chat template")
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
        temperature=args.temperature, agreement_weight=args.agreement_weight, seed=args.seed,
        eval_fraction=args.eval_fraction,
        max_eval_examples=args.max_eval_examples, eval_every=args.eval_every,
        eval_max_new_tokens=args.eval_max_new_tokens, draft_len=args.draft_len,
        checkpoint_every=args.checkpoint_every, max_new_tokens=args.max_new_tokens,
        max_response_tokens=args.max_response_tokens, response_batch_size=args.response_batch_size,
        draft_vocab=args.draft_vocab, inherit_draft_vocab=args.inherit_draft_vocab,
        skip_malformed=args.skip_malformed, raw_prompts=args.raw_prompts)


def _check_training_arguments(args, exit_layers: Optional[Sequence[int]]) -> None:
    """Everything train-imitation and pick-exit-layer can check without loading the model: the folders, and
    the settings (:meth:`TrainConfig.check`, for each exit layer; None: pick-exit-layer's default candidates)
    against the layer count the checkpoint's config gives."""
    from dataclasses import replace

    from .imitation.data import jsonl_files
    from .imitation.exit_layer import default_candidates
    _checkpoint_config(args.model)
    with _ArgumentErrors(args):
        jsonl_files(args.data)
    if args.out.exists() and not args.out.is_dir():
        _fail(f"--out {args.out} exists and is not a folder")
    _check_network_folder("--init-from", None if args.init_from is None else Path(args.init_from))
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda (or cuda:N), got {args.device!r}")
    num_layers = _num_layers(args.model)
    if num_layers is None:
        return
    with _ArgumentErrors(args):
        config = _train_config(args, exit_layer=1)
        for exit_layer in exit_layers if exit_layers is not None else default_candidates(num_layers):
            replace(config, exit_layer=exit_layer).check(num_layers)


def _load_for_training(args):
    import torch
    with _ArgumentErrors(args, loading=True):
        model, processor = load_local(args.model, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), processor


def cmd_train_imitation(args) -> int:
    from .imitation import train_imitation
    _check_training_arguments(args, [args.exit_layer])
    model, processor = _load_for_training(args)
    with _ArgumentErrors(args):
        result = train_imitation(model, processor, args.data, args.out, _train_config(args, args.exit_layer),
                                 resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                                 responses_cache=args.responses_cache, teacher_cache=args.teacher_cache)
    if result.final is not None and result.baseline is not None:
        print(f"exit layer {result.config.exit_layer}: {result.final.mean_accepted:.2f} drafted tokens accepted per "
              f"step with the network, {result.baseline.mean_accepted:.2f} with plain early exit "
              f"(held-out prompts, draft length {result.config.draft_len})")
    print(f"imitation network: {result.out_dir / 'imitation'}")
    return 0


def cmd_pick_exit_layer(args) -> int:
    from .imitation import pick_exit_layer
    from .imitation.exit_layer import format_table
    if args.candidates is not None and not args.candidates:
        _fail("--candidates names no exit layer")
    if args.eval_fraction <= 0:
        _fail(f"--eval-fraction must be > 0: pick-exit-layer measures on held-out prompts, got {args.eval_fraction}")
    _check_training_arguments(args, args.candidates)
    model, processor = _load_for_training(args)
    with _ArgumentErrors(args):
        config = _train_config(args, exit_layer=1)
        reports = pick_exit_layer(model, processor, args.data, args.out, config, args.candidates,
                                  resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
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


def _flags_of(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> ``--flag`` for each long option of a command (the library's argument of the same name)."""
    return {action.dest: action.option_strings[-1] for action in parser._actions
            if action.option_strings and action.option_strings[-1].startswith("--") and action.dest != "help"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="Self-speculative decoding for VLMs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of any error (also FASTVLM_DEBUG=1); without it a mistake in the "
                             "arguments is one line")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", parents=[common], help="answer one prompt (and image) with a local checkpoint, streamed")
    generate.add_argument("--model", type=Path, required=True, help="a local transformers checkpoint folder")
    generate.add_argument("--image", type=Path, help="an image file (VLMs)")
    generate.add_argument("--prompt", required=True,
                          help="the user's message: sent in the model's chat template (the processor's or the "
                               "tokenizer's; with --image, the image is in the message and the template places "
                               "its placeholder), or as written with --raw or when the model has no template "
                               "(a note says so)")
    generate.add_argument("--raw", action="store_true",
                          help="send --prompt as written, formatted by hand the way the model expects (with "
                               "--image, holding the processor's image placeholder)")
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
    generate.add_argument("--tp-plan", choices=("auto",), default=None,
                          help="tensor parallel: 'auto' loads the model sharded by its tensor-parallel plan over "
                               "the processes of `torchrun --nproc_per_node R -m fastvlm_kernels.cli generate ...` "
                               "(NCCL on GPUs, gloo on CPUs); every rank decodes, rank 0 prints")
    generate.set_defaults(handler=cmd_generate, flags=_flags_of(generate))

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

    train = commands.add_parser("train-imitation", parents=[common], help="train an imitation network for a local checkpoint")
    _add_training_arguments(train, with_exit_layer=True)
    train.set_defaults(handler=cmd_train_imitation, flags=_flags_of(train))

    pick = commands.add_parser("pick-exit-layer", parents=[common],
                               help="train briefly at a few exit layers and report accepted length and speedup")
    _add_training_arguments(pick, with_exit_layer=False, steps=200, eval_every=0)
    pick.add_argument("--candidates", type=_candidates, default=None,
                      help="comma-separated exit layers (default: about N/8, N/4, 3N/8, N/2)")
    # each candidate is checked as the exit layer of a run: "--candidates 9 is out of range ..."
    pick.set_defaults(handler=cmd_pick_exit_layer, flags=dict(_flags_of(pick), exit_layer="--candidates"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
