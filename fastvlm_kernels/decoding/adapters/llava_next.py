"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA with any-resolution image tiling; the tiling
and the image-token merge happen in the model's own forward, before the language model."""
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
