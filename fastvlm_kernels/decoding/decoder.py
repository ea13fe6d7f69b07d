"""SelfSpeculativeDecoder: prefill, draft, verify, accept, rollback over a transformers model's own modules.

Per step (docs/design.md, "Data path"): the last emitted token x0 and the drafts d1 .. dk run one at a time
through layers [0, E) (and the imitation network, whose layers own extra cache layers), the early-exit head
proposing d(i+1) from each; dk runs once more through [0, E) and the imitation layers without the head.
The k+1 kept layer-E states then go through layers [E, N) in one pass and the verify head gives the full
model's tokens; acceptance keeps the longest agreeing prefix plus the full model's token, and every cache
layer is rolled back in place to the accepted length. Layers below E never run twice for a token.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..cache import KVCache
from ..ops.acceptance import accept_greedy, accept_sampling
from ..ops.lm_head import early_exit_head, verify_head
from ..ops.lm_head.reference import filter_scores
from .adapters import Adapter, adapter_for
from . import lean
from .attention import STATE_KWARG, StepState, attention_implementation

# Logits processors that model.generate would apply and this decoder does not (name -> inactive value).
_UNSUPPORTED_GENERATION_OPTIONS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_new_tokens": (None, 0), "min_length": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "min_p": (None,), "encoder_repetition_penalty": (None, 1.0),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False), "num_beams": (None, 1),
    "watermarking_config": (None,), "top_h": (None,),
}


@dataclass
class GenerateStats:
    """What one ``generate`` call did. ``accepted[s]`` lists, for the s-th drafting step, the drafted tokens
    each unfinished row kept (not counting the token the verifier adds); ``draft_lens[s]`` its draft length."""
    steps: int = 0
    plain_steps: int = 0      # steps without a draft (draft_len=0, or adaptive drafting that did not pay)
    drafted: int = 0
    accepted: List[List[int]] = field(default_factory=list)
    draft_lens: List[int] = field(default_factory=list)
    new_tokens: List[int] = field(default_factory=list)
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens accepted per step and row (the verifier's own token not counted)."""
        values = [a for step in self.accepted for a in step]
        return sum(values) / len(values) if values else 0.0

    @property
    def mean_emitted(self) -> float:
        """Tokens emitted per step and row: accepted drafts plus the verifier's token."""
        return self.mean_accepted + 1.0 if self.accepted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.total_time if self.total_time > 0 else 0.0

    def summary(self) -> str:
        return (f"{sum(self.new_tokens)} new tokens in {self.total_time:.3f} s ({self.tokens_per_s:.1f} tokens/s); "
                f"{self.steps} steps ({self.plain_steps} without a draft), {self.mean_accepted:.2f} drafted tokens accepted per step "
                f"({self.mean_emitted:.2f} emitted); prefill {self.prefill_time:.3f} s, draft {self.draft_time:.3f} s, "
                f"verify {self.verify_time:.3f} s")


class GenerateOutput(NamedTuple):
    sequences: torch.Tensor      # [B, prompt + new], padded after EOS like model.generate
    stats: GenerateStats


@dataclass
class _Sampling:
    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]


class ModeChooser:
    """Adaptive drafting's "when not to draft": keeps a moving average of the wall time per emitted token of
    drafting steps and of plain (k = 0) steps, runs the faster, and every ``probe_every`` steps runs
    ``probe_steps`` of the other to refresh its estimate (acceptance changes along an answer). Both modes are
    exact, so the choice only affects speed. Plain is first tried after ``warmup`` drafting steps.

    One chooser serves every ``generate`` call of a decoder at one batch size: :meth:`start_call` keeps the
    estimates, so a later call starts in the mode that was faster and does not pay the warmup again."""

    def __init__(self, warmup: int = 8, probe_every: int = 24, probe_steps: int = 2, smoothing: float = 0.3):
        self.per_token = {"draft": None, "plain": None}
        self.mode = "draft"
        self.warmup, self.probe_every, self.probe_steps, self.smoothing = warmup, probe_every, probe_steps, smoothing
        self._probe_left = 0
        self._since = 0

    def start_call(self) -> str:
        """A new ``generate`` call: the faster mode by the estimates so far (drafting until plain was timed),
        with the probe counters restarted. Returns the first step's mode."""
        if self.per_token["draft"] is not None and self.per_token["plain"] is not None:
            self.mode = min(self.per_token, key=lambda mode: self.per_token[mode])
        self._probe_left = 0
        self._since = 0
        return self.mode

    def update(self, seconds: float, tokens_per_row: float) -> str:
        """Records the last step (in the current mode) and returns the mode of the next one."""
        sample = seconds / max(tokens_per_row, 1e-9)
        previous = self.per_token[self.mode]
        self.per_token[self.mode] = sample if previous is None else (1 - self.smoothing) * previous + \
            self.smoothing * sample
        other = "plain" if self.mode == "draft" else "draft"
        if self._probe_left > 0:
            self._probe_left -= 1
            if self._probe_left == 0:
                self.mode = min(self.per_token, key=lambda mode: self.per_token[mode])
                self._since = 0
            return self.mode
        self._since += 1
        if self._since >= (self.warmup if self.per_token[other] is None else self.probe_every):
            self.mode = other
            self._probe_left = self.probe_steps
        return self.mode


class SelfSpeculativeDecoder:
    """Generates exactly what ``model.generate`` would, drafting with the model's own first layers.

    Args:
        model: a transformers model of a supported family (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, or a
            Llama / Mistral / Qwen2 causal LM), in eval mode.
        exit_layer: E in [1, N-1]: the draft runs layers [0, E) and the early-exit head.
        imitation: an :class:`~fastvlm_kernels.imitation.ImitationNetwork` trained for this model and E.
        draft_len: k >= 0 drafted tokens per step (0: plain autoregressive decoding through the package's
            attention and cache), or "adaptive".
        tree: draft trees are not supported by the decoder yet (the tree ops are); None.
        adaptive_threshold: with "adaptive", drafting stops once every unfinished row's draft top-1
            probability is under this.
        adaptive_window, max_draft_len: with "adaptive", k follows the mean accepted length of the last
            ``adaptive_window`` steps, between 1 and ``max_draft_len``; and where drafting does not pay
            (measured time per emitted token, :class:`ModeChooser`) steps fall back to plain decoding,
            drafting being tried again every few steps. These timings are kept across calls (per batch
            size), so later calls start in the mode that was faster.
        max_cache_len: when set, the positions one call may use (prompt + new tokens + draft); a call that
            would need more raises before running anything. The cache is kept between calls and reused.
        attention_backend: the ``verify_attention`` backend ("auto": the op's own order for the device).
        lean_layers: run Llama / Mistral / Qwen2 text layers (and an imitation network's layers) as plain
            tensor ops (:mod:`.lean`: bit-identical to the modules, less host time per layer); other layers,
            or False, run the model's own modules. ``lean_reason`` says why a generate did not.
        draft_vocab: ``[S]`` integer token ids the draft may propose (None: the imitation network's own
            ``draft_vocab`` when it was trained over one, else the whole vocabulary). The
            early-exit head then reads only those rows of the LM head (``early_exit_head(vocab_subset=...)``),
            and when sampling the draft distribution q is the softmax over them (zero elsewhere), which is
            also the q rejection sampling divides by, so sampling stays exact. Verification always reads the
            full vocabulary, so the output is unchanged (greedy: identical; a token outside the subset is
            still emitted, by the verifier). Build it from the answers' token frequencies with
            :func:`~fastvlm_kernels.imitation.data.vocab_subset_from_responses`.
    """

    def __init__(self, model: nn.Module, exit_layer: int, imitation: Optional[nn.Module] = None,
                 draft_len: Union[int, str] = 4, tree=None, *, adaptive_threshold: float = 0.4,
                 adaptive_window: int = 8, max_draft_len: int = 8, max_cache_len: Optional[int] = None,
                 attention_backend: str = "auto", lean_layers: bool = True,
                 draft_vocab: Optional[torch.Tensor] = None):
        self.adapter: Adapter = adapter_for(model)
        self.model = model
        num_layers = self.adapter.num_layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise TypeError(f"exit_layer must be an int, got {type(exit_layer).__name__}")
        if not 1 <= exit_layer < num_layers:
            raise ValueError(f"exit_layer must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                             f"got {exit_layer}")
        if tree is not None:
            raise ValueError("tree: the decoder drafts chains only so far (the tree attention, acceptance and "
                             "compaction ops exist); pass tree=None")
        self.adaptive = draft_len == "adaptive"
        if not self.adaptive:
            if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 0:
                raise ValueError(f"draft_len must be an int >= 0 or 'adaptive', got {draft_len!r}")
        if not 0.0 <= adaptive_threshold < 1.0:
            raise ValueError(f"adaptive_threshold must be in [0, 1), got {adaptive_threshold}")
        if adaptive_window < 1 or max_draft_len < 1:
            raise ValueError("adaptive_window and max_draft_len must be >= 1")
        if imitation is not None:
            config = getattr(imitation, "config", None)
            if getattr(config, "exit_layer", None) != exit_layer:
                raise ValueError(f"the imitation network was built for exit layer "
                                 f"{getattr(config, 'exit_layer', None)}, the decoder's is {exit_layer}")
            hidden = self.adapter.text_config.hidden_size
            if getattr(config, "hidden_size", hidden) != hidden:
                raise ValueError(f"the imitation network has hidden size {config.hidden_size}, the model {hidden}")
            for i, layer in enumerate(getattr(imitation, "layers", ())):
                if layer.self_attn.layer_idx != num_layers + i:
                    raise ValueError(f"imitation layer {i} has layer_idx {layer.self_attn.layer_idx}; "
                                     f"it must be {num_layers + i} (after the backbone's {num_layers} layers)")
        self.exit_layer = exit_layer
        self.imitation = imitation
        self.draft_len = max_draft_len if self.adaptive else draft_len
        self.max_draft_len = max_draft_len if self.adaptive else draft_len
        self.adaptive_threshold = adaptive_threshold
        self.adaptive_window = adaptive_window
        self._choosers: Dict[int, ModeChooser] = {}   # adaptive: one per batch size, kept across calls
        self.max_cache_len = max_cache_len
        from ..ops.verify_attention import BACKENDS as _ATTENTION_BACKENDS
        names = ("auto",) + tuple(backend.name for backend in _ATTENTION_BACKENDS)
        if attention_backend not in names:
            raise ValueError(f"attention_backend must be one of {names}, got {attention_backend!r}")
        self.attention_backend = attention_backend
        self._cache: Optional[KVCache] = None
        config = self.adapter.text_config
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = self.adapter.head_dim
        self.lean_layers = bool(lean_layers)
        self._lean = None          # per generate: (backbone LeanLayers, imitation LeanLayers) or None
        self.lean_reason: Optional[str] = None   # why the last generate ran the model's own layer modules
        if draft_vocab is None and imitation is not None:
            draft_vocab = getattr(imitation, "draft_vocab", None)
        self.draft_vocab = self._check_draft_vocab(draft_vocab)
        self.count_calls = False   # tests: count the tokens each layer attends (StepState.calls)
        self.last_calls: dict = {}

    def _check_draft_vocab(self, draft_vocab: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """draft_vocab as sorted distinct int64 ids on the LM head's device, or None."""
        if draft_vocab is None:
            return None
        if (not isinstance(draft_vocab, torch.Tensor) or draft_vocab.dtype.is_floating_point
                or draft_vocab.dtype.is_complex or draft_vocab.dtype == torch.bool):
            raise TypeError(f"draft_vocab must be an integer tensor of token ids, got "
                            f"{draft_vocab.dtype if isinstance(draft_vocab, torch.Tensor) else type(draft_vocab).__name__}")
        if draft_vocab.dim() != 1:
            raise ValueError(f"draft_vocab must be 1-D [S], got shape {tuple(draft_vocab.shape)}")
        ids = torch.unique(draft_vocab.detach().to("cpu", torch.int64))      # sorted, distinct
        vocab = self.adapter.lm_head.weight.shape[0]
        if ids.numel() == 0:
            raise ValueError("draft_vocab is empty: it must hold at least one token id")
        if int(ids[0]) < 0 or int(ids[-1]) >= vocab:
            raise ValueError(f"draft_vocab holds ids in [{int(ids[0])}, {int(ids[-1])}], outside the model's "
                             f"vocabulary [0, {vocab})")
        return ids.to(self.adapter.lm_head.weight.device)

    @property
    def _drafts_with_imitation(self) -> bool:
        """The imitation network runs (and owns cache layers) only when something may be drafted."""
        return self.imitation is not None and self.draft_len > 0

    # ---- configuration resolved like model.generate ------------------------------------------------------------

    def _generation_options(self, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id,
                            prompt_len, extra):
        config = getattr(self.model, "generation_config", None)
        get = (lambda name, default=None: getattr(config, name, default)) if config is not None else \
            (lambda name, default=None: default)
        for name, value in extra.items():
            inactive = _UNSUPPORTED_GENERATION_OPTIONS.get(name)
            if inactive is not None and value not in inactive:
                raise ValueError(f"{name}={value!r}: this logits processor is not supported by the decoder")
        for name, inactive in _UNSUPPORTED_GENERATION_OPTIONS.items():
            if name not in extra and get(name) not in inactive:
                raise ValueError(f"the model's generation_config sets {name}={get(name)!r}, a logits processor "
                                 f"the decoder does not apply; pass {name}={inactive[-1]!r} to override")
        if max_new_tokens is None:
            max_new_tokens = get("max_new_tokens")
            if max_new_tokens is None:
                max_new_tokens = get("max_length", 20) - prompt_len
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        do_sample = bool(get("do_sample", False)) if do_sample is None else bool(do_sample)
        temperature = get("temperature", 1.0) if temperature is None else temperature
        top_k = get("top_k", None) if top_k is None else top_k
        top_p = get("top_p", None) if top_p is None else top_p
        if do_sample:
            if temperature is None or not temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
                raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        eos = get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        if isinstance(eos_token_id, torch.Tensor):
            eos = [int(e) for e in eos_token_id.flatten().tolist()]
        pad = get("pad_token_id") if pad_token_id is None else pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        sampling = _Sampling(do_sample, float(temperature or 1.0), top_k or None,
                             top_p if top_p is not None and top_p < 1.0 else None)
        return max_new_tokens, sampling, set(eos), int(pad)

    # ---- pieces -----------------------------------------------------------------------------------------------

    def _prepare_lean(self) -> None:
        """Lean versions of the backbone's (and the imitation network's) layers for this generate, when every
        one of them is supported; otherwise the reason is kept in ``lean_reason``."""
        self._lean, self.lean_reason = None, None
        if not self.lean_layers:
            self.lean_reason = "lean_layers=False"
            return
        backbone, reason = lean.lean_layers(self.adapter.layers)
        imitation = None
        if backbone is not None and self._drafts_with_imitation and getattr(self.imitation, "layers", None) \
                is not None and self.imitation.config.kind == "layers":
            imitation, reason = lean.lean_layers(self.imitation.layers)
            if imitation is None:
                backbone = None
        if backbone is None:
            self.lean_reason = reason
            return
        self._lean = (backbone, imitation)

    def _run_layers(self, hidden, start, stop, position_embeddings, state):
        if self._lean is not None:
            return lean.run(self._lean[0][start:stop], hidden, position_embeddings, state)
        kwargs = {STATE_KWARG: state}
        for layer in self.adapter.layers[start:stop]:
            out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _imitate(self, hidden, position_embeddings, state):
        if self.imitation is None:
            return hidden
        if self._lean is not None and self._lean[1] is not None:
            return lean.run(self._lean[1], hidden, position_embeddings, state)
        return self.imitation(hidden, position_embeddings, **{STATE_KWARG: state})

    def _rotary(self, hidden, positions):
        return self.adapter.rotary_emb(hidden, self.adapter.step_positions(positions))

    def _head_kwargs(self):
        return dict(eps=self.adapter.norm_eps)

    def _warped_probs(self, hidden, sampling: _Sampling, subset_head=None) -> torch.Tensor:
        """softmax of the model's own head after temperature, top-k and top-p, as model.generate applies them.
        With ``subset_head`` = (ids [S], weight rows [S, H], bias rows or None): the same over those tokens
        only, written into a full-vocabulary distribution that is zero elsewhere."""
        normed = self.adapter.norm(hidden)
        if subset_head is None:
            logits = self.adapter.lm_head(normed).float()
            scores = filter_scores(logits / sampling.temperature, sampling.top_k, sampling.top_p)
            return torch.softmax(scores, dim=-1)
        ids, weight, bias = subset_head
        logits = nn.functional.linear(normed, weight, bias).float()                   # [..., S]
        scores = filter_scores(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        sub = torch.softmax(scores, dim=-1)
        probs = sub.new_zeros(*sub.shape[:-1], self.adapter.lm_head.weight.shape[0])
        return probs.index_copy_(probs.dim() - 1, ids, sub)

    def _subset_head(self, device, sampling: _Sampling):
        """(ids, weight rows, bias rows) of draft_vocab for one generate call: the greedy draft passes the ids
        to early_exit_head, the sampling draft multiplies by the rows (gathered once per call)."""
        if self.draft_vocab is None:
            return None
        ids = self.draft_vocab if self.draft_vocab.device == torch.device(device) else self.draft_vocab.to(device)
        if not sampling.do_sample:
            return ids, None, None
        head = self.adapter.lm_head
        bias = getattr(head, "bias", None)
        return ids, head.weight.index_select(0, ids), bias.index_select(0, ids) if bias is not None else None

    def _get_cache(self, batch, max_len, dtype, device) -> KVCache:
        num_layers = self.adapter.num_layers + (self.imitation.num_cache_layers if self._drafts_with_imitation else 0)
        cache = self._cache
        device = torch.device(device)
        reusable = (cache is not None and cache.batch == batch and cache.max_len >= max_len and cache.dtype == dtype
                    and cache.num_layers == num_layers and cache.device.type == device.type
                    and (device.index is None or cache.device == device))
        if not reusable:
            self._cache = None   # free the old buffer before allocating the new one
            cache = KVCache(num_layers, batch, self._num_kv_heads, self._head_dim, max_len, dtype, device)
            self._cache = cache
        cache.rollback(torch.zeros(batch, dtype=torch.int32, device=cache.device), host_lens=[0] * batch)
        return cache

    # ---- generate ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, *, max_new_tokens: Optional[int] = None,
                 do_sample: Optional[bool] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
                 pad_token_id: Optional[int] = None, streamer=None, generator: Optional[torch.Generator] = None,
                 **model_inputs) -> GenerateOutput:
        """Generates like ``model.generate(**processor_outputs, ...)`` and returns (sequences, stats).

        Other processor outputs (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``, ...) pass through
        ``model_inputs`` to the model's own forward for the prompt. Generation options that are not given
        resolve from ``model.generation_config`` as ``model.generate`` resolves them; options the decoder
        does not implement (repetition penalty and other logits processors) raise, naming themselves.
        """
        start_time = time.perf_counter()
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                     torch.int32):
            raise TypeError("input_ids must be a [B, L] int64 tensor")
        batch, prompt_len = input_ids.shape
        if batch == 0 or prompt_len == 0:
            raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        if (mask[:, 1:].int() < mask[:, :-1].int()).any():
            raise ValueError("attention_mask must be left-padded (the processor's padding_side='left'): "
                             "a row has a real token before a pad")
        if not mask[:, -1].all():
            raise ValueError("attention_mask: every row needs at least one real token")
        extra = {name: model_inputs.pop(name) for name in list(model_inputs) if name in _UNSUPPORTED_GENERATION_OPTIONS}
        max_new_tokens, sampling, eos, pad = self._generation_options(
            max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, prompt_len, extra)
        if streamer is not None and batch > 1:
            raise ValueError("a streamer supports batch size 1 only (as in model.generate)")
        if pixel_values is not None:
            model_inputs["pixel_values"] = pixel_values
        draft_len = self.draft_len
        # A row that finishes mid-step keeps up to k tokens past max_new_tokens in its cache, and a finished
        # row still runs (and rolls back) k + 1 positions per step while other rows go on.
        max_len = prompt_len + max_new_tokens + 2 * self.max_draft_len + 1
        if self.max_cache_len is not None and max_len > self.max_cache_len:
            raise ValueError(f"max_new_tokens={max_new_tokens}: the prompt ({prompt_len}) + new tokens + twice the "
                             f"draft length ({self.max_draft_len}) + 1 need {max_len} cache positions > "
                             f"max_cache_len={self.max_cache_len}")

        adapter = self.adapter
        device = input_ids.device
        stats = GenerateStats()
        configs = adapter.attention_configs()
        if self.imitation is not None:
            configs += [layer.self_attn.config for layer in getattr(self.imitation, "layers", ())]
        self._prepare_lean()
        with attention_implementation(configs):
            # ---- prefill ------------------------------------------------------------------------------------
            prompt = adapter.prompt_inputs(input_ids, attention_mask, **model_inputs)
            dtype = prompt.embeds.dtype
            lengths = mask.sum(1)                                         # [B] real prompt lengths
            offsets = adapter.position_offsets(prompt, lengths).to(device)
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)   # real tokens first, in order
            hidden_size = prompt.embeds.shape[-1]
            embeds = prompt.embeds.gather(1, order[..., None].expand(-1, -1, hidden_size))
            if prompt.positions.dim() == 3:
                positions = prompt.positions.gather(2, order[None].expand(3, -1, -1).to(prompt.positions.device))
            else:
                positions = prompt.positions.gather(1, order.to(prompt.positions.device))
            cache = self._get_cache(batch, max_len, dtype, device)
            state = StepState(cache, torch.zeros(batch, dtype=torch.int32, device=device),
                              calls={} if self.count_calls else None, requested_backend=self.attention_backend)
            position_embeddings = adapter.rotary_emb(embeds, positions)
            num_layers, exit_layer = adapter.num_layers, self.exit_layer
            hidden = self._run_layers(embeds, 0, exit_layer, position_embeddings, state)
            if self._drafts_with_imitation:
                self._imitate(hidden, position_embeddings, state)
            final = self._run_layers(hidden, exit_layer, num_layers, position_embeddings, state)
            host_lengths = [int(v) for v in lengths.tolist()]
            lengths_dev = lengths.to(torch.int32)
            cache.rollback(lengths_dev, host_lens=host_lengths)
            last = final[torch.arange(batch, device=device), lengths - 1]         # [B, H]
            x0 = self._target_tokens(last, None, sampling, generator)[0]          # [B]
            self._sync(device)
            stats.prefill_time = time.perf_counter() - start_time

            # ---- emission bookkeeping -----------------------------------------------------------------------
            new_tokens: List[List[int]] = [[] for _ in range(batch)]
            finished = [False] * batch
            if streamer is not None:
                streamer.put(input_ids.cpu())

            def emit(rows_tokens: List[List[int]]) -> None:
                streamed_before = len(new_tokens[0])
                for b, tokens in enumerate(rows_tokens):
                    if finished[b]:
                        continue
                    for token in tokens:
                        new_tokens[b].append(token)
                        if token in eos or len(new_tokens[b]) >= max_new_tokens:
                            finished[b] = True
                            break
                if streamer is not None and len(new_tokens[0]) > streamed_before:   # batch 1: row 0's new tokens
                    streamer.put(torch.tensor(new_tokens[0][streamed_before:]))

            emit([[int(t)] for t in x0.tolist()])
            recent = deque(maxlen=self.adaptive_window)
            k = draft_len
            chooser = None
            if self.adaptive:
                if batch not in self._choosers:
                    self._choosers[batch] = ModeChooser(warmup=self.adaptive_window)
                chooser = self._choosers[batch]
                chooser.start_call()
            subset_head = self._subset_head(self.adapter.lm_head.weight.device, sampling)

            # ---- steps --------------------------------------------------------------------------------------
            while not all(finished):
                active = [b for b in range(batch) if not finished[b]]
                step_start = time.perf_counter()
                if k == 0 or (chooser is not None and chooser.mode == "plain"):
                    tokens = self._autoregressive_step(x0, lengths_dev, offsets, state, sampling, generator)
                    if all(not finished[b] for b in range(batch)):
                        host_lengths = [length + 1 for length in host_lengths]
                        lengths_dev = lengths_dev + 1
                    else:   # a finished row keeps nothing new
                        host_lengths = [length + (0 if finished[b] else 1) for b, length in enumerate(host_lengths)]
                        lengths_dev = torch.tensor(host_lengths, dtype=torch.int32).to(device)
                        cache.rollback(lengths_dev, host_lens=host_lengths)
                    stats.steps += 1
                    stats.plain_steps += 1
                    emit([[int(t)] for t in tokens.tolist()])
                    x0 = tokens
                    if chooser is not None:
                        chooser.update(time.perf_counter() - step_start, 1.0)
                    continue
                draft_start = time.perf_counter()
                drafts, draft_probs, layer_e = self._draft(x0, k, lengths_dev, offsets, state, sampling, generator,
                                                           active, subset_head)
                num_drafted = drafts.shape[1]
                self._sync(device)
                verify_start = time.perf_counter()
                stats.draft_time += verify_start - draft_start
                accept_len, emitted = self._verify(layer_e, drafts, draft_probs, lengths_dev, offsets, state,
                                                   sampling, generator)
                accept_host = accept_len.tolist()
                emitted_host = emitted.tolist()
                stats.verify_time += time.perf_counter() - verify_start
                stats.steps += 1
                stats.drafted += num_drafted * len(active)
                stats.draft_lens.append(num_drafted)
                stats.accepted.append([int(accept_host[b]) for b in active])
                # Rows keep x0 and their accepted drafts; a finished row keeps nothing new.
                new_host = [host_lengths[b] + (accept_host[b] + 1 if not finished[b] else 0) for b in range(batch)]
                lengths_dev = torch.tensor(new_host, dtype=torch.int32).to(device)
                cache.rollback(lengths_dev, host_lens=new_host)
                host_lengths = new_host
                emit([row[:a + 1] for row, a in zip(emitted_host, accept_host)])
                x0 = torch.tensor([row[a] for row, a in zip(emitted_host, accept_host)], dtype=torch.long, device=device)
                if self.adaptive:
                    mean_kept = sum(accept_host[b] for b in active) / len(active)
                    recent.append(mean_kept)
                    k = max(1, min(self.max_draft_len, math.ceil(sum(recent) / len(recent)) + 1))
                    chooser.update(time.perf_counter() - step_start, mean_kept + 1.0)
            if streamer is not None:
                streamer.end()
            self.last_calls = dict(state.calls) if state.calls is not None else {}

        width = max(len(tokens) for tokens in new_tokens)
        out = torch.full((batch, width), pad, dtype=input_ids.dtype, device=device)
        for b, tokens in enumerate(new_tokens):
            out[b, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        stats.new_tokens = [len(tokens) for tokens in new_tokens]
        stats.total_time = time.perf_counter() - start_time
        return GenerateOutput(torch.cat([input_ids, out], dim=1), stats)

    @staticmethod
    def _sync(device) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def _target_tokens(self, hidden, draft_tokens, sampling: _Sampling, generator):
        """The full model's token for each row of hidden ``[M, H]`` (greedy: fused verify head argmax)."""
        if sampling.do_sample:
            probs = self._warped_probs(hidden, sampling)
            return torch.multinomial(probs, 1, generator=generator)[:, 0], probs
        weight = self.adapter.lm_head.weight
        if draft_tokens is None:
            draft_tokens = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        result = verify_head(hidden.contiguous(), self.adapter.norm.weight, weight, draft_tokens,
                             validate=False, **self._head_kwargs())
        return result.tokens, None

    def _autoregressive_step(self, x0, lengths_dev, offsets, state, sampling, generator):
        """draft_len = 0: one token through all N layers and the head, with the package's attention and cache."""
        hidden = self.adapter.embed_tokens(x0)[:, None]
        positions = (lengths_dev.long() + offsets)[:, None]
        position_embeddings = self._rotary(hidden, positions)
        state.prefix_lens = lengths_dev
        if self._drafts_with_imitation:
            # Adaptive drafting may draft again later: the imitation layers need this token's KV too.
            hidden = self._run_layers(hidden, 0, self.exit_layer, position_embeddings, state)
            self._imitate(hidden, position_embeddings, state)
            hidden = self._run_layers(hidden, self.exit_layer, self.adapter.num_layers, position_embeddings, state)
        else:
            hidden = self._run_layers(hidden, 0, self.adapter.num_layers, position_embeddings, state)
        return self._target_tokens(hidden[:, 0], None, sampling, generator)[0]

    def _draft(self, x0, k, lengths_dev, offsets, state, sampling, generator, active, subset_head=None):
        """Drafts up to k tokens; returns (drafts [B, k'], draft probs [B, k', V] or None, layer-E states
        [B, k'+1, H] of x0, d1 .. dk'). ``subset_head``: draft_vocab's (ids, rows, bias), or None."""
        adapter = self.adapter
        current = x0
        drafts, probs, layer_e = [], [], []
        stop_after = k
        i = 0
        while True:
            hidden = adapter.embed_tokens(current)[:, None]
            positions = (lengths_dev.long() + offsets + i)[:, None]
            position_embeddings = self._rotary(hidden, positions)
            state.prefix_lens = lengths_dev + i
            hidden = self._run_layers(hidden, 0, self.exit_layer, position_embeddings, state)
            layer_e.append(hidden)
            imitated = self._imitate(hidden, position_embeddings, state)
            if i == stop_after:
                break
            if sampling.do_sample:
                q = self._warped_probs(imitated[:, 0], sampling, subset_head)   # what is drawn from is q
                token = torch.multinomial(q, 1, generator=generator)[:, 0]
                probs.append(q)
                top1 = q.max(dim=-1).values
            else:
                head = early_exit_head(imitated[:, 0].contiguous(), adapter.norm.weight, adapter.lm_head.weight,
                                       mode="argmax", vocab_subset=subset_head[0] if subset_head else None,
                                       validate=False, **self._head_kwargs())
                token = head.tokens
                top1 = torch.exp(head.max_logit - head.lse) if self.adaptive else None
            drafts.append(token)
            current = token
            i += 1
            if self.adaptive and i < stop_after:
                confident = top1[active] >= self.adaptive_threshold
                if not bool(confident.any()):
                    stop_after = i
        draft_tokens = torch.stack(drafts, dim=1)
        draft_probs = torch.stack(probs, dim=1) if probs else None
        return draft_tokens, draft_probs, torch.cat(layer_e, dim=1)

    def _verify(self, layer_e, drafts, draft_probs, lengths_dev, offsets, state, sampling, generator):
        adapter = self.adapter
        batch, num_rows, hidden_size = layer_e.shape
        positions = lengths_dev.long()[:, None] + offsets[:, None] + torch.arange(num_rows, device=layer_e.device)
        position_embeddings = self._rotary(layer_e, positions)
        state.prefix_lens = lengths_dev
        final = self._run_layers(layer_e, self.exit_layer, adapter.num_layers, position_embeddings, state)
        if sampling.do_sample:
            target_probs = self._warped_probs(final, sampling)                 # [B, k+1, V]
            return accept_sampling(drafts, draft_probs.to(target_probs.dtype), target_probs, generator=generator,
                                   validate=False)
        draft_rows = torch.cat([drafts, torch.full((batch, 1), -1, dtype=drafts.dtype, device=drafts.device)], dim=1)
        targets, _ = self._target_tokens(final.reshape(-1, hidden_size), draft_rows.reshape(-1), sampling, generator)
        return accept_greedy(drafts, targets.view(batch, num_rows))
