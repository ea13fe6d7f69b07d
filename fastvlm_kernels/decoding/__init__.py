"""The thin decoder: SelfSpeculativeDecoder over transformers models, with the package's ops and cache."""
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, adapter_for
from .decoder import GenerateOutput, GenerateStats, SelfSpeculativeDecoder

__all__ = ["SelfSpeculativeDecoder", "GenerateOutput", "GenerateStats", "UnsupportedModelError", "adapter_for",
           "SUPPORTED_MODEL_TYPES"]
