"""Online distillation of an :class:`ImitationNetwork` from its frozen base model.

One training step (online: no stored corpus of hidden states or logits unless a teacher cache is given):

1. the frozen model runs once over a batch of prompt + response sequences (no gradient), through its own
   forward (vision tower, projector, positions) into its language model; forward hooks take the output of
   layer E-1 (the layer-E states the drafter sees), of layer ``target_layer - 1`` (the cosine target) and of
   the last layer (whose final norm and LM head give the full model's next-token logits), and a pre-hook
   takes the attention mask and rotary embeddings the backbone's layer E receives (:mod:`.teacher`);
2. the imitation network runs, with gradient, on the layer-E states with that same mask and those same
   rotary embeddings: its decoder layers use transformers' ordinary attention over the full sequence
   (causal), not the decoder's cache path;
3. the loss (:mod:`.losses`) over the positions whose next token is a response token; AdamW, warmup then
   cosine decay, gradient clipping, bf16 autocast on a GPU.

With a teacher cache (:mod:`.teacher_cache`) step 1 reads the frozen model's stored outputs instead of running
it: the forward then runs once per example for the whole run instead of once per example and epoch.

The backbone's parameters get ``requires_grad=False`` for the run (restored afterwards), so no gradient is
ever allocated for them and they end bit-identical. Every ``eval_every`` steps the real metric is measured:
the mean number of drafted tokens accepted per step by :class:`~fastvlm_kernels.SelfSpeculativeDecoder`
with the network, on a held-out split of the prompts (greedy, against the model's own answers).

The output folder holds ``run.json`` (what this run is: settings, model, data), ``responses.jsonl`` (the
model's generated answers, resumable), ``checkpoint.pt`` (network, optimizer, scheduler, step, RNG state,
history), ``history.json``, ``training_curves.png`` and ``imitation/`` (the trained network,
:meth:`ImitationNetwork.save_pretrained`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint, write_json
from .data import DataError, Encoder, Example, data_fingerprint, generate_responses, load_examples
from .losses import LossWeights, draft_logits, imitation_loss
from .network import ImitationNetwork, zero_output_projections
from .schedule import WarmupCosine
from .teacher import Taps, cached_teacher, model_fingerprint, teacher_forward
from .teacher_cache import TeacherCache

RUN_FORMAT = "fastvlm-imitation-run/1"
# Files a run writes in its folder (``--overwrite`` removes these and nothing else).
RUN_FILES = ("run.json", "checkpoint.pt", "responses.jsonl", "history.json", "training_curves.png", "imitation")
# Settings that change only what is measured or saved, not the trained weights: a resumed run may change them.
RESUMABLE_CHANGES = ("eval_every", "checkpoint_every", "eval_max_new_tokens", "draft_len", "progress")
# Settings added after runs were recorded without them: the value that matches what such a run did (prompts
# were always sent as written before raw_prompts existed; no run had the agreement term before it existed).
RECORDED_BEFORE = {"raw_prompts": True, "agreement_weight": 0.0, "inherit_draft_vocab": False}


DEFAULT_WARMUP_STEPS = 50       # the warm-up of a run of 500 steps or more, when none is given
WARMUP_FRACTION = 10            # ... and of a shorter run: a tenth of it (steps // 10), at least 1 step


@dataclass(frozen=True)
class TrainConfig:
    """One training run. CLI flags map to the fields of the same name (``--exit-layer`` -> ``exit_layer``).

    ``warmup_steps``: the linear warm-up of the learning rate. Left unset (None) it is
    ``min(50, max(1, steps // 10))``: 50 steps for a run of 500 steps or more, a tenth of a shorter run, so that
    a short run reaches its learning rate and spends most of its steps there; :meth:`check` fills it in (the
    run's record holds the value used). A value given is honoured as it is, with a warning from the trainer
    when it is not shorter than the run (the learning rate then never reaches ``lr``).

    ``raw_prompts``: the data lines' prompts go to the model as written (formatted by hand the way the model
    expects). False (the default): each prompt is the user's message of a one-turn chat, formatted with the
    model's chat template (its image in the message when the line has one), where the model has a template."""
    exit_layer: int
    target_layer: Optional[int] = None      # None: the last layer (N)
    layers: int = 1                         # decoder layers of the network (kind "layers")
    kind: str = "layers"                    # "layers" or "mlp"
    init_layer: Optional[int] = -1          # backbone layer the network's layers start from (-1: last; None: fresh)
    identity_init: bool = False             # zero the layers' output projections: start as plain early exit
    init_from: Optional[str] = None         # a saved network (save_pretrained folder) whose weights start the run
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None      # None: min(50, max(1, steps // 10)), see above
    min_lr_ratio: float = 0.1               # the cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    cosine_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    agreement_weight: float = 0.0           # > 0: add the cross-entropy against the full model's greedy token
    seed: int = 0
    eval_fraction: float = 0.1              # share of the prompts held out for the accepted-length metric
    max_eval_examples: int = 16
    eval_every: int = 100                   # 0: only at the start and the end
    eval_max_new_tokens: int = 32
    draft_len: int = 4                      # the decoder's k during evaluation
    checkpoint_every: int = 100             # 0: only at the end
    max_new_tokens: int = 128               # length of the generated responses
    max_response_tokens: Optional[int] = 256
    response_batch_size: int = 1            # prompts answered together by generate_responses (1: each alone)
    draft_vocab: int = 0                    # > 0: draft (and distil) over the S most frequent answer tokens
    inherit_draft_vocab: bool = False       # True: keep init_from's own draft vocabulary (fine-tuning on new data)
    skip_malformed: bool = False
    raw_prompts: bool = False               # True: data prompts as written, no chat template

    def resolved_warmup(self) -> int:
        """The warm-up used: ``warmup_steps`` when given, else ``min(50, max(1, steps // 10))``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(DEFAULT_WARMUP_STEPS, max(1, self.steps // WARMUP_FRACTION))

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.cosine_weight, self.kd_weight, self.temperature, self.agreement_weight)

    def check(self, num_layers: int) -> "TrainConfig":
        """Validates against an N-layer model and fills ``target_layer``; errors name the setting."""
        if isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int):
            raise TypeError(f"exit_layer must be an int, got {type(self.exit_layer).__name__}")
        if not 1 <= self.exit_layer < num_layers:
            raise ValueError(f"exit_layer={self.exit_layer} is out of range: this model has {num_layers} decoder "
                             f"layers (valid: 1..{num_layers - 1})")
        target = num_layers if self.target_layer is None else self.target_layer
        if target <= self.exit_layer:
            raise ValueError(f"exit_layer={self.exit_layer} must be below target_layer={target}: the network "
                             "imitates a deeper layer than the one it starts from")
        if target > num_layers:
            raise ValueError(f"target_layer={target} is out of range: this model has {num_layers} decoder layers "
                             f"(valid: {self.exit_layer + 1}..{num_layers})")
        if self.kind not in ("layers", "mlp"):
            raise ValueError(f"kind must be 'layers' or 'mlp', got {self.kind!r}")
        if self.layers < 0 or (self.kind == "layers" and self.layers == 0):
            raise ValueError(f"layers must be >= 1 for kind 'layers', got {self.layers}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(f"init_from={str(self.init_from)!r} holds no saved imitation network (no config.json)")
        if self.init_layer is not None and not -num_layers <= self.init_layer < num_layers:
            raise ValueError(f"init_layer={self.init_layer} is out of range for {num_layers} layers")
        for name in ("steps", "batch_size", "response_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be an int >= 0 (0: the whole vocabulary), got {self.draft_vocab!r}")
        if self.inherit_draft_vocab and (self.init_from is None or self.draft_vocab):
            raise ValueError("inherit_draft_vocab=True keeps init_from's draft vocabulary: it needs init_from and "
                             f"no draft_vocab of its own (init_from={self.init_from!r}, draft_vocab={self.draft_vocab})")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.draft_len < 1 or self.eval_max_new_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("draft_len, eval_max_new_tokens and max_new_tokens must be >= 1")
        self.loss_weights()
        return replace(self, target_layer=target, warmup_steps=self.resolved_warmup())


@dataclass
class EvalResult:
    step: int
    mean_accepted: float        # drafted tokens accepted per decoder step (the verifier's token not counted)
    steps: int                  # decoder steps measured
    seconds: float


@dataclass
class TrainResult:
    out_dir: Path
    network: ImitationNetwork
    config: TrainConfig
    history: List[dict]         # one entry per step: step, loss, cosine, kd, lr, grad_norm
    evals: List[EvalResult]     # the network's accepted length over training (step 0 = untrained)
    baseline: Optional[EvalResult]   # plain early exit (no network), same exit layer and draft length
    plot: Optional[Path]
    held_out: List[Example] = field(default_factory=list)   # the prompts the accepted length is measured on

    @property
    def final(self) -> Optional[EvalResult]:
        return self.evals[-1] if self.evals else None


# ---- evaluation ----------------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, encoder: Encoder, examples: Sequence[Example], exit_layer: int,
             network: Optional[ImitationNetwork], *, draft_len: int, max_new_tokens: int, step: int = 0) -> EvalResult:
    """Mean drafted tokens accepted per step of the decoder (greedy) over ``examples``' prompts, one at a time."""
    from ..decoding import SelfSpeculativeDecoder
    start = time.perf_counter()
    device = next(model.parameters()).device
    decoder = SelfSpeculativeDecoder(model, exit_layer=exit_layer, imitation=network, draft_len=draft_len)
    accepted: List[int] = []
    for example in examples:
        inputs = {name: value.to(device) for name, value in encoder.prompt_inputs(example).items()}
        out = decoder.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        accepted.extend(a for row in out.stats.accepted for a in row)
    mean = sum(accepted) / len(accepted) if accepted else 0.0
    return EvalResult(step=step, mean_accepted=mean, steps=len(accepted), seconds=time.perf_counter() - start)


def _inference_copy(network: ImitationNetwork, dtype: torch.dtype) -> ImitationNetwork:
    """The network in the model's dtype, in eval mode, for the decoder (training keeps fp32 weights)."""
    if next(network.parameters(), torch.empty(0)).dtype == dtype:
        copy_ = network
    else:
        copy_ = copy.deepcopy(network).to(dtype)
    return copy_.eval()


# ---- the output folder ----------------------------------------------------------------------------------------------


def _run_record(config: TrainConfig, model: nn.Module, data_dir: Path) -> dict:
    return {"format": RUN_FORMAT, "config": asdict(config), "model": model_fingerprint(model),
            "data": data_fingerprint(data_dir)}


def _differences(old: dict, new: dict) -> List[str]:
    found = []
    for section in ("config", "model", "data"):
        before, after = old.get(section, {}), new.get(section, {})
        if section == "config":
            before = dict(RECORDED_BEFORE, **before)
        for key in sorted(set(before) | set(after)):
            if section == "config" and key in RESUMABLE_CHANGES:
                continue
            if before.get(key) != after.get(key):
                found.append(f"{section}.{key}: {before.get(key)!r} there, {after.get(key)!r} here")
    return found


def prepare_out_dir(out_dir: Path, record: dict, *, resume: bool, overwrite: bool,
                    say: Callable[[str], None]) -> bool:
    """Makes ``out_dir`` ready for this run; returns True when a checkpoint of this run is to be resumed.
    A folder holding another run, or anything else, is refused unless ``overwrite`` (which removes the files
    a run writes and nothing else); a folder holding this run needs ``resume`` (or ``overwrite``)."""
    if resume and overwrite:
        raise ValueError("pass --resume or --overwrite, not both")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    run_file = out_dir / "run.json"
    if overwrite:
        for name in RUN_FILES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except ValueError:
            raise ValueError(f"--out {out_dir}: run.json is unreadable; pass --overwrite to start again") from None
        differences = _differences(old, record)
        if differences:
            raise ValueError(f"--out {out_dir} already holds a different run ({'; '.join(differences)}); choose "
                             "another folder, or pass --overwrite to replace it")
        if not resume:
            raise ValueError(f"--out {out_dir} already holds this run; pass --resume to continue it or --overwrite "
                             "to start again")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir} is not empty and holds no imitation run; choose an empty folder, or pass "
                         "--overwrite to write into it anyway")
    elif resume:
        say(f"nothing to resume in {out_dir}: starting a new run")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, record)
    return resume and (out_dir / "checkpoint.pt").exists()


def _split(examples: List[Example], config: TrainConfig):
    """(train, held-out) by a seeded permutation; the held-out prompts measure the accepted length."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    num_eval = min(config.max_eval_examples, max(1, round(config.eval_fraction * len(examples))))
    if config.eval_fraction == 0:
        num_eval = 0
    if len(examples) - num_eval < 1:
        raise DataError(f"{len(examples)} example(s) cannot be split into training and held-out prompts; "
                        "give more data or --eval-fraction 0")
    held_out = sorted(order[:num_eval])
    train = sorted(order[num_eval:])
    return [examples[i] for i in train], [examples[i] for i in held_out]


class _BatchOrder:
    """Batch ``s`` = positions [s*B, (s+1)*B) of a stream of per-epoch permutations seeded by (seed, epoch): a
    pure function of the step, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epochs: Dict[int, List[int]] = {}

    def _permutation(self, epoch: int) -> List[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch]

    def __call__(self, step: int) -> List[int]:
        start = step * self.batch_size
        return [self._permutation(p // self.size)[p % self.size] for p in range(start, start + self.batch_size)]


# ---- the run -------------------------------------------------------------------------------------------------------


def train_imitation(model: nn.Module, processor, data_dir: Path, out_dir: Path, config: TrainConfig, *,
                    resume: bool = False, overwrite: bool = False, progress: bool = True,
                    responses_cache: Optional[Path] = None, teacher_cache: Optional[Path] = None,
                    teacher_exit_layers: Optional[Sequence[int]] = None,
                    callback: Optional[Callable[[int, dict], None]] = None,
                    stop_after: Optional[int] = None) -> TrainResult:
    """Trains an imitation network for ``model`` (frozen) on the prompts in ``data_dir``, writing to ``out_dir``.

    ``processor``: the model's processor (VLMs) or tokenizer (text models). ``responses_cache``: where the
    model's generated answers are kept (default ``out_dir/responses.jsonl``; runs on the same model and data
    may share one). ``teacher_cache``: a folder where the frozen model's outputs over the training examples
    are stored once (:class:`~fastvlm_kernels.imitation.teacher_cache.TeacherCache`, built or completed first)
    and read by every step instead of running the model (runs with the same model, target layer and data may
    share one; a cache holding several exit layers serves a run at any of them). ``teacher_exit_layers``: the
    exit layers a new teacher cache stores (an exit-layer sweep builds it once; default: the run's own; it must
    include it). ``callback(step, logs)`` is called after every optimizer step. ``stop_after``: stop (with
    a checkpoint) after this many steps of this call, as an interruption would; the schedule stays that of
    ``config.steps``.
    """
    from tqdm.auto import tqdm
    from ..decoding.adapters import adapter_for

    def say(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stderr)

    def warn(message: str) -> None:   # what the user should know even without a progress display
        if progress:
            tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    adapter = adapter_for(model)
    given_warmup = config.warmup_steps
    config = config.check(adapter.num_layers)
    if given_warmup is not None and given_warmup >= config.steps:
        warn(f"warning: the warm-up ({given_warmup} steps) is not shorter than the run ({config.steps} steps): the "
             f"learning rate never reaches lr={config.lr:g}; leave --warmup-steps unset for a tenth of the run")
    elif given_warmup is None and config.warmup_steps < DEFAULT_WARMUP_STEPS:
        say(f"warm-up: {config.warmup_steps} step(s), a tenth of this {config.steps}-step run")
    encoder = Encoder(processor, max_response_tokens=config.max_response_tokens, chat_template=not config.raw_prompts)
    if not config.raw_prompts and not encoder.uses_chat_template:
        warn("note: the model has no chat template: the data prompts go to it as written")
    examples = load_examples(data_dir, skip_malformed=config.skip_malformed, image_token=encoder.image_token,
                             allow_images=encoder.takes_images, warn=say if progress else (lambda message: None),
                             chat_template=encoder.uses_chat_template)
    preformatted = encoder.preformatted(examples)
    if preformatted:
        raise DataError(f"{len(preformatted)} of {len(examples)} prompts already start with the model's chat "
                        f"template ({preformatted[0].source}: {preformatted[0].prompt[:40]!r}...), which would "
                        "wrap them again; pass --raw-prompts (TrainConfig.raw_prompts=True) to send them as "
                        "written, or give the user's messages alone")
    train_examples, eval_examples = _split(examples, config)
    record = _run_record(config, model, data_dir)
    resuming = prepare_out_dir(out_dir, record, resume=resume, overwrite=overwrite, say=say)

    with frozen(model):
        generate_responses(model, encoder, train_examples, responses_cache or out_dir / "responses.jsonl",
                           max_new_tokens=config.max_new_tokens, fingerprint=record["model"], progress=progress,
                           batch_size=config.response_batch_size, warn=warn)
        cache = None
        if teacher_cache is not None:
            # reads train_examples in their order afterwards (stored ones are found by identity, the rest built)
            exit_layers = [config.exit_layer] if not teacher_exit_layers else list(teacher_exit_layers)
            if config.exit_layer not in exit_layers:
                raise ValueError(f"teacher_exit_layers {exit_layers} must include the run's exit_layer "
                                 f"{config.exit_layer}")
            cache = TeacherCache.build(model, encoder, train_examples, teacher_cache, exit_layer=exit_layers,
                                       target_layer=config.target_layer, model_fingerprint=record["model"],
                                       batch_size=config.batch_size, say=say, progress=progress)
        return _train(model, adapter, encoder, config, train_examples, eval_examples, out_dir, resuming,
                      progress=progress, say=say, callback=callback, stop_after=stop_after, cache=cache)


@contextlib.contextmanager
def frozen(model: nn.Module):
    """The backbone for the duration of the block: eval mode, ``requires_grad=False`` on every parameter (so
    no gradient is ever allocated for it); the caller's flags and mode come back afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    was_training = model.training
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def draft_vocab_for(model, adapter, train_examples: Sequence[Example], encoder: Encoder, size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens of the training answers, plus the model's EOS ids: sorted int64."""
    from ..ops.lm_head import vocab_subset_from_counts
    from .data import _eos_ids
    vocab_size = adapter.lm_head.weight.shape[0]
    if size > vocab_size:
        raise ValueError(f"draft_vocab={size} is larger than the model's vocabulary ({vocab_size})")
    ids = [token for example in train_examples for token in encoder.response_ids(example)]
    eos = torch.tensor(_eos_ids(model), dtype=torch.int64)
    return vocab_subset_from_counts(torch.tensor(ids, dtype=torch.int64), vocab_size, size,
                                    always_include=eos if eos.numel() else None)


def _start_from(network: ImitationNetwork, saved: ImitationNetwork, folder) -> None:
    """Copies a saved network's weights into a freshly built one of the same shape (its draft vocabulary is
    not copied: the run chooses its own from its data). A saved network of fewer decoder layers *grows*: its
    layers become the first ones and each added layer starts as the identity (its attention output and MLP down
    projections zeroed), so the grown network drafts exactly as the saved one before its first step."""
    mine, theirs = network.config, saved.config
    for key in ("exit_layer", "target_layer", "kind"):
        if getattr(mine, key) != getattr(theirs, key):
            raise ValueError(f"init_from={str(folder)!r} holds a network with {key}={getattr(theirs, key)!r}, "
                             f"this run builds {key}={getattr(mine, key)!r}")
    grows = mine.kind == "layers" and theirs.num_layers < mine.num_layers
    if mine.num_layers != theirs.num_layers and not grows:
        raise ValueError(f"init_from={str(folder)!r} holds a network with num_layers={theirs.num_layers}, this run "
                         f"builds num_layers={mine.num_layers} (a network can grow from fewer layers, not shrink)")
    state = {name: tensor for name, tensor in saved.state_dict().items() if name != "_draft_vocab"}
    if not grows:
        network.load_state_dict(state)
        return
    missing, unexpected = network.load_state_dict(state, strict=False)
    added = tuple(f"layers.{i}." for i in range(theirs.num_layers, mine.num_layers))
    if unexpected or any(not name.startswith(added) and name != "_draft_vocab" for name in missing):
        raise ValueError(f"init_from={str(folder)!r}: its weights do not fit this run's first "
                         f"{theirs.num_layers} layer(s) (missing {missing}, unexpected {unexpected})")
    for layer in network.layers[theirs.num_layers:]:
        zero_output_projections(layer)


def _train(model, adapter, encoder: Encoder, config: TrainConfig, train_examples: List[Example],
           eval_examples: List[Example], out_dir: Path, resuming: bool, *, progress: bool,
           say: Callable[[str], None], callback, stop_after: Optional[int], cache=None) -> TrainResult:
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    model_dtype = adapter.norm.weight.dtype
    torch.manual_seed(config.seed)
    network = ImitationNetwork.from_model(model, config.exit_layer, num_layers=config.layers, kind=config.kind,
                                          target_layer=config.target_layer, init_layer=config.init_layer,
                                          identity_init=config.identity_init)
    vocab = None
    if config.init_from is not None:
        saved = ImitationNetwork.from_pretrained(config.init_from, model)
        _start_from(network, saved, config.init_from)
        say(f"starting from the network in {config.init_from}")
        if config.inherit_draft_vocab:
            if saved.draft_vocab is None:
                raise ValueError(f"inherit_draft_vocab=True: the network in init_from={config.init_from!r} drafts "
                                 "over the whole vocabulary (nothing to inherit; leave it False)")
            vocab = saved.draft_vocab.to(device)
            network.set_draft_vocab(vocab)
            say(f"drafting over its own {vocab.numel()}-token draft vocabulary")
    if config.draft_vocab:
        vocab = draft_vocab_for(model, adapter, train_examples, encoder, config.draft_vocab).to(device)
        network.set_draft_vocab(vocab)
        say(f"drafting over the {vocab.numel()} most frequent answer tokens (of {adapter.lm_head.weight.shape[0]})")
    network = network.to(device=device, dtype=torch.float32).requires_grad_(True).train()
    parameters = [p for p in network.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    history: List[dict] = []
    evals: List[EvalResult] = []
    baseline: Optional[EvalResult] = None
    step = 0
    checkpoint_path = out_dir / "checkpoint.pt"
    if resuming:
        state = load_checkpoint(checkpoint_path)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        history = list(state["history"])
        evals = [EvalResult(**entry) for entry in state["evals"]]
        baseline = EvalResult(**state["baseline"]) if state["baseline"] is not None else None
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        say(f"resuming {out_dir} at step {step} of {config.steps}")

    def checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {"step": step, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": history, "evals": [asdict(e) for e in evals],
                 "baseline": asdict(baseline) if baseline is not None else None, "rng": rng}
        save_checkpoint(checkpoint_path, state)
        write_json(out_dir / "history.json", {"steps": history, "evals": [asdict(e) for e in evals],
                                               "baseline": asdict(baseline) if baseline is not None else None})

    def run_eval() -> None:
        nonlocal baseline
        if not eval_examples:
            return
        options = dict(draft_len=config.draft_len, max_new_tokens=config.eval_max_new_tokens, step=step)
        if baseline is None:
            baseline = evaluate(model, encoder, eval_examples, config.exit_layer, None, **options)
            say(f"plain early exit at layer {config.exit_layer}: {baseline.mean_accepted:.3f} accepted per step")
        result = evaluate(model, encoder, eval_examples, config.exit_layer, _inference_copy(network, model_dtype),
                          **options)
        network.train()
        evals.append(result)
        say(f"step {step}: {result.mean_accepted:.3f} drafted tokens accepted per step "
            f"(plain early exit {baseline.mean_accepted:.3f})")

    batch_order = _BatchOrder(len(train_examples), config.batch_size, config.seed)
    taps = Taps(adapter.layers, config.exit_layer, config.target_layer)
    weights = config.loss_weights()
    use_autocast = device.type == "cuda"
    last_step = config.steps if stop_after is None else min(config.steps, step + stop_after)
    if step == 0 and not evals:
        run_eval()
    # made after the initial evaluation, so that its rate (and the time left it shows) counts training alone
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="imitation", file=sys.stderr,
               dynamic_ncols=True)
    try:
        while step < last_step:
            if cache is None:
                batch = encoder.collate([train_examples[i] for i in batch_order(step)]).to(device)
                teacher = teacher_forward(adapter, taps, batch, vocab)
                loss_mask = batch.loss_mask
            else:
                teacher, loss_mask = cached_teacher(adapter, cache, batch_order(step), vocab, model_dtype, device,
                                                    exit_layer=config.exit_layer)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
                hidden = teacher.exit_states if use_autocast else teacher.exit_states.float()
                output = network(hidden, teacher.position_embeddings, attention_mask=teacher.attention_mask)
                selected = output[loss_mask]                                              # [M, H]
                draft = (draft_logits(selected, adapter.norm, adapter.lm_head, vocab) if weights.needs_draft_logits
                         else None)
            terms = imitation_loss(selected.float(), teacher.targets, draft, teacher.logits, weights)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip) if config.grad_clip > 0 else \
                torch.sqrt(sum((p.grad.float() ** 2).sum() for p in parameters if p.grad is not None))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            logs = {"step": step, "loss": float(terms.total.detach()), "cosine": float(terms.cosine.detach()),
                    "kd": float(terms.kd.detach()), "agreement": float(terms.agreement.detach()), "lr": lr,
                    "grad_norm": float(grad_norm)}
            history.append(logs)
            bar.update(1)
            bar.set_postfix_str(f"loss {logs['loss']:.4f} cos {1 - logs['cosine']:.4f} lr {lr:.2e}", refresh=False)
            if callback is not None:
                callback(step, logs)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                run_eval()
                bar.unpause()   # the evaluation's time is not training time: left out of the rate
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < last_step:
                checkpoint()
        if step == config.steps and (not evals or evals[-1].step != step):
            run_eval()
        checkpoint()
    finally:
        bar.close()

    plot = None
    if step == config.steps:
        final = _inference_copy(network, model_dtype)
        final.save_pretrained(out_dir / "imitation", base_model=model)
        plot = plot_curves(history, evals, baseline, out_dir / "training_curves.png", warn=say)
        network = final
    return TrainResult(out_dir=out_dir, network=network, config=config, history=history, evals=evals,
                       baseline=baseline, plot=plot, held_out=eval_examples)


def plot_curves(history: List[dict], evals: List[EvalResult], baseline: Optional[EvalResult], path: Path,
                warn: Callable[[str], None] = print) -> Optional[Path]:
    """Loss terms, learning rate and accepted length over the steps, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn(f"matplotlib is not installed: no plot written ({path}); history.json holds the curves")
        return None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [entry["step"] for entry in history]
    axes[0].plot(steps, [entry["loss"] for entry in history], label="total")
    axes[0].plot(steps, [entry["cosine"] for entry in history], label="cosine (1 - cos)")
    axes[0].plot(steps, [entry["kd"] for entry in history], label="distillation (KL)")
    if any(entry.get("agreement", 0.0) for entry in history):
        axes[0].plot(steps, [entry.get("agreement", 0.0) for entry in history], label="agreement (CE to greedy)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [entry["lr"] for entry in history])
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    axes[2].plot([e.step for e in evals], [e.mean_accepted for e in evals], marker="o", label="imitation network")
    if baseline is not None:
        axes[2].axhline(baseline.mean_accepted, color="gray", linestyle="--", label="plain early exit")
    axes[2].set_xlabel("step")
    axes[2].set_title("held-out: drafted tokens accepted per step")
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
