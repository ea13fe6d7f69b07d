"""Acceptance-controlled models of real shapes, for measuring the system rather than a drafter (issue 24).

A speculative decoder's speed depends on its parts' costs (a one-token pass, a (k+1)-token pass, the heads) and
on how often the draft agrees with the full model. Real 7B checkpoints cannot be downloaded here, and random
weights make an early exit agree with the full model almost never, so nothing is accepted. These models have
the text shapes of real ones (:data:`SHAPES`: LLaVA-1.5-7B's Vicuna and Qwen2-VL-7B's Qwen2, random weights in
the dtype asked for) with the residual contributions of layers E .. N-1 (their attention output and MLP down
projections) scaled by ``residual_scale``: at 0 the last layer's state equals layer E's, so the early exit
agrees with the full model on every token; :func:`calibrate` finds the scale at which it agrees on a chosen
share of tokens (about 70%, say). The decoder's output stays exactly the model's, whatever the scale.

    from fastvlm_kernels.models import synthetic
    model = synthetic.build("llava-1.5-7b", exit_layer=8, dtype=torch.bfloat16, device="cuda")   # agrees always
    scale, measured = synthetic.calibrate(model, exit_layer=8, target=0.7)                       # ~70% per token

``build(..., layers=4, hidden_size=64, ...)`` overrides any config field, for tests of the same code at small
sizes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

# The text models' shapes (their config.json values).
SHAPES: Dict[str, dict] = {
    "llava-1.5-7b": dict(family="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5),
    "qwen2-vl-7b": dict(family="qwen2", num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
}
NAMES = {"llava-1.5-7b": "7B-shaped LLaVA-1.5 text model (Vicuna-7B shapes, random weights)",
         "qwen2-vl-7b": "7B-shaped Qwen2-VL text model (Qwen2-7B shapes, random weights)"}


def config(shape: str, **overrides):
    """The transformers config of ``shape`` (a key of :data:`SHAPES`), with ``overrides`` applied."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {tuple(SHAPES)}, got {shape!r}")
    import transformers
    fields = dict(SHAPES[shape], **overrides)
    family = fields.pop("family")
    rope_theta = fields.pop("rope_theta")
    if family == "llama":
        cls = transformers.LlamaConfig
    else:
        cls = transformers.Qwen2Config
        fields.setdefault("sliding_window", None)
        fields.setdefault("use_sliding_window", False)
    made = cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **fields)
    # transformers 5 keeps the rotary base in rope_parameters; older releases read rope_theta
    parameters = getattr(made, "rope_parameters", None)
    if isinstance(parameters, dict):
        parameters["rope_theta"] = rope_theta
    else:
        made.rope_theta = rope_theta
    return made


def parameter_count(shape: str, **overrides) -> int:
    """Parameters of the model :func:`build` makes (counted on the meta device: nothing allocated)."""
    import transformers
    made = config(shape, **overrides)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(made)
    return sum(p.numel() for p in model.parameters())


def build(shape: str, exit_layer: int, *, residual_scale: float = 0.0, dtype=torch.float32, device="cpu",
          seed: int = 0, **overrides) -> nn.Module:
    """A model of ``shape`` with random weights (seeded; transformers' own initialisation) in ``dtype`` on
    ``device``, eval mode, with layers ``exit_layer`` .. N-1's residual contributions scaled by
    ``residual_scale`` (0: the early exit after layer ``exit_layer`` agrees with the full model everywhere)."""
    import transformers
    made = config(shape, **overrides)
    if not 1 <= exit_layer < made.num_hidden_layers:
        raise ValueError(f"exit_layer must be in [1, {made.num_hidden_layers - 1}], got {exit_layer}")
    if not residual_scale >= 0:
        raise ValueError(f"residual_scale must be >= 0, got {residual_scale}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(made, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    model.generation_config.eos_token_id = None      # random weights: no natural end; lengths come from the call
    model.generation_config.pad_token_id = 0
    model._fastvlm_residual_scale = 1.0
    set_residual_scale(model, exit_layer, residual_scale)
    return model


@torch.no_grad()
def set_residual_scale(model: nn.Module, exit_layer: int, scale: float) -> None:
    """Scales layers ``exit_layer`` .. N-1's attention-output and down projections so that their residual
    contributions are ``scale`` times the original weights' (relative to the scale applied so far; from 0
    nothing can be restored, so 0 is final)."""
    current = getattr(model, "_fastvlm_residual_scale", 1.0)
    if current == 0.0 and scale != 0.0:
        raise ValueError("the residual scale was set to 0: the original weights are gone; build the model again")
    factor = 0.0 if scale == 0.0 else scale / current
    for layer in model.model.layers[exit_layer:]:
        layer.self_attn.o_proj.weight.mul_(factor)
        layer.mlp.down_proj.weight.mul_(factor)
    model._fastvlm_residual_scale = scale


@torch.no_grad()
def agreement(model: nn.Module, exit_layer: int, input_ids: torch.Tensor) -> float:
    """The share of positions of ``input_ids`` ``[B, T]`` at which the early exit after layer ``exit_layer``
    (the model's final norm and LM head over that layer's output) picks the full model's next token."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    early = model.lm_head(model.model.norm(out.hidden_states[exit_layer])).argmax(-1)
    return float((early == out.logits.argmax(-1)).float().mean())


@torch.no_grad()
def calibrate(model: nn.Module, exit_layer: int, target: float, *, batch: int = 4, length: int = 128,
              steps: int = 12, seed: int = 0, tolerance: float = 0.02) -> Tuple[float, float]:
    """Sets the residual scale of layers ``exit_layer`` .. N-1 so that the early exit agrees with the full
    model on about ``target`` of the tokens (bisection over the scale on ``batch`` random sequences of
    ``length`` tokens, at most ``steps`` rounds or until within ``tolerance``). Returns (scale, measured
    agreement). ``target`` 1.0: scale 0 (exact agreement)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if target == 1.0:
        set_residual_scale(model, exit_layer, 0.0)
        return 0.0, 1.0
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator).to(device)
    low, high = 0.0, 1.0          # agreement falls as the scale grows: low agrees more than target
    best: Optional[Tuple[float, float]] = None
    while high < 1024:            # random layers may change little: grow the scale until it agrees too rarely
        set_residual_scale(model, exit_layer, high)
        measured = agreement(model, exit_layer, ids)
        best = (high, measured) if best is None or abs(measured - target) < abs(best[1] - target) else best
        if measured <= target:
            break
        low, high = high, high * 2
    for _ in range(steps):
        middle = (low + high) / 2
        set_residual_scale(model, exit_layer, middle)
        measured = agreement(model, exit_layer, ids)
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (middle, measured)
        if abs(measured - target) <= tolerance:
            break
        if measured > target:
            low = middle
        else:
            high = middle
    set_residual_scale(model, exit_layer, best[0])
    return best
