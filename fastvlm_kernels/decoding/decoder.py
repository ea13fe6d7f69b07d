"""SelfSpeculativeDecoder: prefill, then a loop of steps (speculative or plain) chosen by a draft policy.

A speculative step (docs/design.md, "Data path"): the last emitted token x0 and the drafts d1 .. dk run one at
a time through layers [0, E) (and the imitation network, whose layers own extra cache layers), the early-exit
head proposing d(i+1) from each; dk runs once more through [0, E) and the imitation layers without the head.
The k+1 kept layer-E states then go through layers [E, N) in one pass and the verify head gives the full
model's tokens; acceptance keeps the longest agreeing prefix plus the full model's token. A plain step runs x0
through all N layers and the head. Either way :meth:`Rows.advance` applies the outcome: the step's one
device-to-host read, the lengths advanced on the device and every cache layer rolled back in place. Layers
below E never run twice for a token; for a given k a step's tensors have static shapes.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ..cache import KVCache
from ..ops.acceptance import accept_greedy_plan, accept_sampling_plan
from ..ops.lm_head import early_exit_head_plan, verify_head_plan
from ..ops.lm_head.reference import filter_scores
from . import lean, parallel as tensor_parallel
from .adapters import Adapter, adapter_for
from .attention import STATE_KWARG, StepState, attention_implementation
from .capture import GraphCapture
from .options import (GENERATE_KEYWORDS, REFUSED_GENERATE_KEYWORDS, GenerationOptions, Sampling, check_generate_keywords,
                      check_model_inputs, resolve)
from .policy import AdaptiveDraftLen, FixedDraftLen, StepCosts
from .processing import Processing
from .rows import Rows
from .tree_step import TreeDrafter, check_tree_arguments


@dataclass
class GenerateStats:
    """What one ``generate`` call did. ``accepted[s]`` lists, for the s-th drafting step, the drafted tokens
    each unfinished row kept (not counting the token the verifier adds; a row that ended inside the step counts
    only the tokens before its end), ``emitted[s]`` the tokens each emitted; ``draft_lens[s]`` its draft length."""
    steps: int = 0
    plain_steps: int = 0      # steps without a draft (draft_len=0, or adaptive drafting that did not pay)
    drafted: int = 0
    accepted: List[List[int]] = field(default_factory=list)
    emitted: List[List[int]] = field(default_factory=list)
    draft_lens: List[int] = field(default_factory=list)
    step_draft_lens: List[int] = field(default_factory=list)   # every step's draft length, 0 for plain steps
    # adaptive drafting: per step, the estimated seconds per emitted token of each draft length it weighed
    step_estimates: List[Dict[int, float]] = field(default_factory=list)
    step_costs: Optional[dict] = None   # adaptive drafting: the step costs its estimates came from (at the end)
    measure_time: float = 0.0           # seconds this call spent timing a step's parts (0: an earlier call did)
    new_tokens: List[int] = field(default_factory=list)
    prefill_time: float = 0.0
    draft_time: float = 0.0       # draft and verify times: only with profile=True (they need a sync)
    verify_time: float = 0.0
    total_time: float = 0.0
    # tensor parallel: the collectives each step ran (all-reduces of the row-wise projections and the embedding,
    # the heads' all-gathers), in step order; empty on one process
    step_collectives: List[int] = field(default_factory=list)

    def record(self, draft_len: int, kept: List[Tuple[int, int]]) -> None:
        """One step: its draft length (0: plain) and, per unfinished row, (drafted tokens kept, tokens emitted)."""
        self.steps += 1
        self.step_draft_lens.append(draft_len)
        if draft_len == 0:
            self.plain_steps += 1
            return
        self.drafted += draft_len * len(kept)
        self.draft_lens.append(draft_len)
        self.accepted.append([drafts for drafts, _ in kept])
        self.emitted.append([tokens for _, tokens in kept])

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens accepted per step and row (the verifier's own token not counted)."""
        values = [a for step in self.accepted for a in step]
        return sum(values) / len(values) if values else 0.0

    @property
    def mean_emitted(self) -> float:
        """Tokens emitted per drafting step and row: kept drafts plus the verifier's token (fewer where a row ended)."""
        values = [e for step in self.emitted for e in step]
        return sum(values) / len(values) if values else 0.0

    @property
    def collectives_per_step(self) -> float:
        """Tensor parallel: the collectives a decoding step ran, on average (0.0 on one process)."""
        return sum(self.step_collectives) / len(self.step_collectives) if self.step_collectives else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.total_time if self.total_time > 0 else 0.0

    def summary(self) -> str:
        per_k = {k: self.step_draft_lens.count(k) for k in sorted(set(self.step_draft_lens))}
        return (f"{sum(self.new_tokens)} new tokens in {self.total_time:.3f} s ({self.tokens_per_s:.1f} tokens/s); "
                f"{self.steps} steps ({self.plain_steps} without a draft), "
                + (f"{self.mean_accepted:.2f} drafted tokens kept per drafting step ({self.mean_emitted:.2f} emitted)"
                   if self.accepted else "no drafting step")
                + f"; prefill {self.prefill_time:.3f} s"
                + (f", draft {self.draft_time:.3f} s, verify {self.verify_time:.3f} s" if self.draft_time else "")
                + (f"; steps per draft length {per_k}" if len(per_k) > 1 else "")
                + (f"; step costs timed in {self.measure_time:.3f} s" if self.measure_time else "")
                + (f"; {self.collectives_per_step:.1f} collectives per step" if self.step_collectives else ""))


class GenerateOutput(NamedTuple):
    sequences: torch.Tensor      # [B, prompt + new], padded after EOS like model.generate
    stats: GenerateStats


class SelfSpeculativeDecoder:
    """Generates exactly what ``model.generate`` would, drafting with the model's own first layers.

    Args:
        model: a transformers model of a supported family (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, or a
            Llama / Mistral / Qwen2 causal LM), in eval mode; or one loaded with ``from_pretrained(...,
            tp_plan="auto")`` in every process of a ``torchrun`` launch, sharded by transformers' tensor-parallel
            plan (:mod:`.parallel`: each rank decodes its share of the heads; every rank emits the same tokens; a
            sharding the decoder cannot run is a ``ValueError`` here).
        exit_layer: E in [1, N-1]: the draft runs layers [0, E) and the early-exit head. None (the default):
            the imitation network's own exit layer (required without a network).
        imitation: an :class:`~fastvlm_kernels.imitation.ImitationNetwork` trained for this model and E.
        draft_len: "adaptive" (the default: see ``adaptive_window``), or a fixed k >= 0 drafted tokens per
            step (0: plain autoregressive decoding through the package's attention and cache).
        tree: None (a chain of ``draft_len`` drafts), a static tree as a list of paths of child ranks from the
            root (Medusa's and EAGLE's "choices": ``[(0,), (1,), (0, 0), ...]``, ``(0, 1)`` being the second
            best draft token after the best one; its depth at most ``draft_len`` / ``max_draft_len``), or
            ``"dynamic"``: EAGLE-2's expansion, ``tree_width`` nodes kept per depth (the top ``tree_width``
            children of each by cumulative draft log-probability), depth ``draft_len`` (or the adaptive
            length), the best ``tree_budget`` drafted nodes verified. Each depth's nodes go through layers
            [0, E) in one pass and every verified node through [E, N) in one (:mod:`.tree_step`). Greedy stays
            token-identical; sampling stays exact (children are independent draws from the draft
            distribution, the contract of ``accept_sampling_tree``; a dynamic tree then verifies every
            drafted node).
        tree_budget: drafted nodes verified per step with ``tree="dynamic"`` (default: all of them).
        tree_width: nodes per depth of the dynamic tree.
        adaptive_window, max_draft_len: with "adaptive" (:class:`~.policy.AdaptiveDraftLen`), each step drafts
            the k in 0 .. ``max_draft_len`` (0: a plain step) with the most expected tokens per second: the
            acceptance per depth estimated online (over about the last ``adaptive_window`` drafting steps), the
            cost of each k from a plain and a one-draft step (timed on the first real steps at each batch
            size and sampling mode: a few plain, then a few one-draft steps) and the parts that longer drafts
            add (:meth:`measure_step_costs`, once, at the first call). With a tree, k is its depth.
            The estimates are kept across calls; ``GenerateStats.step_draft_lens`` and ``step_estimates``
            show the choices.
        max_cache_len: when set, the positions one call may use (prompt + new tokens + draft); a call that
            would need more raises before running anything. The cache is kept between calls and reused.
        attention_backend: the ``verify_attention`` backend ("auto": the op's own order for the device).
        lean_layers: run Llama / Mistral / Qwen2 text layers (and an imitation network's layers) as plain
            tensor ops (:mod:`.lean`: bit-identical to the modules, less host time per layer); other layers,
            or False, run the model's own modules. ``lean_reason`` says why a generate did not.
        linear_backend: the lean layers' projections: "auto" (:func:`~fastvlm_kernels.ops.skinny_linear`'s
            CPU kernel for fp32 CPU weights, which reads each weight once for a step's few rows; F.linear
            elsewhere), "cpu" (that kernel, or an error) or "torch" (F.linear: bit-identical to the modules).
            Results differ from F.linear's only by fp32 rounding (as the package's attention does from SDPA).
        draft_vocab: ``[S]`` integer token ids the draft may propose (None: the imitation network's own
            ``draft_vocab`` when it was trained over one, else the whole vocabulary). The
            early-exit head then reads only those rows of the LM head (``early_exit_head(vocab_subset=...)``),
            and when sampling the draft distribution q is the softmax over them (zero elsewhere), which is
            also the q rejection sampling divides by, so sampling stays exact. Verification always reads the
            full vocabulary, so the output is unchanged (greedy: identical; a token outside the subset is
            still emitted, by the verifier). Build it from the answers' token frequencies with
            :func:`~fastvlm_kernels.imitation.data.vocab_subset_from_responses`.
        profile: synchronise the device between draft and verify to split their times in the stats
            (``draft_time``, ``verify_time``); off by default, since a sync costs time on a GPU.
        cuda_graphs: "auto" (the default): on a CUDA device the step's pieces (the draft pass, the verify pass,
            a tree's, the plain step's) are traced whole by ``torch.compile(fullgraph=True)`` and each draft
            length's (and batch shape's) graph is recorded once in a CUDA graph and replayed (:mod:`.capture`:
            no compiler, so capture costs a step, not minutes); elsewhere, or where a
            call cannot be captured, they run eagerly and ``cuda_graphs_reason`` says why (not a CUDA device;
            sampling with a ``generator``, which a traced step cannot take; active logits processors, which read
            the host; ``profile=True``). True: the same, but a call that cannot be captured raises. False:
            eager. The output is the same either way. Each piece is compiled once per shape (draft length,
            batch, cache size); with compiled steps the cache holds ``max_cache_len`` positions when set, else
            it grows in powers of two (at least 256), so that longer prompts seldom compile again.
        compile_steps: torch.compile options for the step's pieces on any device (e.g. ``{"backend":
            "inductor"}``, or ``{"mode": "reduce-overhead"}``: inductor's kernels in its own CUDA graphs), instead
            of what ``cuda_graphs`` chooses; the same conditions apply.
    """

    def __init__(self, model: nn.Module, exit_layer: Optional[int] = None, imitation: Optional[nn.Module] = None,
                 draft_len: Union[int, str] = "adaptive", tree=None, *, tree_budget: Optional[int] = None, tree_width: int = 4,
                 adaptive_window: int = 16, max_draft_len: int = 8, max_cache_len: Optional[int] = None,
                 attention_backend: str = "auto", lean_layers: bool = True, linear_backend: str = "auto",
                 draft_vocab: Optional[torch.Tensor] = None, profile: bool = False,
                 cuda_graphs: Union[bool, str] = "auto", compile_steps: Optional[dict] = None):
        self.adapter: Adapter = adapter_for(model)
        self.model = model
        num_layers = self.adapter.num_layers
        if exit_layer is None:
            exit_layer = getattr(getattr(imitation, "config", None), "exit_layer", None)
            if exit_layer is None:
                raise TypeError("exit_layer is required without an imitation network (which records its own)")
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise TypeError(f"exit_layer must be an int, got {type(exit_layer).__name__}")
        if not 1 <= exit_layer < num_layers:
            raise ValueError(f"exit_layer must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                             f"got {exit_layer}")
        self.adaptive = draft_len == "adaptive"
        if not self.adaptive:
            if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 0:
                raise ValueError(f"draft_len must be an int >= 0 or 'adaptive', got {draft_len!r}")
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
        # The draft policy: a fixed k, or adaptive (its timings kept across calls, per batch size).
        self.policy = AdaptiveDraftLen(max_draft_len, adaptive_window) if self.adaptive else FixedDraftLen(draft_len)
        self.max_draft_len = self.policy.max_draft_len
        self.max_cache_len = max_cache_len
        from ..ops.verify_attention import BACKENDS as _ATTENTION_BACKENDS
        names = ("auto",) + tuple(backend.name for backend in _ATTENTION_BACKENDS)
        if attention_backend not in names:
            raise ValueError(f"attention_backend must be one of {names}, got {attention_backend!r}")
        self.attention_backend = attention_backend
        self._cache: Optional[KVCache] = None
        config = self.adapter.text_config
        self._num_kv_heads = config.num_key_value_heads
        # a model sharded by transformers' tensor-parallel plan: this rank's heads and vocabulary rows (None: one
        # process, or a model that is not sharded); a sharding the decoder cannot run raises here
        self._parallel = tensor_parallel.tensor_parallel_for(self.adapter, imitation)
        if self._parallel is not None:
            self._num_kv_heads = self._parallel.num_kv_heads
            self._check_parallel_imitation(imitation, lean_layers)
        self._head_dim = self.adapter.head_dim
        from ..ops.verify_attention.spec import HEAD_DIMS
        if self._head_dim not in HEAD_DIMS:
            # small test models often have head dims of 8-32: exact through the op's plain-PyTorch reference
            warnings.warn(f"this model's attention head dim is {self._head_dim}; verify_attention's kernels take "
                          f"{HEAD_DIMS}: the decoder runs its PyTorch reference (exact, slower)", stacklevel=2)
            self.attention_backend = "reference"
        self.lean_layers = bool(lean_layers)
        if linear_backend not in ("auto", "cpu", "torch"):
            raise ValueError(f"linear_backend must be one of ('auto', 'cpu', 'torch'), got {linear_backend!r}")
        self.linear_backend = linear_backend
        self._lean = None          # per generate: (backbone LeanLayers, imitation LeanLayers) or None
        self.lean_reason: Optional[str] = None   # why the last generate ran the model's own layer modules
        if draft_vocab is None and imitation is not None:
            draft_vocab = getattr(imitation, "draft_vocab", None)
        self.draft_vocab = self._check_draft_vocab(draft_vocab)
        checked = check_tree_arguments(tree, tree_budget, tree_width, self.max_draft_len,
                                       None if self.draft_vocab is None else self.draft_vocab.numel())
        self._tree: Optional[TreeDrafter] = None if checked is None else TreeDrafter(*checked)
        if self._tree is not None and self.max_draft_len == 0:
            raise ValueError("draft_len=0 drafts nothing: a tree needs draft_len >= 1 or 'adaptive'")
        # positions one step appends to a cache layer at most: the chain's x0 and k drafts, or the tree's nodes
        self._step_positions = (self.max_draft_len + 1 if self._tree is None
                                else self._tree.max_nodes(self.max_draft_len))
        self._plans: dict = {}
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        if compile_steps is not None and not isinstance(compile_steps, dict):
            raise TypeError(f"compile_steps must be a dict of torch.compile options or None, got "
                            f"{type(compile_steps).__name__}")
        self.cuda_graphs, self.compile_steps = cuda_graphs, compile_steps
        self.cuda_graphs_reason: Optional[str] = None   # why the last call ran its steps eagerly (None: compiled)
        self._compile_now, self._compile_options, self._compiled = False, {}, {}
        self._cudagraphs_now, self._warm, self._capture_failed = False, set(), None
        # cuda_graphs: the traced pieces recorded in CUDA graphs (a warm-up puts the cache's lengths back)
        self._capture = GraphCapture(restore=lambda: [self._cache.lengths] if self._cache is not None else [])
        self._processing: Optional[Processing] = None   # per generate: its logits processors, when any is active
        self._head_linear = None   # the LM head's full logits (with processors): skinny_linear where it runs
        self.profile = bool(profile)
        self.count_calls = False   # tests: count the tokens each layer attends (StepState.calls)
        self.last_calls: dict = {}

    def _check_parallel_imitation(self, imitation, lean_layers: bool) -> None:
        """Tensor parallel: the imitation network's decoder layers run on the lean path, cut by this rank's
        share of the heads like the backbone's (their KV heads share the rank's cache), so they must be lean."""
        layers = list(getattr(imitation, "layers", ()) or ())
        if not layers:
            return
        if not lean_layers:
            raise ValueError("lean_layers=False: under tensor parallel an imitation network's decoder layers run "
                             "on the lean path only (cut to this rank's heads); pass lean_layers=True")
        for layer in layers:
            reason = lean.unsupported_reason(layer, self._parallel)
            if reason is not None:
                raise ValueError(f"tensor parallel: the imitation network's layers cannot run on the lean path "
                                 f"({reason}); under tensor parallel they must")

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
    def _drafts(self) -> bool:
        """The imitation network runs (and owns cache layers) only when something may be drafted."""
        return self.imitation is not None and self.max_draft_len > 0

    # ---- generate ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, *, streamer=None, generator: Optional[torch.Generator] = None,
                 **kwargs) -> GenerateOutput:
        """Generates like ``model.generate(**processor_outputs, ...)`` and returns (sequences, stats).

        Every keyword ``model.generate`` takes for greedy decoding and sampling works here the same way:
        generation options (``max_new_tokens``, ``do_sample``, ``temperature``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``min_new_tokens``, ``bad_words_ids``, ``stop_strings`` with ``tokenizer``,
        ``max_time``, ...) or a ``generation_config``, resolved over ``model.generation_config`` and transformers'
        defaults by transformers' own code; ``logits_processor`` and ``stopping_criteria`` lists merged with the
        ones those options build, as ``generate`` merges them (:mod:`.processing`); ``prefix_allowed_tokens_fn``.
        Other processor outputs (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``, ...) pass to the
        model's own forward for the prompt; a keyword the model would not use raises, naming it, as does an
        option the decoder cannot honour (beam search and the other decoding methods, ``output_scores``, ...).
        ``generator``: the random stream of sampling (the draft's draws and the acceptance's).
        """
        start_time = time.perf_counter()
        attention_mask = self._check_prompt(input_ids, attention_mask)
        check_generate_keywords({name: kwargs.pop(name) for name in list(kwargs) if name in REFUSED_GENERATE_KEYWORDS})
        keywords = {name: kwargs.pop(name) for name in list(kwargs) if name in GENERATE_KEYWORDS}
        options, model_inputs = resolve(self.model, input_ids, attention_mask, kwargs,
                                        keywords.pop("generation_config", None))
        check_model_inputs(self.model, dict(model_inputs, pixel_values=pixel_values))
        copies = options.config.num_return_sequences or 1
        prompt_ids, prompt_mask = input_ids, attention_mask
        if copies > 1:   # sampling several answers per prompt: each row's copies together, as in model.generate
            input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        processing = Processing.build(self.model, input_ids, attention_mask, options.config, **keywords)
        self._processing = processing if processing.active else None
        self._head_linear = None
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("a streamer supports batch size 1 only (as in model.generate)")
        self._choose_compilation(options.sampling, generator)
        parallel = self._parallel
        if parallel is not None and options.config.max_time is not None:
            raise ValueError(f"max_time={options.config.max_time}: under tensor parallel each rank would stop on its "
                             f"own clock, at different tokens; use max_new_tokens")
        if parallel is not None and options.sampling.do_sample:   # every rank draws rank 0's random stream
            parallel.share_random_state(generator, input_ids.device)
        if pixel_values is not None:
            model_inputs["pixel_values"] = pixel_values
        stats, policy = GenerateStats(), self.policy
        self._plans = {}   # the heads' and acceptance's plans, made at first use in this call
        with attention_implementation(self._attention_configs()):
            self._prepare_lean()
            rows, state = self.prefill(prompt_ids, prompt_mask, model_inputs, options, streamer, generator,
                                       processing if processing.criteria is not None else None, copies)
            stats.prefill_time = time.perf_counter() - start_time
            subset_head = self._subset_head(self.adapter.lm_head.weight.device, options.sampling)
            policy.start(rows.batch, options.sampling.do_sample)
            if policy.needs_costs(max(rows.host_lengths)):
                policy.set_costs(self.measure_step_costs(rows, state, options.sampling, subset_head))
                stats.measure_time = policy.current_costs.measured_in
            adaptive = isinstance(policy, AdaptiveDraftLen)
            while not rows.done:
                step_start = time.perf_counter()
                if parallel is not None:
                    parallel.reset_counts()
                draft_len = policy.draft_len()
                if parallel is not None and adaptive:   # each rank times its own steps: rank 0's choice for all
                    draft_len = parallel.broadcast_int(draft_len)
                if adaptive:
                    stats.step_estimates.append(policy.last_estimates)
                paths = None
                if draft_len == 0:
                    accept_len, emitted = self.plain_step(rows, state, options.sampling, generator)
                elif self._tree is not None:
                    accept_len, emitted, paths = self.tree_step(rows, state, draft_len, options.sampling, generator,
                                                                subset_head, stats)
                else:
                    accept_len, emitted = self.speculative_step(rows, state, draft_len, options.sampling, generator,
                                                                subset_head, stats)
                accepted = rows.advance(accept_len, emitted, paths)   # the step's one device-to-host read
                stats.record(draft_len, rows.last_kept)
                if parallel is not None:
                    stats.step_collectives.append(sum(parallel.collectives.values()))
                policy.update(draft_len, accepted, time.perf_counter() - step_start)
            if adaptive:
                stats.step_costs = policy.current_costs.as_dict()
            if streamer is not None:
                streamer.end()
            self.last_calls = dict(state.calls) if state.calls is not None else {}
        stats.new_tokens = [len(tokens) for tokens in rows.tokens]
        stats.total_time = time.perf_counter() - start_time
        return GenerateOutput(rows.sequences(input_ids, options.pad), stats)

    def _choose_compilation(self, sampling: Sampling, generator) -> None:
        """Whether this call runs compiled (captured) steps: sets ``_compile_now``, its options and
        :attr:`cuda_graphs_reason`."""
        device = self.adapter.lm_head.weight.device
        wanted = self.compile_steps is not None or (self.cuda_graphs is not False and device.type == "cuda")
        reason = None
        if self.compile_steps is None and self.cuda_graphs is False:
            reason = "cuda_graphs=False"
        elif not wanted:
            reason = f"the model is on {device.type}, not a CUDA device"
        elif sampling.do_sample and generator is not None:
            reason = "sampling with a torch.Generator, which a compiled step cannot take (sample without one)"
        elif self._processing is not None:
            reason = "logits processors are active (they run on the host, per row and position)"
        elif self.profile:
            reason = "profile=True synchronises inside the step"
        elif self._capture_failed is not None and (self.compile_steps or {}).get("backend", self._capture) \
                is self._capture:
            reason = self._capture_failed
        elif self._parallel is not None:
            reason = "tensor parallel: the steps' collectives run eagerly"
        if reason is not None and self.cuda_graphs is True and self.compile_steps is None:
            raise ValueError(f"cuda_graphs=True: this call cannot be captured: {reason}")
        self.cuda_graphs_reason = reason
        self._compile_now = reason is None
        options = self.compile_steps if self.compile_steps is not None else {"backend": self._capture}
        if self._compile_now and options != self._compile_options:
            self._compiled, self._compile_options = {}, dict(options)
        # CUDA graphs replay into the same output memory: see _step_fn
        self._cudagraphs_now = self._compile_now and device.type == "cuda" and \
            self._compile_options.get("mode") in ("reduce-overhead", "max-autotune")
        self._warm = set()        # the pieces that ran once in this call (eagerly: see _step_fn)

    @staticmethod
    def _check_prompt(input_ids, attention_mask) -> torch.Tensor:
        """The prompt's checks; returns the attention mask (all ones when not given)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                     torch.int32):
            raise TypeError("input_ids must be a [B, L] int64 tensor")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        if (mask[:, 1:].int() < mask[:, :-1].int()).any():
            raise ValueError("attention_mask must be left-padded (the processor's padding_side='left'): "
                             "a row has a real token before a pad")
        if not mask[:, -1].all():
            raise ValueError("attention_mask: every row needs at least one real token")
        return attention_mask

    def _attention_configs(self) -> list:
        configs = self.adapter.attention_configs()
        if self.imitation is not None:
            configs += [layer.self_attn.config for layer in getattr(self.imitation, "layers", ())]
        return configs

    # ---- prefill and the two steps ------------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask, model_inputs, options: GenerationOptions, streamer, generator,
                stopping: Optional[Processing] = None, copies: int = 1) -> Tuple[Rows, StepState]:
        """The prompt through the model's own forward up to the text layers, then all N layers (and the
        imitation layers over the layer-E states) with the package's attention; each row's real tokens first
        in its cache. ``copies`` > 1: each prompt row runs ``copies`` times (its embeddings repeated after the
        model's forward). Returns the rows (holding the first new token x0) and the attention state."""
        adapter, device = self.adapter, input_ids.device
        batch, prompt_len = input_ids.shape[0] * copies, input_ids.shape[1]
        # A row that finishes mid-step keeps up to k tokens past max_new_tokens in its cache, and a finished
        # row still runs (and rolls back) a step's positions (k + 1, or the tree's nodes) while other rows go on.
        max_len = prompt_len + options.max_new_tokens + self.max_draft_len + self._step_positions
        if self.max_cache_len is not None and max_len > self.max_cache_len:
            raise ValueError(f"max_new_tokens={options.max_new_tokens}: the prompt ({prompt_len}) + new tokens + "
                             f"the draft length ({self.max_draft_len}) + one step's positions "
                             f"({self._step_positions}) need {max_len} cache positions > "
                             f"max_cache_len={self.max_cache_len}")
        if self._compile_now:
            # a compiled step's graph holds the cache's shape: a cache grown for each longer prompt would
            # compile every piece again, so it grows in powers of two (or is max_cache_len, when set, at once)
            max_len = self.max_cache_len or max(256, 1 << (max_len - 1).bit_length())
        prompt = adapter.prompt_inputs(input_ids, attention_mask, **model_inputs).repeat_rows(copies)
        if copies > 1:
            input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        mask = attention_mask.bool()
        lengths = mask.sum(1)                                                # [B] real prompt lengths
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)   # real tokens first, in order
        embeds = prompt.embeds.gather(1, order[..., None].expand(-1, -1, prompt.embeds.shape[-1]))
        if prompt.positions.dim() == 3:
            positions = prompt.positions.gather(2, order[None].expand(3, -1, -1).to(prompt.positions.device))
        else:
            positions = prompt.positions.gather(1, order.to(prompt.positions.device))
        cache = self._get_cache(batch, max_len, embeds.dtype, device)
        if self._compile_now:   # written in place by the compiled steps: static inputs of their graphs
            for tensor in (cache.buffer, cache.lengths):
                torch._dynamo.mark_static_address(tensor)
        cache.rollback_unchecked(torch.zeros(batch, dtype=torch.int32, device=cache.device), [0] * batch)
        state = StepState(cache, torch.zeros(batch, dtype=torch.int32, device=device),
                          calls={} if self.count_calls else None, requested_backend=self.attention_backend)
        position_embeddings = adapter.rotary_emb(embeds, positions)
        hidden = self._run_layers(embeds, 0, self.exit_layer, position_embeddings, state)
        if self._drafts:
            self._imitate(hidden, position_embeddings, state)
        final = self._run_layers(hidden, self.exit_layer, adapter.num_layers, position_embeddings, state)
        rows = Rows(cache, lengths, adapter.position_offsets(prompt, lengths), max_new_tokens=options.max_new_tokens,
                    eos=options.eos, streamer=streamer, stop=None if stopping is None else stopping.stops)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        last = final[torch.arange(batch, device=device), lengths - 1]         # [B, H]
        rows.start(self._next_tokens(last[:, None], rows, options.sampling, generator)[:, 0])
        return rows, state

    def plain_step(self, rows: Rows, state: StepState, sampling: Sampling, generator):
        """x0 through all N layers and the head: ``(None, emitted [B, 1])`` (None: nothing was drafted)."""
        self._check_room(rows)
        if self._drafts:
            # Adaptive drafting may draft again later: the imitation layers will need this token's KV. Its
            # layer-E state waits in state.imitation_lag, and the imitation layers take the waiting tokens
            # in one pass before the next draft (or once as many wait as a step may append), not one pass
            # per plain step.
            hidden = self._step_fn("plain_low", self._plain_low)(rows, state)
            state.imitation_lag.append((hidden, rows.positions(1), rows.lengths, rows.host_lengths))
            if len(state.imitation_lag) >= self._step_positions:
                self._catch_up_imitation(rows, state)
            return None, self._step_fn("plain_high", self._plain_high_tokens)(rows, state, hidden, sampling, generator)
        return None, self._step_fn("plain", self._plain_tokens)(rows, state, sampling, generator)

    # The plain step's pieces, each a function of the rows' and state's tensors (what _step_fn compiles).
    def _plain_low(self, rows: Rows, state: StepState, stop: Optional[int] = None):
        """x0 embedded and through layers [0, stop) (default E): ``[B, 1, H]``."""
        hidden = self._embed(rows.x0)[:, None]
        state.prefix_lens = rows.lengths
        return self._run_layers(hidden, 0, self.exit_layer if stop is None else stop,
                                self._rotary(hidden, rows.positions(1)), state)

    def _plain_high_tokens(self, rows: Rows, state: StepState, hidden, sampling: Sampling, generator):
        """Layer-E states ``[B, 1, H]`` through layers [E, N), then the next tokens ``[B, 1]``."""
        state.prefix_lens = rows.lengths
        hidden = self._run_layers(hidden, self.exit_layer, self.adapter.num_layers,
                                  self._rotary(hidden, rows.positions(1)), state)
        return self._next_tokens(hidden, rows, sampling, generator)

    def _plain_tokens(self, rows: Rows, state: StepState, sampling: Sampling, generator):
        return self._next_tokens(self._plain_low(rows, state, self.adapter.num_layers), rows, sampling, generator)

    def _next_tokens(self, hidden, rows: Rows, sampling: Sampling, generator) -> torch.Tensor:
        """The full model's next token ``[B, 1]`` after the last layer's states ``[B, 1, H]``: through the call's
        logits processors when any is active (then no step is compiled), else the fused head."""
        if self._processing is not None:
            return self._processed_tokens(hidden, rows, None, sampling, generator)
        return self._target_tokens(hidden[:, 0], None, sampling, generator)[0][:, None]

    def _check_room(self, rows: Rows) -> None:
        """A compiled step's appends do not check the cache's room (:meth:`KVCache.append_unchecked`): the
        step's positions are checked here, before anything is written."""
        if self._compile_now:
            rows.cache.check_room(self._step_positions)

    def _step_fn(self, name: str, fn):
        """``fn``, or its torch.compile'd form when this call compiles its steps (:attr:`cuda_graphs_reason`
        None): one compiled function per piece, kept across calls (a new draft length or batch shape adds a
        graph; on a CUDA device each is recorded in a CUDA graph and replayed: :mod:`.capture`). The
        draft and verify pieces are compiled per draft length (``name`` carries it), so that adaptive drafting's
        lengths do not share one function's recompilation budget. With ``cuda_graphs="auto"`` a piece whose
        capture fails runs eagerly, and so do the decoder's later steps, ``cuda_graphs_reason`` saying why.

        One graph per piece, not one per step: a piece's first use in a call runs eagerly (it makes the call's
        op plans, which the graph would otherwise trace being made and then guard on, a second graph), the
        cache's appends inside a graph read no host lengths (:meth:`KVCache.append_unchecked`; the room is
        checked before the step), and the cache's buffer and lengths are static inputs (marked in
        :meth:`prefill`), which a CUDA graph writes in place instead of refusing capture for mutated inputs.
        A captured graph writes its outputs to the same memory at every replay: they are cloned, since a
        step's results outlive the next replay (the imitation network's waiting states, the next x0)."""
        if not self._compile_now:
            return fn
        if name not in self._warm:
            self._warm.add(name)
            return fn
        compiled = self._compiled.get(name)
        if compiled is None:
            # Dynamo's recompilation budget is per function: every batch shape and cache size adds a graph of
            # each piece (gpt-fast raises the same limit)
            import torch._dynamo
            for option in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                           "accumulated_cache_size_limit"):
                if hasattr(torch._dynamo.config, option):
                    setattr(torch._dynamo.config, option, max(getattr(torch._dynamo.config, option), 256))
            # static shapes: every batch and draft length its own graph (what a CUDA graph captures anyway)
            options = dict({"dynamic": False}, **self._compile_options)
            graph = torch.compile(fn, fullgraph=True, **options)

            def compiled(*args, _graph=graph):
                if self._cudagraphs_now:    # each piece its own root of the CUDA graph tree: no pending outputs
                    torch.compiler.cudagraph_mark_step_begin()
                try:
                    outputs = _graph(*args)
                except Exception as error:  # noqa: BLE001 - "auto": eager, with the reason, where capture fails
                    if self.cuda_graphs != "auto" or self._compile_options.get("backend") is not self._capture:
                        raise
                    self._capture_failed = (f"capturing the {name} piece failed ({type(error).__name__}: "
                                            f"{str(error).splitlines()[0][:200] if str(error) else ''})")
                    warnings.warn(f"cuda_graphs='auto': {self._capture_failed}; steps run eagerly", RuntimeWarning,
                                  stacklevel=2)
                    self.cuda_graphs_reason, self._compile_now = self._capture_failed, False
                    return fn(*args)
                return tree_map_only(torch.Tensor, torch.clone, outputs)
            self._compiled[name] = compiled
        return compiled

    def _catch_up_imitation(self, rows: Rows, state: StepState) -> None:
        """The plain steps' tokens waiting for the imitation layers (``state.imitation_lag``) through them in
        one pass: those layers' lengths are set back to where the first waiting token starts, the pass
        appends the tokens' KV, and the lengths are set to the rows' again (a row that finished meanwhile
        wrote past its length: at most ``_step_positions`` positions, within the cache's slack)."""
        lag = state.imitation_lag
        if not lag:
            return
        hidden = torch.cat([entry[0] for entry in lag], dim=1)
        positions = torch.cat([entry[1] for entry in lag], dim=1)
        layers = slice(self.adapter.num_layers, None)
        rows.cache.rollback_unchecked(lag[0][2], lag[0][3], layers=layers)
        state.prefix_lens = lag[0][2]
        self._imitate(hidden, self._rotary(hidden, positions), state)
        rows.cache.rollback_unchecked(rows.lengths, rows.host_lengths, layers=layers)
        lag.clear()

    def speculative_step(self, rows: Rows, state: StepState, draft_len: int, sampling: Sampling, generator,
                         subset_head=None, stats: Optional[GenerateStats] = None):
        """Drafts ``draft_len`` tokens, verifies them in one pass and accepts: ``(accept_len [B] int32,
        emitted [B, k+1] int64)``. With ``profile`` on, the draft and verify times go to ``stats``."""
        self._check_room(rows)
        self._catch_up_imitation(rows, state)
        if self.profile:
            self._sync(rows.lengths.device)
            draft_start = time.perf_counter()
        drafts, draft_probs, layer_e = self._step_fn(f"draft{draft_len}", self._draft)(rows, state, draft_len, sampling, generator,
                                                                           subset_head)
        if self.profile:
            self._sync(rows.lengths.device)
            verify_start = time.perf_counter()
            stats.draft_time += verify_start - draft_start
        result = self._step_fn(f"verify{draft_len}", self._verify)(rows, state, layer_e, drafts, draft_probs, sampling, generator)
        if self.profile:
            self._sync(rows.lengths.device)
            stats.verify_time += time.perf_counter() - verify_start
        return result

    def tree_step(self, rows: Rows, state: StepState, depth: int, sampling: Sampling, generator, subset_head=None,
                  stats: Optional[GenerateStats] = None):
        """Drafts a tree of depth ``depth``, verifies it in one pass and accepts a path (:mod:`.tree_step`):
        ``(accept_len [B] int32, emitted [B, Nv] int64, paths)``, paths for :meth:`Rows.advance`."""
        self._check_room(rows)
        self._catch_up_imitation(rows, state)
        if self.profile:
            self._sync(rows.lengths.device)
            draft_start = time.perf_counter()
        drafted = self._step_fn(f"tree_draft{depth}", self._tree.draft)(self, rows, state, depth, sampling, generator,
                                                                 subset_head)
        if self.profile:
            self._sync(rows.lengths.device)
            verify_start = time.perf_counter()
            stats.draft_time += verify_start - draft_start
        result = self._step_fn(f"tree_verify{depth}", self._tree.verify)(self, rows, state, drafted, sampling, generator)
        if self.profile:
            self._sync(rows.lengths.device)
            stats.verify_time += time.perf_counter() - verify_start
        return result

    def measure_step_costs(self, rows: Rows, state: StepState, sampling: Sampling, subset_head=None,
                           repeats: int = 3) -> StepCosts:
        """Times the parts that price longer drafts, on this call's real state, for the adaptive policy
        (:class:`StepCosts`; its ``plain`` and ``first`` steps the policy times on the real steps that follow):
        the draft loop at 0 and 1 drafts (a tree: depths 1 and 2), whose difference is one more drafted token
        (depth), and verification of 2 and of ``max_draft_len + 1`` positions (a tree: its verified nodes at
        depths 1 and ``max_draft_len``). Each is the median of ``repeats`` timings, taken in alternated turns.
        Every part runs as a step runs it and is undone at once: the cache is rolled back to the rows' lengths
        (a step's positions past them are overwritten by the next step anyway), nothing is emitted, and
        sampling draws from a generator of its own, so the call's output and random stream are unchanged.
        The device is synchronised around each timing (once per batch size and mode, not per step)."""
        begin = time.perf_counter()
        device = rows.lengths.device
        generator = torch.Generator(device=device)
        generator.manual_seed(0)
        max_k, tree = self.max_draft_len, self._tree

        def undo():
            rows.cache.rollback_unchecked(rows.lengths, rows.host_lengths)

        if tree is None:
            drafts, probs, layer_e = self._draft(rows, state, 1, sampling, generator, subset_head)
            undo()
            index = torch.arange(max_k + 1, device=device) % 2   # x0 and max_k drafts: the two drafted
            wide_e = layer_e[:, index]                           # positions' layer-E states, repeated (the
            wide_drafts = drafts[:, index[:-1] * 0]              # cost does not depend on the values)
            wide_probs = None if probs is None else probs[:, index[:-1] * 0]
            parts = {
                "draft_lo": lambda: self._draft(rows, state, 0, sampling, generator, subset_head),
                "draft_hi": lambda: self._draft(rows, state, 1, sampling, generator, subset_head),
                "verify_lo": lambda: self._verify(rows, state, layer_e, drafts, probs, sampling, generator),
                "verify_hi": lambda: self._verify(rows, state, wide_e, wide_drafts, wide_probs, sampling, generator),
            }
            nodes = list(range(1, max_k + 2))
        else:
            shallow = tree.draft(self, rows, state, 1, sampling, generator, subset_head)
            undo()
            deep = tree.draft(self, rows, state, max_k, sampling, generator, subset_head)
            undo()
            two = min(2, max_k)
            parts = {
                "draft_lo": lambda: tree.draft(self, rows, state, 1, sampling, generator, subset_head),
                "draft_hi": lambda: tree.draft(self, rows, state, two, sampling, generator, subset_head),
                "verify_lo": lambda: tree.verify(self, rows, state, shallow, sampling, generator),
                "verify_hi": lambda: tree.verify(self, rows, state, deep, sampling, generator),
            }
            nodes = [1] + [tree.verified_nodes(depth, sampling.do_sample) for depth in range(1, max_k + 1)]
        samples = {name: [] for name in parts}
        for _ in range(repeats):               # alternated turns: the machine's drift falls on every part
            for name, run in parts.items():
                self._sync(device)
                start = time.perf_counter()
                run()
                self._sync(device)
                samples[name].append(time.perf_counter() - start)
                undo()
        seconds = {name: statistics.median(values) for name, values in samples.items()}
        per_depth = seconds["draft_hi"] - seconds["draft_lo"]
        if tree is not None and max_k < 2:
            per_depth = 0.0
        return StepCosts(plain=None, first=None, draft_per_token=per_depth,
                         verify_points=((nodes[1], seconds["verify_lo"]), (nodes[max_k], seconds["verify_hi"])),
                         nodes=nodes, context_len=max(rows.host_lengths), measured_in=time.perf_counter() - begin)

    def _tree_paths(self, draft_path: torch.Tensor, verify_path: torch.Tensor):
        """Compaction of a tree whose draft layers ([0, E) and the imitation layers) hold every drafted node and
        whose layers [E, N) hold the verified ones: each group of cache layers with its own node indices."""
        exit_layer, num_layers = self.exit_layer, self.adapter.num_layers
        paths = [(slice(0, exit_layer), draft_path), (slice(exit_layer, num_layers), verify_path)]
        if self._drafts and self.imitation.num_cache_layers:
            paths.append((slice(num_layers, None), draft_path))
        return paths

    def _draft(self, rows: Rows, state: StepState, draft_len: int, sampling: Sampling, generator, subset_head):
        """Drafts k tokens; returns (drafts [B, k], draft probs [B, k, V] or None, layer-E states [B, k+1, H] of
        x0, d1 .. dk). ``subset_head``: draft_vocab's (ids, rows, bias), or None."""
        adapter = self.adapter
        current = rows.x0
        first_position = rows.positions(1)                      # [B, 1]: x0's; the i-th draft's is + i
        drafts, probs, layer_e = [], [], []
        processing = self._processing
        drafted: List[List[int]] = [[] for _ in range(rows.batch)]    # with processors: the drafts on the host
        for i in range(draft_len + 1):
            hidden = self._embed(current)[:, None]
            position_embeddings = self._rotary(hidden, first_position + i)
            state.prefix_lens = rows.lengths + i
            hidden = self._run_layers(hidden, 0, self.exit_layer, position_embeddings, state)
            layer_e.append(hidden)
            imitated = self._imitate(hidden, position_embeddings, state)
            if i == draft_len:
                break
            # sampling: the draft distribution q (what is drawn from); greedy: the draft token
            if processing is not None:     # the draft's scores processed with its own prefix
                scores = self._processed_scores(imitated, rows, [[tuple(row)] for row in drafted], subset_head)[:, 0]
                q = torch.softmax(scores, dim=-1) if sampling.do_sample else None
                current = None if sampling.do_sample else scores.argmax(dim=-1)
            elif sampling.do_sample:
                q = self._warped_probs(imitated[:, 0], sampling, subset_head)
            else:
                hidden = imitated[:, 0].contiguous()
                current = self._head_plan("draft_head", early_exit_head_plan, hidden, mode="argmax",
                                          vocab_subset=subset_head[0] if subset_head else None).run(hidden).tokens
            if sampling.do_sample:
                current = torch.multinomial(q, 1, generator=generator)[:, 0]
                probs.append(q)
            if processing is not None:
                for row, token in zip(drafted, current.tolist()):
                    row.append(token)
            drafts.append(current)
        draft_probs = torch.stack(probs, dim=1) if probs else None
        drafts = torch.stack(drafts, dim=1) if drafts else current.new_empty((rows.batch, 0))
        return drafts, draft_probs, torch.cat(layer_e, dim=1)

    def _verify(self, rows: Rows, state: StepState, layer_e, drafts, draft_probs, sampling: Sampling, generator):
        """Layers [E, N) over the k+1 layer-E states, the verify head, and acceptance."""
        batch, num_rows, hidden_size = layer_e.shape
        position_embeddings = self._rotary(layer_e, rows.positions(num_rows))
        state.prefix_lens = rows.lengths
        final = self._run_layers(layer_e, self.exit_layer, self.adapter.num_layers, position_embeddings, state)
        # sampling: the target distributions [B, k+1, V]; greedy: the full model's tokens [B, k+1]
        if self._processing is not None:
            host = drafts.tolist()
            extras = [[tuple(row[:j]) for j in range(num_rows)] for row in host]   # position j: the drafts before it
            scores = self._processed_scores(final, rows, extras)
            target_probs = torch.softmax(scores, dim=-1) if sampling.do_sample else None
            targets = None if sampling.do_sample else scores.argmax(dim=-1)
        elif sampling.do_sample:
            target_probs = self._warped_probs(final, sampling)
        else:
            draft_rows = torch.cat([drafts, drafts.new_full((batch, 1), -1)], dim=1)
            targets = self._target_tokens(final.reshape(-1, hidden_size), draft_rows.reshape(-1), sampling,
                                          generator)[0].view(batch, num_rows)
        if sampling.do_sample:
            draft_probs = draft_probs.to(target_probs.dtype).contiguous()
            return self._plan("accept", accept_sampling_plan, drafts, draft_probs, target_probs,
                              generator=generator).run(drafts, draft_probs, target_probs, generator=generator)
        return self._plan("accept", accept_greedy_plan, drafts, targets).run(drafts, targets)

    # ---- pieces -----------------------------------------------------------------------------------------------

    def _processed_scores(self, hidden, rows: Rows, extras, subset_head=None) -> torch.Tensor:
        """The model's head over ``hidden [B, n, H]`` (full logits) through the call's logits processors: row b's
        position i with the ids of its prompt, its emitted tokens and ``extras[b][i]`` (the drafted tokens before
        that position; None: nothing drafted before any position). ``[B, n, V]`` float32 scores. With
        ``subset_head`` (the draft's vocabulary: ids, weight rows, bias rows) only those rows are computed and
        every other token's logit is -inf before processing (the draft then never proposes it)."""
        head = self.adapter.lm_head
        normed = self.adapter.norm(hidden)
        linear = self._head_linear
        if linear is None:
            linear = self._head_linear = lean.linear_for_weight(tensor_parallel.local(head.weight), self.linear_backend)
        flat = normed.reshape(-1, normed.shape[-1])
        if subset_head is None and self._parallel is not None:
            logits = self._gathered_logits(normed)
        elif subset_head is None:
            logits = linear(flat, head.weight, getattr(head, "bias", None)).view(*normed.shape[:-1], -1)
        else:
            ids, weight, bias = subset_head
            logits = normed.new_full((*normed.shape[:-1], head.weight.shape[0]), float("-inf"))
            logits.index_copy_(logits.dim() - 1, ids, linear(flat, weight, bias).view(*normed.shape[:-1], -1))
        if extras is None:
            extras = [[()] * hidden.shape[1]] * hidden.shape[0]
        scores = self._processing.scores(logits, rows.tokens, extras, rows.active())
        if subset_head is not None:        # a draft row left without a finite score: any q is exact, take uniform
            dead = ~torch.isfinite(scores).any(dim=-1)
            if bool(dead.any()):
                scores[dead] = 0.0
        return scores

    def _processed_tokens(self, hidden, rows: Rows, extras, sampling: Sampling, generator) -> torch.Tensor:
        """The tokens ``[B, n]`` the full model would emit after each position of ``hidden [B, n, H]`` under the
        call's logits processors, as model.generate chooses them: argmax, or a draw from the softmax."""
        scores = self._processed_scores(hidden, rows, extras)
        if not sampling.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])

    def _target_tokens(self, hidden, draft_tokens, sampling: Sampling, generator):
        """The full model's token for each row of hidden ``[M, H]`` (greedy: fused verify head argmax)."""
        if sampling.do_sample:
            probs = self._warped_probs(hidden, sampling)
            return torch.multinomial(probs, 1, generator=generator)[:, 0], probs
        if draft_tokens is None:
            draft_tokens = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        hidden = hidden.contiguous()
        plan = self._head_plan("verify_head", verify_head_plan, hidden, draft_tokens, verify=True)
        return plan.run(hidden, draft_tokens).tokens, None

    def _plan(self, name: str, make, *args, **kwargs):
        """The op plan ``name`` of this generate call (checks and backend choice made at its first use)."""
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = make(*args, validate=False, **kwargs)
        return plan

    def _head_plan(self, name: str, make, hidden, *args, verify: bool = False, **kwargs):
        """The fused head's plan ``name`` (``make``: early_exit_head_plan or verify_head_plan) over the model's
        final norm and LM head; tensor-parallel with a vocabulary-sharded head, over this rank's rows, merged
        over the ranks (:class:`~.parallel.VocabParallelHeadPlan`)."""
        plan = self._plans.get(name)
        if plan is not None:
            return plan
        adapter, parallel = self.adapter, self._parallel
        if parallel is None or not parallel.vocab_parallel:
            return self._plan(name, make, hidden, adapter.norm.weight, tensor_parallel.local(adapter.lm_head.weight),
                              *args, eps=adapter.norm_eps, **kwargs)
        plan = self._plans[name] = tensor_parallel.head_plan(parallel, make, hidden, adapter.norm.weight,
                                                             adapter.lm_head.weight, *args, eps=adapter.norm_eps,
                                                             verify=verify, **kwargs)
        return plan

    def _prepare_lean(self) -> None:
        """Lean versions of the backbone's (and the imitation network's) layers for this generate, when every
        one of them is supported; otherwise the reason is kept in ``lean_reason``."""
        self._lean, self.lean_reason = None, None
        if not self.lean_layers:
            self.lean_reason = "lean_layers=False"
            return
        linear = lean.linear_for(self.adapter.layers, self.linear_backend)
        backbone, reason = lean.lean_layers(self.adapter.layers, linear, self._parallel)
        imitation = None
        if backbone is not None and self._drafts and getattr(self.imitation, "layers", None) \
                is not None and self.imitation.config.kind == "layers":
            imitation, reason = lean.lean_layers(self.imitation.layers, linear, self._parallel)
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
        if self._parallel is not None:   # each layer's row-wise attention output and down projections all-reduce
            self._parallel.count("all_reduce", 2 * (stop - start))
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

    def _gathered_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: the full logits over ``normed [..., H]`` from the LM head module (a sharded head's
        hook all-gathers them), the same on every rank."""
        if self._parallel.vocab_parallel:
            self._parallel.count("all_gather")
        return self.adapter.lm_head(normed)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``tokens`` (a sharded embedding all-reduces them over the ranks)."""
        if self._parallel is not None and self._parallel.embedding_sharded:
            self._parallel.count("all_reduce")
        return self.adapter.embed_tokens(tokens)

    def _rotary(self, hidden, positions):
        return self.adapter.rotary_emb(hidden, self.adapter.step_positions(positions))

    def _warped_probs(self, hidden, sampling: Sampling, subset_head=None) -> torch.Tensor:
        """softmax of the model's own head after temperature, top-k and top-p, as model.generate applies them.
        With ``subset_head`` = (ids [S], weight rows [S, H], bias rows or None): the same over those tokens
        only, written into a full-vocabulary distribution that is zero elsewhere."""
        normed = self.adapter.norm(hidden)
        if subset_head is None:
            head = self.adapter.lm_head if self._parallel is None else self._gathered_logits
            logits = head(normed).float()
            scores = filter_scores(logits / sampling.temperature, sampling.top_k, sampling.top_p)
            return torch.softmax(scores, dim=-1)
        ids, weight, bias = subset_head
        logits = nn.functional.linear(normed, weight, bias).float()                   # [..., S]
        scores = filter_scores(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        sub = torch.softmax(scores, dim=-1)
        probs = sub.new_zeros(*sub.shape[:-1], self.adapter.lm_head.weight.shape[0])
        return probs.index_copy_(probs.dim() - 1, ids, sub)

    def _subset_head(self, device, sampling: Sampling):
        """(ids, weight rows, bias rows) of draft_vocab for one generate call: the greedy draft passes the ids
        to early_exit_head, the sampling draft (and any draft under logits processors) multiplies by the rows
        (gathered once per call)."""
        if self.draft_vocab is None:
            return None
        ids = self.draft_vocab if self.draft_vocab.device == torch.device(device) else self.draft_vocab.to(device)
        if not sampling.do_sample and self._processing is None:
            return ids, None, None
        head = self.adapter.lm_head
        bias = getattr(head, "bias", None)
        if self._parallel is not None and self._parallel.vocab_parallel:   # the rows from the ranks holding them
            rows = self._parallel.gather_rows(head.weight, ids)
            if bias is not None:
                bias = self._parallel.gather_rows(tensor_parallel.local(bias)[:, None], ids)[:, 0]
            return ids, rows, bias
        bias = tensor_parallel.local(bias)
        return ids, tensor_parallel.local(head.weight).index_select(0, ids), \
            bias.index_select(0, ids) if bias is not None else None

    def _get_cache(self, batch, max_len, dtype, device) -> KVCache:
        num_layers = self.adapter.num_layers + (self.imitation.num_cache_layers if self._drafts else 0)
        cache = self._cache
        device = torch.device(device)
        reusable = (cache is not None and cache.batch == batch and cache.max_len >= max_len and cache.dtype == dtype
                    and cache.num_layers == num_layers and cache.device.type == device.type
                    and (device.index is None or cache.device == device))
        if not reusable:
            self._cache = None   # free the old buffer before allocating the new one
            cache = KVCache(num_layers, batch, self._num_kv_heads, self._head_dim, max_len, dtype, device)
            self._cache = cache
        return cache

    @staticmethod
    def _sync(device) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
