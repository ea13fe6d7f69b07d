"""What the decoder needs to know about a model family: where its text layers, final norm, LM head, token
embedding and rotary module live, and how its prompt becomes embeddings and positions.

The prompt goes through the model's own forward (vision tower, projector, image-token merge, Qwen2-VL's
3-D positions): a pre-hook on the language model captures the embeddings and positions it is called with
and stops the forward there, so no text layer runs twice and nothing model-specific is re-implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn



class UnsupportedModelError(ValueError):
    """The model's family has no adapter, or uses a feature the decoder does not handle."""


class _Captured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("captured")
        self.kwargs = kwargs


@dataclass
class PromptInputs:
    embeds: torch.Tensor             # [B, L, H] the language model's input embeddings (left padding kept)
    positions: torch.Tensor          # [B, L] (1-D rotary) or [3, B, L] (M-RoPE), as the model computed them
    attention_mask: torch.Tensor     # [B, L] 1 for real tokens

    def repeat_rows(self, copies: int) -> "PromptInputs":
        """Each row ``copies`` times in a row (``num_return_sequences``: a prompt's copies together, as
        model.generate orders them), the images' embeddings included."""
        if copies == 1:
            return self
        batch_dim = 1 if self.positions.dim() == 3 else 0
        return PromptInputs(self.embeds.repeat_interleave(copies, 0),
                            self.positions.repeat_interleave(copies, batch_dim),
                            self.attention_mask.repeat_interleave(copies, 0))


class Adapter:
    """Base adapter: a decoder-only text model (``model.model`` holds the layers, ``model.lm_head`` the head)."""
    model_types: tuple = ()
    text_model_types = ("llama", "mistral", "qwen2")
    mrope = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.language_model = self._language_model(model)
        self.text_config = self.language_model.config
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None or not hasattr(self.lm_head, "weight"):
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
        self.layers = self.language_model.layers
        self.norm = self.language_model.norm
        self.embed_tokens = self.language_model.embed_tokens
        self.rotary_emb = self.language_model.rotary_emb
        self._check_text_config()

    # ---- where things live -------------------------------------------------------------------------------

    def _language_model(self, model: nn.Module) -> nn.Module:
        return model.model

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        config = self.text_config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def norm_eps(self) -> float:
        for name in ("variance_epsilon", "eps"):
            if hasattr(self.norm, name):
                return float(getattr(self.norm, name))
        return float(self.text_config.rms_norm_eps)

    def _check_text_config(self) -> None:
        config = self.text_config
        text_type = getattr(config, "model_type", None)
        if text_type not in self.text_model_types and not any(text_type.startswith(t) for t in self.text_model_types):
            raise UnsupportedModelError(f"the text model of this {type(self.model).__name__} is '{text_type}'; "
                                        f"supported text models: {', '.join(self.text_model_types)}")
        sliding = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ()
        if "sliding_attention" in layer_types or (sliding and getattr(config, "use_sliding_window", True) and
                                                  text_type == "mistral"):
            raise UnsupportedModelError(f"this {text_type} model has an active sliding window "
                                        f"(sliding_window={sliding}); the decoder attends to the whole cache")
        if not isinstance(self.norm.weight, torch.Tensor) or self.norm.weight.dim() != 1:
            raise UnsupportedModelError("the final norm has no [H] weight")

    def attention_configs(self) -> list:
        """Every config object the text layers' attention modules read ``_attn_implementation`` from."""
        configs = [self.text_config]
        for layer in self.layers:
            attention = getattr(layer, "self_attn", None)
            if attention is not None and hasattr(attention, "config"):
                configs.append(attention.config)
        return configs

    # ---- the prompt ----------------------------------------------------------------------------------------

    def prompt_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs) -> PromptInputs:
        """Runs the model's own forward up to its language model and captures what the language model gets."""
        captured = self._capture(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)
        embeds = captured.get("inputs_embeds")
        if embeds is None:
            ids = captured.get("input_ids", input_ids)
            embeds = self.embed_tokens(ids)
        positions = captured.get("position_ids")
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        positions = self._normalise_positions(positions, embeds.shape[0])
        return PromptInputs(embeds=embeds, positions=positions, attention_mask=attention_mask)

    def _normalise_positions(self, positions: torch.Tensor, batch: int) -> torch.Tensor:
        if positions.dim() == 2:
            return positions.expand(batch, -1)
        raise UnsupportedModelError(f"unexpected position_ids of shape {tuple(positions.shape)} for 1-D rotary")

    def _capture(self, **inputs) -> dict:
        def hook(module, args, kwargs):
            raise _Captured(dict(kwargs))

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        saved = self._save_model_state()
        try:
            self.model(**inputs, use_cache=False)
        except _Captured as captured:
            return captured.kwargs
        finally:
            handle.remove()
            self._restore_model_state(saved)
        raise RuntimeError(f"{type(self.model).__name__}'s forward never called its language model")

    def _save_model_state(self):
        return None

    def _restore_model_state(self, saved) -> None:
        return None

    # ---- per-step positions --------------------------------------------------------------------------------

    def position_offsets(self, prompt: PromptInputs, lengths: torch.Tensor) -> torch.Tensor:
        """``[B]``: row b's token at cache index j has position j + offset[b] (0 for 1-D rotary)."""
        return torch.zeros_like(lengths)

    def step_positions(self, positions_1d: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` positions -> what the rotary module takes (``[3, B, T]`` for M-RoPE)."""
        return positions_1d
