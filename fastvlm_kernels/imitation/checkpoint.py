"""The files a training run writes as it goes: JSON records and torch checkpoints, each replaced atomically (a run
killed mid-write leaves the previous file whole), and checkpoints read back with ``weights_only=True`` (tensors,
numbers, strings, lists and dicts only: loading one runs no code)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def write_json(path: Path, value) -> None:
    """Writes ``value`` as indented JSON to ``path`` through a temporary file beside it."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file beside it. ``state`` must hold only what
    :func:`load_checkpoint` accepts (tensors, state dicts, numbers, strings, None, lists, tuples and dicts)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict:
    """What :func:`save_checkpoint` wrote, on the CPU, loaded with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)
