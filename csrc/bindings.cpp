// The one registration file of fastvlm_kernels._C: a schema per op (`Tensor(a!)` marks what is written),
// then the CPU and CUDA implementations. Fake (meta) implementations live in fastvlm_kernels/ops/_library.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastvlm, m) {
  m.def(
      "verify_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor? tree_mask, "
      "float sm_scale, Tensor(a!) out, Tensor(b!)? lse) -> ()");
  // lm_head: early_exit_head and verify_head (fastvlm_kernels/ops/lm_head)
  m.def(
      "lm_head(Tensor hidden, Tensor norm_weight, Tensor lm_head_weight, Tensor? vocab_subset, "
      "Tensor? draft_tokens, Tensor? prob_rows, Tensor? seed, float eps, float norm_offset, float logit_scale, "
      "float logit_softcap, float temperature, int selection, int top_k, float top_p, Tensor(a!) tokens, "
      "Tensor(b!) max_logit, Tensor(c!) lse, Tensor(d!) logprob, Tensor(e!)? draft_logprob, "
      "Tensor(f!)? probs) -> ()");
}

TORCH_LIBRARY_IMPL(fastvlm, CPU, m) {
  m.impl("verify_attention", &fastvlm::verify_attention_cpu);
  m.impl("lm_head", &fastvlm::lm_head_cpu);
}

#ifdef FASTVLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvlm, CUDA, m) {
  m.impl("verify_attention", &fastvlm::verify_attention_cuda);
  m.impl("lm_head", &fastvlm::lm_head_cuda);
}
#endif
