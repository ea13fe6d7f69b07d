"""The specification of the acceptance ops, in plain PyTorch (slow, obviously right; every backend is
tested against it).

Chains and trees share one walk. A chain of k drafts is the tree of N = k + 1 nodes whose node 0 is the
root (the last accepted token, x0) and whose node i >= 1 is draft i - 1 with parent i - 1. Per row:

    cur = 0                                    # the node whose successor is being decided
    for c in 1 .. N - 1:                       # nodes in index order; a child always follows its parent
        if parent(c) != cur: continue          # not a child of the current node (or a finished branch)
        greedy:   accept c iff token(c) == target_tokens[cur]
        sampling: accept c iff u[c - 1] * q_cur(token c) * Z < r(token c)
                  on rejection: r <- max(0, r - Z * q_cur), Z <- sum(r); (r, Z) <- (p_cur, 1) if Z == 0
        on acceptance: cur = c, (r, Z) <- (p_cur, 1)
    greedy:   emit target_tokens[cur]
    sampling: emit the first j with cumsum(r)[j] > u[N - 1] * sum(r)   (r = p_cur when nothing was rejected)

where p_cur = target_probs[cur], q_cur = draft_probs[cur] (the distribution all of cur's children were
drawn from), and the residual distribution is r / Z (unnormalised, so that no backend divides). Because
the loop visits children in index order and moves to an accepted child at once, later siblings of an
accepted node are never tested (their parent is no longer `cur`). Sampling arithmetic is fp64 on values
read from the (fp32 / fp16 / bf16) probabilities; the accept test is a product and a comparison, which
every backend evaluates identically; sums over the vocabulary may round differently between backends,
which can move a drawn token across a boundary with probability about 1e-12 per draw.
"""
from __future__ import annotations

from typing import Tuple

import torch


def _walk(num_nodes: int, parent_of, accept_child, reject_child, emit) -> Tuple[int, list, list]:
    """The walk above for one row: returns (accept_len, path node indices, emitted tokens)."""
    cur, path, emitted = 0, [0], []
    for child in range(1, num_nodes):
        if parent_of(child) != cur:
            continue
        token = accept_child(cur, child)
        if token is not None:
            path.append(child)
            emitted.append(token)
            cur = child
        else:
            reject_child(cur, child)
    emitted.append(emit(cur))
    return len(path) - 1, path, emitted


def _pack(batch: int, num_nodes: int, rows, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    accept_len = torch.zeros(batch, dtype=torch.int32)
    path = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    emitted = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    for row, (length, row_path, row_emitted) in enumerate(rows):
        accept_len[row] = length
        path[row, :len(row_path)] = torch.tensor(row_path)
        emitted[row, :len(row_emitted)] = torch.tensor(row_emitted)
    return accept_len.to(device), path.to(device), emitted.to(device)


def _greedy(draft_tokens, parents, target_tokens):
    """draft_tokens [B, N] (node 0 unused), parents [B, N] or None (chain), target_tokens [B, N]."""
    batch, num_nodes = target_tokens.shape
    drafts, targets = draft_tokens.tolist(), target_tokens.tolist()
    parent_rows = parents.tolist() if parents is not None else None
    rows = []
    for row in range(batch):
        parent_of = (lambda c, r=row: parent_rows[r][c]) if parent_rows is not None else (lambda c: c - 1)
        rows.append(_walk(
            num_nodes, parent_of,
            accept_child=lambda cur, c, r=row: drafts[r][c] if drafts[r][c] == targets[r][cur] else None,
            reject_child=lambda cur, c: None,
            emit=lambda cur, r=row: targets[r][cur]))
    return _pack(batch, num_nodes, rows, target_tokens.device)


def sample_index(weights: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF draw from unnormalised fp64 `weights` [V]: the first j with cumsum[j] > u * sum.
    Past the end (rounding), the last index with positive weight."""
    cumulative = torch.cumsum(weights, 0)
    threshold = uniform * float(weights.sum())
    above = torch.nonzero(cumulative > threshold)
    if above.numel():
        return int(above[0, 0])
    positive = torch.nonzero(weights > 0)
    return int(positive[-1, 0]) if positive.numel() else 0


def _sampling(draft_tokens, parents, draft_probs, target_probs, uniforms):
    """draft_tokens [B, N] (node 0 unused), parents [B, N] or None (chain), draft_probs [B, N - 1, V],
    target_probs [B, N, V], uniforms [B, N] fp32."""
    batch, num_nodes = draft_tokens.shape
    drafts = draft_tokens.tolist()
    parent_rows = parents.tolist() if parents is not None else None
    u = uniforms.double().cpu()
    rows = []
    for row in range(batch):
        p = target_probs[row].double().cpu()          # [N, V]
        q = draft_probs[row].double().cpu()           # [N - 1, V]
        state = {"r": None, "z": 1.0}                 # r None: the residual is p_cur itself (Z = 1)

        def residual(cur):
            return state["r"] if state["r"] is not None else p[cur]

        def accept_child(cur, child, row=row):
            token = drafts[row][child]
            r = residual(cur)
            if float(u[row, child - 1]) * float(q[cur, token]) * state["z"] < float(r[token]):
                state["r"], state["z"] = None, 1.0
                return token
            return None

        def reject_child(cur, child):
            r = torch.clamp_min(residual(cur) - state["z"] * q[cur], 0.0)
            z = float(r.sum())
            state["r"], state["z"] = (r, z) if z > 0 else (None, 1.0)

        def emit(cur, row=row):
            return sample_index(residual(cur), float(u[row, num_nodes - 1]))

        parent_of = (lambda c, r=row: parent_rows[r][c]) if parent_rows is not None else (lambda c: c - 1)
        rows.append(_walk(num_nodes, parent_of, accept_child, reject_child, emit))
    return _pack(batch, num_nodes, rows, draft_tokens.device)


def _with_root(draft_tokens: torch.Tensor) -> torch.Tensor:
    """[B, k] chain drafts -> [B, k + 1] node tokens (node 0, the root, holds -1: never read)."""
    return torch.cat([draft_tokens.new_full((draft_tokens.shape[0], 1), -1), draft_tokens], dim=1)


def accept_greedy_reference(draft_tokens: torch.Tensor, target_tokens: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    accept_len, _, emitted = _greedy(_with_root(draft_tokens), None, target_tokens)
    return accept_len, emitted


def accept_sampling_reference(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                              uniforms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    accept_len, _, emitted = _sampling(_with_root(draft_tokens), None, draft_probs, target_probs, uniforms)
    return accept_len, emitted


def accept_greedy_tree_reference(draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _greedy(draft_tokens, parents, target_tokens)


def accept_sampling_tree_reference(draft_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor,
                                   target_probs: torch.Tensor, uniforms: torch.Tensor
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sampling(draft_tokens, parents, draft_probs, target_probs, uniforms)
