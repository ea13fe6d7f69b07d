// Launchers of the acceptance CUDA kernels (acceptance.cuh): pointers and sizes from the tensors, the
// fp64 residual workspace for sampling, launched on the current stream (no host synchronisation).
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "acceptance.cuh"
#include "ops.h"

namespace fastvlm {
namespace {

namespace ac = acceptance;

ac::TreeParams tree_params(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents, int64_t num_nodes,
                           at::Tensor& accept_len, const std::optional<at::Tensor>& path, at::Tensor& emitted,
                           const char* op) {
  const int64_t batch = draft_tokens.size(0);
  TORCH_CHECK(draft_tokens.is_cuda() && draft_tokens.dim() == 2 && draft_tokens.scalar_type() == at::kLong &&
                  draft_tokens.is_contiguous(),
              op, ": draft_tokens must be [B, cols] int64 contiguous on a CUDA device");
  TORCH_CHECK(num_nodes >= 1 && (draft_tokens.size(1) == num_nodes || draft_tokens.size(1) == num_nodes - 1), op,
              ": draft_tokens must have N (tree) or N - 1 (chain) columns");
  TORCH_CHECK(parents.has_value() == (draft_tokens.size(1) == num_nodes), op,
              ": a tree (draft_tokens with N columns) needs parents, a chain (N - 1 columns) none");
  if (parents.has_value()) {
    TORCH_CHECK(parents->scalar_type() == at::kLong && parents->is_contiguous() &&
                    parents->numel() == batch * num_nodes && parents->device() == draft_tokens.device(),
                op, ": parents must be [B, N] int64 contiguous on draft_tokens' device");
  }
  TORCH_CHECK(accept_len.scalar_type() == at::kInt && accept_len.is_contiguous() && accept_len.numel() == batch &&
                  accept_len.device() == draft_tokens.device(),
              op, ": accept_len must be [B] int32 contiguous on draft_tokens' device");
  TORCH_CHECK(emitted.scalar_type() == at::kLong && emitted.is_contiguous() && emitted.numel() == batch * num_nodes &&
                  emitted.device() == draft_tokens.device(),
              op, ": emitted must be [B, N] int64 contiguous on draft_tokens' device");
  if (path.has_value()) {
    TORCH_CHECK(path->scalar_type() == at::kLong && path->is_contiguous() && path->numel() == batch * num_nodes &&
                    path->device() == draft_tokens.device(),
                op, ": path must be [B, N] int64 contiguous on draft_tokens' device");
  }
  ac::TreeParams tree{};
  tree.draft_tokens = draft_tokens.data_ptr<int64_t>();
  tree.parents = parents.has_value() ? parents->data_ptr<int64_t>() : nullptr;
  tree.accept_len = accept_len.data_ptr<int32_t>();
  tree.path = path.has_value() ? path->data_ptr<int64_t>() : nullptr;
  tree.emitted = emitted.data_ptr<int64_t>();
  tree.batch = batch;
  tree.num_nodes = num_nodes;
  tree.cols = draft_tokens.size(1);
  tree.node_offset = num_nodes - tree.cols;
  return tree;
}

}  // namespace

void accept_greedy_cuda(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                        const at::Tensor& target_tokens, at::Tensor& accept_len, const std::optional<at::Tensor>& path,
                        at::Tensor& emitted) {
  const int64_t batch = draft_tokens.size(0), num_nodes = target_tokens.size(1);
  TORCH_CHECK(target_tokens.scalar_type() == at::kLong && target_tokens.is_contiguous() &&
                  target_tokens.size(0) == batch && target_tokens.device() == draft_tokens.device(),
              "accept_greedy (cuda): target_tokens must be [B, N] int64 contiguous on draft_tokens' device");
  const ac::TreeParams tree =
      tree_params(draft_tokens, parents, num_nodes, accept_len, path, emitted, "accept_greedy (cuda)");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard device_guard(draft_tokens.device());
  const auto blocks = static_cast<unsigned>((batch + ac::kGreedyThreads - 1) / ac::kGreedyThreads);
  ac::accept_greedy_kernel<<<blocks, ac::kGreedyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      tree, target_tokens.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void accept_sampling_cuda(const at::Tensor& draft_tokens, const std::optional<at::Tensor>& parents,
                          const at::Tensor& draft_probs, const at::Tensor& target_probs, const at::Tensor& uniforms,
                          at::Tensor& accept_len, const std::optional<at::Tensor>& path, at::Tensor& emitted) {
  const int64_t batch = draft_tokens.size(0), num_nodes = target_probs.size(1), vocab = target_probs.size(2);
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.is_contiguous() && target_probs.size(0) == batch &&
                  target_probs.device() == draft_tokens.device(),
              "accept_sampling (cuda): target_probs must be [B, N, V] contiguous on draft_tokens' device");
  TORCH_CHECK(draft_probs.dim() == 3 && draft_probs.is_contiguous() && draft_probs.size(0) == batch &&
                  draft_probs.size(1) == num_nodes - 1 && draft_probs.size(2) == vocab &&
                  draft_probs.scalar_type() == target_probs.scalar_type() &&
                  draft_probs.device() == draft_tokens.device(),
              "accept_sampling (cuda): draft_probs must be [B, N - 1, V] contiguous in target_probs' dtype");
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat && uniforms.is_contiguous() &&
                  uniforms.numel() == batch * num_nodes && uniforms.device() == draft_tokens.device(),
              "accept_sampling (cuda): uniforms must be [B, N] fp32 contiguous on draft_tokens' device");
  TORCH_CHECK(vocab >= 1, "accept_sampling (cuda): the vocabulary is empty");
  const ac::TreeParams tree =
      tree_params(draft_tokens, parents, num_nodes, accept_len, path, emitted, "accept_sampling (cuda)");
  if (batch == 0) return;
  TORCH_CHECK(batch <= INT32_MAX, "accept_sampling (cuda): too many rows for one grid dimension");
  const c10::cuda::CUDAGuard device_guard(draft_tokens.device());
  at::Tensor residual = at::empty({batch, vocab}, draft_tokens.options().dtype(at::kDouble));
  ac::SamplingParams params{};
  params.draft_probs = draft_probs.data_ptr();
  params.target_probs = target_probs.data_ptr();
  params.uniforms = uniforms.data_ptr<float>();
  params.residual = residual.data_ptr<double>();
  params.vocab = vocab;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(batch);
  switch (target_probs.scalar_type()) {
    case at::kFloat:
      ac::accept_sampling_kernel<float><<<blocks, ac::kSamplingThreads, 0, stream>>>(tree, params);
      break;
    case at::kHalf:
      ac::accept_sampling_kernel<__half><<<blocks, ac::kSamplingThreads, 0, stream>>>(tree, params);
      break;
    case at::kBFloat16:
      ac::accept_sampling_kernel<__nv_bfloat16><<<blocks, ac::kSamplingThreads, 0, stream>>>(tree, params);
      break;
    default:
      TORCH_CHECK(false, "accept_sampling (cuda): probabilities must be fp32, fp16 or bf16, got ",
                  target_probs.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastvlm
