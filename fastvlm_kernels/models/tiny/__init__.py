"""The embedded tiny VLM: a transformers ``LlavaForConditionalGeneration`` (CLIP vision tower, projector,
24-layer Llama of width 256) trained from scratch on procedural scenes of coloured shapes, with an early-exit
loss at layer ``EXIT_LAYER`` so that its first layers already draft well. Everything runs offline.

    from fastvlm_kernels.models import tiny
    model, processor = tiny.load()
    image, prompt = tiny.scene(0)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    print(processor.decode(model.generate(**inputs)[0], skip_special_tokens=True))

The weights are built by ``python python/build_tiny_vlm.py`` (the recipe: ``python/tiny_vlm_recipe.py``; the
reasoning behind it, cost model included: README.md in this folder). The package keeps what loading and using
the model need: its configuration and prompt format (``config.py``) and the scenes (``scenes.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

from .config import HELD_OUT_SEED, TinyConfig, prompt_for
from .scenes import Scene, make_scene, make_turn, render

FOLDER = Path(__file__).resolve().parent
EXIT_LAYER = TinyConfig().exit_layer
BUILD_COMMAND = "python python/build_tiny_vlm.py"
# The shipped imitation networks, by the exit layer each was trained for (folders in FOLDER).
IMITATION_NETWORKS = {EXIT_LAYER: "imitation", 1: "imitation_e1"}

__all__ = ["load", "scene", "load_imitation", "is_built", "FOLDER", "EXIT_LAYER", "IMITATION_NETWORKS", "Scene",
           "make_scene", "make_turn", "render", "prompt_for"]


def is_built(folder: Union[str, Path, None] = None) -> bool:
    folder = Path(folder) if folder is not None else FOLDER
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and \
        (folder / "tokenizer.json").is_file()


def load(folder: Union[str, Path, None] = None, *, dtype=None, tp_plan=None):
    """``(model, processor)`` from the shipped files (or ``folder``), offline; the model in eval mode, fp32
    unless ``dtype`` says otherwise (the files are fp16). ``tp_plan``: passed to ``from_pretrained`` ("auto":
    sharded by transformers' tensor-parallel plan, in every process of a ``torchrun`` launch; the tiny VLM's
    2 KV heads take 1 or 2 ranks)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(folder) if folder is not None else FOLDER
    if not is_built(folder):
        raise FileNotFoundError(f"the tiny VLM is not built: {folder} lacks config.json, model.safetensors or "
                                f"tokenizer.json. Build it with `{BUILD_COMMAND}` from the repository root "
                                f"(about 90 minutes on a 2-core CPU; `--out DIR` to write elsewhere)")
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32,
                                                          tp_plan=tp_plan).eval()
    processor = LlavaProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def scene(seed: int, question: Optional[str] = None, *, kind: Optional[str] = None) -> Tuple[object, str]:
    """``(image, prompt)``: a new scene (never one of the training examples) and a prompt in the processor's
    format, ready for ``processor(images=image, text=prompt, return_tensors="pt")``. The question is drawn
    from the scene grammar (``kind``: one of scenes.QUESTION_KINDS) unless given."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    drawn = make_scene(HELD_OUT_SEED + seed)
    if question is None:
        question = make_turn(drawn, HELD_OUT_SEED + seed, kind).question
    return render(drawn), prompt_for(question)


def answer(seed: int, kind: Optional[str] = None) -> str:
    """The ground-truth answer to ``scene(seed, kind=kind)``'s question."""
    return make_turn(make_scene(HELD_OUT_SEED + seed), HELD_OUT_SEED + seed, kind).answer


def load_imitation(model=None, folder: Union[str, Path, None] = None, *, exit_layer: Optional[int] = None):
    """A shipped trained :class:`~fastvlm_kernels.imitation.ImitationNetwork` for the tiny VLM (its
    ``config.exit_layer`` is the exit layer to decode with). ``model``: the tiny VLM (loaded if None).
    ``exit_layer``: which shipped network (``IMITATION_NETWORKS``): ``EXIT_LAYER`` (the default), the residual
    MLP over the exit the VLM was trained to draft from, or 1, one decoder layer over layer 1's state, where
    plain early exit is weak. ``folder``: a network's folder instead (e.g. another build's)."""
    from ...imitation import ImitationNetwork

    if folder is None:
        chosen = EXIT_LAYER if exit_layer is None else exit_layer
        if chosen not in IMITATION_NETWORKS:
            raise ValueError(f"exit_layer={exit_layer}: no imitation network is shipped for it; shipped: exit layers "
                             f"{sorted(IMITATION_NETWORKS)} (train one with `fastvlm train-imitation`)")
        folder = FOLDER / IMITATION_NETWORKS[chosen]
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no trained imitation network is shipped yet: {folder} is missing. It is trained on "
                                f"the frozen tiny VLM with the imitation trainer after `{BUILD_COMMAND}`; until "
                                f"then decode with plain early exit (imitation=None, exit_layer={EXIT_LAYER})")
    if model is None:
        model = load()[0]
    network = ImitationNetwork.from_pretrained(folder, model)
    if exit_layer is not None and network.config.exit_layer != exit_layer:
        raise ValueError(f"exit_layer={exit_layer}, but the network in {folder} was trained for exit layer "
                         f"{network.config.exit_layer}")
    return network
