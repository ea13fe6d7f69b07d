"""Qwen2-VL and Qwen2.5-VL: 3-D M-RoPE positions.

The prompt's ``[3, B, L]`` positions come from the model's own forward (``get_rope_index`` over all
processor outputs, ``mm_token_type_ids`` included). Text positions after the prompt advance by one in all
three sections, so row b's token at cache index j >= L_b has position ``j + offset[b]`` in each, with
``offset[b] = last prompt position + 1 - L_b`` (the rope delta), kept in the decoder's state; the model's
``rope_deltas`` attribute is restored after the prompt pass, so a later ``model.generate`` is untouched.
"""
import torch

from .base import Adapter, PromptInputs, UnsupportedModelError


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    text_model_types = ("qwen2_vl", "qwen2_5_vl", "qwen2")
    mrope = True

    def _language_model(self, model):
        return model.model.language_model

    def _normalise_positions(self, positions, batch):
        if positions.dim() == 3 and positions.shape[0] == 4:   # text positions prepended (packed sequences)
            positions = positions[1:]
        if positions.dim() == 2:
            positions = positions[None].expand(3, batch, -1)
        if positions.dim() != 3 or positions.shape[0] != 3:
            raise UnsupportedModelError(f"unexpected M-RoPE position_ids of shape {tuple(positions.shape)}")
        return positions

    def _save_model_state(self):
        inner = self.model.model
        return getattr(inner, "rope_deltas", None)

    def _restore_model_state(self, saved):
        inner = self.model.model
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = saved

    def position_offsets(self, prompt: PromptInputs, lengths: torch.Tensor) -> torch.Tensor:
        # The prompt is left-padded: the last real token of every row is at index L - 1.
        last = prompt.positions[0, :, -1]
        return last + 1 - lengths

    def step_positions(self, positions_1d):
        return positions_1d[None].expand(3, -1, -1)
