"""Generation options of one ``generate`` call, resolved from the call and ``model.generation_config`` as
``model.generate`` resolves them; options the decoder does not apply raise, naming themselves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

# Logits processors that model.generate would apply and this decoder does not (name -> inactive values).
UNSUPPORTED_GENERATION_OPTIONS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_new_tokens": (None, 0), "min_length": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "min_p": (None,), "encoder_repetition_penalty": (None, 1.0),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False), "num_beams": (None, 1),
    "watermarking_config": (None,), "top_h": (None,),
}


@dataclass(frozen=True)
class Sampling:
    """How the full model's tokens (and the draft's) are chosen: greedy, or sampled after temperature,
    top-k and top-p, in model.generate's order."""
    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    sampling: Sampling
    eos: FrozenSet[int]
    pad: int


def resolve(model, prompt_len: int, *, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
            pad_token_id, extra: dict) -> GenerationOptions:
    """The call's options, the model's ``generation_config`` filling what the call leaves out. ``extra``: the
    logits-processor options the call passed (names of :data:`UNSUPPORTED_GENERATION_OPTIONS`)."""
    config = getattr(model, "generation_config", None)

    def get(name, default=None):
        return getattr(config, name, default) if config is not None else default

    for name, value in extra.items():
        inactive = UNSUPPORTED_GENERATION_OPTIONS.get(name)
        if inactive is not None and value not in inactive:
            raise ValueError(f"{name}={value!r}: this logits processor is not supported by the decoder")
    for name, inactive in UNSUPPORTED_GENERATION_OPTIONS.items():
        if name not in extra and get(name) not in inactive:
            raise ValueError(f"the model's generation_config sets {name}={get(name)!r}, a logits processor "
                             f"the decoder does not apply; pass {name}={inactive[-1]!r} to override")
    if max_new_tokens is None:
        max_new_tokens = get("max_new_tokens")
        if max_new_tokens is None:
            max_new_tokens = get("max_length", 20) - prompt_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    do_sample = bool(get("do_sample", False)) if do_sample is None else bool(do_sample)
    temperature = get("temperature", 1.0) if temperature is None else temperature
    top_k = get("top_k", None) if top_k is None else top_k
    top_p = get("top_p", None) if top_p is None else top_p
    if do_sample:
        if temperature is None or not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos = get("eos_token_id") if eos_token_id is None else eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = [int(e) for e in eos.flatten().tolist()]
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = get("pad_token_id") if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    sampling = Sampling(do_sample, float(temperature or 1.0), top_k or None,
                        top_p if top_p is not None and top_p < 1.0 else None)
    return GenerationOptions(max_new_tokens, sampling, frozenset(eos), int(pad))
