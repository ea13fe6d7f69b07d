"""The decoder's draft-tree step: draft a tree depth by depth, verify every kept node in one pass, accept a path.

Drafting (draft index space: the root x0 is node 0, then each depth's nodes, depth after depth): the nodes of
one depth go through layers [0, E) and the imitation network in one pass, with the ancestor bitmask of the
nodes drafted so far (``StepState.query_offset``: the earlier depths are already in the cache) and the
positions ``length + depth``; the early-exit head on their imitated states proposes the next depth's tokens.
The last depth's nodes take one more pass for their layer-E states (and the imitation layers' KV, which every
cache layer must hold alike). Verification: the verified nodes' layer-E states through [E, N) in one pass with
their ancestor masks, the verify head (greedy) or the warped target distributions (sampling), and the tree
acceptance op. The accepted path is then compacted in place in every cache layer (``Rows.advance``).

Tree shapes:

- static (a :class:`~.trees.DraftTree` from paths of child ranks): node j's token is its parent's
  ``ranks[j]``-th candidate. Greedy: the parent's top-k draft tokens (distinct, best first). Sampling: the
  parent's candidates are independent draws (with replacement) from its draft distribution q, the contract
  under which ``accept_sampling_tree`` (multi-candidate rejection sampling) is exact.
- ``"dynamic"`` (EAGLE-2's expansion), ``width`` W and depth D: every depth keeps W nodes per row. Greedy: the
  top-W children of each of the W frontier nodes are scored by cumulative draft log-probability and the best W
  form the next depth; after the last depth, the best ``budget`` drafted nodes by that score (an ancestor
  never scores below its descendants, and ties go to the lower index, so the set is closed under ancestors)
  are verified. Sampling: how many children each frontier node gets is decided from the frontier's scores
  BEFORE its children are drawn (slot s of the next depth goes to the node with the best ``score - c ln 2``,
  c its slots so far), then each child is an independent draw from its parent's q; no reranking (dropping a
  node because of its drawn value would bias acceptance), so every drafted node is verified. Both keep the
  acceptance op's contract: a node's children are i.i.d. draws from its q, their number fixed before they are
  drawn.

Every tensor's shape depends only on the batch, the tree (static) or W, D and the budget (dynamic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..ops.acceptance import accept_greedy_tree_plan, accept_sampling_tree_plan
from ..ops.lm_head import early_exit_head_plan
from ..ops.verify_attention.spec import MAX_TREE_TOKENS
from .trees import DraftTree

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class _Level:
    """One depth of a static tree in draft order: its nodes' [start, stop) and, for the next depth, the
    candidates each node must propose (``fanout``) and where each child takes its token from
    (``child_index[c]`` = parent's position in this level * fanout + rank)."""
    start: int
    stop: int
    fanout: int
    child_index: Tuple[int, ...]


class StaticTree:
    """A static tree, truncated to each depth the policy may ask for (its levels and tensors made once)."""

    def __init__(self, tree: DraftTree):
        self.full = tree
        self._by_depth = {}

    @property
    def depth(self) -> int:
        return self.full.depth

    def at_depth(self, depth: int) -> Tuple[DraftTree, List[_Level]]:
        depth = min(depth, self.full.depth)
        cached = self._by_depth.get(depth)
        if cached is None:
            tree = self.full if depth == self.full.depth else \
                DraftTree.from_paths([path for path in self.full.paths[1:] if len(path) <= depth])
            levels = []
            for d, nodes in enumerate(tree.levels):
                fanout = max((tree.children_needed(node) for node in nodes), default=0)
                following = tree.levels[d + 1] if d + 1 < len(tree.levels) else ()
                child_index = tuple((tree.parents[c] - nodes[0]) * fanout + tree.ranks[c] for c in following)
                levels.append(_Level(nodes[0], nodes[-1] + 1, fanout, child_index))
            cached = self._by_depth[depth] = (tree, levels)
        return cached


class TreeDrafter:
    """Drafts, verifies and accepts a draft tree for :class:`~.decoder.SelfSpeculativeDecoder` (see the module).

    ``tree``: a :class:`StaticTree`, or None for the dynamic tree of ``width`` and ``budget``."""

    def __init__(self, tree: Optional[StaticTree], width: int, budget: int):
        self.static = tree
        self.width, self.budget = width, budget
        self._constants = {}

    # ---- shapes -----------------------------------------------------------------------------------------

    def max_nodes(self, max_depth: int) -> int:
        """The most nodes (with the root) one step appends to the draft layers at depth <= max_depth."""
        if self.static is not None:
            return self.static.at_depth(max_depth)[0].num_nodes
        return 1 + self.width * max_depth

    def verified_nodes(self, depth: int, sampling: bool) -> int:
        """The nodes (with the root) one step verifies at depth ``depth``: a static tree's nodes to that depth;
        a dynamic tree's best ``budget`` drafted nodes when greedy, every drafted node when sampling."""
        if self.static is not None:
            return self.static.at_depth(depth)[0].num_nodes
        drafted = self.width * depth
        return 1 + (drafted if sampling else min(self.budget, drafted))

    def _static_tensors(self, tree: DraftTree, device):
        key = (id(tree), str(device))
        tensors = self._constants.get(key)
        if tensors is None:
            parents, masks = tree.tensors(device)
            depths = torch.tensor(tree.depths, dtype=torch.int64, device=device)
            tensors = self._constants[key] = (parents, masks, depths)
        return tensors

    # ---- the step ---------------------------------------------------------------------------------------

    def draft(self, decoder, rows, state, depth: int, sampling, generator, subset_head) -> dict:
        """Drafts a tree of depth ``depth`` (>= 1): every node's token, parent, ancestor mask, depth and layer-E
        state (draft order), the levels' draft distributions when sampling and the nodes' scores (dynamic)."""
        adapter = decoder.adapter
        batch, device = rows.batch, rows.lengths.device
        if self.static is not None:
            tree, levels = self.static.at_depth(depth)
            parents_c, masks_c, depths_c = self._static_tensors(tree, device)
            num_nodes = tree.num_nodes
            bounds = [(level.start, level.stop) for level in levels]
            parents = parents_c.expand(batch, -1).contiguous()
            masks = masks_c.expand(batch, -1).contiguous()
        else:
            levels = None
            width = self.width
            num_nodes = 1 + width * depth
            bounds = [(0, 1)] + [(1 + width * d, 1 + width * (d + 1)) for d in range(depth)]
            parents = torch.full((batch, num_nodes), -1, dtype=torch.int64, device=device)
            masks = torch.zeros((batch, num_nodes), dtype=torch.int64, device=device)
            masks[:, 0] = 1
            node_scores = torch.zeros((batch, num_nodes), dtype=torch.float32, device=device)
            depths_c = torch.tensor([d for d, (lo, hi) in enumerate(bounds) for _ in range(lo, hi)],
                                    dtype=torch.int64, device=device)
        tokens = torch.empty((batch, num_nodes), dtype=torch.int64, device=device)
        tokens[:, 0] = rows.x0
        hidden_size = adapter.text_config.hidden_size
        layer_e = None
        probs = [] if sampling.do_sample else None        # q of each drafted level's nodes, [B, n, V]
        first_position = rows.positions(1)                # [B, 1]
        state.prefix_lens = rows.lengths
        for d, (lo, hi) in enumerate(bounds):
            hidden = decoder._embed(tokens[:, lo:hi])
            position_embeddings = decoder._rotary(hidden, (first_position + d).expand(-1, hi - lo))
            state.tree_mask, state.query_offset = masks[:, :hi].contiguous(), lo
            hidden = decoder._run_layers(hidden, 0, decoder.exit_layer, position_embeddings, state)
            if layer_e is None:
                layer_e = hidden.new_empty((batch, num_nodes, hidden_size))
            layer_e[:, lo:hi] = hidden
            imitated = decoder._imitate(hidden, position_embeddings, state)
            if d == len(bounds) - 1:
                break
            nlo, nhi = bounds[d + 1]
            if decoder._processing is not None:
                extras = node_paths(tokens[:, :hi], parents[:, :hi], range(lo, hi))
                scores = decoder._processed_scores(imitated, rows, extras, subset_head)    # [B, n, V]
            else:
                scores = None
            if self.static is not None:
                self._static_children(decoder, imitated, tokens, levels[d], nlo, nhi, sampling, generator,
                                      subset_head, probs, scores)
            elif sampling.do_sample:
                self._dynamic_sampled_children(decoder, imitated, tokens, parents, masks, node_scores, lo, hi, nlo,
                                               nhi, sampling, generator, subset_head, probs, scores)
            else:
                self._dynamic_greedy_children(decoder, imitated, tokens, parents, masks, node_scores, lo, hi, nlo,
                                              nhi, subset_head, scores)
        state.tree_mask, state.query_offset = None, 0
        return {"tokens": tokens, "parents": parents, "masks": masks, "depths": depths_c, "layer_e": layer_e,
                "probs": probs, "scores": None if self.static is not None else node_scores, "depth": len(bounds) - 1}

    def _static_children(self, decoder, imitated, tokens, level: _Level, nlo, nhi, sampling, generator,
                         subset_head, probs, scores=None) -> None:
        """``scores``: the nodes' processed draft scores [B, n, V] when logits processors are active."""
        batch, count = imitated.shape[:2]
        index = self._child_index(level, tokens.device)
        if sampling.do_sample:
            q = decoder._warped_probs(imitated, sampling, subset_head) if scores is None else torch.softmax(scores, -1)
            probs.append(q)
            draws = self.draw_children(q.reshape(batch * count, -1), level.fanout, generator)
            candidates = draws.view(batch, count * level.fanout)
        else:
            candidates = self._top_children(decoder, imitated, level.fanout, subset_head, scores)[0]
        tokens[:, nlo:nhi] = candidates.index_select(1, index)

    def _child_index(self, level: _Level, device) -> torch.Tensor:
        key = (level, str(device))
        index = self._constants.get(key)
        if index is None:
            index = self._constants[key] = torch.tensor(level.child_index, dtype=torch.int64, device=device)
        return index

    @staticmethod
    def draw_children(q: torch.Tensor, count: int, generator) -> torch.Tensor:
        """``count`` children per row of q ``[M, V]``: independent draws with replacement (the contract of
        ``accept_sampling_tree``; drawing distinct children would bias the output). ``[M, count]``."""
        return torch.multinomial(q, count, replacement=True, generator=generator)

    @staticmethod
    def _top_children(decoder, imitated, count: int, subset_head, scores=None):
        """The draft head's top ``count`` tokens (best first) and their log-probabilities, ``[B, n * count]``
        (of the processed ``scores [B, n, V]`` when given)."""
        batch, nodes, hidden_size = imitated.shape
        if scores is not None:
            top = torch.topk(torch.log_softmax(scores, dim=-1), count, dim=-1)
            return top.indices.reshape(batch, nodes * count), top.values.reshape(batch, nodes * count)
        flat = imitated.reshape(batch * nodes, hidden_size).contiguous()
        plan = decoder._head_plan(f"draft_top{count}", early_exit_head_plan, flat, mode="topk", top_k=count,
                                  vocab_subset=subset_head[0] if subset_head else None)
        out = plan.run(flat)
        return out.tokens.view(batch, nodes * count), out.logprob.view(batch, nodes * count)

    def _dynamic_greedy_children(self, decoder, imitated, tokens, parents, masks, scores, lo, hi, nlo, nhi,
                                 subset_head, processed=None) -> None:
        width = self.width
        candidates, logprobs = self._top_children(decoder, imitated, width, subset_head, processed)   # [B, n * W]
        totals = scores[:, lo:hi].repeat_interleave(width, dim=1) + logprobs
        # the best W candidates; ties to the lower candidate index (stable sort)
        order = torch.sort(totals, dim=1, descending=True, stable=True).indices[:, :nhi - nlo]
        self._set_children(tokens, parents, masks, scores, candidates.gather(1, order), totals.gather(1, order),
                           lo + order // width, nlo, nhi)

    def _dynamic_sampled_children(self, decoder, imitated, tokens, parents, masks, scores, lo, hi, nlo, nhi,
                                  sampling, generator, subset_head, probs, processed=None) -> None:
        batch, count = imitated.shape[:2]
        slots = nhi - nlo
        q = (decoder._warped_probs(imitated, sampling, subset_head) if processed is None
             else torch.softmax(processed, dim=-1))                                      # [B, n, V]
        probs.append(q)
        # Each frontier node's child count from the frontier's scores alone (known before any child is drawn).
        value = scores[:, lo:hi, None] - _LN2 * torch.arange(slots, device=q.device, dtype=scores.dtype)
        owner = torch.sort(value.reshape(batch, count * slots), dim=1, descending=True, stable=True
                           ).indices[:, :slots] // slots                                  # [B, W] level positions
        owner = torch.sort(owner, dim=1).values                                        # siblings together
        # slot s is its parent's r-th child, r = s - (the parent's first slot); every frontier node draws
        # `slots` candidates (what a parent with all the slots would need) and its children take the first ones
        first = torch.searchsorted(owner, owner, right=False)
        rank = torch.arange(slots, device=q.device) - first
        draws = self.draw_children(q.reshape(batch * count, -1), slots, generator).view(batch, count * slots)
        drawn = draws.gather(1, owner * slots + rank)                                   # [B, W]
        rows_q = q.gather(1, owner[..., None].expand(-1, -1, q.shape[-1]))              # [B, W, V]
        logq = torch.log(rows_q.gather(2, drawn[..., None])[..., 0].clamp_min(1e-30))
        self._set_children(tokens, parents, masks, scores, drawn, scores[:, lo:hi].gather(1, owner) + logq,
                           lo + owner, nlo, nhi)

    @staticmethod
    def _set_children(tokens, parents, masks, scores, child_tokens, child_scores, child_parents, nlo, nhi):
        tokens[:, nlo:nhi] = child_tokens
        scores[:, nlo:nhi] = child_scores
        parents[:, nlo:nhi] = child_parents
        bits = torch.ones((), dtype=torch.int64, device=tokens.device) << torch.arange(nlo, nhi, device=tokens.device)
        masks[:, nlo:nhi] = masks.gather(1, child_parents) | bits

    # ---- verification -----------------------------------------------------------------------------------

    def verify(self, decoder, rows, state, drafted: dict, sampling, generator):
        """Layers [E, N) over the verified nodes, the targets and tree acceptance: ``(accept_len [B] int32,
        emitted [B, Nv] int64, paths)`` with ``paths`` as :meth:`Rows.advance` takes them."""
        tokens, parents, masks, layer_e = drafted["tokens"], drafted["parents"], drafted["masks"], drafted["layer_e"]
        depths = drafted["depths"]
        batch, num_nodes = tokens.shape
        keep = None
        if self.static is None and not sampling.do_sample and self.budget < num_nodes - 1:
            keep, parents, masks = self._rerank(drafted["scores"], parents, drafted["depth"])
            tokens = tokens.gather(1, keep)
            layer_e = layer_e.gather(1, keep[..., None].expand(-1, -1, layer_e.shape[-1]))
            depths = depths[keep]
        positions = rows.positions(1) + (depths if depths.dim() == 2 else depths[None])
        position_embeddings = decoder._rotary(layer_e, positions)
        state.prefix_lens, state.tree_mask = rows.lengths, masks
        final = decoder._run_layers(layer_e, decoder.exit_layer, decoder.adapter.num_layers, position_embeddings,
                                    state)
        state.tree_mask = None
        processed = None
        if decoder._processing is not None:   # each verified node's scores with its own path as the prefix
            processed = decoder._processed_scores(final, rows, node_paths(tokens, parents, range(tokens.shape[1])))
        if sampling.do_sample:
            target_probs = (decoder._warped_probs(final, sampling) if processed is None
                            else torch.softmax(processed, dim=-1))                           # [B, N, V]
            # q of every node that drew children (all depths but the last, in node order), then zero rows for
            # the last depth's leaves, which the acceptance never reads: [B, N - 1, V]
            drawn = torch.cat(drafted["probs"], dim=1).to(target_probs.dtype)
            draft_probs = torch.cat([drawn, drawn.new_zeros((batch, num_nodes - 1 - drawn.shape[1],
                                                             drawn.shape[-1]))], dim=1)
            plan = decoder._plan("accept_tree", accept_sampling_tree_plan, tokens, parents, draft_probs,
                                 target_probs, generator=generator)
            accept_len, path, emitted = plan.run(tokens, parents, draft_probs, target_probs, generator=generator)
        else:
            hidden_size = final.shape[-1]
            if processed is not None:
                targets = processed.argmax(dim=-1)
            else:
                targets = decoder._target_tokens(final.reshape(-1, hidden_size), None, sampling, generator)[0]
                targets = targets.view(batch, -1)
            plan = decoder._plan("accept_tree", accept_greedy_tree_plan, tokens, parents, targets)
            accept_len, path, emitted = plan.run(tokens, parents, targets)
        if keep is None:
            paths = [(None, path)]
        else:
            draft_path = torch.where(path >= 0, keep.gather(1, path.clamp_min(0)), -1)
            paths = decoder._tree_paths(draft_path, path)
        return accept_len, emitted, paths

    def _rerank(self, scores, parents, depth: int):
        """The root and the best ``budget`` drafted nodes by score (ties to the lower index), in draft order:
        ``(keep [B, 1 + budget] draft indices, parents and ancestor masks in the kept nodes' indices)``."""
        batch, num_nodes = scores.shape
        device = scores.device
        order = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices[:, :self.budget] + 1
        keep = torch.cat([torch.zeros((batch, 1), dtype=torch.int64, device=device),
                          torch.sort(order, dim=1).values], dim=1)                         # [B, Nv]
        inverse = torch.full((batch, num_nodes), -1, dtype=torch.int64, device=device)
        inverse.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand(batch, -1))
        kept_parents = parents.gather(1, keep)
        kept_parents = torch.where(kept_parents >= 0, inverse.gather(1, kept_parents.clamp_min(0)), -1)
        bits = torch.ones((), dtype=torch.int64, device=device) << torch.arange(keep.shape[1], device=device)
        bits = bits.expand(batch, -1)
        masks = bits
        for _ in range(depth):     # one more generation of ancestors per pass
            masks = bits | torch.where(kept_parents >= 0, masks.gather(1, kept_parents.clamp_min(0)), 0)
        return keep, kept_parents, masks.contiguous()


def node_paths(tokens: torch.Tensor, parents: torch.Tensor, nodes) -> List[List[Tuple[int, ...]]]:
    """Per row, for each node index in ``nodes``, the tokens from depth 1 down to that node (the root, node 0,
    is the row's last emitted token and not part of a path): what logits processors see after the emitted
    tokens at that node. ``tokens``, ``parents``: ``[B, N]`` in the same node order, parent -1 at the root."""
    out = []
    for row_tokens, row_parents in zip(tokens.tolist(), parents.tolist()):
        paths: List[Tuple[int, ...]] = [()] * len(row_tokens)
        for j in range(1, len(row_tokens)):      # a parent comes before its children
            parent = row_parents[j]
            paths[j] = (paths[parent] if parent > 0 else ()) + (row_tokens[j],)
        out.append([paths[j] for j in nodes])
    return out


def check_tree_arguments(tree, tree_budget, tree_width, max_depth: int, draft_vocab_size: Optional[int]):
    """The decoder's tree arguments: ``(StaticTree or None, width, budget)``, or ``None`` with tree=None.
    Raises ValueError / TypeError naming the argument, before anything runs."""
    if tree is None:
        if tree_budget is not None:
            raise ValueError("tree_budget: only a dynamic tree (tree='dynamic') takes a budget; tree is None")
        return None
    for name, value in (("tree_budget", tree_budget), ("tree_width", tree_width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if tree_budget is not None and tree_budget < 1:
        raise ValueError(f"tree_budget must be >= 1 (drafted nodes verified per step), got {tree_budget}")
    if isinstance(tree, str):
        if tree != "dynamic":
            raise ValueError(f"tree must be None, 'dynamic' or a list of paths of child ranks, got {tree!r}")
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        if 1 + tree_width * max_depth > MAX_TREE_TOKENS:
            raise ValueError(f"tree_width={tree_width} at depth {max_depth} drafts {1 + tree_width * max_depth} "
                             f"nodes with the root, more than the {MAX_TREE_TOKENS} a tree mask holds; lower "
                             f"tree_width or the draft length")
        if draft_vocab_size is not None and tree_width > draft_vocab_size:
            raise ValueError(f"tree_width={tree_width} exceeds the draft vocabulary's {draft_vocab_size} tokens")
        budget = tree_width * max_depth if tree_budget is None else tree_budget
        return None, tree_width, budget
    if tree_budget is not None:
        raise ValueError("tree_budget: a static tree is verified whole; tree_budget applies to tree='dynamic'")
    try:
        static = DraftTree.from_paths(tree)
    except (TypeError, ValueError) as error:
        raise type(error)(f"tree: {error}") from None
    if static.depth > max_depth:
        raise ValueError(f"tree: its depth {static.depth} exceeds the draft length {max_depth}; pass "
                         f"draft_len={static.depth} (or max_draft_len with 'adaptive')")
    if draft_vocab_size is not None:
        widest = max(static.children_needed(node) for node in range(static.num_nodes))
        if widest > draft_vocab_size:
            raise ValueError(f"tree: a node needs {widest} candidates, more than the draft vocabulary's "
                             f"{draft_vocab_size} tokens")
    return StaticTree(static), 0, static.num_nodes - 1
