"""Draft-tree shapes: a static tree as paths of child ranks, and what the ops need of it.

A static tree is given the way Medusa's and EAGLE's "choices" are: a list of paths of child ranks from the
root, ``[(0,), (1,), (0, 0), (0, 1), (1, 0), ...]``, where ``(0, 1)`` is the second-best draft token after
the best one. The root is node 0, the last accepted token x0; the paths become nodes 1..n in depth order
(parents before children, siblings by rank), the order the tree ops take (``accept_greedy_tree``'s
``parents``, ``verify_attention``'s ancestor bitmask ``tree_mask``, ``kv_compact``'s node indices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

import torch

from ..ops.verify_attention.spec import MAX_TREE_TOKENS

Path = Tuple[int, ...]


@dataclass(frozen=True)
class DraftTree:
    """A static draft tree of ``num_nodes`` nodes, node 0 the root. Every per-node list is indexed by node.

    - ``paths[j]``: node j's path of child ranks from the root (``()`` for the root).
    - ``parents[j]``: its parent's index (-1 for the root), smaller than j.
    - ``depths[j]``: its depth (0 for the root); ``ranks[j]``: its rank among its parent's draft candidates.
    - ``levels[d]``: the nodes at depth d, in index order: drafting runs one depth's frontier per pass.
    - ``ancestor_masks[j]``: bit i set for node j itself and each of its ancestors (what node j attends
      to among the new tokens; ``verify_attention``'s ``tree_mask`` row).
    """
    paths: Tuple[Path, ...]
    parents: Tuple[int, ...]
    depths: Tuple[int, ...]
    ranks: Tuple[int, ...]
    levels: Tuple[Tuple[int, ...], ...]
    ancestor_masks: Tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        """The longest path's length: the most drafted tokens one step can accept."""
        return len(self.levels) - 1

    def children_needed(self, node: int) -> int:
        """How many draft candidates node ``node`` must propose: one past its highest child rank (0: a leaf)."""
        return 1 + max((self.ranks[j] for j in range(node + 1, self.num_nodes) if self.parents[j] == node),
                       default=-1)

    def tensors(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(parents [N] int64, tree_mask [N] int64)`` on ``device``; add a batch dimension to use them."""
        parents = torch.tensor(self.parents, dtype=torch.int64, device=device)
        # bit 63 is the sign bit of int64: masks are stored as their two's-complement value
        masks = [mask - (1 << 64) if mask >= 1 << 63 else mask for mask in self.ancestor_masks]
        return parents, torch.tensor(masks, dtype=torch.int64, device=device)

    @classmethod
    def chain(cls, draft_len: int) -> "DraftTree":
        """The chain of ``draft_len`` drafts as a tree (each node's best candidate only)."""
        if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
            raise ValueError(f"draft_len must be an int >= 1, got {draft_len!r}")
        return cls.from_paths([(0,) * depth for depth in range(1, draft_len + 1)])

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> "DraftTree":
        """The tree of these paths of child ranks (any order; the root is implied). Raises ValueError / TypeError
        naming ``paths`` for a path that is not a sequence of ints >= 0, a repeated path, a path whose parent
        path is missing, or more nodes (with the root) than ``verify_attention``'s tree mask holds."""
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable):
            raise TypeError(f"paths must be a list of paths (tuples of child ranks), got {type(paths).__name__}")
        normalised: List[Path] = []
        for index, path in enumerate(paths):
            if isinstance(path, (str, bytes)) or not isinstance(path, Sequence):
                raise TypeError(f"paths[{index}] must be a tuple of child ranks, got {path!r}")
            if len(path) == 0:
                raise ValueError(f"paths[{index}] is empty: the root is implied, list only its descendants")
            for rank in path:
                if isinstance(rank, bool) or not isinstance(rank, int):
                    raise TypeError(f"paths[{index}] = {tuple(path)!r}: child ranks must be ints")
                if rank < 0:
                    raise ValueError(f"paths[{index}] = {tuple(path)!r}: child ranks must be >= 0, got {rank}")
            normalised.append(tuple(path))
        if not normalised:
            raise ValueError("paths is empty: a tree needs at least one drafted node")
        seen = set()
        for path in normalised:
            if path in seen:
                raise ValueError(f"paths holds {path!r} twice")
            seen.add(path)
        for path in normalised:
            if len(path) > 1 and path[:-1] not in seen:
                raise ValueError(f"paths: {path!r} has no parent: {path[:-1]!r} is missing")
        if len(normalised) + 1 > MAX_TREE_TOKENS:
            raise ValueError(f"paths: {len(normalised)} nodes plus the root exceed the {MAX_TREE_TOKENS} tokens "
                             f"a tree mask holds (one int64 bitmask per node)")
        ordered: List[Path] = [()] + sorted(normalised, key=lambda path: (len(path), path))
        index_of = {path: j for j, path in enumerate(ordered)}
        parents = tuple(-1 if not path else index_of[path[:-1]] for path in ordered)
        masks = []
        for j, path in enumerate(ordered):
            mask = 1 << j
            if path:
                mask |= masks[parents[j]]
            masks.append(mask)
        depth = max(len(path) for path in ordered)
        levels = tuple(tuple(j for j, path in enumerate(ordered) if len(path) == d) for d in range(depth + 1))
        return cls(paths=tuple(ordered), parents=parents, depths=tuple(len(path) for path in ordered),
                   ranks=tuple(path[-1] if path else 0 for path in ordered), levels=levels,
                   ancestor_masks=tuple(masks))
