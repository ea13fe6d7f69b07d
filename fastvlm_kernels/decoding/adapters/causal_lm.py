"""Plain causal language models of the text families the VLMs use: Llama, Mistral, Qwen2."""
from .base import Adapter


class CausalLMAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
