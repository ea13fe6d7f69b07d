"""Loading the compiled extension fastvlm_kernels._C and the torch.library glue around it.

The schemas are defined in csrc/bindings.cpp; this module adds the fake (meta) implementations that
torch.compile and CUDA-graph capture need. Loading never raises: a missing module, or one built for
another torch, leaves `EXTENSION.loaded` False with the reason in `EXTENSION.error`, and the ops fall
back to their other backends (one warning, at import).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass
class ExtensionState:
    loaded: bool = False
    path: Optional[str] = None
    error: Optional[str] = None
    build_info: dict = field(default_factory=dict)

    @property
    def with_cuda(self) -> bool:
        return self.loaded and bool(self.build_info.get("with_cuda"))


def _load() -> ExtensionState:
    state = ExtensionState()
    info_path = _PACKAGE_DIR / "_build_info.json"
    if info_path.exists():
        state.build_info = json.loads(info_path.read_text())
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so"))
    if not candidates:
        state.error = "fastvlm_kernels._C is not built (pip install --no-build-isolation -e .)"
        return state
    state.path = str(candidates[0])
    built_for = state.build_info.get("torch_version")
    try:
        torch.ops.load_library(state.path)
    except (OSError, RuntimeError) as error:
        mismatch = (f" (built for torch {built_for}, you have {torch.__version__}: rebuild it)"
                    if built_for and built_for != torch.__version__ else "")
        state.error = f"fastvlm_kernels._C failed to load{mismatch}: {error}"
        return state
    state.loaded = True
    return state


EXTENSION = _load()
if not EXTENSION.loaded:
    warnings.warn(f"{EXTENSION.error}; ops fall back to their Triton and PyTorch backends",
                  RuntimeWarning, stacklevel=2)
else:
    @torch.library.register_fake("fastvlm::verify_attention")
    def _verify_attention_fake(q, k_cache, v_cache, prefix_lens, tree_mask, sm_scale, out, lse):
        return None

    # fastvlm::verify_attention_checked has no fake on purpose: it is the eager CPU entry of the public function
    # (never traced; torch.compile takes the checked Python path), and a meta or fake tensor must reach the
    # dispatcher's NotImplementedError, which sends the call to the Python checks.

    @torch.library.register_fake("fastvlm::skinny_linear")
    def _skinny_linear_fake(x, weight, bias, out):
        return None

    @torch.library.register_fake("fastvlm::kv_compact")
    def _kv_compact_fake(buffer, start, accepted):
        return None

    @torch.library.register_fake("fastvlm::kv_append")
    def _kv_append_fake(k_cache, v_cache, lengths, keys, values):
        return None

    # acceptance: every output is preallocated by the Python wrapper and written in place.
    @torch.library.register_fake("fastvlm::accept_greedy")
    def _accept_greedy_fake(draft_tokens, parents, target_tokens, accept_len, path, emitted):
        return None

    @torch.library.register_fake("fastvlm::accept_sampling")
    def _accept_sampling_fake(draft_tokens, parents, draft_probs, target_probs, uniforms, accept_len, path, emitted):
        return None

    @torch.library.register_fake("fastvlm::lm_head")
    def _lm_head_fake(hidden, norm_weight, lm_head_weight, vocab_subset, draft_tokens, prob_rows, seed, eps,
                      norm_offset, logit_scale, logit_softcap, temperature, selection, top_k, top_p, tokens, max_logit,
                      lse, logprob, draft_logprob, probs):
        return None
