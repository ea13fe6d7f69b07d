"""The ops of fastvlm_kernels: one public function each, with backends chosen by device.

Each op also has a plan (``<op>_plan``): the checks and the backend choice done once, and a ``run`` that calls
the chosen kernel on inputs of the planned kind with nothing in front of it; the public function is plan + run.
"""
from . import _library  # loads fastvlm_kernels._C (or says why not) before any op is used
from .verify_attention import verify_attention, verify_attention_plan
from .kv_cache import kv_append, kv_compact

from .acceptance import (accept_greedy, accept_greedy_plan, accept_greedy_tree, accept_greedy_tree_plan,
                         accept_sampling, accept_sampling_plan, accept_sampling_tree, accept_sampling_tree_plan)

from .lm_head import early_exit_head, early_exit_head_plan, verify_head, verify_head_plan, vocab_subset_from_counts
from .linear import skinny_linear, skinny_linear_plan

__all__ = ["verify_attention", "kv_compact", "kv_append",
           "accept_greedy", "accept_sampling", "accept_greedy_tree", "accept_sampling_tree",
           "early_exit_head", "verify_head", "vocab_subset_from_counts", "skinny_linear", "skinny_linear_plan",
           "verify_attention_plan", "accept_greedy_plan", "accept_sampling_plan", "accept_greedy_tree_plan",
           "accept_sampling_tree_plan", "early_exit_head_plan", "verify_head_plan"]
