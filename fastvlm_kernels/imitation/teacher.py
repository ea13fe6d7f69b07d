"""The frozen model as a teacher: one forward with hooks on its layers, and what a distillation step takes from it.

:class:`Taps` hooks the backbone's layers for one forward: the output of layer E-1 (the layer-E states the
drafter sees), of layer ``target_layer - 1`` (the cosine target) and of the last layer (whose final norm and LM
head give the full model's next-token logits), and the keyword arguments (attention mask, rotary embeddings)
layer E is called with. :func:`tapped_forward` runs the model's own forward (vision tower, projector,
positions) into its language model with the taps attached; :func:`teacher_forward` turns that into a
:class:`Teacher` (the targets and logits at the loss positions); :func:`cached_teacher` makes the same
:class:`Teacher` from a :class:`~fastvlm_kernels.imitation.teacher_cache.TeacherCache`. The trainer
(:mod:`.trainer`), the teacher cache (:mod:`.teacher_cache`) and the drafter comparison (:mod:`.evaluation`)
all take the teacher from here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .data import TrainBatch
from .losses import draft_logits


def model_fingerprint(model: nn.Module) -> dict:
    """Architecture, size and a checksum of a few weights: enough to tell two checkpoints apart cheaply."""
    from ..decoding.adapters import adapter_for
    from .network import _describe
    adapter = adapter_for(model)
    with torch.no_grad():
        pieces = [adapter.lm_head.weight[:64], adapter.embed_tokens.weight[:64], adapter.norm.weight]
        for layer in adapter.layers:
            pieces.append(layer.input_layernorm.weight)
            pieces.append(layer.self_attn.q_proj.weight[:4])
        checksum = sum(float(piece.double().abs().sum()) for piece in pieces)
    return dict(_describe(model), checksum=f"{checksum:.10e}")


class Taps:
    """Hooks on the frozen backbone for one forward: the layer-E states, the target-layer states, the last
    layer's output, and the keyword arguments (mask, rotary embeddings) layer E is called with. ``exit_layer``
    may be several layers (a teacher cache for an exit-layer sweep): each one's states as ``exit_<E>``, the
    first's also as ``exit``; every layer gets the same rotary embeddings, taken at the first."""

    def __init__(self, layers: nn.ModuleList, exit_layer: Union[int, Sequence[int]], target_layer: int):
        self.exit_layers = [exit_layer] if isinstance(exit_layer, int) else list(exit_layer)
        self.layers, self.exit_layer, self.target_layer = layers, self.exit_layers[0], target_layer
        self.values: Dict[str, object] = {}

    def _store(self, name):
        def hook(module, args, output):
            self.values[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def _store_kwargs(self, module, args, kwargs):
        self.values["layer_kwargs"] = kwargs

    @contextlib.contextmanager
    def active(self):
        self.values = {}
        layers = self.layers
        handles = [layers[self.exit_layer - 1].register_forward_hook(self._store("exit")),
                   *(layers[e - 1].register_forward_hook(self._store(f"exit_{e}")) for e in self.exit_layers),
                   layers[self.target_layer - 1].register_forward_hook(self._store("target")),
                   layers[len(layers) - 1].register_forward_hook(self._store("last")),
                   layers[self.exit_layer].register_forward_pre_hook(self._store_kwargs, with_kwargs=True)]
        try:
            yield self.values
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class Teacher:
    exit_states: torch.Tensor            # [B, T, H] output of backbone layer E-1
    targets: torch.Tensor                # [M, H] output of layer target_layer-1 at the loss positions
    logits: torch.Tensor                 # [M, V] the full model's next-token logits at the loss positions (fp32)
    attention_mask: Optional[torch.Tensor]
    position_embeddings: tuple


@torch.no_grad()
def tapped_forward(adapter, taps: Taps, batch: TrainBatch) -> Dict[str, object]:
    """The frozen model's own forward over ``batch`` up to its language model (images, positions), then the
    language model with the taps attached: what the taps took (``exit``, ``target``, ``last``,
    ``layer_kwargs``)."""
    inputs = dict(batch.model_inputs)
    prompt = adapter.prompt_inputs(inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs)
    with taps.active() as values:
        adapter.language_model(inputs_embeds=prompt.embeds, attention_mask=prompt.attention_mask,
                               position_ids=prompt.positions, use_cache=False)
    return values


@torch.no_grad()
def teacher_forward(adapter, taps: Taps, batch: TrainBatch, vocab: Optional[torch.Tensor] = None) -> Teacher:
    """Runs the frozen model once over ``batch``: its own forward up to the language model (images, positions),
    then the language model with the taps attached. ``vocab``: the teacher's logits over those ids only."""
    values = tapped_forward(adapter, taps, batch)
    mask = batch.loss_mask
    last = values["last"][mask]
    logits = draft_logits(last, adapter.norm, adapter.lm_head, vocab).float()
    kwargs = values["layer_kwargs"]
    return Teacher(exit_states=values["exit"], targets=values["target"][mask], logits=logits,
                   attention_mask=kwargs.get("attention_mask"), position_embeddings=kwargs["position_embeddings"])


@torch.no_grad()
def cached_teacher(adapter, cache, indices: Sequence[int], vocab: Optional[torch.Tensor], dtype: torch.dtype,
                   device, exit_layer: Optional[int] = None) -> tuple:
    """(Teacher, loss mask) of the training examples ``indices`` read from a TeacherCache: the logits come from
    the stored last-layer states through the model's final norm and LM head, as :func:`teacher_forward` makes
    them. Rows are right-padded, so the causal mask alone keeps pads out (no attention mask)."""
    stored = cache.batch(indices, dtype=dtype, device=device, exit_layer=exit_layer)
    logits = draft_logits(stored.last.to(dtype), adapter.norm, adapter.lm_head, vocab).float()
    return Teacher(exit_states=stored.exit_states, targets=stored.targets.to(dtype), logits=logits,
                   attention_mask=None, position_embeddings=stored.position_embeddings), stored.loss_mask
