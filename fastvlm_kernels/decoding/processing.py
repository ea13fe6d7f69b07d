"""model.generate's logits processors and stopping criteria in the decoder, applied position by position.

``generate`` builds a ``LogitsProcessorList`` (repetition penalty, n-gram blocking, minimum lengths, bad words,
suppressed and forced tokens, sequence bias, length penalties, the sampling warpers, the user's own list merged
in) and a ``StoppingCriteriaList`` (max length and time, stop strings, EOS, the user's) from the resolved
GenerationConfig. :class:`Processing` builds the same lists with transformers' own code
(``model._get_logits_processor``, ``model._get_stopping_criteria``), one list per row (a processor may hold
per-row state: the repetition penalty's prompt padding, ``prefix_allowed_tokens_fn``'s batch index), and calls
a row's list on ``[1, L]`` input ids: exactly the prefix ``generate`` would show at that position (the row's
left-padded prompt, the tokens it emitted, and, at a drafted position, the drafts before it). So every verified
position's target is what ``generate`` computes there, whatever the step kept before it, and the draft is
processed the same way (its own prefix) so that it proposes what the processed target would.

A processor must be a function of (input ids, scores) for a row: the decoder calls it for drafted positions that
may be rejected and in a different order than ``generate`` (per row, per position). Stopping criteria are called
for each emitted token with the row's ids up to it and ``scores=None`` (the built-in criteria do not read them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

# Warpers the decoder applies itself (Sampling: temperature, top-k, top-p over the fused head's logits) when the
# list holds nothing else; and the criteria that Rows applies itself (EOS, max_length).
_OWN_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")
_OWN_CRITERIA = ("EosTokenCriteria", "MaxLengthCriteria")


class Processing:
    """The call's logits processors (``processors``: one list per row, None when only the decoder's own warpers
    are active) and stopping criteria (``criteria``: one list per row, None when only EOS and max_length)."""

    def __init__(self, prompt: torch.Tensor, processors: Optional[List], criteria: Optional[List]):
        self.prompt = prompt                                      # [B, P] the left-padded prompt as given
        self.processors, self.criteria = processors, criteria
        self._prompt_lists = [row.tolist() for row in prompt.cpu()]
        self._base: List[Optional[torch.Tensor]] = [None] * prompt.shape[0]
        self._base_len = [-1] * prompt.shape[0]

    @classmethod
    def build(cls, model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], config, *,
              logits_processor=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, tokenizer=None,
              ) -> "Processing":
        from transformers import LogitsProcessorList, StoppingCriteriaList
        batch, prompt_len = input_ids.shape
        user_processors = LogitsProcessorList(logits_processor or [])
        user_criteria = StoppingCriteriaList(stopping_criteria or [])
        full_mask = attention_mask is None or bool((attention_mask == 1).all())
        processors = []
        for b in range(batch):
            fn = None
            if prefix_allowed_tokens_fn is not None:
                fn = (lambda row: lambda _batch_id, ids: prefix_allowed_tokens_fn(row, ids))(b)
            mask = None if full_mask else attention_mask[b:b + 1]
            processors.append(model._get_logits_processor(
                generation_config=config, input_ids_seq_length=prompt_len, encoder_input_ids=input_ids[b:b + 1],
                prefix_allowed_tokens_fn=fn, logits_processor=user_processors, device=input_ids.device,
                model_kwargs={"attention_mask": mask}, negative_prompt_ids=None, negative_prompt_attention_mask=None))
        if all(type(p).__name__ in _OWN_WARPERS for p in processors[0]) and not user_processors:
            processors = None
        criteria = model._get_stopping_criteria(generation_config=config, stopping_criteria=user_criteria,
                                                tokenizer=tokenizer)
        criteria = [c for c in criteria if type(c).__name__ not in _OWN_CRITERIA
                    or any(c is user for user in user_criteria)]
        criteria = [StoppingCriteriaList(criteria)] * batch if criteria else None
        return cls(input_ids, processors, criteria)

    @property
    def active(self) -> bool:
        return self.processors is not None

    def prefix(self, b: int, emitted: Sequence[int], extra: Sequence[int] = ()) -> torch.Tensor:
        """``[1, L]`` ids of row b: its prompt, ``emitted`` (the row's tokens so far), then ``extra``."""
        if self._base_len[b] != len(emitted):
            self._base[b] = torch.tensor(self._prompt_lists[b] + list(emitted), dtype=self.prompt.dtype,
                                         device=self.prompt.device)
            self._base_len[b] = len(emitted)
        base = self._base[b]
        if not extra:
            return base[None]
        tail = torch.tensor(list(extra), dtype=base.dtype, device=base.device)
        return torch.cat([base, tail])[None]

    def scores(self, logits: torch.Tensor, tokens: Sequence[Sequence[int]], extras, active: Sequence[int]
               ) -> torch.Tensor:
        """Processed scores ``[B, n, V]`` (float32) of ``logits [B, n, V]``: row b's position i through row b's
        list with the ids ``prompt + tokens[b] + extras[b][i]`` (``extras``: per row, per position, the drafted
        tokens before it). Only the rows in ``active`` are processed; the others keep their logits."""
        scores = logits.float()
        out = scores.clone()
        for b in active:
            processors, emitted, row_extras = self.processors[b], tokens[b], extras[b]
            for i in range(scores.shape[1]):
                ids = self.prefix(b, emitted, row_extras[i])
                out[b, i] = processors(ids, scores[b, i][None].clone())[0]
        return out

    def stops(self, b: int, emitted: Sequence[int]) -> bool:
        """Whether row b's stopping criteria end it after its last emitted token."""
        ids = self.prefix(b, emitted)
        return bool(self.criteria[b](ids, None)[0])
