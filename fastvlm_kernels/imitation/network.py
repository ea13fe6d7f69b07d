"""ImitationNetwork: maps the backbone's layer-E hidden states to a stand-in for a deep layer's.

It has 0..n decoder layers of the base model's own layer class (``kind="layers"``; copied from a deep
layer or freshly initialised) or a residual MLP (``kind="mlp"``). Its attention layers are renumbered to
``layer_idx = N + i``, so the decoder's :class:`~fastvlm_kernels.KVCache` holds ``N + num_layers`` layers and
one rollback covers the backbone and the imitation network together. The trainer is separate; an
untrained network is a valid (if poor) drafter, which is what the decoder's tests use.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class ImitationConfig:
    exit_layer: int
    target_layer: int
    num_layers: int = 1
    kind: str = "layers"          # "layers" or "mlp"
    model_type: str = ""
    hidden_size: int = 0
    init_layer: Optional[int] = None   # the backbone layer the decoder layers were copied from (None: fresh)

    def to_dict(self) -> dict:
        return asdict(self)


class ImitationNetwork(nn.Module):
    def __init__(self, config: ImitationConfig, layers: Optional[nn.ModuleList] = None,
                 mlp: Optional[nn.Module] = None):
        super().__init__()
        if config.kind not in ("layers", "mlp"):
            raise ValueError(f"kind must be 'layers' or 'mlp', got {config.kind!r}")
        self.config = config
        self.layers = layers if layers is not None else nn.ModuleList()
        self.mlp = mlp

    @classmethod
    def from_model(cls, model: nn.Module, exit_layer: int, *, num_layers: int = 1, kind: str = "layers",
                   target_layer: Optional[int] = None, init_layer: Optional[int] = -1) -> "ImitationNetwork":
        """An untrained network for ``model``. ``init_layer``: the backbone layer the decoder layers start
        from (-1: the last; None: fresh weights from the layer class's initialiser)."""
        from ..decoding.adapters import adapter_for
        adapter = adapter_for(model)
        num_backbone = adapter.num_layers
        if not 1 <= exit_layer < num_backbone:
            raise ValueError(f"exit_layer must be in [1, {num_backbone - 1}], got {exit_layer}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        target_layer = num_backbone if target_layer is None else target_layer
        if not exit_layer < target_layer <= num_backbone:
            raise ValueError(f"target_layer must be in ({exit_layer}, {num_backbone}], got {target_layer}")
        hidden_size = adapter.text_config.hidden_size
        if init_layer is not None and init_layer < 0:
            init_layer += num_backbone
        config = ImitationConfig(exit_layer=exit_layer, target_layer=target_layer, num_layers=num_layers, kind=kind,
                                 model_type=model.config.model_type, hidden_size=hidden_size,
                                 init_layer=init_layer if kind == "layers" else None)
        if kind == "mlp":
            width = 2 * hidden_size
            mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, hidden_size))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            dtype = adapter.norm.weight.dtype
            return cls(config, mlp=mlp.to(adapter.norm.weight.device, dtype))
        layers = nn.ModuleList()
        for i in range(num_layers):
            if init_layer is not None:
                layer = copy.deepcopy(adapter.layers[init_layer])
            else:
                template = adapter.layers[0]
                layer = type(template)(adapter.text_config, num_backbone + i)
                layer.to(template.input_layernorm.weight.device, template.input_layernorm.weight.dtype)
            layer.self_attn.layer_idx = num_backbone + i
            layers.append(layer)
        return cls(config, layers=layers)

    @property
    def num_cache_layers(self) -> int:
        return len(self.layers)

    def forward(self, hidden: torch.Tensor, position_embeddings=None, **attention_kwargs) -> torch.Tensor:
        """``hidden [B, T, H]`` (the backbone's layer-E states) -> the state that goes into the final norm."""
        if self.config.kind == "mlp":
            return hidden + self.mlp(hidden)
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, **attention_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
