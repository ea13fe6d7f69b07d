"""What loading and using the tiny VLM need of its build: the configuration it was built with (size, exit layer,
training schedule; ``training.json`` records it), the prompt format it was trained on, and where the held-out
scenes start. The build itself (tokenizer, processor, model, data and training) is a program:
``python/tiny_vlm_recipe.py``, run by ``python/build_tiny_vlm.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PROMPT_FORMAT = "USER: <image> {question} ASSISTANT:"
# Seeds of the scenes that ``scene(seed)`` and evaluation use: far from the training range [0, steps * batch).
HELD_OUT_SEED = 1_000_000_000


@dataclass(frozen=True)
class TinyConfig:
    """Model size and training schedule. The defaults are the shipped model (README of models/tiny)."""
    # text model (Llama): deep and narrow, head dim 64
    num_layers: int = 24
    hidden_size: int = 256
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    exit_layer: int = 3
    # vision tower (CLIP): 72x72 images, 24x24 patches -> 9 image tokens, one per cell of the scene grid
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 24
    # training: the joint phase (next-token loss + early-exit loss at exit_layer through the final norm and head)
    steps: int = 3000
    batch_size: int = 24
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    exit_loss_weight: float = 1.0
    # the vision tower's own supervision (recipe only; the probe is not part of the shipped model): each of the
    # 9 image tokens, RMS-normalised as the text model's first norm sees it, must tell its grid cell's colour,
    # kind, size and texture through linear heads. Alone for the first vision_warmup_steps (as a VLM starts
    # from a pretrained vision tower), then added to the joint loss. Without it the image features collapsed
    # into one large constant vector within 100 steps and the text model never read the image.
    vision_warmup_steps: int = 100
    vision_loss_weight: float = 1.0
    probe_cells: bool = False        # the probe also names each token's grid cell (an experiment, see above)
    # then count_steps joint steps of "how many shapes?" only, and grounding_steps of short questions answered
    # from the image (scenes.GROUNDING_KINDS), before the full mix. With the mix from the start the text model
    # learned the answers' grammar first and never read the image; with 400 grounding steps (the shipped run)
    # it began to, late in the mixed phase (README). Counting alone is read from the image within 90 steps at
    # full learning rate, but a 300-step counting phase was forgotten again in the grounding mix that
    # followed (an experiment: count_steps=300, probe_cells=True); neither is in the shipped model.
    count_steps: int = 0
    grounding_steps: int = 400
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TinyConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def prompt_for(question: str) -> str:
    return PROMPT_FORMAT.format(question=question)
