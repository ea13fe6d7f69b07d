"""The recipe of the embedded tiny VLM: tokenizer, processor, model config, data and the joint training phase.

A program, not part of the package (which keeps only what loading and inference need: the configuration, the
prompt format and the scenes, ``fastvlm_kernels.models.tiny``). ``python/build_tiny_vlm.py`` is the command
line over :func:`train`; the tests load this file (``tests.helpers.load_program``) and run the same functions
on a reduced model for a few steps. Everything is deterministic from ``TinyConfig.seed``: example i of the run
is scene ``i`` with question seed ``i`` whatever the batch it lands in, so a resumed run sees the same data.
The learning-rate schedule and the checkpoint files are the imitation trainer's
(:mod:`fastvlm_kernels.imitation.schedule`, :mod:`fastvlm_kernels.imitation.checkpoint`).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.imitation.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fastvlm_kernels.imitation.schedule import WarmupCosine  # noqa: E402
from fastvlm_kernels.models.tiny import scenes  # noqa: E402
from fastvlm_kernels.models.tiny.config import HELD_OUT_SEED, TinyConfig, prompt_for  # noqa: E402

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
BUCKET_STEPS = 8
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
                 "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> {% else %}"
                 "{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: {% for item in message['content'] %}"
                 "{{ item['text'] }}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:"
                 "{% endif %}")


# ---- tokenizer and processor -------------------------------------------------------------------------------------

def build_tokenizer():
    """A word-level tokenizer over the scene grammar's words (``▁word``) and punctuation, wrapped as a
    transformers ``PreTrainedTokenizerFast``; decoding restores the text exactly (spaces before words only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: Dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in scenes.vocabulary():
        vocab[word if not word.isalnum() else "\u2581" + word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(behavior="isolated"),
                                                       pre_tokenizers.Metaspace(prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    # lstrip: the space before <image> belongs to the image token, so "USER: <image> how" has no stray "▁".
    tokenizer.add_special_tokens([AddedToken(token, special=True, lstrip=token == IMAGE, normalized=False)
                                  for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                             special_tokens=[(BOS, vocab[BOS])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=UNK, extra_special_tokens={"image_token": IMAGE},
                                      padding_side="left", model_max_length=512)
    return wrapped


def build_processor(config: TinyConfig):
    """A ``LlavaProcessor``: the PIL CLIP image processor at the scenes' size and the tokenizer; ``<image>`` expands to
    one token per patch (the CLS feature is dropped, ``vision_feature_select_strategy="default"``)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = scenes.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def num_image_tokens(config: TinyConfig) -> int:
    return (scenes.IMAGE_SIZE // config.patch_size) ** 2


# ---- model -------------------------------------------------------------------------------------------------------

def build_model(config: TinyConfig, processor):
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    if config.hidden_size % config.num_heads or config.hidden_size // config.num_heads != 64:
        raise ValueError(f"head dim must be 64: hidden_size {config.hidden_size} / num_heads {config.num_heads}")
    if num_image_tokens(config) != scenes.GRID * scenes.GRID:
        raise ValueError(f"patch_size must make one image token per grid cell ({scenes.IMAGE_SIZE // scenes.GRID}), "
                         f"got {config.patch_size}")
    if not 1 <= config.exit_layer < config.num_layers:
        raise ValueError(f"exit_layer must be in [1, {config.num_layers - 1}], got {config.exit_layer}")
    vision = CLIPVisionConfig(hidden_size=config.vision_hidden_size, intermediate_size=config.vision_intermediate_size,
                              num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                              image_size=scenes.IMAGE_SIZE, patch_size=config.patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                       num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=64,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                        vision_feature_select_strategy="default", vision_feature_layer=-1,
                        projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=80, do_sample=False)
    return model


# ---- data --------------------------------------------------------------------------------------------------------

def example(index: int, kind: Optional[str] = None, kinds: Optional[tuple] = None):
    """(image, question, answer) of training example ``index`` (held-out examples: index >= HELD_OUT_SEED);
    ``kinds``: the question families it may draw from (the grounding phase)."""
    scene = scenes.make_scene(index)
    turn = scenes.make_turn(scene, index, kind, kinds)
    return scenes.render(scene), turn.question, turn.answer


def step_kinds(config: TinyConfig, step: int) -> Optional[tuple]:
    """The question families of training step ``step``: the grounding ones early in the joint phase. Decided
    per block of BUCKET_STEPS steps (the block's first step), since a block's examples are sorted together."""
    step -= step % BUCKET_STEPS
    if step < config.vision_warmup_steps + config.count_steps:
        return ("count_all",)
    if step < config.vision_warmup_steps + config.count_steps + config.grounding_steps:
        return scenes.GROUNDING_KINDS
    return None


def example_length(tokenizer, index: int, kinds: Optional[tuple] = None) -> int:
    """Tokens of training example ``index`` beyond its image and chat tokens (question + answer), from the
    scene's ground truth alone (no rendering)."""
    scene = scenes.make_scene(index)
    turn = scenes.make_turn(scene, index, None, kinds)
    return len(tokenizer(" " + turn.question + " " + turn.answer, add_special_tokens=False)["input_ids"])


_BLOCK_CACHE: dict = {}


def batch_indices(config: TinyConfig, tokenizer, step: int) -> List[int]:
    """The examples of training step ``step``: the examples of a block of BUCKET_STEPS steps are sorted by
    length and cut into batches (less padding: answers run from 5 to 60 tokens), which the block visits in a
    seeded order. A pure function of (config, step), so a resumed run sees the same batches."""
    block, position = divmod(step, BUCKET_STEPS)
    kinds = step_kinds(config, step)
    key = (config.batch_size, config.seed, block, kinds)
    if key not in _BLOCK_CACHE:
        first = block * BUCKET_STEPS * config.batch_size
        pool = sorted(range(first, first + BUCKET_STEPS * config.batch_size),
                      key=lambda index: (example_length(tokenizer, index, kinds), index))
        order = random.Random(f"block-{config.seed}-{block}").sample(range(BUCKET_STEPS), BUCKET_STEPS)
        _BLOCK_CACHE.clear()
        _BLOCK_CACHE[key] = [pool[i * config.batch_size:(i + 1) * config.batch_size] for i in order]
    return _BLOCK_CACHE[key][position]


def encode_batch(processor, indices: List[int], kinds: Optional[tuple] = None) -> dict:
    """Right-padded training batch: input_ids, attention_mask, pixel_values, labels (-100 except the answer and
    its EOS, which follow the prompt exactly as generation continues it)."""
    tokenizer = processor.tokenizer
    rows, images = [], []
    for index in indices:
        image, question, answer = example(index, kinds=kinds)
        prompt = processor(images=image, text=prompt_for(question), return_tensors="pt")
        prompt_ids = prompt["input_ids"][0].tolist()
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, answer_ids))
        images.append(prompt["pixel_values"][0])
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt_ids, answer_ids) in enumerate(rows):
        ids = prompt_ids + answer_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(prompt_ids):len(ids)] = torch.tensor(answer_ids)
        attention_mask[row, :len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.stack(images), labels=labels)


# ---- losses ------------------------------------------------------------------------------------------------------

def joint_loss(model, batch: dict, exit_layer: int, exit_loss_weight: float):
    """Next-token loss of the full model plus ``exit_loss_weight`` times the loss of an exit after layer
    ``exit_layer - 1`` read out through the model's own final norm and LM head. Returns (loss, final loss,
    exit loss, exit-vs-final top-1 agreement on the answer tokens)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    language_model = model.model.language_model
    exit_hidden = out.hidden_states[exit_layer]            # output of layer exit_layer - 1, before the final norm
    exit_logits = model.lm_head(language_model.norm(exit_hidden))
    targets = labels[:, 1:]
    mask = targets != -100
    final_logits = out.logits[:, :-1][mask].float()
    early_logits = exit_logits[:, :-1][mask].float()
    final_loss = F.cross_entropy(final_logits, targets[mask])
    exit_loss = F.cross_entropy(early_logits, targets[mask])
    agreement = (early_logits.argmax(-1) == final_logits.argmax(-1)).float().mean()
    return final_loss + exit_loss_weight * exit_loss, final_loss.detach(), exit_loss.detach(), agreement.detach()


class VisionProbe(torch.nn.Module):
    """Linear heads that read each image token's grid cell (class 0: empty cell) from the projector's output."""

    ATTRIBUTES = (("colour", tuple(scenes.COLOURS)), ("kind", scenes.KINDS), ("size", tuple(scenes.SIZES)),
                  ("texture", scenes.TEXTURES))

    def __init__(self, hidden_size: int, cells: bool = False):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden_size, len(values) + 1)
                                          for name, values in self.ATTRIBUTES})
        if cells:
            # which cell the token is (0..8, empty or not): the features carry their own grid position, so that
            # a text query ("the top left", "the next shape") could find its token by content
            self.heads["cell"] = torch.nn.Linear(hidden_size, scenes.GRID * scenes.GRID)

    @classmethod
    def labels(cls, indices: List[int]) -> Dict[str, torch.Tensor]:
        """[B, 9] class per grid cell (row-major, the order of the patch tokens) for training examples ``indices``."""
        cells = scenes.GRID * scenes.GRID
        out = {name: torch.zeros(len(indices), cells, dtype=torch.long) for name, _ in cls.ATTRIBUTES}
        out["cell"] = torch.arange(cells).expand(len(indices), cells).clone()
        for row, index in enumerate(indices):
            for shape in scenes.make_scene(index).shapes:
                cell = shape.row * scenes.GRID + shape.column
                for name, values in cls.ATTRIBUTES:
                    out[name][row, cell] = tuple(values).index(getattr(shape, name)) + 1
        return out

    def forward(self, model, pixel_values: torch.Tensor, indices: List[int]):
        """(summed cross-entropy over the attributes, mean accuracy) of the probe on ``model``'s image features."""
        import torch.nn.functional as F

        features = model.model.get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        features = features.reshape(len(indices), scenes.GRID * scenes.GRID, -1).float()
        features = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6)
        labels = self.labels(indices)
        loss, correct = 0.0, []
        for name, head in self.heads.items():
            logits = head(features)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[name].flatten())
            correct.append((logits.argmax(-1) == labels[name]).float().mean())
        return loss, torch.stack(correct).mean().detach()


def learning_rate(config: TinyConfig, step: int) -> float:
    """Linear warmup then cosine decay, separately for the vision warm-up phase and the joint phase (the text
    model starts its own warmup when it starts training)."""
    if step < config.vision_warmup_steps:
        phase_step, phase_steps = step, config.vision_warmup_steps
    else:
        phase_step, phase_steps = step - config.vision_warmup_steps, config.steps - config.vision_warmup_steps
    schedule = WarmupCosine(min(config.warmup_steps, phase_steps), phase_steps, config.min_lr_ratio)
    return schedule.rate(config.learning_rate, phase_step)


# ---- training ----------------------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, model, probe, optimizer, config: TinyConfig, step: int, elapsed: float,
                     log: list) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "probe": probe.state_dict(),
                           "optimizer": optimizer.state_dict(), "config": config.to_dict(), "step": step,
                           "elapsed": elapsed, "log": log})


def train(config: TinyConfig, out_dir: Path, work_dir: Path, *, checkpoint_every_s: float = 300.0,
          eval_every: int = 100, dtype: torch.dtype = torch.float16, stop_after: Optional[int] = None,
          print_fn: Callable[[str], None] = print) -> Optional[dict]:
    """Trains from scratch (or resumes from ``work_dir/checkpoint.pt``), then writes the model (``dtype``
    safetensors), tokenizer and processor under ``out_dir``. Returns the training summary written to
    ``out_dir/training.json``. ``stop_after``: leave after that many steps of this call with a checkpoint and
    nothing written to ``out_dir`` (returns None), as an interrupted run would."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = work_dir / "checkpoint.pt"
    processor = build_processor(config)
    model = build_model(config, processor)
    probe = VisionProbe(config.hidden_size, cells=config.probe_cells)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0},
                                   {"params": list(probe.parameters()), "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.98))
    step, elapsed, log = 0, 0.0, []
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        if TinyConfig.from_dict(state["config"]) != config:
            raise ValueError(f"{checkpoint_path} was written for another configuration; delete it or pass the same "
                             f"options (checkpoint: {state['config']})")
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        print_fn(f"resumed from {checkpoint_path} at step {step} ({elapsed / 60:.1f} min of training so far)")
    parameters = sum(p.numel() for p in model.parameters())
    print_fn(f"tiny VLM: {config.num_layers} layers x {config.hidden_size}, exit layer {config.exit_layer}, "
             f"{parameters / 1e6:.2f} M parameters, {config.steps} steps of {config.batch_size}, "
             f"{torch.get_num_threads()} threads")
    eval_indices = [HELD_OUT_SEED + i for i in range(32)]
    eval_batch = encode_batch(processor, eval_indices)
    model.train()
    last_checkpoint = time.perf_counter()
    start = time.perf_counter() - elapsed
    window = []
    stop_at = config.steps if stop_after is None else min(config.steps, step + stop_after)
    while step < stop_at:
        step_start, cpu_start = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        indices = batch_indices(config, processor.tokenizer, step)
        batch = encode_batch(processor, indices, step_kinds(config, step))
        if step < config.vision_warmup_steps:        # the vision tower and projector alone, through the probe
            loss, probe_accuracy = probe(model, batch["pixel_values"], indices)
            final_loss = exit_loss = agreement = torch.tensor(float("nan"))
        else:
            loss, final_loss, exit_loss, agreement = joint_loss(model, batch, config.exit_layer,
                                                                config.exit_loss_weight)
            if config.vision_loss_weight:
                vision_loss, probe_accuracy = probe(model, batch["pixel_values"], indices)
                loss = loss + config.vision_loss_weight * vision_loss
            else:
                probe_accuracy = torch.tensor(float("nan"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        window.append((float(final_loss), float(exit_loss), float(agreement), time.perf_counter() - step_start,
                       time.process_time() - cpu_start, float(probe_accuracy)))
        if step % eval_every == 0 or step == config.steps or step <= 2 or step == config.vision_warmup_steps:
            model.eval()
            with torch.no_grad():
                _, eval_final, eval_exit, eval_agreement = joint_loss(model, eval_batch, config.exit_layer, 1.0)
                # The same answers with every row given another row's image: how much the model reads the image.
                shuffled = dict(eval_batch, pixel_values=eval_batch["pixel_values"].roll(1, 0))
                eval_shuffled = joint_loss(model, shuffled, config.exit_layer, 1.0)[1]
                eval_probe = probe(model, eval_batch["pixel_values"], eval_indices)[1]
            model.train()
            mean = [_nanmean(values) for values in zip(*window)]
            entry = dict(step=step, train_loss=mean[0], train_exit_loss=mean[1], eval_loss=float(eval_final),
                         eval_exit_loss=float(eval_exit), eval_agreement=float(eval_agreement), step_s=mean[3],
                         cpu_step_s=mean[4], eval_loss_shuffled_images=float(eval_shuffled),
                         train_probe_accuracy=mean[5], eval_probe_accuracy=float(eval_probe),
                         minutes=(time.perf_counter() - start) / 60)
            log.append(entry)
            window = []
            remaining = (config.steps - step) * mean[3] / 60
            losses = ("vision warm-up" if math.isnan(mean[0])
                      else f"loss {mean[0]:.3f}  exit loss {mean[1]:.3f}")
            print_fn(f"step {step}/{config.steps}  {losses}  eval {eval_final:.3f} "
                     f"/ exit {eval_exit:.3f} / shuffled images {eval_shuffled:.3f}  "
                     f"exit=final top-1 {eval_agreement:.2f}  vision probe {eval_probe:.2f}  "
                     f"{mean[3]:.2f} s/step (cpu {mean[4]:.2f} s)  "
                     f"{entry['minutes']:.1f} min, ~{remaining:.0f} min left")
        if time.perf_counter() - last_checkpoint >= checkpoint_every_s and step < config.steps:
            _save_checkpoint(checkpoint_path, model, probe, optimizer, config, step, time.perf_counter() - start, log)
            last_checkpoint = time.perf_counter()
            print_fn(f"checkpoint: {checkpoint_path} at step {step}")
    elapsed = time.perf_counter() - start
    _save_checkpoint(checkpoint_path, model, probe, optimizer, config, step, elapsed, log)
    if step < config.steps:
        print_fn(f"stopped at step {step}; rerun to resume from {checkpoint_path}")
        return None
    model.eval()
    summary = write(model, processor, config, out_dir, dtype=dtype, log=log, elapsed=elapsed)
    print_fn(f"wrote {out_dir} ({summary['size_mb']:.1f} MB) after {elapsed / 60:.1f} min")
    return summary


def _nanmean(values) -> float:
    values = [value for value in values if not math.isnan(value)]
    return sum(values) / len(values) if values else float("nan")


def write(model, processor, config: TinyConfig, out_dir: Path, *, dtype: torch.dtype, log: list,
          elapsed: float) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir)
    model.float()
    processor.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) / 2 ** 20
    summary = dict(config=config.to_dict(), exit_layer=config.exit_layer, minutes=elapsed / 60,
                   size_mb=size, torch=torch.__version__, threads=torch.get_num_threads(), log=log)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def reduced(config: TinyConfig = TinyConfig(), **overrides) -> TinyConfig:
    """A small variant for tests and toy runs."""
    values = dict(num_layers=4, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1, exit_layer=2,
                  vision_hidden_size=64, vision_intermediate_size=128, vision_layers=1, vision_heads=1, steps=30,
                  batch_size=8, warmup_steps=5, vision_warmup_steps=5, grounding_steps=3)
    values.update(overrides)
    return replace(config, **values)
