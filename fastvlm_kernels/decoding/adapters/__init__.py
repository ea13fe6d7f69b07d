"""Model adapters, one file per family, found from ``config.model_type``."""
from torch import nn

from .base import Adapter, PromptInputs, UnsupportedModelError
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, CausalLMAdapter)
SUPPORTED_MODEL_TYPES = tuple(model_type for adapter in ADAPTERS for model_type in adapter.model_types)

__all__ = ["Adapter", "PromptInputs", "UnsupportedModelError", "adapter_for", "SUPPORTED_MODEL_TYPES"]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, or an :class:`UnsupportedModelError` listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise UnsupportedModelError(f"unsupported model: model_type '{model_type}' ({type(model).__name__}); "
                                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
