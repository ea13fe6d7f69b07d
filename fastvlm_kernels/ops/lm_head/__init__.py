"""early_exit_head and verify_head: final RMSNorm, LM-head projection and token selection in one pass over
the head's rows, never writing the [M, V] logits.

Backends: "cpu" (csrc/cpu/lm_head.cpp) does every mode. Sampling with top_k (and top_p) keeps each row's
top_k (score, id) candidates in the same single pass over the head, then applies top-p over those
candidates (Hugging Face's rules on the renormalised top-k distribution) and draws by Gumbel-max among the
survivors; top_p without top_k needs the whole sorted row, so that case goes to the reference. "cuda" and
"triton" do argmax, plain sampling and verify_head, "triton" also "topk" (k <= 64: each tile's k best, then
a stable sort of the candidates); top-k / top-p sampling on GPU tensors falls back to "torch" (the
reference, which materialises the logits). All backends draw the same noise for the
same seed: a splitmix64 hash of (seed, offset, row, token id), see reference.gumbel_noise.

Plan/run: :func:`early_exit_head_plan` and :func:`verify_head_plan` check the arguments and choose the backend
once; their plans' ``run`` allocates the outputs and calls the chosen kernel (the decoder holds one of each
per generate). The public functions are plan then run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Union

import torch

from .. import _checks
from .._dispatch import (Backend, call_custom_op, device_reasons, extension_reasons, select_remembered,
                         triton_device_reasons)
from .reference import lm_head_reference
from .spec import MODE_CODES, MODES, SUPPORTED_DTYPES

__all__ = ["early_exit_head", "verify_head", "early_exit_head_plan", "verify_head_plan", "EarlyExitHeadPlan",
           "VerifyHeadPlan", "EarlyExitHeadOutput", "VerifyHeadOutput", "vocab_subset_from_counts",
           "lm_head_reference", "BACKENDS", "PRIORITY"]


class EarlyExitHeadOutput(NamedTuple):
    """tokens [M] int64 ([M, top_k] for "topk"); max_logit, lse [M] fp32 of the processed scores; logprob
    [M] ([M, top_k]) fp32: the chosen tokens' log-probabilities under the processed distribution."""
    tokens: torch.Tensor
    max_logit: torch.Tensor
    lse: torch.Tensor
    logprob: torch.Tensor


class VerifyHeadOutput(NamedTuple):
    """tokens [M] int64 (the target's argmax); max_logit, lse [M] fp32; draft_logprob [M] fp32 (-inf where
    the draft token is -1); probs [R, V] fp32 softmax rows for prob_rows (None when not asked)."""
    tokens: torch.Tensor
    max_logit: torch.Tensor
    lse: torch.Tensor
    draft_logprob: torch.Tensor
    probs: Optional[torch.Tensor]


@dataclass
class _Call:
    """One validated call, as every backend receives it."""
    hidden: torch.Tensor
    norm_weight: torch.Tensor
    lm_head_weight: torch.Tensor
    vocab_subset: Optional[torch.Tensor]
    draft_tokens: Optional[torch.Tensor]
    prob_rows: Optional[torch.Tensor]
    seed: Optional[torch.Tensor]          # [2] int64 (seed, offset) on hidden's device, for "sample"
    eps: float
    norm_offset: float
    logit_scale: float
    logit_softcap: float                  # 0: none
    temperature: float
    mode: str
    top_k: int                            # 0: none
    top_p: float                          # 1: none
    tokens: torch.Tensor
    max_logit: torch.Tensor
    lse: torch.Tensor
    logprob: torch.Tensor
    draft_logprob: Optional[torch.Tensor]
    probs: Optional[torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def op_args(self) -> tuple:
        return (self.hidden, self.norm_weight, self.lm_head_weight, self.vocab_subset, self.draft_tokens,
                self.prob_rows, self.seed, self.eps, self.norm_offset, self.logit_scale, self.logit_softcap,
                self.temperature, MODE_CODES[self.mode], self.top_k, self.top_p, self.tokens, self.max_logit,
                self.lse, self.logprob, self.draft_logprob, self.probs)


def early_exit_head(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, *,
                    eps: float, mode: str = "argmax", temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, vocab_subset: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, seed: Optional[Union[int, torch.Tensor]] = None,
                    norm_offset: float = 0.0, logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
                    validate: bool = True, backend: str = "auto") -> EarlyExitHeadOutput:
    """The drafter's head: RMSNorm, projection and selection fused over vocabulary tiles.

    Args:
        hidden: ``[M, H]`` hidden states (fp32, fp16 or bf16; last dim contiguous).
        norm_weight: ``[H]`` the model's final RMSNorm weight, hidden's dtype.
        lm_head_weight: ``[V, H]`` the LM head (rows contiguous), hidden's dtype and device.
        eps: the RMSNorm epsilon. norm_offset: 1.0 for Gemma-style ``(1 + w)`` norms, else 0.
        logit_scale: logits are multiplied by it (models that scale logits); logit_softcap: when set,
            logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        mode: "argmax" (ties to the lowest index, like torch.argmax; temperature is ignored),
            "sample" (exact draw from softmax(logits / temperature) after optional top_k / top_p filtering,
            by the Gumbel-max trick with counter-based noise) or "topk" (the top_k tokens of
            softmax(logits / temperature), best first, ties to the lowest index).
        temperature: > 0 for "sample" and "topk". top_k: an int >= 1 ("topk": required, at most the number
            of columns; "sample": values above the vocabulary are clamped, like Hugging Face).
            top_p: in (0, 1], "sample" only, applied after top_k (Hugging Face's rules).
        vocab_subset: ``[S]`` int64 strictly increasing token ids in [0, V): only those rows are read and
            the distribution is the softmax over them (returned ids are vocabulary ids). See
            :func:`vocab_subset_from_counts`.
        generator: draws the sampling seed when ``seed`` is not given (``torch.randint`` on hidden's device,
            so it follows the generator's state under CUDA-graph capture).
        seed: an int, or a ``[2]`` int64 tensor ``(seed, offset)`` on hidden's device (graph-safe: update it
            in place between replays). Same seed, same tokens, on every backend.
        validate: check vocab_subset's values (a device-to-host read on a GPU).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Returns:
        :class:`EarlyExitHeadOutput` (tokens, max_logit, lse, logprob).
    """
    plan, _, _ = _plan(EarlyExitHeadPlan, hidden, norm_weight, lm_head_weight, eps=eps, mode=mode,   # the plan
                       temperature=temperature, top_k=top_k, top_p=top_p, vocab_subset=vocab_subset,
                       generator=generator, seed=seed, norm_offset=norm_offset, logit_scale=logit_scale,
                       logit_softcap=logit_softcap, draft_tokens=None, prob_rows=None, validate=validate,
                       backend=backend)
    return plan.run(hidden, seed=seed, generator=generator)


def verify_head(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                draft_tokens: torch.Tensor, *, eps: float, temperature: float = 1.0,
                prob_rows: Optional[torch.Tensor] = None, norm_offset: float = 0.0, logit_scale: float = 1.0,
                logit_softcap: Optional[float] = None, validate: bool = True,
                backend: str = "auto") -> VerifyHeadOutput:
    """The full model's head over the T+1 verification rows, fused like :func:`early_exit_head`.

    Args:
        hidden, norm_weight, lm_head_weight, eps, norm_offset, logit_scale, logit_softcap: as in
            :func:`early_exit_head` (the full vocabulary is always read).
        draft_tokens: ``[M]`` int64 draft token per row in [0, V), or -1 for a row without one (the
            bonus row); its log-probability under softmax(logits / temperature) is returned.
        temperature: > 0; scales lse, draft_logprob and probs (the argmax does not depend on it).
        prob_rows: ``[R]`` int64 distinct row indices in [0, M) whose full probability rows are wanted
            (rejection sampling's residual or bonus draw); None for none.
        validate: check draft_tokens' and prob_rows' values (a device-to-host read on a GPU).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        :class:`VerifyHeadOutput` (tokens, max_logit, lse, draft_logprob, probs).
    """
    plan, draft_tokens, prob_rows = _plan(                                      # the plan, and run's layouts
        VerifyHeadPlan, hidden, norm_weight, lm_head_weight, eps=eps, mode="argmax", temperature=temperature,
        top_k=None, top_p=None, vocab_subset=None, generator=None, seed=None, norm_offset=norm_offset,
        logit_scale=logit_scale, logit_softcap=logit_softcap, draft_tokens=draft_tokens, prob_rows=prob_rows,
        validate=validate, backend=backend, verify=True)
    return plan.run(hidden, draft_tokens, prob_rows=prob_rows)


class _HeadPlan:
    """What a head plan fixes: the head's weights, its options and the backend. Its ``run`` checks nothing: it
    takes hidden ``[M, H]`` of the planned H, dtype and device, last dim contiguous, any M."""

    __slots__ = ("backend", "_kernel", "norm_weight", "lm_head_weight", "vocab_subset", "eps", "norm_offset",
                 "logit_scale", "logit_softcap", "temperature", "mode", "top_k", "top_p", "device", "dtype")

    def __init__(self, hidden, norm_weight, lm_head_weight, vocab_subset, eps: float, norm_offset: float,
                 logit_scale: float, logit_softcap: float, temperature: float, mode: str, top_k: int, top_p: float):
        """Scalars as the kernels take them: logit_softcap 0 for none, top_k 0 for none, top_p 1 for none."""
        self.norm_weight, self.lm_head_weight, self.vocab_subset = norm_weight, lm_head_weight, vocab_subset
        self.eps, self.norm_offset, self.logit_scale, self.logit_softcap = eps, norm_offset, logit_scale, logit_softcap
        self.temperature, self.mode, self.top_k, self.top_p = temperature, mode, top_k, top_p
        self.device, self.dtype = hidden.device, hidden.dtype    # what the backends' reasons read

    def _choose(self, backend: str) -> None:
        device_type = self.device.type
        self.backend = select_remembered("lm_head", BACKENDS, PRIORITY.get(device_type, ("torch",)), backend,
                                         device_type, (self.dtype, self.mode, self.top_k, self.top_p), self)
        self._kernel = self.backend.run

    def _call(self, hidden, draft_tokens, prob_rows, seed) -> _Call:
        """The kernels' arguments, with fresh outputs."""
        num_rows, device = hidden.shape[0], hidden.device
        token_shape = (num_rows, self.top_k) if self.mode == "topk" else (num_rows,)
        return _Call(
            hidden=hidden, norm_weight=self.norm_weight, lm_head_weight=self.lm_head_weight,
            vocab_subset=self.vocab_subset, draft_tokens=draft_tokens, prob_rows=prob_rows, seed=seed, eps=self.eps,
            norm_offset=self.norm_offset, logit_scale=self.logit_scale, logit_softcap=self.logit_softcap,
            temperature=self.temperature, mode=self.mode, top_k=self.top_k, top_p=self.top_p,
            tokens=torch.empty(token_shape, dtype=torch.int64, device=device),
            max_logit=torch.empty(num_rows, dtype=torch.float32, device=device),
            lse=torch.empty(num_rows, dtype=torch.float32, device=device),
            logprob=torch.empty(token_shape, dtype=torch.float32, device=device),
            draft_logprob=(torch.empty(num_rows, dtype=torch.float32, device=device)
                           if draft_tokens is not None else None),
            probs=(torch.empty(prob_rows.numel(), self.lm_head_weight.shape[0], dtype=torch.float32, device=device)
                   if prob_rows is not None else None),
        )


class EarlyExitHeadPlan(_HeadPlan):
    """:func:`early_exit_head`'s checks and backend, done once (see :func:`early_exit_head_plan`)."""

    __slots__ = ()

    def run(self, hidden: torch.Tensor, *, seed: Optional[Union[int, torch.Tensor]] = None,
            generator: Optional[torch.Generator] = None) -> EarlyExitHeadOutput:
        """The head on hidden ``[M, H]`` (any M). For mode "sample": seed (an int, or a ``[2]`` int64 tensor on
        hidden's device, used as is) or else a seed drawn with generator, as in :func:`early_exit_head`."""
        seed_tensor = _seed_tensor(seed, generator, hidden.device) if self.mode == "sample" else None
        call = self._call(hidden, None, None, seed_tensor)
        if hidden.shape[0] > 0:
            self._kernel(call)
        return EarlyExitHeadOutput(call.tokens, call.max_logit, call.lse, call.logprob)


class VerifyHeadPlan(_HeadPlan):
    """:func:`verify_head`'s checks and backend, done once (see :func:`verify_head_plan`)."""

    __slots__ = ()

    def run(self, hidden: torch.Tensor, draft_tokens: torch.Tensor, *,
            prob_rows: Optional[torch.Tensor] = None) -> VerifyHeadOutput:
        """The head on hidden ``[M, H]`` (any M); draft_tokens ``[M]`` int64 contiguous (-1: none); prob_rows
        None or ``[R]`` int64 contiguous, as in :func:`verify_head`."""
        call = self._call(hidden, draft_tokens, prob_rows, None)
        if hidden.shape[0] > 0:
            self._kernel(call)
        return VerifyHeadOutput(call.tokens, call.max_logit, call.lse, call.draft_logprob, call.probs)


def early_exit_head_plan(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, *,
                         eps: float, mode: str = "argmax", temperature: float = 1.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, vocab_subset: Optional[torch.Tensor] = None,
                         generator: Optional[torch.Generator] = None,
                         seed: Optional[Union[int, torch.Tensor]] = None, norm_offset: float = 0.0,
                         logit_scale: float = 1.0, logit_softcap: Optional[float] = None, validate: bool = True,
                         backend: str = "auto") -> EarlyExitHeadPlan:
    """Checks :func:`early_exit_head`'s arguments (as it documents them) and chooses the backend, once.
    ``plan.run(hidden, seed=..., generator=...)`` then runs the head on hidden of the planned H, dtype and
    device (any M), with the planned weights, vocab_subset and options; seed and generator here are only
    checked (pass them to run)."""
    return _plan(EarlyExitHeadPlan, hidden, norm_weight, lm_head_weight, eps=eps, mode=mode, temperature=temperature,
                 top_k=top_k, top_p=top_p, vocab_subset=vocab_subset, generator=generator, seed=seed,
                 norm_offset=norm_offset, logit_scale=logit_scale, logit_softcap=logit_softcap, draft_tokens=None,
                 prob_rows=None, validate=validate, backend=backend)[0]


def verify_head_plan(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                     draft_tokens: torch.Tensor, *, eps: float, temperature: float = 1.0,
                     prob_rows: Optional[torch.Tensor] = None, norm_offset: float = 0.0, logit_scale: float = 1.0,
                     logit_softcap: Optional[float] = None, validate: bool = True,
                     backend: str = "auto") -> VerifyHeadPlan:
    """Checks :func:`verify_head`'s arguments (as it documents them) and chooses the backend, once.
    ``plan.run(hidden, draft_tokens, prob_rows=...)`` then runs the head on inputs of the planned H, dtype and
    device (any M; draft_tokens and prob_rows int64 contiguous), with the planned weights and options."""
    return _plan(VerifyHeadPlan, hidden, norm_weight, lm_head_weight, eps=eps, mode="argmax",
                 temperature=temperature, top_k=None, top_p=None, vocab_subset=None, generator=None, seed=None,
                 norm_offset=norm_offset, logit_scale=logit_scale, logit_softcap=logit_softcap,
                 draft_tokens=draft_tokens, prob_rows=prob_rows, validate=validate, backend=backend, verify=True)[0]


def vocab_subset_from_counts(token_ids: torch.Tensor, vocab_size: int, size: int,
                             always_include: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``size`` most frequent token ids of a corpus (ties to the lower id), plus ``always_include``
    (special tokens such as EOS), as a sorted int64 tensor for ``early_exit_head(vocab_subset=...)``.

    token_ids: any-shaped integer tensor of token ids in [0, vocab_size) (the tokenised corpus).
    """
    token_ids = _checks.check_tensor("token_ids", token_ids)
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if not 1 <= size <= vocab_size:
        raise ValueError(f"size must be in [1, vocab_size={vocab_size}], got {size}")
    flat = token_ids.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token_ids must lie in [0, {vocab_size}), got values in [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=vocab_size)
    order = torch.sort(-counts, stable=True).indices            # most frequent first, ties to the lower id
    chosen = order[:size]
    if always_include is not None:
        chosen = torch.cat([chosen, always_include.reshape(-1).to(torch.int64).cpu()])
    return torch.unique(chosen)                                  # sorted, distinct


# ---- checks -----------------------------------------------------------------------------------------

def _prepare(hidden, norm_weight, lm_head_weight, *, eps, mode, temperature, top_k, top_p, vocab_subset, generator,
             seed, norm_offset, logit_scale, logit_softcap, draft_tokens, prob_rows, validate,
             verify: bool = False) -> _Call:
    """One checked call as every backend receives it, outputs allocated, no backend chosen (tests, benchmarks
    and ``info`` ask each backend about it)."""
    plan, draft_tokens, prob_rows = _plan(
        VerifyHeadPlan if verify else EarlyExitHeadPlan, hidden, norm_weight, lm_head_weight, eps=eps, mode=mode,
        temperature=temperature, top_k=top_k, top_p=top_p, vocab_subset=vocab_subset, generator=generator,
        seed=seed, norm_offset=norm_offset, logit_scale=logit_scale, logit_softcap=logit_softcap,
        draft_tokens=draft_tokens, prob_rows=prob_rows, validate=validate, backend=None, verify=verify)
    seed_tensor = _seed_tensor(seed, generator, hidden.device) if mode == "sample" else None
    return plan._call(hidden, draft_tokens, prob_rows, seed_tensor)


def _plan(plan_class, hidden, norm_weight, lm_head_weight, *, eps, mode, temperature, top_k, top_p, vocab_subset,
          generator, seed, norm_offset, logit_scale, logit_softcap, draft_tokens, prob_rows, validate,
          backend: Optional[str], verify: bool = False):
    """The checks of both heads, once: (the plan, with its backend unless backend is None, draft_tokens and
    prob_rows contiguous)."""
    hidden = _checks.check_tensor("hidden", hidden, ndim=2, dtypes=SUPPORTED_DTYPES, shape_doc="[M, H]")
    num_rows, hidden_size = hidden.shape
    norm_weight = _checks.check_tensor("norm_weight", norm_weight, ndim=1, shape_doc="[H]")
    lm_head_weight = _checks.check_tensor("lm_head_weight", lm_head_weight, ndim=2, shape_doc="[V, H]")
    for name, tensor in (("norm_weight", norm_weight), ("lm_head_weight", lm_head_weight)):
        _checks.check_same_dtype(name, tensor, "hidden", hidden)
        _checks.check_same_device(name, tensor, "hidden", hidden)
    _checks.check_size("norm_weight", norm_weight, 0, hidden_size, "the hidden size H of hidden")
    _checks.check_size("lm_head_weight", lm_head_weight, 1, hidden_size, "the hidden size H of hidden")
    if hidden_size == 0:
        raise ValueError("hidden has hidden size H=0")
    vocab = lm_head_weight.shape[0]
    if vocab == 0:
        raise ValueError("lm_head_weight has V=0 rows")
    _checks.check_last_dim_contiguous("hidden", hidden)
    _checks.check_last_dim_contiguous("lm_head_weight", lm_head_weight)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "argmax" or verify:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0 with mode={mode!r}, got {temperature}"
                             + (" (use mode='argmax' for greedy decoding)" if mode == "sample" else ""))
    else:
        temperature = 1.0
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")

    num_cols = vocab
    if vocab_subset is not None:
        vocab_subset = _checks.check_tensor("vocab_subset", vocab_subset, ndim=1, dtypes=(torch.int64,), shape_doc="[S]")
        _checks.check_same_device("vocab_subset", vocab_subset, "hidden", hidden)
        if vocab_subset.numel() == 0:
            raise ValueError("vocab_subset is empty: it must hold at least one token id")
        vocab_subset = vocab_subset.contiguous()
        num_cols = vocab_subset.numel()
        if validate and not torch.compiler.is_compiling():
            low, high, increasing = (int(v) for v in torch.stack([
                vocab_subset.min(), vocab_subset.max(),
                (vocab_subset[1:] > vocab_subset[:-1]).all().to(torch.int64)]).tolist())
            if low < 0 or high >= vocab:
                raise ValueError(f"vocab_subset holds ids in [{low}, {high}], outside [0, V={vocab})")
            if not increasing:
                raise ValueError("vocab_subset must be strictly increasing (sorted, distinct token ids)")

    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if mode == "topk":
        if top_k is None:
            raise ValueError("top_k is required with mode='topk'")
        if top_k > num_cols:
            raise ValueError(f"top_k={top_k} exceeds the {num_cols} tokens to choose from")
    if top_p is not None:
        if mode != "sample":
            raise ValueError(f"top_p applies to mode='sample' only, got mode={mode!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if mode == "sample" and top_k is not None:
        top_k = min(top_k, num_cols)
    if mode == "argmax":
        top_k = None

    device = hidden.device
    if mode == "sample":
        if isinstance(seed, torch.Tensor):
            _checks.check_tensor("seed", seed, ndim=1, dtypes=(torch.int64,), shape_doc="[2] (seed, offset)")
            _checks.check_size("seed", seed, 0, 2, "(seed, offset)")
            _checks.check_same_device("seed", seed, "hidden", hidden)
        elif seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int or a [2] int64 tensor, got {type(seed).__name__}")
    elif seed is not None or generator is not None:
        raise ValueError(f"seed and generator apply to mode='sample' only, got mode={mode!r}")

    if draft_tokens is not None:
        draft_tokens = _checks.check_tensor("draft_tokens", draft_tokens, ndim=1, dtypes=(torch.int64,), shape_doc="[M]")
        _checks.check_same_device("draft_tokens", draft_tokens, "hidden", hidden)
        _checks.check_size("draft_tokens", draft_tokens, 0, num_rows, "the number of rows M of hidden")
        draft_tokens = draft_tokens.contiguous()
        if validate and num_rows and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.stack([draft_tokens.min(), draft_tokens.max()]).tolist())
            if low < -1 or high >= vocab:
                raise ValueError(f"draft_tokens must be in [0, V={vocab}) or -1 (no draft), got values in [{low}, {high}]")
    if prob_rows is not None:
        prob_rows = _checks.check_tensor("prob_rows", prob_rows, ndim=1, dtypes=(torch.int64,), shape_doc="[R]")
        _checks.check_same_device("prob_rows", prob_rows, "hidden", hidden)
        prob_rows = prob_rows.contiguous()
        if validate and prob_rows.numel() and not torch.compiler.is_compiling():
            low, high, distinct = (int(v) for v in torch.stack([
                prob_rows.min(), prob_rows.max(),
                torch.tensor(prob_rows.unique().numel() == prob_rows.numel(), device=device).to(torch.int64)]).tolist())
            if low < 0 or high >= num_rows:
                raise ValueError(f"prob_rows must be row indices in [0, M={num_rows}), got values in [{low}, {high}]")
            if not distinct:
                raise ValueError("prob_rows must hold distinct row indices")

    plan = plan_class(hidden, norm_weight, lm_head_weight, vocab_subset, float(eps), float(norm_offset),
                      float(logit_scale), float(logit_softcap) if logit_softcap is not None else 0.0,
                      float(temperature), mode, int(top_k or 0), float(top_p if top_p is not None else 1.0))
    if backend is not None:
        plan._choose(backend)
    return plan, draft_tokens, prob_rows


def _seed_tensor(seed, generator, device: torch.device) -> torch.Tensor:
    """The sampling kernels' ``[2]`` int64 (seed, offset) on `device`: seed's, or drawn with generator."""
    if isinstance(seed, torch.Tensor):
        return seed.contiguous()
    if seed is not None:
        return torch.tensor([seed, 0], dtype=torch.int64).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, 2 ** 62, (2,), generator=generator, device=gen_device).to(device)


# ---- backends ----------------------------------------------------------------------------------------

def _run_reference(call: _Call) -> None:
    seed, offset = (int(v) for v in call.seed.tolist()) if call.seed is not None else (0, 0)
    result = lm_head_reference(
        call.hidden, call.norm_weight, call.lm_head_weight, eps=call.eps, mode=call.mode,
        temperature=call.temperature, top_k=call.top_k or None, top_p=call.top_p if call.top_p < 1 else None,
        vocab_subset=call.vocab_subset, seed=seed, offset=offset, norm_offset=call.norm_offset,
        logit_scale=call.logit_scale, logit_softcap=call.logit_softcap or None, draft_tokens=call.draft_tokens,
        prob_rows=call.prob_rows)
    call.tokens.copy_(result["tokens"])
    call.max_logit.copy_(result["max_logit"])
    call.lse.copy_(result["lse"])
    call.logprob.copy_(result["logprob"])
    if call.draft_logprob is not None:
        call.draft_logprob.copy_(result["draft_logprob"])
    if call.probs is not None:
        call.probs.copy_(result["probs"])


def _run_extension(call: _Call) -> None:
    torch.ops.fastvlm.lm_head(*call.op_args())


# fp32 rows from which the CPU backend's argmax / verify runs as chunked GEMM (below: the C++ kernel). The
# C++ kernel reads each weight row once for all rows, which wins while the head is memory bound (fp32 M = 5,
# 17: 1.6-1.8x the reference chain); from a few dozen rows it is compute bound, where its FMA micro-kernel
# (no cache blocking of the hidden rows) fell to 0.88x F.linear + argmax at M = 65 (2 cores). bf16 stays on
# the C++ kernel at every M (its AMX / vdpbf16ps path is 1.4-1.5x the chain at M = 65).
CPU_GEMM_MIN_ROWS = 40
_GEMM_CHUNK = 4096   # vocabulary rows per GEMM: a [M, 4096] fp32 score tile stays in the caches


def _uses_chunked_gemm(call: _Call) -> bool:
    return (call.hidden.dtype == torch.float32 and call.hidden.shape[0] >= CPU_GEMM_MIN_ROWS
            and call.mode == "argmax" and call.vocab_subset is None)


def _run_cpu(call: _Call) -> None:
    if _uses_chunked_gemm(call):
        _run_chunked_gemm(call)
    else:
        _run_extension(call)


def _run_chunked_gemm(call: _Call) -> None:
    """Argmax / verify_head on the CPU as GEMMs over vocabulary chunks (MKL's cache blocking for the
    compute-bound case) reduced to per-chunk partials as they are made, then merged: the [M, V] logits
    are never held, only one [M, _GEMM_CHUNK] tile. Semantics of reference.py (scores = logits * scale,
    soft-capped, / temperature; ties to the lowest token id)."""
    from .partials import merge_partials, probs_from_logits_
    from .reference import normed_hidden

    normed = normed_hidden(call.hidden, call.norm_weight, call.eps, call.norm_offset)
    weight = call.lm_head_weight
    num_rows, vocab = normed.shape[0], weight.shape[0]
    num_tiles = -(-vocab // _GEMM_CHUNK)
    tile_max = torch.empty(num_rows, num_tiles)
    tile_sum = torch.empty(num_rows, num_tiles)
    tile_arg = torch.empty(num_rows, num_tiles, dtype=torch.int64)
    draft = call.draft_tokens
    tile_draft = torch.full((num_rows, num_tiles), float("-inf")) if draft is not None else None
    for tile, start in enumerate(range(0, vocab, _GEMM_CHUNK)):
        scores = torch.mm(normed, weight[start:start + _GEMM_CHUNK].t())
        if call.logit_scale != 1.0:
            scores.mul_(call.logit_scale)
        if call.logit_softcap:
            scores = scores.div_(call.logit_softcap).tanh_().mul_(call.logit_softcap)
        if call.temperature != 1.0:
            scores.div_(call.temperature)
        best, arg = scores.max(dim=1)                              # the first maximal column on ties
        tile_max[:, tile] = best
        tile_arg[:, tile] = arg + start
        tile_sum[:, tile] = torch.exp(scores - best[:, None]).sum(dim=1)
        if draft is not None:
            local = draft - start
            inside = (local >= 0) & (local < scores.shape[1])
            picked = scores.gather(1, local.clamp(0, scores.shape[1] - 1)[:, None])[:, 0]
            tile_draft[:, tile] = torch.where(inside, picked, float("-inf"))
        if call.probs is not None:
            call.probs[:, start:start + scores.shape[1]] = scores[call.prob_rows]
    merge_partials(tile_max, tile_arg, tile_sum, tile_max, tile_arg, tile_max, tile_draft, None, False,
                   call.tokens, call.max_logit, call.lse, call.logprob, call.draft_logprob)
    if call.probs is not None:
        probs_from_logits_(call.probs, call.lse, call.prob_rows)


def _run_triton(call: _Call) -> None:
    from .triton import lm_head_triton_op
    call_custom_op(lm_head_triton_op, *call.op_args())


# The reasons read a call's (or a plan's) device, dtype, mode, top_k and top_p.

def _filter_reasons(call: _Call) -> List[str]:
    """What the fused GPU kernels do not do (the CPU kernel and the reference do)."""
    reasons = []
    if call.mode == "sample" and (call.top_k or call.top_p < 1):
        reasons.append("sampling with top_k / top_p is not implemented in this backend")
    return reasons


def _cpu_reasons(call: _Call) -> List[str]:
    reasons = device_reasons(call.device, "cpu") + extension_reasons(call.device)
    if call.mode == "sample" and call.top_p < 1 and not call.top_k:
        reasons.append("top_p without top_k is not implemented in the CPU kernel (it keeps top_k candidates)")
    return reasons


def _cuda_reasons(call: _Call) -> List[str]:
    reasons = device_reasons(call.device, "cuda") + extension_reasons(call.device) + _filter_reasons(call)
    if call.mode == "topk":
        reasons.append("mode='topk' is not implemented in the CUDA kernel (the Triton one does it)")
    return reasons


def _triton_reasons(call: _Call) -> List[str]:
    reasons = triton_device_reasons(call.device) + _filter_reasons(call)
    if call.mode == "topk" and call.top_k > 64:
        reasons.append(f"mode='topk' with top_k={call.top_k}: the Triton kernel takes top_k <= 64")
    if call.device.type == "cpu" and call.dtype == torch.bfloat16:
        reasons.append("the Triton interpreter does not run bf16 reliably on the CPU")
    return reasons


BACKENDS = (
    Backend("cuda", _run_extension, _cuda_reasons),
    Backend("triton", _run_triton, _triton_reasons),
    Backend("cpu", _run_cpu, _cpu_reasons),
    Backend("torch", _run_reference, lambda call: []),
)
# `auto` order per device type. GPU order measured on an H100 and an H200 (bench/results/NVIDIA-H100-80GB-HBM3-
# 2026-11-25-{lm_head,profile}*, NVIDIA-H200-2026-11-26-{lm_head,tuned-lm_head}*, device time per call,
# fp16/bf16): after tuning, Triton streams the 151936x3584 head at 92-97% of copy bandwidth for M = 1..17 on
# the H200 (1.12-1.14x cuBLAS F.linear + argmax, which writes the logits; 1.32-1.38x on the 32064x4096 head)
# and reads the weight once up to M = 128; the CUDA C++ kernel (mma.sync tiles, cp.async ring) reached 65-70%
# and reads it twice for M > 64. The CUDA kernel comes before the PyTorch chain because it never
# materialises the [M, V] logits.
PRIORITY = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
