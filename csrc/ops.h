// Every C++ entry point of fastvlm_kernels._C, grouped by op. Schemas live in bindings.cpp; the Python
// wrappers in fastvlm_kernels/ops/<op>/__init__.py validate every argument before these run, so the
// kernels below assume valid shapes, dtypes and devices (and still never read out of bounds).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fastvlm {

// ---- verify_attention ------------------------------------------------------------------------------
// q [B, Hq, T, D], k_cache / v_cache [B, Hkv, L_max, D] (fp32 | fp16 | bf16, last dim contiguous, any
// other strides), prefix_lens [B] int32, tree_mask [B, T] int64 or none (causal chain), out [B, Hq, T, D]
// (q's dtype, last dim contiguous), lse [B, Hq, T] fp32 contiguous or none. Query j of head h reads KV
// head h / (Hq / Hkv) at every position < prefix_lens[b] and new token i (position prefix_lens[b] + i)
// where bit i of tree_mask[b, j] is set (i <= j without a mask). prefix_lens is clamped to
// [0, L_max - T], so no value can make a kernel read outside the cache.
void verify_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask, double sm_scale,
                          at::Tensor& out, const std::optional<at::Tensor>& lse);

// verify_attention_checked (CPU only): the public call in one C++ call: checks every argument (with `validate`
// the values of prefix_lens and tree_mask too), allocates out [B, Hq, T, D] and runs verify_attention_cpu; any
// argument it does not take is refused with NotImplementedError before the output is allocated (the Python
// wrapper's own checks then name it). sm_scale defaults to D^-0.5; prefix_lens may be int32 or int64.
at::Tensor verify_attention_checked_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask,
                                        std::optional<double> sm_scale, bool validate);

#ifdef FASTVLM_WITH_CUDA
void verify_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask, double sm_scale,
                           at::Tensor& out, const std::optional<at::Tensor>& lse);
#endif

// ---- kv_cache: kv_compact, kv_append -----------------------------------------------------------------------
// buffer [num_layers, 2, B, Hkv, L_max, D] (any dtype, last dim contiguous, other strides arbitrary),
// start [B] int32, accepted [B, A] int32 (-1 padded, strictly increasing). Moves position
// start[b] + accepted[b, j] to start[b] + j in every layer, keys and values, in place; moves that would
// leave the buffer are skipped.
void kv_compact_cpu(at::Tensor& buffer, const at::Tensor& start, const at::Tensor& accepted);
// kv_append: k_cache / v_cache [B, Hkv, L_max, D], keys / values [B, Hkv, T, D] (same dtype, last dim
// contiguous), lengths [B] int32 (read only). Writes keys[b, :, t] at k_cache[b, :, lengths[b] + t] (values
// likewise); positions outside the cache are skipped.
void kv_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lengths, const at::Tensor& keys,
                   const at::Tensor& values);
#ifdef FASTVLM_WITH_CUDA
void kv_compact_cuda(at::Tensor& buffer, const at::Tensor& start, const at::Tensor& accepted);
void kv_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lengths, const at::Tensor& keys,
                    const at::Tensor& values);
#endif

// ---- acceptance: accept_greedy, accept_sampling (chains and trees) --------------------------------------
// A chain of k drafts is the tree of N = k + 1 nodes with parent(c) = c - 1. draft_tokens [B, N - 1] int64
// (a chain, parents none: node c's token is draft_tokens[c - 1]) or [B, N] (a tree: draft_tokens[c], with
// parents [B, N] int64, parents[c] < c). target_tokens [B, N] int64; draft_probs [B, N - 1, V] and
// target_probs [B, N, V] (fp32 | fp16 | bf16, one dtype, contiguous); uniforms [B, N] fp32. Outputs:
// accept_len [B] int32, path [B, N] int64 (trees; none for a chain), emitted [B, N] int64, all -1 padded.
// The walk is fastvlm_kernels/ops/acceptance/reference.py's; token values are clamped to [0, V) where they
// index probabilities, so no input makes a kernel read out of bounds.
void accept_greedy_cpu(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                       const at::Tensor& target_tokens, at::Tensor& accept_len, const std::optional<at::Tensor>& path,
                       at::Tensor& emitted);
void accept_sampling_cpu(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                         const at::Tensor& draft_probs, const at::Tensor& target_probs, const at::Tensor& uniforms,
                         at::Tensor& accept_len, const std::optional<at::Tensor>& path, at::Tensor& emitted);

#ifdef FASTVLM_WITH_CUDA
void accept_greedy_cuda(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                        const at::Tensor& target_tokens, at::Tensor& accept_len, const std::optional<at::Tensor>& path,
                        at::Tensor& emitted);
void accept_sampling_cuda(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                          const at::Tensor& draft_probs, const at::Tensor& target_probs, const at::Tensor& uniforms,
                          at::Tensor& accept_len, const std::optional<at::Tensor>& path, at::Tensor& emitted);
#endif

// ---- lm_head (early_exit_head, verify_head) ----------------------------------------------------------
// hidden [M, H], norm_weight [H], lm_head_weight [V, H] (one dtype: fp32 | fp16 | bf16; rows contiguous),
// vocab_subset [S] int64 (columns read weight rows subset[j]) or none, draft_tokens [M] int64 (-1: none)
// or none, prob_rows [R] int64 or none, seed [2] int64 (seed, offset; read by sampling) or none.
// selection: 0 argmax, 1 sample (Gumbel-max; top_k > 0 / top_p < 1 filter), 2 topk. Outputs: tokens [M] ([M, k] for
// topk) int64, max_logit / lse [M] fp32, logprob [M] ([M, k]) fp32, draft_logprob [M] fp32 or none,
// probs [R, V] fp32 contiguous or none. logit_softcap <= 0 means none. Semantics: ops/lm_head/reference.py.
#define FASTVLM_LM_HEAD_ARGS                                                                                           \
  const at::Tensor &hidden, const at::Tensor &norm_weight, const at::Tensor &lm_head_weight,                           \
      const std::optional<at::Tensor>&vocab_subset, const std::optional<at::Tensor>&draft_tokens,                      \
      const std::optional<at::Tensor>&prob_rows, const std::optional<at::Tensor>&seed, double eps, double norm_offset, \
      double logit_scale, double logit_softcap, double temperature, int64_t selection, int64_t top_k, double top_p,    \
      at::Tensor &tokens, at::Tensor &max_logit, at::Tensor &lse, at::Tensor &logprob,                                 \
      const std::optional<at::Tensor>&draft_logprob, const std::optional<at::Tensor>&probs
void lm_head_cpu(FASTVLM_LM_HEAD_ARGS);
#ifdef FASTVLM_WITH_CUDA
void lm_head_cuda(FASTVLM_LM_HEAD_ARGS);
#endif

// ---- skinny_linear ---------------------------------------------------------------------------------------
// x [M, I], weight [O, I], out [M, O] contiguous fp32, bias [O] fp32 or none, M <= kSkinnyMaxRows:
// out = x @ weight^T (+ bias), reading the weight once (csrc/cpu/linear.cpp). skinny_linear_isa: the vector
// width the kernel runs with on this CPU (512, 256, or 0 for the scalar loop).
constexpr int64_t kSkinnyMaxRows = 16;
void skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::Tensor& out);
int64_t skinny_linear_isa();

}  // namespace fastvlm
