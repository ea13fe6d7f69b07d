"""Stored teacher outputs: the frozen model's forward over a training set, run once and kept on disk.

Online distillation (:mod:`.trainer`) runs the whole frozen model over every batch, and on a small model
that forward is most of a step (SmolLM2-135M on 2 CPU cores: ~1.4 of 1.7 s). Over several epochs it
repeats the same work. A :class:`TeacherCache` runs it once per training example and keeps what a step
needs: the layer-E states of every token (the network's input), the target layer's states and the last
layer's states at the loss positions, and the rotary embeddings layer E was called with. The full model's
logits are not stored (``[M, V]`` floats per example would not fit on a disk): a step recomputes them from
the last layer's states with the model's own final norm and LM head, as the online step does, so both paths
compute the same loss up to the batch composition (rows are right-padded and the attention causal, so a
row's values do not depend on the other rows of its batch).

One build can store several exit layers' states (``exit_layer=(4, 6, 8, 12)``): an exit-layer sweep then
runs the teacher once, and each run reads its own layer's states (``batch(..., exit_layer=E)``).

Examples are stored under their identity (prompt, image and response: :func:`identity`), so a cache grows with
the data: a build over a larger or reordered training set runs the model over the examples it lacks only and
serves the rest from what is stored (a run holds out a few examples at random, so a larger data set moves every
position); the cache a build returns reads the rows in the order of the examples it was given.

Folder layout: ``index.json`` (format, exit layers and target layer, the model's fingerprint, the examples'
identities (prompt and response) and where each one's rows start) and raw little-endian float32 arrays
``exit_<E>.f32`` ``[tokens, H]`` per exit layer E (``exit.f32`` in a format-1 cache: one exit layer), ``target.f32`` and ``last.f32`` ``[loss positions, H]`` (``last.f32`` empty when
the target is the last layer), ``cos.f32`` and ``sin.f32`` ``[tokens, R]`` (R: the rotary table's size per
token, with leading dims such as three position kinds). Building is resumable: examples are appended a batch
at a time and the index records how many are complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import write_json
from .data import DataError, Encoder, Example
from .teacher import Taps, tapped_forward

CACHE_FORMAT = "fastvlm-teacher-cache/2"
_READABLE_FORMATS = ("fastvlm-teacher-cache/1", CACHE_FORMAT)
_ARRAYS = ("target", "last", "cos", "sin")      # and one exit array per exit layer
GROUP_BATCHES = 8    # a build sorts this many batches' worth of examples by length before batching them


@dataclass
class CachedBatch:
    """What one training step needs, read from a cache (right-padded rows, as :meth:`Encoder.collate` builds)."""
    exit_states: torch.Tensor       # [B, T, H]
    targets: torch.Tensor           # [M, H] at the loss positions, rows in order
    last: torch.Tensor              # [M, H] the last layer's output at the loss positions
    loss_mask: torch.Tensor         # [B, T] bool
    position_embeddings: tuple      # (cos, sin) shaped as layer E received them, batch B and width T


class TeacherCache:
    """A built (or partly built) cache folder. ``len(cache)`` is the number of complete examples stored;
    :meth:`select` gives a cache whose ``batch(indices)`` index a run's own examples instead."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise ValueError(f"teacher cache {self.folder}: no index.json (build it with TeacherCache.build)")
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError:
            raise ValueError(f"teacher cache {self.folder}: index.json is unreadable") from None
        if self.index.get("format") not in _READABLE_FORMATS:
            raise ValueError(f"teacher cache {self.folder}: format {self.index.get('format')!r}, "
                             f"expected {CACHE_FORMAT!r}")
        self.exit_layers = list(self.index.get("exit_layers") or [self.index["exit_layer"]])
        self.hidden_size = int(self.index["hidden_size"])
        self.rotary_width = int(self.index["rotary_width"])
        self.rotary_lead = tuple(self.index["rotary_lead"])     # dims of cos/sin before [B, T, ...]
        self.rotary_tail = tuple(self.index["rotary_tail"])     # dims after [B, T]
        self._arrays = {}
        self._rows: Optional[List[int]] = None      # a selection: run example i is stored example _rows[i]

    def __len__(self) -> int:
        return len(self.index["examples"])

    @property
    def keys(self) -> List[str]:
        return [entry[0] for entry in self.index["examples"]]

    def select(self, encoder: Encoder, examples: Sequence[Example]) -> "TeacherCache":
        """This cache read in the order of ``examples`` (``batch([i])`` is ``examples[i]``'s rows), found by
        identity; ValueError when one of them is not stored (an unfinished build, or other data)."""
        position = {key: i for i, key in enumerate(self.keys)}
        rows = []
        for i, example in enumerate(examples):
            key = identity(encoder, example)
            if key not in position:
                raise ValueError(f"teacher cache {self.folder}: example {i} of the run ({key}) is not stored: "
                                 "an unfinished build (build it again to complete it) or other data")
            rows.append(position[key])
        view = TeacherCache(self.folder)
        view._rows = rows
        return view

    def exit_array_name(self, exit_layer: int) -> str:
        return exit_array_name(self.index, exit_layer)

    def _array(self, name: str) -> np.ndarray:
        rows = self.index["tokens"] if name.startswith("exit") or name in ("cos", "sin") else self.index["loss_positions"]
        width = self.rotary_width if name in ("cos", "sin") else self.hidden_size
        cached = self._arrays.get(name)
        if cached is None or cached.shape[0] != rows:
            path = self.folder / f"{name}.f32"
            if path.stat().st_size < rows * width * 4:
                raise ValueError(f"teacher cache {self.folder}: {path.name} is shorter than its index says")
            cached = np.memmap(path, dtype="<f4", mode="r", shape=(rows, width)) if rows else \
                np.zeros((0, width), dtype="<f4")
            self._arrays[name] = cached
        return cached

    def check(self, *, exit_layer: int, target_layer: int, model_fingerprint: dict, encoder: Encoder,
              examples: Sequence[Example]) -> None:
        """Raises ValueError naming what differs, unless this cache was built from this model and these layers
        and stores every one of ``examples`` (a partial cache must be built further first; other stored examples
        and another order are fine: :meth:`select` reads them in the run's order)."""
        if exit_layer not in self.exit_layers:
            raise ValueError(f"teacher cache {self.folder}: built for exit layers {self.exit_layers}, this run uses "
                             f"exit_layer={exit_layer}")
        if self.index["target_layer"] != target_layer:
            raise ValueError(f"teacher cache {self.folder}: built for target_layer={self.index['target_layer']}, "
                             f"this run uses {target_layer}")
        if self.index["model"] != model_fingerprint:
            raise ValueError(f"teacher cache {self.folder}: built from another model ({self.index['model']})")
        self.select(encoder, examples)

    def batch(self, indices: Sequence[int], dtype: torch.dtype = torch.float32, device=None,
              exit_layer: Optional[int] = None) -> CachedBatch:
        """The examples ``indices`` as one right-padded batch, with exit layer ``exit_layer``'s states (default:
        the cache's first)."""
        if self._rows is not None:
            indices = [self._rows[i] for i in indices]
        entries = [self.index["examples"][i] for i in indices]
        width = max(entry[2] for entry in entries)
        batch = len(entries)
        if exit_layer is None:
            exit_layer = self.exit_layers[0]
        elif exit_layer not in self.exit_layers:
            raise ValueError(f"teacher cache {self.folder}: holds exit layers {self.exit_layers}, not {exit_layer}")
        exit_array = self._array(self.exit_array_name(exit_layer))
        cos_array, sin_array = self._array("cos"), self._array("sin")
        target_array = self._array("target")
        last_array = target_array if self.index["last_is_target"] else self._array("last")
        exit_states = torch.zeros(batch, width, self.hidden_size, dtype=torch.float32)
        cos = torch.zeros(batch, width, self.rotary_width, dtype=torch.float32)
        sin = torch.zeros(batch, width, self.rotary_width, dtype=torch.float32)
        loss_mask = torch.zeros(batch, width, dtype=torch.bool)
        targets, last = [], []
        for b, (_, start, length, prompt_len, loss_start, loss_len) in enumerate(entries):
            exit_states[b, :length] = torch.from_numpy(np.array(exit_array[start:start + length]))
            cos[b, :length] = torch.from_numpy(np.array(cos_array[start:start + length]))
            sin[b, :length] = torch.from_numpy(np.array(sin_array[start:start + length]))
            loss_mask[b, prompt_len - 1:prompt_len - 1 + loss_len] = True
            targets.append(torch.from_numpy(np.array(target_array[loss_start:loss_start + loss_len])))
            last.append(torch.from_numpy(np.array(last_array[loss_start:loss_start + loss_len])))

        def rotary(rows: torch.Tensor) -> torch.Tensor:
            return _from_rows(rows, self.rotary_lead, self.rotary_tail).to(device=device, dtype=dtype)

        return CachedBatch(exit_states=exit_states.to(device=device, dtype=dtype),
                           targets=torch.cat(targets).to(device=device), last=torch.cat(last).to(device=device),
                           loss_mask=loss_mask.to(device), position_embeddings=(rotary(cos), rotary(sin)))

    # ---- building ----------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model, encoder: Encoder, examples: Sequence[Example], folder: Path, *,
              exit_layer: Union[int, Sequence[int]], target_layer: int, model_fingerprint: dict, batch_size: int = 8,
              say: Callable[[str], None] = lambda message: None, progress: bool = True) -> "TeacherCache":
        """Runs the frozen ``model`` over ``examples`` (in their order, ``batch_size`` at a time) and stores the
        teacher's outputs in ``folder``: the states of ``exit_layer`` (one layer, or several for an exit-layer
        sweep). A folder holding a build of the same model and target layer whose exit layers include the ones
        asked for is continued: the examples it stores (by identity: a build that stopped part way, or one over
        other or fewer examples) are not run again, the others are appended. Any other folder is refused. The
        cache returned reads ``examples`` in their order (:meth:`select`; no :meth:`check` needed)."""
        exit_layers = sorted({exit_layer} if isinstance(exit_layer, int) else set(exit_layer))
        from tqdm.auto import tqdm
        from ..decoding.adapters import adapter_for
        folder = Path(folder)
        adapter = adapter_for(model)
        keys = [identity(encoder, example) for example in examples]
        if (folder / "index.json").is_file():
            cache = cls(folder)
            for name, value in (("target_layer", target_layer), ("model", model_fingerprint)):
                if cache.index[name] != value:
                    raise ValueError(f"teacher cache {folder}: holds another build ({name} {cache.index[name]!r}, "
                                     f"this one {value!r}); remove the folder or choose another")
            missing = [e for e in exit_layers if e not in cache.exit_layers]
            if missing:
                raise ValueError(f"teacher cache {folder}: holds exit layers {cache.exit_layers}, not {missing}; "
                                 "remove the folder or choose another")
            exit_layers = cache.exit_layers
            stored = set(cache.keys)
            index = cache.index
            if stored:
                have = sum(key in stored for key in keys)
                say(f"teacher cache {folder}: {have} of the {len(keys)} examples stored already "
                    f"({len(stored)} in all): building the other {len(keys) - have}")
        else:
            if folder.exists() and any(folder.iterdir()):
                raise ValueError(f"teacher cache {folder}: the folder is not empty and holds no cache")
            folder.mkdir(parents=True, exist_ok=True)
            index = {"format": CACHE_FORMAT, "exit_layer": exit_layers[0], "exit_layers": exit_layers,
                     "target_layer": target_layer,
                     "model": model_fingerprint, "hidden_size": adapter.text_config.hidden_size,
                     "last_is_target": target_layer == adapter.num_layers, "rotary_width": None,
                     "rotary_lead": None, "rotary_tail": None, "tokens": 0, "loss_positions": 0, "examples": []}
            stored = set()
        # Each example not stored yet, once, in the given order.
        todo = []
        for i, key in enumerate(keys):
            if key not in stored:
                stored.add(key)
                todo.append(i)
        # Files are cut back to what the index says is complete (a build killed mid-batch leaves a tail).
        per_loss = index["loss_positions"] * index["hidden_size"]
        exit_names = {e: exit_array_name(index, e) for e in exit_layers}
        sizes = {name: index["tokens"] * index["hidden_size"] for name in exit_names.values()}
        sizes.update(target=per_loss, last=0 if index["last_is_target"] else per_loss)
        if index["rotary_width"] is not None:
            sizes.update(cos=index["tokens"] * index["rotary_width"], sin=index["tokens"] * index["rotary_width"])
        handles = {}
        for name in (*exit_names.values(), *_ARRAYS):
            path = folder / f"{name}.f32"
            handle = open(path, "r+b" if path.exists() else "w+b")
            handle.truncate(sizes.get(name, 0) * 4)
            handle.seek(0, os.SEEK_END)
            handles[name] = handle
        taps = Taps(adapter.layers, exit_layers, target_layer)
        bar = tqdm(total=len(todo), disable=not progress, desc="teacher cache", file=sys.stderr, dynamic_ncols=True)
        started, tokens_this_run = time.perf_counter(), 0
        group = batch_size * GROUP_BATCHES
        device = next(model.parameters()).device
        try:
            for first in range(0, len(todo), group):
                members_of_chunk = todo[first:first + group]
                chunk = [examples[i] for i in members_of_chunk]
                # Batches of similar lengths (less padding to run through the model); stored in the given order.
                lengths = [encoder.prompt_inputs(example)["input_ids"].shape[1] + len(encoder.response_ids(example))
                           for example in chunk]
                order = sorted(range(len(chunk)), key=lambda i: lengths[i])
                rows = {}
                for start in range(0, len(order), batch_size):
                    members = order[start:start + batch_size]
                    for i, row in zip(members, _teacher_rows(adapter, taps, encoder, [chunk[i] for i in members],
                                                             device, index, folder)):
                        rows[i] = row
                for i in range(len(chunk)):
                    row = rows.pop(i)
                    for e, name in exit_names.items():
                        _write(handles[name], row[f"exit_{e}"])
                    for name in ("cos", "sin", "target"):
                        _write(handles[name], row[name])
                    if not index["last_is_target"]:     # the target is the last layer's output: stored once
                        _write(handles["last"], row["last"])
                    length, loss_len = row["cos"].shape[0], row["target"].shape[0]
                    index["examples"].append([keys[members_of_chunk[i]], index["tokens"], length, row["prompt_len"],
                                              index["loss_positions"], loss_len])
                    index["tokens"] += length
                    index["loss_positions"] += loss_len
                    tokens_this_run += length
                for handle in handles.values():
                    handle.flush()
                    os.fsync(handle.fileno())
                write_json(folder / "index.json", index)
                bar.update(len(chunk))
                seconds = time.perf_counter() - started
                bar.set_postfix_str(f"{tokens_this_run / max(seconds, 1e-9):.0f} tokens/s", refresh=False)
        finally:
            bar.close()
            for handle in handles.values():
                handle.close()
        write_json(folder / "index.json", index)
        return cls(folder).select(encoder, examples)


@torch.no_grad()
def _teacher_rows(adapter, taps, encoder: Encoder, examples: Sequence[Example], device, index: dict,
                  folder: Path) -> List[dict]:
    """One forward of the frozen model over ``examples``: per example its stored values (CPU float32)."""
    batch = encoder.collate(examples).to(device)
    values = tapped_forward(adapter, taps, batch)
    cos, sin = values["layer_kwargs"]["position_embeddings"]
    count, width = batch.loss_mask.shape
    lead, tail = rotary_layout(cos, count, width)
    if index["rotary_width"] is None:
        index.update(rotary_lead=list(lead), rotary_tail=list(tail), rotary_width=int(math.prod(lead) *
                                                                                      math.prod(tail)))
    elif (list(lead), list(tail)) != (index["rotary_lead"], index["rotary_tail"]):
        raise DataError(f"teacher cache {folder}: the rotary embeddings changed layout ({index['rotary_lead']}, "
                        f"{index['rotary_tail']} -> {list(lead)}, {list(tail)})")
    cos, sin = _to_rows(cos, lead, tail, count), _to_rows(sin, lead, tail, count)
    lengths = batch.model_inputs["attention_mask"].sum(dim=1).tolist()
    rows = []
    for b in range(count):
        length, row_mask = int(lengths[b]), batch.loss_mask[b]
        rows.append({**{name: value[b, :length].float().cpu() for name, value in values.items()
                        if name.startswith("exit_")}, "cos": cos[b, :length].cpu(),
                     "sin": sin[b, :length].cpu(), "target": values["target"][b][row_mask].float().cpu(),
                     "last": values["last"][b][row_mask].float().cpu(),
                     "prompt_len": int(row_mask.nonzero()[0, 0]) + 1})
    return rows


def exit_array_name(index: dict, exit_layer: int) -> str:
    """The array holding exit layer ``exit_layer``'s states: ``exit_<E>`` (format 2), ``exit`` (format 1)."""
    return f"exit_{exit_layer}" if "exit_layers" in index else "exit"


def identity(encoder: Encoder, example: Example) -> str:
    """The example's prompt (and image) and the response the encoder gives it: what its teacher outputs depend on."""
    digest = hashlib.sha256(example.key.encode())
    digest.update(np.asarray(encoder.response_ids(example), dtype="<i8").tobytes())
    return digest.hexdigest()[:24]


def rotary_layout(table: torch.Tensor, batch: int, width: int):
    """(lead, tail) dims of a cos/sin table around its [B, T] dims (Llama: (), (D,); Qwen2-VL: (3,), (D,)); a
    batch dim of 1 (one table shared by the rows) counts as B."""
    for start in range(table.dim() - 1):
        if table.shape[start] in (batch, 1) and table.shape[start + 1] == width:
            return tuple(table.shape[:start]), tuple(table.shape[start + 2:])
    raise DataError(f"cannot find the [batch {batch}, tokens {width}] dims in a rotary table of shape "
                    f"{tuple(table.shape)}")


def _to_rows(table: torch.Tensor, lead: tuple, tail: tuple, batch: int) -> torch.Tensor:
    """[lead..., B or 1, T, tail...] -> [B, T, R] float32 (R = prod(lead) * prod(tail))."""
    width = table.shape[len(lead) + 1]
    table = table.expand(*lead, batch, width, *tail)
    order = [len(lead), len(lead) + 1] + list(range(len(lead))) + list(range(len(lead) + 2, table.dim()))
    return table.permute(order).reshape(batch, width, -1).float()


def _from_rows(rows: torch.Tensor, lead: tuple, tail: tuple) -> torch.Tensor:
    """[B, T, R] -> [lead..., B, T, tail...] (what the layers take)."""
    batch, width = rows.shape[:2]
    table = rows.reshape(batch, width, *lead, *tail)
    order = list(range(2, 2 + len(lead))) + [0, 1] + list(range(2 + len(lead), table.dim()))
    return table.permute(order).contiguous()


def _write(handle, values: torch.Tensor) -> None:
    handle.write(values.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes())
