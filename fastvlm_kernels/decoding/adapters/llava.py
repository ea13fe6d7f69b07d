"""LLaVA (``LlavaForConditionalGeneration``) over a Llama, Mistral or Qwen2 text model."""
from .base import Adapter


class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def _language_model(self, model):
        return model.model.language_model
