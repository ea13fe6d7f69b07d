// Launcher of the lm_head CUDA kernels (lm_head.cuh): normalises the rows, launches the tile kernel
// (tensor cores for fp16 / bf16, CUDA cores for fp32) per chunk of <= 64 rows on the current stream,
// then merges the [M, num_tiles] partials in vocabulary order with a few ATen ops on the device (no
// host synchronisation, so it can be captured in a CUDA graph).
// Modes: 0 argmax (verify_head's draft log-prob and probability rows included), 1 sample without
// top-k / top-p; the Python dispatcher sends the rest elsewhere.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "lm_head.cuh"
#include "ops.h"

namespace fastvlm {
namespace {

constexpr int kMaxDevices = 64;

// Rows per launch: kMaxRows. fp32 runs the CUDA-core kernel (kColsPerWarp columns per partial);
// fp16 / bf16 the tensor-core kernel (kTileCols columns per partial), sized to the chunk's padded rows.
template <typename T>
void launch(const at::Tensor& hidden, const at::Tensor& norm_weight, lm_head::Params base, double eps,
            double norm_offset, T* normed, int64_t num_rows, cudaStream_t stream) {
  lm_head::rms_norm_kernel<T><<<static_cast<unsigned int>(num_rows), 256, 0, stream>>>(
      static_cast<const T*>(hidden.data_ptr()), hidden.stride(0), static_cast<const T*>(norm_weight.data_ptr()), normed,
      static_cast<int>(hidden.size(1)), static_cast<float>(eps), static_cast<float>(norm_offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  if constexpr (kTensorCores) {
    // 16-byte copies need 16-byte aligned rows: the normed buffer is fresh (H % 8 == 0 suffices), the head
    // may be a view.
    base.vector_loads =
        base.hidden % 8 == 0 && base.stride_w % 8 == 0 && reinterpret_cast<uintptr_t>(base.weight) % 16 == 0;
    // Once per device: opt in to more than 48 KB of shared memory, and ask for the largest carve-out so
    // that two CTAs fit on an SM.
    static std::once_flag prepared[kMaxDevices];
    const int device = hidden.get_device();
    TORCH_CHECK(device >= 0 && device < kMaxDevices, "lm_head (cuda): device index ", device, " out of range");
    std::call_once(prepared[device], [] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(lm_head::lm_head_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          lm_head::mma_shared_bytes(lm_head::kMaxRows)));
      C10_CUDA_CHECK(cudaFuncSetAttribute(lm_head::lm_head_mma_kernel<T>,
                                          cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
    });
  }
  const unsigned int blocks = static_cast<unsigned int>(
      kTensorCores ? base.num_tiles : (base.num_tiles + lm_head::kWarps - 1) / lm_head::kWarps);
  for (int64_t row0 = 0; row0 < num_rows; row0 += lm_head::kMaxRows) {
    lm_head::Params p = base;
    const int64_t offset = row0 * base.num_tiles;
    p.row0 = row0;
    p.rows = static_cast<int>(std::min<int64_t>(lm_head::kMaxRows, num_rows - row0));
    p.normed = normed + row0 * base.hidden;
    if (p.draft) p.draft += row0;
    if (p.prob_index) p.prob_index += row0;
    p.tile_max += offset;
    p.tile_arg += offset;
    p.tile_sum += offset;
    p.tile_best += offset;
    p.tile_best_arg += offset;
    p.tile_best_score += offset;
    p.tile_draft += offset;
    if constexpr (kTensorCores) {
      const int shared_bytes = lm_head::mma_shared_bytes((p.rows + 15) / 16 * 16);
      lm_head::lm_head_mma_kernel<T><<<blocks, lm_head::kMmaThreads, shared_bytes, stream>>>(p);
    } else {
      lm_head::lm_head_tile_kernel<T><<<blocks, lm_head::kWarps * 32, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void lm_head_cuda(FASTVLM_LM_HEAD_ARGS) {
  const int64_t mode = selection;  // 0 argmax, 1 sample
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 2 && lm_head_weight.dim() == 2 &&
                  lm_head_weight.size(1) == hidden.size(1) && lm_head_weight.scalar_type() == hidden.scalar_type() &&
                  norm_weight.scalar_type() == hidden.scalar_type() && hidden.stride(1) == 1 &&
                  lm_head_weight.stride(1) == 1,
              "lm_head (cuda): hidden [M, H] and lm_head_weight [V, H] of one dtype, rows contiguous, expected");
  TORCH_CHECK(mode == 0 || (mode == 1 && top_k == 0 && top_p >= 1.0),
              "lm_head (cuda): modes argmax and sample (without top_k / top_p) only");
  const int64_t num_rows = hidden.size(0), hidden_size = hidden.size(1), vocab = lm_head_weight.size(0);
  if (num_rows == 0) return;
  TORCH_CHECK(hidden_size <= INT32_MAX && vocab <= INT32_MAX, "lm_head (cuda): sizes beyond int32");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t num_cols = vocab_subset ? vocab_subset->numel() : vocab;
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  if (!fp32) {
    const auto* properties = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(properties->major >= 8, "lm_head (cuda): fp16 / bf16 need tensor cores of sm_80 or later; ",
                properties->name, " is sm_", properties->major, properties->minor);
    TORCH_CHECK(lm_head::mma_shared_bytes(lm_head::kMaxRows) <= static_cast<int>(properties->sharedMemPerBlockOptin),
                "lm_head (cuda): the tensor-core kernel needs ", lm_head::mma_shared_bytes(lm_head::kMaxRows),
                " bytes of shared memory per block; ", properties->name, " allows ",
                properties->sharedMemPerBlockOptin);
  }
  const int64_t tile_cols = fp32 ? lm_head::kColsPerWarp : lm_head::kTileCols;
  const int64_t num_tiles = (num_cols + tile_cols - 1) / tile_cols;
  const bool sample = mode == 1;
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto i64 = hidden.options().dtype(at::kLong);
  at::Tensor normed = at::empty({num_rows, hidden_size}, hidden.options());  // rounded to T, as the model does
  at::Tensor tile_max = at::empty({num_rows, num_tiles}, f32), tile_sum = at::empty({num_rows, num_tiles}, f32);
  at::Tensor tile_arg = at::empty({num_rows, num_tiles}, i64);
  at::Tensor tile_best = sample ? at::empty({num_rows, num_tiles}, f32) : tile_max;
  at::Tensor tile_best_score = sample ? at::empty({num_rows, num_tiles}, f32) : tile_max;
  at::Tensor tile_best_arg = sample ? at::empty({num_rows, num_tiles}, i64) : tile_arg;
  at::Tensor tile_draft = draft_tokens ? at::empty({num_rows, num_tiles}, f32) : tile_max;
  const bool has_probs = prob_rows && probs && probs->numel() > 0;
  at::Tensor prob_index;
  if (has_probs) {
    prob_index = at::full({num_rows}, -1, hidden.options().dtype(at::kInt));
    prob_index.scatter_(0, *prob_rows, at::arange(prob_rows->numel(), prob_index.options()));
  }

  lm_head::Params p{};
  p.weight = lm_head_weight.data_ptr();
  p.stride_w = lm_head_weight.stride(0);
  p.subset = vocab_subset ? vocab_subset->data_ptr<int64_t>() : nullptr;
  p.draft = draft_tokens ? draft_tokens->data_ptr<int64_t>() : nullptr;
  p.prob_index = has_probs ? prob_index.data_ptr<int32_t>() : nullptr;
  p.probs = has_probs ? probs->data_ptr<float>() : nullptr;
  p.seed = sample ? seed->data_ptr<int64_t>() : nullptr;
  p.tile_max = tile_max.data_ptr<float>();
  p.tile_arg = tile_arg.data_ptr<int64_t>();
  p.tile_sum = tile_sum.data_ptr<float>();
  p.tile_best = tile_best.data_ptr<float>();
  p.tile_best_arg = tile_best_arg.data_ptr<int64_t>();
  p.tile_best_score = tile_best_score.data_ptr<float>();
  p.tile_draft = tile_draft.data_ptr<float>();
  p.hidden = static_cast<int>(hidden_size);
  p.num_cols = static_cast<int>(num_cols);
  p.vocab = vocab;
  p.num_tiles = num_tiles;
  p.logit_scale = static_cast<float>(logit_scale);
  p.softcap = static_cast<float>(logit_softcap);
  p.temperature = static_cast<float>(temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (hidden.scalar_type()) {
    case at::kFloat:
      launch<float>(hidden, norm_weight, p, eps, norm_offset, normed.data_ptr<float>(), num_rows, stream);
      break;
    case at::kHalf:
      launch<__half>(hidden, norm_weight, p, eps, norm_offset, static_cast<__half*>(normed.data_ptr()), num_rows,
                     stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(hidden, norm_weight, p, eps, norm_offset, static_cast<__nv_bfloat16*>(normed.data_ptr()),
                            num_rows, stream);
      break;
    default: TORCH_CHECK(false, "lm_head (cuda): unsupported dtype ", hidden.scalar_type());
  }

  // Merge in vocabulary order: max() returns the first maximal tile, so ties keep the lowest column.
  auto [row_max, first_tile] = tile_max.max(1);
  const at::Tensor total = (tile_sum * at::exp(tile_max - row_max.unsqueeze(1))).sum(1);
  const at::Tensor row_lse = row_max + at::log(total);
  max_logit.copy_(row_max);
  lse.copy_(row_lse);
  at::Tensor col;
  if (sample) {
    auto [best, best_tile] = tile_best.max(1);
    col = tile_best_arg.gather(1, best_tile.unsqueeze(1)).squeeze(1);
    logprob.copy_(tile_best_score.gather(1, best_tile.unsqueeze(1)).squeeze(1) - row_lse);
  } else {
    col = tile_arg.gather(1, first_tile.unsqueeze(1)).squeeze(1);
    logprob.copy_(row_max - row_lse);
  }
  tokens.copy_(vocab_subset ? vocab_subset->index_select(0, col) : col);
  if (draft_logprob) draft_logprob->copy_(std::get<0>(tile_draft.max(1)) - row_lse);
  if (has_probs) probs->sub_(row_lse.index_select(0, *prob_rows).unsqueeze(1)).exp_();
}

}  // namespace fastvlm
