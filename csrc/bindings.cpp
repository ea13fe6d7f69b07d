// The one registration file of fastvlm_kernels._C: a schema per op (`Tensor(a!)` marks what is written),
// then the CPU and CUDA implementations. Fake (meta) implementations live in fastvlm_kernels/ops/_library.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastvlm, m) {
  m.def(
      "verify_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor? tree_mask, "
      "float sm_scale, Tensor(a!) out, Tensor(b!)? lse) -> ()");
  // The CPU entry of the public function (csrc/ops.h): refuses what it does not take with NotImplementedError.
  m.def(
      "verify_attention_checked(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor? tree_mask, "
      "float? sm_scale, bool validate) -> Tensor");
  m.def("kv_compact(Tensor(a!) buffer, Tensor start, Tensor accepted) -> ()");
  m.def("kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, Tensor keys, Tensor values) -> ()");
  // acceptance
  m.def(
      "accept_greedy(Tensor draft_tokens, Tensor? parents, Tensor target_tokens, Tensor(a!) accept_len, "
      "Tensor(b!)? path, Tensor(c!) emitted) -> ()");
  m.def(
      "accept_sampling(Tensor draft_tokens, Tensor? parents, Tensor draft_probs, Tensor target_probs, "
      "Tensor uniforms, Tensor(a!) accept_len, Tensor(b!)? path, Tensor(c!) emitted) -> ()");
  // lm_head: early_exit_head and verify_head (fastvlm_kernels/ops/lm_head)
  m.def(
      "lm_head(Tensor hidden, Tensor norm_weight, Tensor lm_head_weight, Tensor? vocab_subset, "
      "Tensor? draft_tokens, Tensor? prob_rows, Tensor? seed, float eps, float norm_offset, float logit_scale, "
      "float logit_softcap, float temperature, int selection, int top_k, float top_p, Tensor(a!) tokens, "
      "Tensor(b!) max_logit, Tensor(c!) lse, Tensor(d!) logprob, Tensor(e!)? draft_logprob, "
      "Tensor(f!)? probs) -> ()");
  // skinny_linear (fastvlm_kernels/ops/linear): CPU only
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  // no tensor argument to dispatch on: a catch-all kernel
  m.def("skinny_linear_isa() -> int", &fastvlm::skinny_linear_isa);
}

TORCH_LIBRARY_IMPL(fastvlm, CPU, m) {
  m.impl("verify_attention", &fastvlm::verify_attention_cpu);
  m.impl("verify_attention_checked", &fastvlm::verify_attention_checked_cpu);
  m.impl("kv_compact", &fastvlm::kv_compact_cpu);
  m.impl("kv_append", &fastvlm::kv_append_cpu);
  // acceptance
  m.impl("accept_greedy", &fastvlm::accept_greedy_cpu);
  m.impl("accept_sampling", &fastvlm::accept_sampling_cpu);
  m.impl("lm_head", &fastvlm::lm_head_cpu);
  m.impl("skinny_linear", &fastvlm::skinny_linear_cpu);
}

#ifdef FASTVLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvlm, CUDA, m) {
  m.impl("verify_attention", &fastvlm::verify_attention_cuda);
  m.impl("kv_compact", &fastvlm::kv_compact_cuda);
  m.impl("kv_append", &fastvlm::kv_append_cuda);
  // acceptance
  m.impl("accept_greedy", &fastvlm::accept_greedy_cuda);
  m.impl("accept_sampling", &fastvlm::accept_sampling_cuda);
  m.impl("lm_head", &fastvlm::lm_head_cuda);
}
#endif
