"""Rows: the per-row state of one ``generate`` call, and the one place a step's outcome is applied.

A step (speculative or plain) ends with ``accept_len [B]`` and ``emitted [B, T]`` on the device. ``advance``
applies them: one device-to-host read (both tensors in one transfer), each unfinished row's tokens appended
(up to EOS or max_new_tokens), the lengths advanced on the device without a host-to-device copy, every cache
layer rolled back to them in place, and the next step's first token taken on the device. A finished row
keeps running with the others (static shapes) but keeps nothing: its length stays put.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..cache import KVCache


class Rows:
    """Per-row state: lengths (``[B]`` int32 on the device, and their one host copy), the next token ``x0``,
    finished rows, the tokens emitted so far, and the cache they index.

    Invariant between steps: every cache layer holds row b's positions ``[0, lengths[b])``; ``x0[b]`` is the
    token at position ``lengths[b]`` (emitted, not yet in any cache layer)."""

    def __init__(self, cache: KVCache, lengths: torch.Tensor, offsets: torch.Tensor, *, max_new_tokens: int,
                 eos, streamer=None, stop: Optional[Callable[[int, List[int]], bool]] = None):
        self.cache = cache
        self.batch = lengths.shape[0]
        self.lengths = lengths.to(device=cache.device, dtype=torch.int32)   # [B]
        self.host_lengths: List[int] = [int(v) for v in self.lengths.tolist()]
        self.offsets = offsets.to(cache.device)          # [B] rotary offset: position = cache index + offset
        self.x0: Optional[torch.Tensor] = None           # [B] int64
        self.keep = torch.ones(self.batch, dtype=torch.int32, device=cache.device)   # 0 once a row finished
        self.tokens: List[List[int]] = [[] for _ in range(self.batch)]
        self.finished = [False] * self.batch
        self.max_new_tokens, self.eos, self.streamer = max_new_tokens, eos, streamer
        self.stop = stop        # stopping criteria beyond EOS and max_new_tokens: stop(row, its tokens) -> bool
        # Without EOS tokens, model.generate pads nothing: a row its criteria stop keeps generating until every
        # row has stopped, and every row then ends at the length the last one stopped at. stop_at[b]: the tokens
        # row b had when its criteria first held.
        self.stop_at: List[Optional[int]] = [None] * self.batch
        cache.rollback_unchecked(self.lengths, self.host_lengths)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def active(self) -> List[int]:
        return [b for b in range(self.batch) if not self.finished[b]]

    def positions(self, num_tokens: int) -> torch.Tensor:
        """``[B, T]`` positions of the next T tokens (from each row's length)."""
        start = self.lengths.long() + self.offsets
        if num_tokens == 1:
            return start[:, None]
        return start[:, None] + torch.arange(num_tokens, device=start.device)

    def start(self, x0: torch.Tensor) -> None:
        """The prefill's token: each row's first new token."""
        self.x0 = x0
        self._emit([[token] for token in x0.tolist()])

    def advance(self, accept_len: Optional[torch.Tensor], emitted: torch.Tensor,
                paths: Optional[Sequence[Tuple[Optional[slice], torch.Tensor]]] = None) -> List[int]:
        """Applies a step: row b keeps x0 and its first ``accept_len[b]`` drafts (their KV is in the cache) and
        emits ``emitted[b, :accept_len[b] + 1]``; ``emitted[b, accept_len[b]]`` is its next x0. ``accept_len``
        None: a plain step (``emitted [B, 1]``, nothing drafted). ``paths``: a draft tree's step, whose kept
        nodes are not the first positions after each row's length: ``(layers, path [B, N])`` pairs, path being
        0 (the root, x0) then the accepted nodes' indices in those cache layers' order, -1 padded (``layers``
        None: every layer); the nodes are compacted in place (``KVCache.compact``, no read) instead of a
        rollback. Returns the accepted lengths of the rows that were unfinished at the step's start (what the
        verifier agreed on); ``last_kept`` then holds each such row's (drafted tokens kept, tokens emitted)."""
        active = self.active()
        start = self.lengths
        if accept_len is None:
            tokens = emitted[:, 0]
            host = [[0, token] for token in tokens.tolist()]                                   # the one read
            self.lengths = self.lengths + self.keep
            self.x0 = tokens
        else:
            host = torch.cat([accept_len.to(emitted.dtype)[:, None], emitted], dim=1).tolist()  # the one read
            self.lengths = self.lengths + (accept_len.to(torch.int32) + 1) * self.keep
            self.x0 = emitted.gather(1, accept_len.long()[:, None])[:, 0]
        self.host_lengths = [length + (row[0] + 1 if not self.finished[b] else 0)
                             for b, (length, row) in enumerate(zip(self.host_lengths, host))]
        if paths is None:
            self.cache.rollback_unchecked(self.lengths, self.host_lengths)
        else:
            kept = self.keep.bool()[:, None]          # a finished row keeps nothing: all -1, its length stays
            for layers, path in paths:
                self.cache.compact(start, torch.where(kept, path, -1), self.host_lengths, validate=False,
                                   layers=layers)
        before = [len(self.tokens[b]) for b in active]
        self._emit([row[1:row[0] + 2] for row in host])
        # what each row kept: a row that ends inside the step (EOS, max_new_tokens, a stopping criterion) keeps
        # fewer tokens than its drafts agreed on
        self.last_kept = [(min(host[b][0], len(self.tokens[b]) - n), len(self.tokens[b]) - n)
                          for b, n in zip(active, before)]
        return [host[b][0] for b in active]

    def _emit(self, rows_tokens: List[List[int]]) -> None:
        streamed = len(self.tokens[0])
        newly_finished = False
        for b, tokens in enumerate(rows_tokens):
            if self.finished[b]:
                continue
            row = self.tokens[b]
            for token in tokens:
                row.append(token)
                if token in self.eos or len(row) >= self.max_new_tokens:
                    self.finished[b] = newly_finished = True
                    break
                if self.stop is not None and self.stop_at[b] is None and self.stop(b, row):
                    if self.eos:
                        self.finished[b] = newly_finished = True
                        break
                    self.stop_at[b] = len(row)
        if self.stop is not None and not self.eos and all(at is not None for at in self.stop_at) \
                and self.max_new_tokens > max(self.stop_at):
            # every row has stopped: all end at the last one's length (rows past it drop what they emitted since)
            self.max_new_tokens = max(self.stop_at)
            for b, row in enumerate(self.tokens):
                del row[self.max_new_tokens:]
                if len(row) >= self.max_new_tokens and not self.finished[b]:
                    self.finished[b] = newly_finished = True
        if newly_finished:   # rare: at most once per row
            self.keep = torch.tensor([0 if done else 1 for done in self.finished], dtype=torch.int32,
                                     device=self.keep.device)
        if self.streamer is not None and len(self.tokens[0]) > streamed:   # batch 1: row 0's new tokens
            self.streamer.put(torch.tensor(self.tokens[0][streamed:]))

    def sequences(self, input_ids: torch.Tensor, pad: int) -> torch.Tensor:
        """``[B, prompt + new]``: the prompt and each row's new tokens, padded after EOS like model.generate."""
        width = max(len(tokens) for tokens in self.tokens)
        out = torch.full((self.batch, width), pad, dtype=input_ids.dtype)
        for b, tokens in enumerate(self.tokens):
            out[b, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
