"""Generation options of one ``generate`` call, resolved by transformers' own code as ``model.generate`` resolves
them: the call's keywords over ``model.generation_config`` over transformers' defaults
(``_prepare_generation_config``), the special tokens and lengths (``_prepare_special_tokens``,
``_prepare_generated_length``), model keywords validated (``_validate_model_kwargs``). What the decoder cannot
honour raises, naming the option; the logits processors and stopping criteria ``generate`` would build are built
by :mod:`.processing` from the same resolved config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

# model.generate's keywords that are not GenerationConfig fields and that the decoder does not implement, with the
# values that leave them inactive; any other value raises, naming the keyword.
REFUSED_GENERATE_KEYWORDS = {
    "synced_gpus": (None, False), "assistant_model": (None,), "assistant_tokenizer": (None,),
    "negative_prompt_ids": (None,), "negative_prompt_attention_mask": (None,), "custom_generate": (None,),
    "trust_remote_code": (None, False),
}
# model.generate's keywords that the decoder takes (the rest of its signature): the logits processors and
# stopping criteria lists, prefix_allowed_tokens_fn, the tokenizer stop_strings need, a GenerationConfig.
GENERATE_KEYWORDS = frozenset({"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "tokenizer",
                               "generation_config"})

# GenerationConfig fields whose active values the decoder cannot honour: name -> (inactive values, what it is).
# Beam search, contrastive search, DoLa and assisted decoding are other decoding methods; classifier-free guidance
# runs a second model pass per token; output_* return per-step tensors the decoder does not produce; a
# watermarking processor keeps state across calls.
REFUSED_GENERATION_OPTIONS = {
    "num_beams": ((None, 1), "beam search"), "num_beam_groups": ((None, 1), "group beam search"),
    "diversity_penalty": ((None, 0.0), "group beam search"), "penalty_alpha": ((None, 0.0), "contrastive search"),
    "dola_layers": ((None,), "DoLa decoding"), "prompt_lookup_num_tokens": ((None,), "prompt lookup decoding"),
    "constraints": ((None,), "constrained beam search"), "force_words_ids": ((None,), "constrained beam search"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance"),
    "watermarking_config": ((None,), "a watermarking logits processor"), "token_healing": ((None, False), "token healing"),
    "output_scores": ((None, False), "per-step scores"), "output_logits": ((None, False), "per-step logits"),
    "output_attentions": ((None, False), "per-step attentions"),
    "output_hidden_states": ((None, False), "per-step hidden states"),
}


def _is_inactive(value, inactive: tuple) -> bool:
    """Whether an option's value is one of ``inactive``; a list, tuple or tensor is never compared element-wise
    (an empty list counts as inactive)."""
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    if value is None or isinstance(value, torch.Tensor):
        return value is None and None in inactive
    return any(v is not None and value == v for v in inactive)


def check_generate_keywords(keywords: dict) -> None:
    """Raises for a model.generate keyword the decoder does not implement, set to an active value, naming it."""
    for name, value in keywords.items():
        inactive = REFUSED_GENERATE_KEYWORDS[name]
        if not _is_inactive(value, inactive):
            raise ValueError(f"{name}={value!r}: model.generate's option {name} is not supported by the decoder "
                             f"(its inactive value: {inactive[-1]!r})")


def check_model_inputs(model, model_inputs: dict) -> None:
    """Keywords the model's forward would not use raise, naming them, as model.generate validates them (a
    misspelt option lands here: ``max_new_tokenz``): transformers' own check (:func:`resolve` needs the model's
    generation methods too)."""
    model._validate_model_kwargs(dict(model_inputs))


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
    config: object = None        # the resolved transformers GenerationConfig (special-token tensors set)


def resolve(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], call: dict,
            generation_config=None):
    """``(GenerationOptions, model_kwargs)``: the call's options (``call``: every keyword of the call that is
    neither the prompt nor a generate keyword) resolved as ``model.generate`` resolves them; ``model_kwargs``
    the keywords that are not generation options, validated as the model's inputs by the caller. Raises, naming
    the option, for a decoding method or output the decoder does not implement."""
    prompt_len = input_ids.shape[1]
    defaults = getattr(model, "generation_config", None)
    has_default_max_length = (call.get("max_length") is None and getattr(generation_config, "max_length", None) is None
                              and getattr(defaults, "max_length", None) is None)
    has_default_min_length = (call.get("min_length") is None and getattr(generation_config, "min_length", None) is None
                              and getattr(defaults, "min_length", None) is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **call)
    for name, (inactive, what) in REFUSED_GENERATION_OPTIONS.items():
        value = getattr(config, name, None)
        if not _is_inactive(value, inactive):
            source = name if name in call else f"the model's generation_config {name}"
            raise ValueError(f"{name}={value!r}: {what} is not supported by the decoder ({source}; "
                             f"its inactive value: {inactive[-1]!r})")
    if (config.num_return_sequences or 1) > 1 and not config.do_sample:
        raise ValueError(f"num_return_sequences={config.num_return_sequences}: greedy decoding returns one sequence "
                         f"per prompt row (as in model.generate, which raises too); sample (do_sample=True) for several")
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device,
                                  batch_size=input_ids.shape[0])
    config = model._prepare_generated_length(generation_config=config, has_default_max_length=has_default_max_length,
                                             has_default_min_length=has_default_min_length,
                                             model_input_name="input_ids", inputs_tensor=input_ids,
                                             input_ids_length=prompt_len)
    max_new_tokens = config.max_length - prompt_len if isinstance(config.max_length, int) else config.max_length
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}"
                         + (f" (max_length={config.max_length} with a {prompt_len}-token prompt)"
                            if config.max_new_tokens is None else ""))
    do_sample = bool(config.do_sample)
    temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
    if do_sample:
        if temperature is None or not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_tensor = config._eos_token_tensor
    eos = [] if eos_tensor is None else [int(e) for e in eos_tensor.flatten().tolist()]
    pad_tensor = config._pad_token_tensor
    pad = int(pad_tensor) if pad_tensor is not None else 0
    sampling = Sampling(do_sample, float(temperature or 1.0), top_k or None,
                        top_p if top_p is not None and top_p < 1.0 else None)
    return GenerationOptions(max_new_tokens, sampling, frozenset(eos), pad, config), model_kwargs

