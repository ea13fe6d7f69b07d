"""Choosing the exit layer by measurement: for a few candidate E, train an imitation network briefly, then run
the held-out prompts through ``model.generate``, the decoder with plain early exit and the decoder with the
network, back to back per prompt, and report accepted lengths and measured speedups.

A shallow E drafts cheaply but is accepted less; a deep E is accepted more but each draft costs more
(docs/design.md, "Cost model"). Where the balance lies depends on the model and the hardware, so it is measured,
not guessed.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .data import Encoder, Example
from .trainer import TrainConfig, train_imitation


@dataclass
class ExitLayerReport:
    exit_layer: int
    accepted_early_exit: float      # drafted tokens accepted per step, plain early exit
    accepted_imitation: float       # the same with the trained network
    seconds_generate: float         # model.generate over the held-out prompts
    seconds_early_exit: float
    seconds_imitation: float
    identical: bool                 # both decoders returned model.generate's tokens for every prompt

    @property
    def speedup_early_exit(self) -> float:
        return self.seconds_generate / self.seconds_early_exit

    @property
    def speedup_imitation(self) -> float:
        return self.seconds_generate / self.seconds_imitation

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup_early_exit=self.speedup_early_exit,
                    speedup_imitation=self.speedup_imitation)


def default_candidates(num_layers: int) -> List[int]:
    """About N/8, N/4, 3N/8 and N/2, at least 1, distinct."""
    values = {max(1, min(num_layers - 1, round(num_layers * fraction))) for fraction in (1 / 8, 1 / 4, 3 / 8, 1 / 2)}
    return sorted(values)


@torch.no_grad()
def measure(model: nn.Module, encoder: Encoder, examples: Sequence[Example], exit_layer: int, network, *,
            draft_len: int, max_new_tokens: int) -> ExitLayerReport:
    """Times model.generate, plain early exit and the network's decoder on each prompt, back to back (so that
    load on a shared machine hits all three alike), after one warm-up call of each."""
    from ..decoding import SelfSpeculativeDecoder
    device = next(model.parameters()).device
    plain = SelfSpeculativeDecoder(model, exit_layer=exit_layer, draft_len=draft_len)
    imitated = SelfSpeculativeDecoder(model, exit_layer=exit_layer, imitation=network, draft_len=draft_len)
    options = dict(max_new_tokens=max_new_tokens, do_sample=False)
    pad = encoder.pad_token_id
    seconds = {"generate": 0.0, "plain": 0.0, "imitation": 0.0}
    accepted = {"plain": [], "imitation": []}
    identical = True

    def timed(function, inputs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = function(**inputs, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    prompts = [{name: value.to(device) for name, value in encoder.prompt_inputs(example).items()}
               for example in examples]
    if prompts:   # warm-up
        model.generate(**prompts[0], **options, pad_token_id=pad)
        plain.generate(**prompts[0], **options)
        imitated.generate(**prompts[0], **options)
    for inputs in prompts:
        expected, elapsed = timed(lambda **kw: model.generate(**kw, pad_token_id=pad), inputs)
        seconds["generate"] += elapsed
        for name, decoder in (("plain", plain), ("imitation", imitated)):
            out, elapsed = timed(decoder.generate, inputs)
            seconds[name] += elapsed
            accepted[name].extend(a for row in out.stats.accepted for a in row)
            identical = identical and torch.equal(out.sequences, expected)
    mean = {name: sum(values) / len(values) if values else 0.0 for name, values in accepted.items()}
    return ExitLayerReport(exit_layer=exit_layer, accepted_early_exit=mean["plain"],
                           accepted_imitation=mean["imitation"], seconds_generate=seconds["generate"],
                           seconds_early_exit=seconds["plain"], seconds_imitation=seconds["imitation"],
                           identical=identical)


def fastest(reports: Sequence[ExitLayerReport]) -> Tuple[ExitLayerReport, str, float]:
    """(report, drafter, speedup) of the fastest of all measured configurations: plain early exit and the
    imitation network at each exit layer (``drafter`` is ``"plain early exit"`` or ``"imitation network"``). A
    tie goes to the earlier report, and within one report to plain early exit (no network to ship)."""
    if not reports:
        raise ValueError("no exit layer was measured")
    configurations = [(report, drafter, speedup) for report in reports
                      for drafter, speedup in (("plain early exit", report.speedup_early_exit),
                                               ("imitation network", report.speedup_imitation))]
    return max(configurations, key=lambda configuration: configuration[2])


def format_table(reports: Sequence[ExitLayerReport], draft_len: int) -> str:
    lines = ["| exit layer | accepted / step, early exit | accepted / step, imitation | speedup, early exit | "
             "speedup, imitation | identical output |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for report in reports:
        lines.append(f"| {report.exit_layer} | {report.accepted_early_exit:.2f} | {report.accepted_imitation:.2f} | "
                     f"{report.speedup_early_exit:.2f}x | {report.speedup_imitation:.2f}x | "
                     f"{'yes' if report.identical else 'NO'} |")
    best, drafter, speedup = fastest(reports)
    lines.append("")
    lines.append(f"draft length {draft_len}; speedup = model.generate time / decoder time on the held-out prompts. "
                 f"Fastest: exit layer {best.exit_layer} ({speedup:.2f}x with "
                 f"{'its imitation network' if drafter == 'imitation network' else 'plain early exit'}).")
    return "\n".join(lines)


def pick_exit_layer(model: nn.Module, processor, data_dir: Path, out_dir: Path, config: TrainConfig,
                    candidates: Optional[Sequence[int]] = None, *, resume: bool = False, overwrite: bool = False,
                    progress: bool = True) -> List[ExitLayerReport]:
    """Trains one network per candidate exit layer (``config`` with its ``exit_layer`` replaced) into
    ``out_dir/exit_layer_E``, sharing one cache of the model's responses, and measures each. Writes
    ``out_dir/exit_layers.json`` and ``exit_layers.md``; returns the reports in candidate order."""
    from ..decoding.adapters import adapter_for
    out_dir = Path(out_dir)
    num_layers = adapter_for(model).num_layers
    candidates = sorted(set(candidates)) if candidates else default_candidates(num_layers)
    for exit_layer in candidates:   # every candidate checked before any training
        replace(config, exit_layer=exit_layer).check(num_layers)
    if resume and overwrite:
        raise ValueError("pass --resume or --overwrite, not both")
    if overwrite:
        for name in ("responses.jsonl", "exit_layers.json", "exit_layers.md"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the prompts as training formats them (train_imitation's encoder), so that the speedups are measured on them
    encoder = Encoder(processor, max_response_tokens=config.max_response_tokens, chat_template=not config.raw_prompts)
    reports = []
    for exit_layer in candidates:
        result = train_imitation(model, processor, data_dir, out_dir / f"exit_layer_{exit_layer}",
                                 replace(config, exit_layer=exit_layer), resume=resume, overwrite=overwrite,
                                 progress=progress, responses_cache=out_dir / "responses.jsonl")
        if not result.held_out:
            raise ValueError("pick-exit-layer measures on held-out prompts: --eval-fraction must be > 0")
        report = measure(model, encoder, result.held_out, exit_layer, result.network, draft_len=config.draft_len,
                         max_new_tokens=config.eval_max_new_tokens)
        reports.append(report)
        if progress:
            print(f"exit layer {exit_layer}: {report.accepted_imitation:.2f} accepted per step, "
                  f"{report.speedup_imitation:.2f}x", file=sys.stderr)
    table = format_table(reports, config.draft_len)
    (out_dir / "exit_layers.md").write_text(table + "\n")
    (out_dir / "exit_layers.json").write_text(json.dumps(
        {"draft_len": config.draft_len, "reports": [report.to_dict() for report in reports]}, indent=2) + "\n")
    return reports
