"""How often a drafter agrees with the full model, measured teacher-forced in one forward per batch.

Running :class:`~fastvlm_kernels.SelfSpeculativeDecoder` measures the accepted length for real but costs a
full speculative decode per prompt and per setting. Along an answer the full model itself would give, the
decoder's draft at a position sees exactly the tokens before it (earlier drafts were accepted, or replaced
by the full model's own), so whether a drafted token is accepted depends only on whether the draft head's
token there equals the full model's (greedy). One teacher-forced forward over prompt + answer therefore
gives, for every answer position, the draft's and the full model's tokens; walking each answer the way the
decoder does (from a step's first position, count the agreeing run up to k, emit it plus one) gives the mean
accepted length for every draft length at once. It equals the decoder's own figure up to floating-point
differences between a full-sequence forward and cached decoding (tested on small models).

Used to compare exit layers, network kinds and draft vocabularies cheaply; the reported figures of the
project come from the decoder itself.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .data import Encoder, Example
from .losses import draft_logits
from .teacher import Taps, teacher_forward


@dataclass
class AcceptanceProfile:
    agreement: float                       # share of answer positions where the draft's token is the model's
    positions: int                         # answer positions compared (the prefill's first token excluded)
    mean_accepted: Dict[int, float]        # draft length k -> drafted tokens accepted per decoder step
    per_example: List[List[bool]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"agreement": self.agreement, "positions": self.positions,
                "mean_accepted": {str(k): v for k, v in self.mean_accepted.items()}}


def accepted_by_walk(matches: Sequence[bool], draft_len: int) -> List[int]:
    """The accepted count of each decoder step along one answer: ``matches[j]`` says whether the draft
    agrees with the full model at answer position j (position 0, the prefill's token, is not drafted). A step
    starting at position p drafts min(k, positions left) tokens, accepts the agreeing run, and emits it plus
    the full model's next token."""
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    accepted, p, n = [], 1, len(matches)
    while p < n:
        k = min(draft_len, n - p)
        run = 0
        while run < k and matches[p + run]:
            run += 1
        accepted.append(run)
        p += run + 1
    return accepted


def teacher_forced_acceptance(model: nn.Module, encoder: Encoder, examples: Sequence[Example], exit_layer: int,
                              network: Optional[nn.Module] = None, *, draft_vocab: Optional[torch.Tensor] = None,
                              draft_lens: Sequence[int] = (1, 2, 3, 4, 6, 8), batch_size: int = 8,
                              progress: bool = False) -> AcceptanceProfile:
    """Teacher-forced acceptance of the drafter (layers below ``exit_layer``, then ``network`` or nothing,
    then the final norm and the LM head over ``draft_vocab`` or the whole vocabulary) against the full model,
    over ``examples`` with their responses (given, or generated and cached beforehand). ``draft_vocab``
    None takes the network's own, if it has one."""
    if draft_vocab is None and network is not None:
        draft_vocab = getattr(network, "draft_vocab", None)
    return compare_drafters(model, encoder, examples, exit_layer, {"drafter": (network, draft_vocab)},
                            draft_lens=draft_lens, batch_size=batch_size, progress=progress)["drafter"]


@torch.no_grad()
def compare_drafters(model: nn.Module, encoder: Encoder, examples: Sequence[Example], exit_layer: int,
                     drafters: Dict[str, tuple], *, draft_lens: Sequence[int] = (1, 2, 3, 4, 6, 8),
                     batch_size: int = 8, progress: bool = False) -> Dict[str, AcceptanceProfile]:
    """:func:`teacher_forced_acceptance` of several drafters at one exit layer, ``{name: (network or None,
    draft_vocab or None)}``, from one forward of the full model per batch."""
    from ..decoding.adapters import adapter_for
    adapter = adapter_for(model)
    if not 1 <= exit_layer < adapter.num_layers:
        raise ValueError(f"exit_layer must be in [1, {adapter.num_layers - 1}], got {exit_layer}")
    device = next(model.parameters()).device
    prepared = {}
    for name, (network, vocab) in drafters.items():
        if network is not None and network.config.exit_layer != exit_layer:
            raise ValueError(f"drafter {name!r}: its network was trained for exit layer {network.config.exit_layer}, "
                             f"not {exit_layer}")
        prepared[name] = (network, vocab.to(device, torch.int64) if vocab is not None else None)
    taps = Taps(adapter.layers, exit_layer, adapter.num_layers)
    modes = {name: network.training for name, (network, _) in prepared.items() if network is not None}
    for name in modes:
        prepared[name][0].eval()
    rows: Dict[str, List[List[bool]]] = {name: [] for name in prepared}
    try:
        from tqdm.auto import tqdm
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc="teacher-forced acceptance", disable=not progress, file=sys.stderr):
            batch = encoder.collate(list(examples[start:start + batch_size])).to(device)
            teacher = teacher_forward(adapter, taps, batch)
            target = teacher.logits.argmax(dim=-1)
            counts = batch.loss_mask.sum(dim=1).tolist()
            for name, (network, vocab) in prepared.items():
                hidden = teacher.exit_states
                if network is not None:
                    hidden = network(hidden.to(next(network.parameters()).dtype), teacher.position_embeddings,
                                     attention_mask=teacher.attention_mask)
                selected = hidden[batch.loss_mask].to(adapter.norm.weight.dtype)
                draft = draft_logits(selected, adapter.norm, adapter.lm_head, vocab).argmax(dim=-1)
                if vocab is not None:
                    draft = vocab[draft]
                agree = (draft == target).tolist()
                offset = 0
                for count in counts:
                    rows[name].append([bool(a) for a in agree[offset:offset + count]])
                    offset += count
    finally:
        for name, mode in modes.items():
            prepared[name][0].train(mode)
    return {name: _profile(found, draft_lens) for name, found in rows.items()}


def _profile(rows: List[List[bool]], draft_lens: Sequence[int]) -> AcceptanceProfile:
    compared = [row[1:] for row in rows]
    positions = sum(len(row) for row in compared)
    agreement = sum(sum(row) for row in compared) / positions if positions else 0.0
    mean_accepted = {}
    for k in draft_lens:
        steps = [a for row in rows for a in accepted_by_walk(row, k)]
        mean_accepted[int(k)] = sum(steps) / len(steps) if steps else 0.0
    return AcceptanceProfile(agreement=agreement, positions=positions, mean_accepted=mean_accepted, per_example=rows)
