"""Tiny offline tokenizers, processors and data folders for the trainer's tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.decoding.models import IMAGE_TOKEN, TEXT


def tokenizer(image_token: bool = False):
    """A word-level tokenizer over the tiny models' vocabulary: ``w3`` .. ``w118`` are tokens 3 .. 118;
    with ``image_token``, ``<image>`` is token 119 (the tiny LLaVA's image token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, TEXT["vocab_size"])]
    if image_token:
        words[IMAGE_TOKEN] = "<image>"
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = dict(extra_special_tokens={"image_token": "<image>"}) if image_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   **extra)


def llava_processor():
    """A LlavaProcessor for tests.decoding.models' tiny LLaVA: 28x28 images, 14x14 patches, CLS dropped: 4
    image tokens."""
    import transformers
    from transformers import LlavaProcessor
    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = image_processor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer(image_token=True), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def random_words(generator: torch.Generator, low: int = 3, high: int = 8) -> str:
    count = int(torch.randint(low, high, (1,), generator=generator))
    return " ".join(f"w{int(t)}" for t in torch.randint(3, 100, (count,), generator=generator))


def write_prompts(folder: Path, count: int, seed: int = 0, responses: bool = False, name: str = "prompts.jsonl") -> Path:
    """``count`` text-only prompts of random words (and random word responses when ``responses``)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    path = folder / name
    with open(path, "w") as handle:
        for _ in range(count):
            record = {"prompt": random_words(generator)}
            if responses:
                record["response"] = random_words(generator, 4, 9)
            handle.write(json.dumps(record) + "\n")
    return path


def write_image(path: Path, seed: int) -> Path:
    from PIL import Image
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (28, 28, 3), generator=generator, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# A chat template over the tiny vocabulary: "w3 <message> w4", then " w5" as the generation prompt. The
# tokenizer's form reads the message as a string; the processor's as typed parts (an image part: "<image>").
TOKENIZER_CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
                           "{% if add_generation_prompt %} w5{% endif %}")
PROCESSOR_CHAT_TEMPLATE = ("{% for m in messages %}w3 {% for part in m['content'] %}{% if part['type'] == 'image' %}"
                           "<image> {% else %}{{ part['text'] }}{% endif %}{% endfor %} w4{% endfor %}"
                           "{% if add_generation_prompt %} w5{% endif %}")


def chat_tokenizer():
    """:func:`tokenizer` with :data:`TOKENIZER_CHAT_TEMPLATE`."""
    chat = tokenizer()
    chat.chat_template = TOKENIZER_CHAT_TEMPLATE
    return chat


def chat_llava_processor():
    """:func:`llava_processor` with :data:`PROCESSOR_CHAT_TEMPLATE`."""
    processor = llava_processor()
    processor.chat_template = PROCESSOR_CHAT_TEMPLATE
    return processor
