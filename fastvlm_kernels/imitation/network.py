"""ImitationNetwork: maps the backbone's layer-E hidden states to a stand-in for a deep layer's.

It has 0..n decoder layers of the base model's own layer class (``kind="layers"``; copied from a deep
layer or freshly initialised) or a residual MLP (``kind="mlp"``). Its attention layers are renumbered to
``layer_idx = N + i``, so the decoder's :class:`~fastvlm_kernels.KVCache` holds ``N + num_layers`` layers and
one rollback covers the backbone and the imitation network together. The trainer is separate; an
untrained network is a valid (if poor) drafter, which is what the decoder's tests use.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

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
    identity_init: bool = False        # output projections started at zero: the untrained network is the identity
    draft_vocab_size: int = 0          # > 0: the network drafts over its ``draft_vocab`` (that many token ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ImitationConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


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
                   target_layer: Optional[int] = None, init_layer: Optional[int] = -1,
                   identity_init: bool = False) -> "ImitationNetwork":
        """An untrained network for ``model``. ``init_layer``: the backbone layer the decoder layers start
        from (-1: the last; None: fresh weights from the layer class's initialiser). ``identity_init``: zero
        each layer's attention output and MLP down projections, so that the untrained network adds nothing
        (it drafts exactly as plain early exit) and training starts from there: for a model whose exit is
        already trained to draft (the tiny VLM's joint phase), a copied deep layer starts worse than that."""
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
                                 init_layer=init_layer if kind == "layers" else None,
                                 identity_init=bool(identity_init) and kind == "layers")
        if kind == "mlp":
            width = 2 * hidden_size
            mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, hidden_size))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            dtype = adapter.norm.weight.dtype
            return cls(config, mlp=mlp.to(adapter.norm.weight.device, dtype))
        layers = nn.ModuleList()
        for i in range(num_layers):
            if init_layer is not None and _tensor_parallel(adapter.layers[init_layer]):
                layer = _replicated_copy(adapter.layers[init_layer], adapter.text_config, num_backbone - 1)
            elif init_layer is not None:
                layer = copy.deepcopy(adapter.layers[init_layer])
            else:
                template = adapter.layers[0]
                # Built with a backbone index (per-layer config lists such as layer_types have N entries),
                # then renumbered below.
                layer = type(template)(adapter.text_config, num_backbone - 1)
                layer.to(template.input_layernorm.weight.device, template.input_layernorm.weight.dtype)
            layer.self_attn.layer_idx = num_backbone + i
            if config.identity_init:
                zero_output_projections(layer)
            layers.append(layer)
        return cls(config, layers=layers)

    @property
    def num_cache_layers(self) -> int:
        return len(self.layers)

    @property
    def draft_vocab(self) -> Optional[torch.Tensor]:
        """The sorted int64 token ids this network was trained to draft over (its distillation loss covered
        only these), or None for the full vocabulary. :class:`~fastvlm_kernels.SelfSpeculativeDecoder`
        drafts over them unless given another ``draft_vocab``."""
        return getattr(self, "_draft_vocab", None)

    def set_draft_vocab(self, ids: Optional[torch.Tensor]) -> "ImitationNetwork":
        """Records the draft vocabulary (saved with the weights); None removes it."""
        if ids is None:
            self._buffers.pop("_draft_vocab", None)
            self.config.draft_vocab_size = 0
            return self
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool \
                or ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("draft vocabulary must be a non-empty 1-D integer tensor of token ids")
        ids = torch.unique(ids.detach().to(torch.int64).cpu())
        device = next(self.parameters(), ids).device
        self.register_buffer("_draft_vocab", ids.to(device))
        self.config.draft_vocab_size = int(ids.numel())
        return self

    def forward(self, hidden: torch.Tensor, position_embeddings=None, **attention_kwargs) -> torch.Tensor:
        """``hidden [B, T, H]`` (the backbone's layer-E states) -> the state that goes into the final norm.

        ``attention_kwargs`` go to every layer: the decoder passes its cache state; the trainer passes the
        ``attention_mask`` the backbone's own layers get (transformers' attention over the full sequence)."""
        if self.config.kind == "mlp":
            return hidden + self.mlp(hidden)
        attention_mask = attention_kwargs.pop("attention_mask", None)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                        **attention_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # ---- persistence ------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: Union[str, Path], base_model: Optional[nn.Module] = None, *,
                        dtype: Optional[torch.dtype] = None) -> None:
        """Writes ``config.json`` (this config plus the base model's architecture and size) and
        ``model.safetensors`` (the network's own weights only; with ``dtype``, its floating-point weights stored
        in that type, e.g. ``torch.bfloat16`` to halve a shipped file: :meth:`from_pretrained` loads them into
        the model's dtype, so the network then computes with the rounded weights)."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"imitation": self.config.to_dict()}
        if base_model is not None:
            record["base_model"] = _describe(base_model)
        (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        if dtype is not None:
            state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
        save_file(state, str(folder / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], model: nn.Module) -> "ImitationNetwork":
        """Loads a network saved by :meth:`save_pretrained` for ``model``; a network trained for another
        architecture, size or depth is a clear error."""
        from safetensors.torch import load_file
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no imitation network (no config.json)")
        record = json.loads((folder / "config.json").read_text())
        config = ImitationConfig.from_dict(record["imitation"])
        expected = record.get("base_model")
        if expected is not None:
            actual = _describe(model)
            mismatched = {key: (expected[key], actual.get(key)) for key in expected if expected[key] != actual.get(key)}
            if mismatched:
                details = ", ".join(f"{key}: trained for {want}, this model has {have}"
                                    for key, (want, have) in mismatched.items())
                raise ValueError(f"the imitation network in {folder} was trained for another model ({details})")
        network = cls.from_model(model, config.exit_layer, num_layers=config.num_layers, kind=config.kind,
                                 target_layer=config.target_layer, init_layer=-1)   # weights replaced below
        network.config = config
        state = load_file(str(folder / "model.safetensors"))
        if config.draft_vocab_size:
            if "_draft_vocab" not in state or state["_draft_vocab"].numel() != config.draft_vocab_size:
                raise ValueError(f"{folder}: config.json records a draft vocabulary of {config.draft_vocab_size} "
                                 "ids but model.safetensors does not hold it")
            network.set_draft_vocab(state.pop("_draft_vocab"))
        elif "_draft_vocab" in state:
            raise ValueError(f"{folder}: model.safetensors holds a draft vocabulary that config.json does not record")
        reference = next(network.parameters(), None)
        if reference is not None:
            state = {name: tensor.to(reference.device, reference.dtype) for name, tensor in state.items()}
        state["_draft_vocab"] = network.draft_vocab
        if state["_draft_vocab"] is None:
            del state["_draft_vocab"]
        network.load_state_dict(state)
        return network


@torch.no_grad()
def zero_output_projections(layer: nn.Module) -> None:
    """Zeroes a decoder layer's attention output and MLP down projections (weights and biases): both residual
    branches then add nothing, so the layer passes its input through unchanged until it is trained."""
    for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
        projection.weight.zero_()
        if projection.bias is not None:
            projection.bias.zero_()


def _tensor_parallel(layer: nn.Module) -> bool:
    """Whether ``layer`` was sharded by transformers' tensor-parallel plan (DTensor weights)."""
    from ..decoding.parallel import is_sharded
    return any(is_sharded(parameter) for parameter in layer.parameters())


def _replicated_copy(layer: nn.Module, config, layer_idx: int) -> nn.Module:
    """A plain (unsharded) copy of a tensor-parallel ``layer``: a new layer of its class holding the full
    weights, gathered from the ranks (every rank calls this; the decoder cuts the copy by rank again)."""
    from ..decoding.parallel import is_sharded
    state = {name: tensor.full_tensor() if is_sharded(tensor) else tensor
             for name, tensor in layer.state_dict().items()}
    reference = next(iter(state.values()))
    copy_ = type(layer)(config, layer_idx).to(reference.device, reference.dtype)
    copy_.load_state_dict(state)
    return copy_


def _describe(model: nn.Module) -> dict:
    from ..decoding.adapters import adapter_for
    adapter = adapter_for(model)
    config = adapter.text_config
    return {"model_type": model.config.model_type, "text_model_type": getattr(config, "model_type", None),
            "hidden_size": config.hidden_size, "num_hidden_layers": adapter.num_layers,
            "vocab_size": adapter.lm_head.weight.shape[0]}
