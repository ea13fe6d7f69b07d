"""Acceptance of speculative drafts: how many draft tokens the full model accepts and which tokens to emit,
for a chain of k drafts or a draft tree, greedily or by rejection sampling (exactly the full model's
distribution). Results stay on the device: no op here reads a value back to the host (except the optional
`validate` checks), so a decoding step can be captured in a CUDA graph.

Plan/run: each op's ``*_plan`` function checks its arguments and chooses the backend once; the plan's ``run``
(the op's arguments, same names) takes inputs of the planned kind and calls the chosen kernel with no checks
in front (the decoder holds one per generate). The public functions are plan then run."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import _checks
from .._dispatch import (Backend, always_supported, call_custom_op, compiled_backend_reasons, select_remembered,
                         triton_backend_reasons)
from .reference import (accept_greedy_reference, accept_greedy_tree_reference, accept_sampling_reference,
                        accept_sampling_tree_reference)
from .spec import MAX_NODES, PROB_DTYPES, TOKEN_DTYPES

__all__ = ["accept_greedy", "accept_sampling", "accept_greedy_tree", "accept_sampling_tree", "Acceptance",
           "TreeAcceptance", "accept_greedy_plan", "accept_sampling_plan", "accept_greedy_tree_plan",
           "accept_sampling_tree_plan", "AcceptGreedyPlan", "AcceptSamplingPlan", "AcceptGreedyTreePlan",
           "AcceptSamplingTreePlan", "accept_greedy_reference", "accept_sampling_reference",
           "accept_greedy_tree_reference", "accept_sampling_tree_reference", "BACKENDS", "PRIORITY"]


class Acceptance(NamedTuple):
    accept_len: torch.Tensor   # [B] int32: accepted drafts per row
    emitted: torch.Tensor      # [B, k + 1] int64: accepted drafts then one more token, -1 padded


class TreeAcceptance(NamedTuple):
    accept_len: torch.Tensor   # [B] int32: accepted draft nodes per row (the root not counted)
    path: torch.Tensor         # [B, N] int64: 0 (the root), then the accepted nodes, -1 padded
    emitted: torch.Tensor      # [B, N] int64: the accepted nodes' tokens then one more token, -1 padded


def accept_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, *,
                  out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                  backend: str = "auto") -> Acceptance:
    """Greedy acceptance of a chain: the longest prefix of the drafts that the full model agrees with.

    Args:
        draft_tokens: ``[B, k]`` int64 or int32, the drafted tokens d_0 .. d_(k-1).
        target_tokens: ``[B, k + 1]`` int64 or int32 on draft_tokens' device: ``target_tokens[b, i]`` is the
            full model's (argmax) token after the context ending in d_(i-1) (after x0 for i = 0).
        out: optional preallocated ``(accept_len, emitted)`` (contiguous, the dtypes and shapes returned),
            written in place (a CUDA graph's static outputs).
        validate: accepted for symmetry with the other ops (greedy acceptance reads no values to check).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        ``(accept_len [B] int32, emitted [B, k + 1] int64)``: a = accept_len[b] is the largest a with
        d_i == target_tokens[b, i] for all i < a; emitted[b] is d_0 .. d_(a-1), target_tokens[b, a] (the
        correction at the first mismatch, or the bonus token when a == k), then -1.
    """
    plan = accept_greedy_plan(draft_tokens, target_tokens, out=out, validate=validate, backend=backend)
    return plan.run(_int64(draft_tokens), _int64(target_tokens), out=out)


def accept_sampling(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, *,
                    generator: Optional[torch.Generator] = None, uniforms: Optional[torch.Tensor] = None,
                    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                    backend: str = "auto") -> Acceptance:
    """Speculative rejection sampling of a chain: the emitted tokens follow the full model's distribution
    exactly, whatever the draft distribution.

    Args:
        draft_tokens: ``[B, k]`` int64 or int32, d_i drawn from ``draft_probs[b, i]``.
        draft_probs: ``[B, k, V]`` fp32, fp16 or bf16, the draft's distribution q_i at each position
            (rows sum to 1; processed like the target: same temperature, top-k, top-p).
        target_probs: ``[B, k + 1, V]``, draft_probs' dtype and device: the full model's p_i after x0, d_0,
            .., d_(k-1); row k gives the bonus token.
        generator: the torch.Generator (on the tensors' device) that draws the uniforms.
        uniforms: optional ``[B, k + 1]`` fp32 in [0, 1) to use instead of drawing them (e.g. drawn ahead
            into a CUDA graph's static buffer): column i < k decides d_i, column k draws the emitted token.
        out: optional preallocated ``(accept_len, emitted)``, written in place.
        validate: check values (tokens in [0, V), probabilities finite and >= 0, uniforms in [0, 1)); a
            device-to-host read, so the decoder passes False. Skipped under torch.compile.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        ``(accept_len [B] int32, emitted [B, k + 1] int64, -1 padded)``. d_i is accepted iff
        u_i * q_i(d_i) < p_i(d_i) (probability min(1, p/q)); at the first rejection the emitted token is
        drawn from max(0, p_i - q_i) normalised (from p_i if that has no mass); with all k accepted it is
        drawn from p_k. Draws are by inverse CDF with fp64 running sums (see reference.py).
    """
    plan = accept_sampling_plan(draft_tokens, draft_probs, target_probs, generator=generator, uniforms=uniforms,
                                out=out, validate=validate, backend=backend)
    return plan.run(_int64(draft_tokens), draft_probs.contiguous(), target_probs.contiguous(), generator=generator,
                    uniforms=None if uniforms is None else uniforms.contiguous(), out=out)


def accept_greedy_tree(draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor, *,
                       out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                       backend: str = "auto") -> TreeAcceptance:
    """Greedy acceptance of a draft tree: the longest root-to-node path the full model agrees with.

    Args:
        draft_tokens: ``[B, N]`` int64 or int32, the token of each node. Node 0 is the root (the last
            accepted token x0; its entry is not read); nodes are in topological order.
        parents: ``[B, N]`` int64 or int32: ``parents[b, 0] == -1`` and ``0 <= parents[b, j] < j``.
        target_tokens: ``[B, N]``: the full model's (argmax) token after the context ending at each node.
        out: optional preallocated ``(accept_len, path, emitted)``, written in place.
        validate: check that parents is a valid tree (a device-to-host read; the decoder passes False).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        ``(accept_len [B] int32, path [B, N] int64, emitted [B, N] int64)``. From cur = 0, the walk moves to
        the first child c of cur (lowest index) with draft_tokens[c] == target_tokens[cur] and stops when
        there is none. path[b] is 0 then the a = accept_len[b] accepted nodes, -1 padded (what
        KVCache.compact takes); emitted[b] is their tokens then target_tokens[b, last node], -1 padded.
        A chain (parents[j] = j - 1) gives what accept_greedy gives for draft_tokens[:, 1:].
    """
    plan = accept_greedy_tree_plan(draft_tokens, parents, target_tokens, out=out, validate=validate, backend=backend)
    return plan.run(_int64(draft_tokens), _int64(parents), _int64(target_tokens), out=out)


def accept_sampling_tree(draft_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor,
                         target_probs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                         uniforms: Optional[torch.Tensor] = None,
                         out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                         backend: str = "auto") -> TreeAcceptance:
    """Multi-candidate rejection sampling over a draft tree (SpecInfer's multi-step speculative sampling):
    the emitted tokens follow the full model's distribution exactly when siblings were drafted
    INDEPENDENTLY: each child of node j drawn from ``draft_probs[b, j]`` independently of its siblings
    (i.i.d., with replacement: duplicate siblings are allowed). Siblings drafted without replacement
    (distinct top-k children, or sampling that excludes earlier siblings) break exactness: this op does
    not remove a rejected token from q.

    Args:
        draft_tokens: ``[B, N]`` int64 or int32, each node's token; node 0 is the root (not read).
        parents: ``[B, N]``: ``parents[b, 0] == -1``, ``0 <= parents[b, j] < j``.
        draft_probs: ``[B, N - 1, V]`` fp32, fp16 or bf16: row j is the draft distribution q_j at node j,
            from which all of node j's children were drawn (node N - 1 is always a leaf, so it has no row).
        target_probs: ``[B, N, V]``, draft_probs' dtype and device: the full model's p_j after node j.
        generator / uniforms: as for accept_sampling; uniforms is ``[B, N]``: column c - 1 decides node c,
            column N - 1 draws the emitted token.
        out: optional preallocated ``(accept_len, path, emitted)``, written in place.
        validate: check tokens, parents, probabilities and uniforms (a device-to-host read).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        ``(accept_len [B] int32, path [B, N] int64, emitted [B, N] int64)`` as for accept_greedy_tree. At
        node cur the children c are tried in index order: accept c with probability
        min(1, p'(d_c) / q_cur(d_c)), where p' starts as p_cur; on rejection p' <- normalise(max(0, p' - q_cur))
        (p_cur if that has no mass) and the next sibling is tried; on acceptance the walk moves to c. When no
        child is accepted (or cur is a leaf) the emitted token is drawn from p'. A chain tree consumes the
        same uniforms as accept_sampling and gives the same result.
    """
    plan = accept_sampling_tree_plan(draft_tokens, parents, draft_probs, target_probs, generator=generator,
                                     uniforms=uniforms, out=out, validate=validate, backend=backend)
    return plan.run(_int64(draft_tokens), _int64(parents), draft_probs.contiguous(), target_probs.contiguous(),
                    generator=generator, uniforms=None if uniforms is None else uniforms.contiguous(), out=out)


# ---- plans -------------------------------------------------------------------------------------------

class _AcceptancePlan:
    """The backend an ``accept_*_plan`` chose for inputs of one kind. ``run`` checks nothing: it takes the
    op's arguments with the planned batch size B, device and probabilities' dtype, any number of drafts (or
    nodes) k, tokens and parents int64 contiguous, probabilities and uniforms contiguous, ``out`` (when given)
    as the op documents it."""

    __slots__ = ("backend", "_kernel")

    def __init__(self, backend: Backend, batch: int):
        self.backend = backend
        self._kernel = backend.run if batch > 0 else _run_nothing

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend.name!r})"


class AcceptGreedyPlan(_AcceptancePlan):
    __slots__ = ()

    def run(self, draft_tokens: torch.Tensor, target_tokens: torch.Tensor, *,
            out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Acceptance:
        """:func:`accept_greedy` on inputs of the planned kind."""
        batch, columns, device = target_tokens.shape[0], target_tokens.shape[1], target_tokens.device
        accept_len, _, emitted = _out_or_new(out, batch, columns, device, with_path=False)
        self._kernel("greedy", draft_tokens, None, target_tokens, None, None, None, accept_len, None, emitted)
        return Acceptance(accept_len, emitted)


class AcceptSamplingPlan(_AcceptancePlan):
    __slots__ = ()

    def run(self, draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, *,
            generator: Optional[torch.Generator] = None, uniforms: Optional[torch.Tensor] = None,
            out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Acceptance:
        """:func:`accept_sampling` on inputs of the planned kind (uniforms drawn with generator when None)."""
        batch, columns, device = draft_tokens.shape[0], draft_tokens.shape[1] + 1, draft_tokens.device
        if uniforms is None:
            uniforms = _draw_uniforms(generator, batch, columns, device)
        accept_len, _, emitted = _out_or_new(out, batch, columns, device, with_path=False)
        self._kernel("sampling", draft_tokens, None, None, draft_probs, target_probs, uniforms, accept_len, None,
                     emitted)
        return Acceptance(accept_len, emitted)


class AcceptGreedyTreePlan(_AcceptancePlan):
    __slots__ = ()

    def run(self, draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor, *,
            out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> TreeAcceptance:
        """:func:`accept_greedy_tree` on inputs of the planned kind."""
        batch, num_nodes, device = draft_tokens.shape[0], draft_tokens.shape[1], draft_tokens.device
        accept_len, path, emitted = _out_or_new(out, batch, num_nodes, device, with_path=True)
        self._kernel("greedy", draft_tokens, parents, target_tokens, None, None, None, accept_len, path, emitted)
        return TreeAcceptance(accept_len, path, emitted)


class AcceptSamplingTreePlan(_AcceptancePlan):
    __slots__ = ()

    def run(self, draft_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor,
            target_probs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
            uniforms: Optional[torch.Tensor] = None,
            out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> TreeAcceptance:
        """:func:`accept_sampling_tree` on inputs of the planned kind (uniforms drawn with generator when None)."""
        batch, num_nodes, device = draft_tokens.shape[0], draft_tokens.shape[1], draft_tokens.device
        if uniforms is None:
            uniforms = _draw_uniforms(generator, batch, num_nodes, device)
        accept_len, path, emitted = _out_or_new(out, batch, num_nodes, device, with_path=True)
        self._kernel("sampling", draft_tokens, parents, None, draft_probs, target_probs, uniforms, accept_len, path,
                     emitted)
        return TreeAcceptance(accept_len, path, emitted)


def accept_greedy_plan(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, *,
                       out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                       backend: str = "auto") -> AcceptGreedyPlan:
    """Checks :func:`accept_greedy`'s arguments and chooses the backend, once (``validate`` reads nothing)."""
    _check_chain_tokens(draft_tokens, target_tokens, "target_tokens")
    batch, num_nodes = target_tokens.shape
    _check_out(out, batch, num_nodes, target_tokens.device, with_path=False)
    chosen = _select("accept_greedy", backend, draft_tokens, None)
    return AcceptGreedyPlan(chosen, batch)


def accept_sampling_plan(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, *,
                         generator: Optional[torch.Generator] = None, uniforms: Optional[torch.Tensor] = None,
                         out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, validate: bool = True,
                         backend: str = "auto") -> AcceptSamplingPlan:
    """Checks :func:`accept_sampling`'s arguments (with validate, their values; uniforms drawn by run need
    none) and chooses the backend, once."""
    _check_chain_tokens(draft_tokens, None, None)
    batch, num_drafts = draft_tokens.shape
    _check_probs(draft_tokens, draft_probs, target_probs, num_drafts + 1)
    _check_uniforms(uniforms, generator, batch, num_drafts + 1, draft_tokens.device)
    if validate and not torch.compiler.is_compiling():
        _check_sampling_values(draft_tokens, None, draft_probs, target_probs, uniforms)
    _check_out(out, batch, num_drafts + 1, draft_tokens.device, with_path=False)
    chosen = _select("accept_sampling", backend, draft_tokens, draft_probs)
    return AcceptSamplingPlan(chosen, batch)


def accept_greedy_tree_plan(draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor, *,
                            out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                            validate: bool = True, backend: str = "auto") -> AcceptGreedyTreePlan:
    """Checks :func:`accept_greedy_tree`'s arguments (with validate, that parents is a tree) and chooses the
    backend, once."""
    num_nodes = _check_tree(draft_tokens, parents, validate)
    _check_token_tensor("target_tokens", target_tokens, draft_tokens, num_nodes, "N, the nodes of draft_tokens")
    batch = draft_tokens.shape[0]
    _check_out(out, batch, num_nodes, draft_tokens.device, with_path=True)
    chosen = _select("accept_greedy_tree", backend, draft_tokens, None)
    return AcceptGreedyTreePlan(chosen, batch)


def accept_sampling_tree_plan(draft_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor,
                              target_probs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                              uniforms: Optional[torch.Tensor] = None,
                              out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                              validate: bool = True, backend: str = "auto") -> AcceptSamplingTreePlan:
    """Checks :func:`accept_sampling_tree`'s arguments (with validate, their values) and chooses the backend,
    once."""
    num_nodes = _check_tree(draft_tokens, parents, False)
    batch = draft_tokens.shape[0]
    _check_probs(draft_tokens, draft_probs, target_probs, num_nodes)
    _check_uniforms(uniforms, generator, batch, num_nodes, draft_tokens.device)
    if validate and not torch.compiler.is_compiling():
        _check_parent_values(_int64(parents))
        _check_sampling_values(draft_tokens[:, 1:], parents, draft_probs, target_probs, uniforms)
    _check_out(out, batch, num_nodes, draft_tokens.device, with_path=True)
    chosen = _select("accept_sampling_tree", backend, draft_tokens, draft_probs)
    return AcceptSamplingTreePlan(chosen, batch)


# ---- checks ------------------------------------------------------------------------------------------

def _device_type(tensor: torch.Tensor) -> str:
    return "cuda" if tensor.device.type == "cuda" else "cpu"


def _select(op_name: str, backend: str, draft_tokens: torch.Tensor, probs: Optional[torch.Tensor]) -> Backend:
    """The backend for these inputs: its reasons read the tokens' device and the probabilities' dtype."""
    return select_remembered(op_name, BACKENDS, PRIORITY[_device_type(draft_tokens)], backend,
                             draft_tokens.device.type, None if probs is None else probs.dtype, draft_tokens, probs)


def _int64(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens or parents as the kernels read them: int64, contiguous."""
    return tokens.to(torch.int64).contiguous()


def _check_token_tensor(name: str, value, reference: Optional[torch.Tensor], columns: int, meaning: str) -> None:
    _checks.check_tensor(name, value, ndim=2, dtypes=TOKEN_DTYPES, shape_doc="[B, columns]")
    if reference is not None:
        _checks.check_same_device(name, value, "draft_tokens", reference)
        _checks.check_size(name, value, 0, reference.shape[0], "the batch size B of draft_tokens")
    _checks.check_size(name, value, 1, columns, meaning)


def _check_chain_tokens(draft_tokens, target_tokens, target_name) -> None:
    _checks.check_tensor("draft_tokens", draft_tokens, ndim=2, dtypes=TOKEN_DTYPES, shape_doc="[B, k]")
    if draft_tokens.shape[1] + 1 > MAX_NODES:
        raise ValueError(f"draft_tokens has k={draft_tokens.shape[1]} drafts; at most {MAX_NODES - 1} are supported")
    if target_tokens is not None:
        _check_token_tensor(target_name, target_tokens, draft_tokens, draft_tokens.shape[1] + 1,
                            "k + 1, one more than the drafts of draft_tokens")


def _check_tree(draft_tokens, parents, validate: bool) -> int:
    """Checks a tree's tokens and parents (with validate, the parents' values); returns its N nodes."""
    _checks.check_tensor("draft_tokens", draft_tokens, ndim=2, dtypes=TOKEN_DTYPES, shape_doc="[B, N]")
    num_nodes = draft_tokens.shape[1]
    if num_nodes < 1:
        raise ValueError("draft_tokens has N=0 nodes; a tree has at least its root (node 0)")
    if num_nodes > MAX_NODES:
        raise ValueError(f"draft_tokens has N={num_nodes} nodes; at most {MAX_NODES} are supported")
    _check_token_tensor("parents", parents, draft_tokens, num_nodes, "N, the nodes of draft_tokens")
    if validate and not torch.compiler.is_compiling():
        _check_parent_values(_int64(parents))
    return num_nodes


def _check_parent_values(parents: torch.Tensor) -> None:
    """parents[b, 0] == -1 and 0 <= parents[b, j] < j: a tree in topological order."""
    if parents.numel() == 0:
        return
    node = torch.arange(parents.shape[1], device=parents.device)
    expected_low = torch.where(node == 0, -1, 0)
    expected_high = torch.where(node == 0, -1, node - 1)
    bad = (parents < expected_low) | (parents > expected_high)                         # [B, N]
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        rule = ("must be -1 (node 0 is the root)" if col == 0
                else f"must be in [0, {col - 1}] (a parent precedes its child)")
        raise ValueError(f"parents is not a valid tree: parents[{row}, {col}] = {int(parents[row, col])} {rule}")


def _check_probs(draft_tokens, draft_probs, target_probs, num_nodes: int) -> None:
    target_probs = _checks.check_tensor("target_probs", target_probs, ndim=3, dtypes=PROB_DTYPES,
                                        shape_doc="[B, k + 1 (or N), V]")
    draft_probs = _checks.check_tensor("draft_probs", draft_probs, ndim=3, dtypes=PROB_DTYPES,
                                       shape_doc="[B, k (or N - 1), V]")
    for name, tensor in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        _checks.check_same_device(name, tensor, "draft_tokens", draft_tokens)
        _checks.check_size(name, tensor, 0, draft_tokens.shape[0], "the batch size B of draft_tokens")
    _checks.check_same_dtype("draft_probs", draft_probs, "target_probs", target_probs)
    _checks.check_size("target_probs", target_probs, 1, num_nodes,
                       "one row per position: k + 1 for a chain of k drafts, N for a tree of N nodes")
    _checks.check_size("draft_probs", draft_probs, 1, num_nodes - 1,
                       "one row per drafted position: k for a chain, N - 1 for a tree")
    vocab = target_probs.shape[2]
    if vocab < 1:
        raise ValueError("target_probs has V=0 vocabulary entries")
    _checks.check_size("draft_probs", draft_probs, 2, vocab, "the vocabulary size V of target_probs")


def _check_uniforms(uniforms, generator, batch: int, columns: int, device: torch.device) -> None:
    """Given uniforms ``[B, columns]`` fp32 on the tensors' device, or else a generator of that device type."""
    if uniforms is None:
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the tensors are on {device}: "
                             "pass a generator of the tensors' device")
        return
    _checks.check_tensor("uniforms", uniforms, ndim=2, dtypes=(torch.float32,), shape_doc="[B, k + 1 (or N)]")
    if uniforms.device != device:
        raise ValueError(f"uniforms is on {uniforms.device} but draft_tokens is on {device}: "
                         "all tensors must be on one device")
    _checks.check_size("uniforms", uniforms, 0, batch, "the batch size B of draft_tokens")
    _checks.check_size("uniforms", uniforms, 1, columns, "k + 1 for a chain, N for a tree")


def _draw_uniforms(generator, batch: int, columns: int, device: torch.device) -> torch.Tensor:
    return torch.rand((batch, columns), generator=generator, device=device, dtype=torch.float32)


def _check_sampling_values(drafted_tokens, parents, draft_probs, target_probs, uniforms) -> None:
    """Drafted tokens in [0, V), probabilities finite and >= 0, given uniforms in [0, 1) (None: run draws
    them, in range): one host read."""
    vocab = target_probs.shape[2]
    outside = (drafted_tokens < 0) | (drafted_tokens >= vocab)
    flags = torch.stack([                                   # .any() of an empty tensor is False
        outside.any(),
        (~torch.isfinite(draft_probs) | (draft_probs < 0)).any(),
        (~torch.isfinite(target_probs) | (target_probs < 0)).any(),
        ((uniforms < 0) | (uniforms >= 1) | uniforms.isnan()).any() if uniforms is not None
        else torch.zeros((), dtype=torch.bool, device=outside.device),
    ]).tolist()
    if flags[0]:
        row, col = outside.nonzero()[0].tolist()
        column = col + 1 if parents is not None else col
        raise ValueError(f"draft_tokens[{row}, {column}] = {int(drafted_tokens[row, col])} is outside the "
                         f"vocabulary [0, {vocab}) of target_probs")
    for flag, name in ((flags[1], "draft_probs"), (flags[2], "target_probs")):
        if flag:
            raise ValueError(f"{name} holds a negative, NaN or infinite value; "
                             "probabilities must be finite and >= 0")
    if flags[3]:
        raise ValueError("uniforms must lie in [0, 1)")


def _out_or_new(out, batch: int, num_nodes: int, device: torch.device, with_path: bool):
    """(accept_len, path or None, emitted): the caller's `out` (checked by the plan), or fresh."""
    if out is not None:
        return (out[0], out[1], out[2]) if with_path else (out[0], None, out[1])
    accept_len = torch.empty(batch, dtype=torch.int32, device=device)
    emitted = torch.empty(batch, num_nodes, dtype=torch.int64, device=device)
    path = torch.empty(batch, num_nodes, dtype=torch.int64, device=device) if with_path else None
    return accept_len, path, emitted


def _check_out(out, batch: int, num_nodes: int, device: torch.device, with_path: bool) -> None:
    """The caller's preallocated outputs, if any: contiguous, of the shapes and dtypes returned."""
    if out is None:
        return
    names = ("accept_len", "path", "emitted") if with_path else ("accept_len", "emitted")
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise TypeError(f"out must be a tuple ({', '.join(names)}) of tensors, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    expected = {"accept_len": ((batch,), torch.int32), "path": ((batch, num_nodes), torch.int64),
                "emitted": ((batch, num_nodes), torch.int64)}
    for name, tensor in zip(names, out):
        shape, dtype = expected[name]
        _checks.check_tensor(f"out[{names.index(name)}] ({name})", tensor, ndim=len(shape), dtypes=(dtype,))
        if tuple(tensor.shape) != shape or not tensor.is_contiguous() or tensor.device != device:
            raise ValueError(f"out[{names.index(name)}] ({name}) must be contiguous with shape {shape} on {device}, "
                             f"got shape {tuple(tensor.shape)} on {tensor.device}")


# ---- backends ----------------------------------------------------------------------------------------
# Every backend takes (mode, draft_tokens, parents, target_tokens, draft_probs, target_probs, uniforms,
# accept_len, path, emitted) and writes the outputs in place. draft_tokens is [B, k] (a chain: parents is
# None, node c's token is draft_tokens[c - 1]) or [B, N] (a tree: node c's token is draft_tokens[c]).

def _run_nothing(mode, draft_tokens, parents, target_tokens, draft_probs, target_probs, uniforms,
                 accept_len, path, emitted) -> None:
    """The plan of an empty batch (B = 0): nothing to accept."""


def _run_reference(mode, draft_tokens, parents, target_tokens, draft_probs, target_probs, uniforms,
                   accept_len, path, emitted) -> None:
    if mode == "greedy":
        result = (accept_greedy_tree_reference(draft_tokens, parents, target_tokens) if parents is not None
                  else accept_greedy_reference(draft_tokens, target_tokens))
    else:
        result = (accept_sampling_tree_reference(draft_tokens, parents, draft_probs, target_probs, uniforms)
                  if parents is not None else
                  accept_sampling_reference(draft_tokens, draft_probs, target_probs, uniforms))
    accept_len.copy_(result[0])
    emitted.copy_(result[-1])
    if path is not None:
        path.copy_(result[1])


def _run_extension(mode, draft_tokens, parents, target_tokens, draft_probs, target_probs, uniforms,
                   accept_len, path, emitted) -> None:
    if mode == "greedy":
        torch.ops.fastvlm.accept_greedy(draft_tokens, parents, target_tokens, accept_len, path, emitted)
    else:
        torch.ops.fastvlm.accept_sampling(draft_tokens, parents, draft_probs, target_probs, uniforms, accept_len,
                                          path, emitted)


def _run_triton(mode, draft_tokens, parents, target_tokens, draft_probs, target_probs, uniforms,
                accept_len, path, emitted) -> None:
    from .triton import accept_greedy_triton_op, accept_sampling_triton_op
    if mode == "greedy":
        call_custom_op(accept_greedy_triton_op, draft_tokens, parents, target_tokens, accept_len, path, emitted)
    else:
        call_custom_op(accept_sampling_triton_op, draft_tokens, parents, draft_probs, target_probs, uniforms,
                       accept_len, path, emitted)


BACKENDS = (
    Backend("cuda", _run_extension, compiled_backend_reasons("cuda")),
    Backend("triton", _run_triton, triton_backend_reasons),
    Backend("cpu", _run_extension, compiled_backend_reasons("cpu")),
    Backend("torch", _run_reference, always_supported),
)
# `auto` order per device type (Triton on CPU tensors is for tests under the interpreter only).
# On an H100 (bench/results/NVIDIA-H100-80GB-HBM3-2026-11-25-acceptance*) the CUDA kernels are 1.0-1.3x faster
# than Triton's (sampling 46-212 us, greedy 2.3 us) and launch with less host overhead: CUDA first.
PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
