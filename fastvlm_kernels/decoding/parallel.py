"""Tensor parallel: the decoder over a model that transformers sharded with its tensor-parallel plan.

``from_pretrained(folder, tp_plan="auto")`` under ``torchrun`` shards every text layer by the model's plan:
the query, key, value, gate and up projections column-wise (each rank holds ``1/R`` of the heads and of the
MLP's width, the weights ``Shard(0)`` DTensors), the attention output and down projections row-wise
(``Shard(1)``; transformers all-reduces their outputs), the token embedding by vocabulary rows (all-reduced)
and, where the plan names it, the LM head by vocabulary rows (gathered). Norms stay replicated.

What the decoder does with that (docs/design.md, "Tensor parallel"):

- Each rank's cache holds its own KV heads (:attr:`TensorParallel.num_kv_heads`, read from the sharded
  ``k_proj``), and the layers run on the local shards: the model's own modules (their hooks all-reduce), or
  the lean layers (:mod:`.lean`), which read each weight's local tensor and all-reduce after the attention
  output and down projections, as transformers' row-wise hook does.
- An LM head sharded by vocabulary rows runs the fused heads over the rank's rows only and merges the ranks'
  results per row with one small all-gather (:class:`VocabParallelHeadPlan`): the best logit and its id,
  the log-sum-exp, the top k. Sampling reads the gathered logits of the model's own head module, identical
  on every rank, and the random stream is rank 0's (:meth:`TensorParallel.share_random_state`), so every rank
  draws the same tokens and decides the same acceptance without a collective of its own.
- A plan the decoder does not know, or head counts the ranks do not divide, is a ``ValueError`` at the
  decoder's construction (:func:`tensor_parallel_for`).

A model that is not sharded gets ``None`` here and the decoder's path is unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops.lm_head import EarlyExitHeadOutput, VerifyHeadOutput

COLUMN_WISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_WISE = ("self_attn.o_proj", "mlp.down_proj")


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter transformers' plan distributed)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rank's local tensor of a DTensor; any other tensor (or None) as it is."""
    return tensor.to_local() if tensor is not None and is_sharded(tensor) else tensor


def _placement(tensor) -> Optional[Tuple[str, Optional[int]]]:
    """("shard", dim) / ("replicate", None) for a 1-D-mesh DTensor; None for a plain tensor."""
    if not is_sharded(tensor):
        return None
    placements = tensor.placements
    if len(placements) != 1:
        return ("mesh", len(placements))
    placement = placements[0]
    if placement.is_shard():
        return ("shard", placement.dim % tensor.dim())
    if placement.is_replicate():
        return ("replicate", None)
    return (type(placement).__name__, None)


def _module(layer: nn.Module, path: str) -> Optional[nn.Module]:
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


class TensorParallel:
    """One sharded model's ranks: the process group, this rank's heads and vocabulary rows, the collectives.

    ``collectives`` counts the collectives the decoder issued or caused (the model's own row-wise and
    embedding hooks included), per kind, since the last :meth:`reset_counts`."""

    def __init__(self, group, rank: int, world_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 vocab_range: Optional[Tuple[int, int]], embedding_sharded: bool, device_type: str):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.vocab_range = vocab_range          # (first, end) of the LM head's rows here; None: replicated head
        self.embedding_sharded = embedding_sharded
        self.device_type = device_type          # where the group's collectives run ("cuda" for NCCL)
        self.collectives = {"all_reduce": 0, "all_gather": 0, "broadcast": 0}

    @property
    def vocab_parallel(self) -> bool:
        return self.vocab_range is not None

    def reset_counts(self) -> None:
        for kind in self.collectives:
            self.collectives[kind] = 0

    def count(self, kind: str, times: int = 1) -> None:
        """Counts collectives that the model's own hooks run (the decoder knows where they are)."""
        self.collectives[kind] += times

    # ---- collectives ---------------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks in place (a row-wise projection's partial outputs); returns it."""
        import torch.distributed as dist
        dist.all_reduce(tensor, group=self.group)
        self.collectives["all_reduce"] += 1
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[R, *tensor.shape]``: every rank's ``tensor`` (same shape on every rank), in rank order."""
        import torch.distributed as dist
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        self.collectives["all_gather"] += 1
        return torch.stack(parts)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a choice each rank would make from its own timings)."""
        import torch.distributed as dist
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device_type)
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.collectives["broadcast"] += 1
        return int(tensor.item())

    def share_random_state(self, generator: Optional[torch.Generator], device: torch.device) -> None:
        """Sets ``generator`` (None: ``device``'s default generator) to rank 0's state on every rank, so that
        every rank draws the same tokens (one broadcast per generate call that samples)."""
        import torch.distributed as dist
        if generator is None:
            device = torch.device(device)
            generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                       else torch.cuda.current_device()]
                         if device.type == "cuda" else torch.default_generator)
        state = generator.get_state()
        moved = state.to(self.device_type) if self.device_type != "cpu" else state.clone()
        dist.broadcast(moved, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.collectives["broadcast"] += 1
        generator.set_state(moved.cpu())

    # ---- shards --------------------------------------------------------------------------------------------

    def shard_rows(self, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's block of rows of a full (replicated) ``weight`` ``[O, ...]``: a column-wise projection's
        shard, as the plan takes it (the ranks divide O, checked at construction)."""
        if weight is None:
            return None
        size = weight.shape[0] // self.world_size
        return weight[self.rank * size:(self.rank + 1) * size]

    def shard_columns(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's block of columns of a full ``weight`` ``[O, I]`` (a row-wise projection's shard)."""
        size = weight.shape[1] // self.world_size
        return weight[:, self.rank * size:(self.rank + 1) * size].contiguous()

    def local_vocab_subset(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The ids of ``ids`` (sorted vocabulary ids) among this rank's LM-head rows, as local row indices
        (None when this rank holds none of them)."""
        first, end = self.vocab_range
        mine = ids[(ids >= first) & (ids < end)] - first
        return mine if mine.numel() else None

    def gather_rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[S, H]`` rows ``ids`` of the vocabulary-sharded LM-head ``weight`` on every rank: each rank writes
        the rows it holds into a zero buffer and one all-reduce sums them (exact: the others add zeros)."""
        first, end = self.vocab_range
        rows = local(weight)                                   # [V / R, H] (a bias: [V / R, 1])
        out = rows.new_zeros((ids.numel(), rows.shape[1]))
        mine = (ids >= first) & (ids < end)
        out[mine] = rows.index_select(0, ids[mine] - first)
        return self.all_reduce(out)


def tensor_parallel_for(adapter, imitation=None) -> Optional[TensorParallel]:
    """The :class:`TensorParallel` of a model sharded by transformers' tensor-parallel plan; None for a model
    that is not sharded. Raises ``ValueError`` naming why when the decoder cannot run the sharding."""
    layers = list(adapter.layers)
    probe = _module(layers[0], COLUMN_WISE[0]) if layers else None
    weights = [getattr(_module(layer, path), "weight", None) for layer in layers for path in COLUMN_WISE + ROW_WISE]
    sharded = [w for w in weights if w is not None and is_sharded(w)]
    if not sharded and not is_sharded(adapter.lm_head.weight) and not is_sharded(adapter.embed_tokens.weight):
        return None
    if probe is None:
        raise ValueError("tensor parallel: the decoder found no q_proj in the text layers")
    mesh = sharded[0].device_mesh if sharded else adapter.lm_head.weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"tensor parallel: the weights are distributed over a {mesh.ndim}-D device mesh; the "
                         f"decoder runs a 1-D tensor-parallel mesh")
    world_size, rank = mesh.size(), mesh.get_local_rank()
    for index, layer in enumerate(layers):
        for paths, expected in ((COLUMN_WISE, ("shard", 0)), (ROW_WISE, ("shard", 1))):
            for path in paths:
                module = _module(layer, path)
                weight = getattr(module, "weight", None)
                found = _placement(weight)
                if found != expected:
                    what = "not sharded (replicated)" if found is None else f"placed {weight.placements}"
                    raise ValueError(
                        f"tensor parallel: layer {index}'s {path} is {what}; the decoder runs transformers' "
                        f"colwise q/k/v/gate/up and rowwise o/down plan only ("
                        f"{'Shard(0)' if expected[1] == 0 else 'Shard(1)'} here)")
                bias = getattr(module, "bias", None)
                if bias is not None and expected[1] == 1 and _placement(bias) not in (None, ("replicate", None)):
                    raise ValueError(f"tensor parallel: layer {index}'s {path} bias is sharded; a row-wise "
                                     f"projection's bias must be replicated")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if _placement(getattr(getattr(layer, norm, None), "weight", None)) not in (None, ("replicate", None)):
                raise ValueError(f"tensor parallel: layer {index}'s {norm} is sharded (sequence parallel); the "
                                 f"decoder runs replicated norms")
    config = adapter.text_config
    head_dim = adapter.head_dim
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for name, count in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                        ("intermediate_size", config.intermediate_size)):
        if count % world_size:
            raise ValueError(f"tensor parallel: {name}={count} is not divisible by the {world_size} ranks; each "
                             f"rank must hold whole heads (and an equal share of the MLP)")
    attention = layers[0].self_attn
    local_heads = local(attention.q_proj.weight).shape[0] // head_dim
    local_kv_heads = local(attention.k_proj.weight).shape[0] // head_dim
    if (local_heads, local_kv_heads) != (num_heads // world_size, num_kv_heads // world_size):
        raise ValueError(f"tensor parallel: rank {rank} holds {local_heads} query and {local_kv_heads} KV heads, "
                         f"expected {num_heads // world_size} and {num_kv_heads // world_size}")
    vocab_range = None
    head_placement = _placement(adapter.lm_head.weight)
    if head_placement == ("shard", 0):
        import torch.distributed as dist
        rows = torch.tensor([local(adapter.lm_head.weight).shape[0]], device=mesh.device_type)   # NCCL: on the GPU
        sizes = [torch.zeros_like(rows) for _ in range(world_size)]
        dist.all_gather(sizes, rows, group=mesh.get_group())
        sizes = [int(size) for size in sizes]
        vocab_range = (sum(sizes[:rank]), sum(sizes[:rank + 1]))
    elif head_placement not in (None, ("replicate", None)):
        raise ValueError(f"tensor parallel: the LM head is placed {adapter.lm_head.weight.placements}; the decoder "
                         f"runs a head sharded by vocabulary rows (Shard(0)) or replicated")
    embedding = _placement(adapter.embed_tokens.weight)
    if embedding not in (None, ("replicate", None), ("shard", 0)):
        raise ValueError(f"tensor parallel: the token embedding is placed {adapter.embed_tokens.weight.placements}; "
                         f"the decoder runs one sharded by vocabulary rows or replicated")
    if imitation is not None and len(getattr(imitation, "layers", ())):
        for layer in imitation.layers:
            sharded_layer = _placement(layer.self_attn.q_proj.weight) is not None
            if not sharded_layer and (layer.self_attn.q_proj.weight.shape[0] // head_dim) % world_size:
                raise ValueError(f"tensor parallel: the imitation network's layers have "
                                 f"{layer.self_attn.q_proj.weight.shape[0] // head_dim} heads, not divisible by "
                                 f"the {world_size} ranks")
    return TensorParallel(mesh.get_group(), rank, world_size, local_heads, local_kv_heads, head_dim, vocab_range,
                          embedding == ("shard", 0), mesh.device_type)


class VocabParallelHeadPlan:
    """An ``early_exit_head`` / ``verify_head`` plan over this rank's rows of a vocabulary-sharded LM head,
    merged over the ranks per row by one all-gather of ``[M, 4]`` (argmax: the best logit, its vocabulary id,
    the log-sum-exp and the chosen token's log-probability; "topk": ``[M, 2k + 1]``). Ties go to the lowest
    id, as in one process (the ranks hold ascending blocks of rows).

    ``plan`` None: this rank holds none of a draft vocabulary's ids and contributes nothing (-inf)."""

    def __init__(self, parallel: TensorParallel, plan, *, mode: str, top_k: int = 1, verify: bool = False):
        self.parallel, self.plan, self.mode, self.top_k, self.verify = parallel, plan, mode, top_k, verify
        self.first = parallel.vocab_range[0]

    def run(self, hidden: torch.Tensor, draft_tokens: Optional[torch.Tensor] = None, **_):
        rows = hidden.shape[0]
        if self.mode == "topk":
            return self._topk(hidden, rows)
        local_drafts = None
        if self.verify:
            end = self.parallel.vocab_range[1]
            mine = (draft_tokens >= self.first) & (draft_tokens < end)
            local_drafts = torch.where(mine, draft_tokens - self.first, -1)
        if self.plan is None:
            out = hidden.new_full((rows, 4), float("-inf"), dtype=torch.float64)
        else:
            result = self.plan.run(hidden, local_drafts) if self.verify else self.plan.run(hidden)
            tokens = result.tokens          # local row ids (a subset's too)
            chosen = result.draft_logprob if self.verify else result.logprob
            out = torch.stack([result.max_logit.double(), (tokens + self.first).double(), result.lse.double(),
                               chosen.double()], dim=1)                                        # [M, 4]
        every = self.parallel.all_gather(out)                                                  # [R, M, 4]
        winner = every[:, :, 0].argmax(dim=0)                        # first maximum: the lowest rank, lowest id
        picked = every.gather(0, winner[None, :, None].expand(1, rows, 4))[0]
        lse = torch.logsumexp(every[:, :, 2], dim=0)
        tokens = picked[:, 1].long()
        if self.verify:   # the draft token's log-prob: from the rank holding it (-inf elsewhere)
            draft_logprob = (every[:, :, 3] + every[:, :, 2]).max(dim=0).values - lse
            return VerifyHeadOutput(tokens, picked[:, 0].float(), lse.float(), draft_logprob.float(), None)
        logprob = picked[:, 3] + picked[:, 2] - lse
        return EarlyExitHeadOutput(tokens, picked[:, 0].float(), lse.float(), logprob.float())

    def _topk(self, hidden: torch.Tensor, rows: int):
        k = self.top_k
        out = hidden.new_full((rows, 2 * k + 1), float("-inf"), dtype=torch.float64)
        out[:, k:2 * k] = -1
        if self.plan is not None:
            result = self.plan.run(hidden)
            tokens = result.tokens
            have = tokens.shape[1]
            out[:, :have] = result.logprob.double() + result.lse.double()[:, None]   # the scores
            out[:, k:k + have] = (tokens + self.first).double()
            out[:, 2 * k] = result.lse.double()
        every = self.parallel.all_gather(out)                                            # [R, M, 2k + 1]
        scores = every[:, :, :k].permute(1, 0, 2).reshape(rows, -1)                      # [M, R k]
        ids = every[:, :, k:2 * k].permute(1, 0, 2).reshape(rows, -1)
        lse = torch.logsumexp(every[:, :, 2 * k], dim=0)
        by_id = torch.sort(torch.where(ids < 0, float("inf"), ids), dim=1, stable=True).indices
        scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]   # ties: the lower id
        logprob = (scores.gather(1, best) - lse[:, None]).float()
        return EarlyExitHeadOutput(ids.gather(1, best).long(), every[:, :, 0].max(dim=0).values.float(), lse.float(),
                                   logprob)


def head_plan(parallel: TensorParallel, make, hidden: torch.Tensor, norm_weight: torch.Tensor,
              lm_head_weight: torch.Tensor, *args, vocab_subset: Optional[torch.Tensor] = None,
              verify: bool = False, **kwargs) -> VocabParallelHeadPlan:
    """``make``'s plan (early_exit_head_plan / verify_head_plan) over this rank's rows of the LM head, wrapped
    to merge the ranks. ``args``: verify's draft tokens (made local here)."""
    mode = kwargs.get("mode", "argmax")
    top_k = kwargs.get("top_k") or 1
    weight = local(lm_head_weight)
    local_subset = None
    if vocab_subset is not None:
        local_subset = parallel.local_vocab_subset(vocab_subset)
        if local_subset is None:
            return VocabParallelHeadPlan(parallel, None, mode=mode, top_k=top_k, verify=verify)
    columns = weight.shape[0] if local_subset is None else local_subset.numel()
    if mode == "topk":
        kwargs["top_k"] = min(top_k, columns)
    if verify:
        args = (torch.full_like(args[0], -1),) + args[1:]
    plan = make(hidden, norm_weight, weight, *args, vocab_subset=local_subset, validate=False, **kwargs) \
        if not verify else make(hidden, norm_weight, weight, *args, validate=False, **kwargs)
    return VocabParallelHeadPlan(parallel, plan, mode=mode, top_k=top_k, verify=verify)
