"""Generation options of one ``generate`` call, resolved from the call and ``model.generation_config`` as
``model.generate`` resolves them; options the decoder does not apply raise, naming themselves."""
from __future__ import annotations

import functools
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


# model.generate's own options that this decoder does not implement, with the values that leave them inactive
# (an empty list counts as inactive for the list-valued ones); any other value raises, naming the option.
GENERATE_ONLY_OPTIONS = {
    "num_return_sequences": (None, 1), "stopping_criteria": (None,), "logits_processor": (None,),
    "stop_strings": (None,), "max_time": (None,), "prefix_allowed_tokens_fn": (None,), "assistant_model": (None,),
    "negative_prompt_ids": (None,), "negative_prompt_attention_mask": (None,), "synced_gpus": (None, False),
    "output_scores": (None, False), "output_logits": (None, False), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "use_cache": (None, True), "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0), "constraints": (None,), "force_words_ids": (None,), "dola_layers": (None,),
    "penalty_alpha": (None,), "cache_implementation": (None,), "generation_config": (None,),
}
# generate's options that change nothing here: the output is always (sequences, stats); length_penalty and
# early_stopping only act with beam search (itself refused through num_beams); the tokenizer only serves
# stop_strings (refused when set).
IGNORABLE_GENERATE_OPTIONS = frozenset({"return_dict_in_generate", "length_penalty", "early_stopping", "tokenizer"})

# transformers' defaults for options neither the call nor the model's generation_config sets (as in
# GenerationConfig._get_default_generation_params, read from transformers when it has it).
_FALLBACK_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


@functools.lru_cache(maxsize=None)
def _transformers_defaults() -> dict:
    try:
        from transformers import GenerationConfig
        defaults = GenerationConfig._get_default_generation_params()
    except (ImportError, AttributeError):
        return dict(_FALLBACK_DEFAULTS)
    return {**_FALLBACK_DEFAULTS, **defaults}


def _text_config(model):
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def _is_inactive(value, inactive: tuple, empty_list: bool = False) -> bool:
    """Whether an option's value leaves it inactive: one of ``inactive`` (or, with ``empty_list``, an empty list).
    A list or tensor value is never compared element-wise."""
    if isinstance(value, (list, tuple)):
        return empty_list and len(value) == 0
    if value is None or isinstance(value, torch.Tensor):
        return value is None and None in inactive
    return any(v is not None and value == v for v in inactive)


def check_generate_options(options: dict) -> None:
    """Raises for a generate-only option set to a value the decoder cannot honour, naming it."""
    for name, value in options.items():
        inactive = GENERATE_ONLY_OPTIONS.get(name)
        if inactive is not None and not _is_inactive(value, inactive, empty_list=True):
            raise ValueError(f"{name}={value!r}: model.generate's option {name} is not supported by the "
                             f"decoder (its inactive value: {inactive[-1]!r})")


def check_model_inputs(model, model_inputs: dict) -> None:
    """Keywords the model's forward would not use raise, naming them, as model.generate validates them (a
    misspelt option lands here: ``max_new_tokenz``)."""
    validate = getattr(model, "_validate_model_kwargs", None)
    if validate is not None:
        validate(dict(model_inputs))
        return
    import inspect
    accepted = set(inspect.signature(model.forward).parameters)
    unused = [name for name, value in model_inputs.items() if value is not None and name not in accepted]
    if unused and "kwargs" not in accepted:
        raise ValueError(f"The following `model_kwargs` are not used by the model: {unused}")


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
            pad_token_id, extra: dict, max_length=None) -> GenerationOptions:
    """The call's options, the model's ``generation_config`` filling what the call leaves out and
    transformers' defaults what both leave out (max_length 20, temperature 1.0, top_k 50, top_p 1.0), as
    ``model.generate`` resolves them. ``extra``: the logits-processor options the call passed (names of
    :data:`UNSUPPORTED_GENERATION_OPTIONS`)."""
    config = getattr(model, "generation_config", None)
    defaults = _transformers_defaults()

    def get(name, default=None):
        value = getattr(config, name, None) if config is not None else None
        if value is None:
            value = defaults.get(name, default)
        return default if value is None else value

    for name, value in extra.items():
        inactive = UNSUPPORTED_GENERATION_OPTIONS.get(name)
        if inactive is not None and not _is_inactive(value, inactive):
            raise ValueError(f"{name}={value!r}: this logits processor is not supported by the decoder")
    for name, inactive in UNSUPPORTED_GENERATION_OPTIONS.items():
        if name not in extra and not _is_inactive(get(name), inactive):
            raise ValueError(f"the model's generation_config sets {name}={get(name)!r}, a logits processor "
                             f"the decoder does not apply; pass {name}={inactive[-1]!r} to override")
    if max_new_tokens is None:
        max_new_tokens = getattr(config, "max_new_tokens", None)
    if max_new_tokens is None:
        # A max_length from the call or the config counts the prompt; with neither, transformers generates
        # its default max_length (20) new tokens, within max_position_embeddings.
        if max_length is None:
            max_length = getattr(config, "max_length", None)
        if max_length is not None:
            max_new_tokens = max_length - prompt_len if isinstance(max_length, int) else max_length
        else:
            max_new_tokens = defaults["max_length"]
            limit = getattr(_text_config(model), "max_position_embeddings", None)
            if isinstance(limit, int):
                max_new_tokens = min(prompt_len + max_new_tokens, limit) - prompt_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    do_sample = bool(get("do_sample", False)) if do_sample is None else bool(do_sample)
    temperature = get("temperature", 1.0) if temperature is None else temperature
    top_k = get("top_k") if top_k is None else top_k
    top_p = get("top_p") if top_p is None else top_p
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
