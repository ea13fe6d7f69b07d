// Launcher of the verify_attention CUDA kernels (verify_attention.cuh): reads sizes, strides and
// pointers from the tensors, picks the compute path and the padded head dim, decides the KV split
// without reading prefix_lens on the host, and launches on the current stream.
#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"
#include "verify_attention.cuh"

namespace fastvlm {
namespace {

namespace va = verify_attention;

constexpr int kMaxSplits = 64;
constexpr int kMaxDevices = 64;

// Enough CTAs to fill every SM's resident slots once (a second, partial wave would cost a whole CTA's
// time), each split at least min_split_keys long. The host does not read prefix_lens (that would
// synchronise), so the cache length L_max stands in for the longest prefix; the kernel divides each
// block's actual range evenly among the splits.
// FASTVLM_VERIFY_ATTENTION_SPLITS=N forces N splits (1..64), to tune this choice on a new GPU.
int choose_num_splits(int64_t base_ctas, int cache_len, int64_t resident_ctas, int min_split_keys) {
  static const int forced = [] {
    const char* value = std::getenv("FASTVLM_VERIFY_ATTENTION_SPLITS");
    return value == nullptr ? 0 : std::clamp(std::atoi(value), 0, kMaxSplits);
  }();
  if (forced > 0) return forced;
  if (base_ctas >= resident_ctas) return 1;
  const int64_t by_occupancy = resident_ctas / base_ctas;
  const int64_t by_length = cache_len / min_split_keys;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({by_occupancy, by_length, kMaxSplits})));
}

// The instances: 3 dtypes x padded head dims {64, 128, 256} on CUDA cores, fp16 / bf16 x {64, 128, 256}
// on tensor cores, and one merge kernel per dtype. D = 80 and 96 run in the 128 instance (the loops over
// D stop at the real head dim; only shared memory is sized for 128).
// Picks the query block and the split, allocates the split workspace and launches on `stream`.
template <typename T, int kHeadDimPadded, bool kTensorCores>
void launch_attention(va::Params params, const at::Tensor& q, cudaStream_t stream) {
  void (*kernel)(va::Params);
  int threads, min_split_keys;
  size_t shared_bytes;
  if constexpr (kTensorCores) {
    using Config = va::TensorCoreConfig<T, kHeadDimPadded>;
    kernel = va::verify_attention_tensor_core_kernel<T, kHeadDimPadded>;
    threads = Config::kThreads;
    shared_bytes = Config::kSharedBytes;
    min_split_keys = 2 * Config::kBlockN;  // short splits: decode shapes are latency bound per CTA
    // 16 query rows per warp; warps not needed for rows share each tile's keys instead.
    const int64_t rows = static_cast<int64_t>(params.num_new) * params.group;
    params.warps_m = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
    params.block_m = 16 * params.warps_m;
  } else {
    using Config = va::CudaCoreConfig<T, kHeadDimPadded>;
    kernel = va::verify_attention_cuda_core_kernel<T, kHeadDimPadded>;
    threads = Config::kThreads;
    shared_bytes = Config::kSharedBytes;
    min_split_keys = 4 * Config::kBlockN;
    params.warps_m = 0;
    params.block_m = va::kCudaCoreBlockM;
  }

  // Once per device: allow the dynamic shared memory and ask how many CTAs fit on an SM.
  const int device = q.get_device();
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  static std::array<std::atomic<int>, kMaxDevices> ctas_per_sm_by_device{};
  int ctas_per_sm = device < kMaxDevices ? ctas_per_sm_by_device[device].load(std::memory_order_relaxed) : 0;
  if (ctas_per_sm == 0) {
    TORCH_CHECK(shared_bytes <= properties->sharedMemPerBlockOptin, "verify_attention (cuda): the kernel for head dim ",
                params.head_dim, " needs ", shared_bytes, " bytes of shared memory per block; ", properties->name,
                " allows ", properties->sharedMemPerBlockOptin);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
    // Shared memory over L1 (K/V bypass L1 anyway), so that 2 or 3 CTAs of 64-99 KB fit on an SM.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        static_cast<int>(cudaSharedmemCarveoutMaxShared)));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, threads, shared_bytes));
    ctas_per_sm = std::max(ctas_per_sm, 1);
    if (device < kMaxDevices) ctas_per_sm_by_device[device].store(ctas_per_sm, std::memory_order_relaxed);
  }

  const int64_t rows = static_cast<int64_t>(params.num_new) * params.group;
  const int64_t num_query_blocks = (rows + params.block_m - 1) / params.block_m;
  const int64_t base_ctas = static_cast<int64_t>(params.batch) * params.num_kv_heads * num_query_blocks;
  TORCH_CHECK(base_ctas <= INT_MAX, "verify_attention (cuda): sizes exceed the kernel's 32-bit indexing");
  params.num_query_blocks = static_cast<int>(num_query_blocks);
  const int64_t resident_ctas = static_cast<int64_t>(properties->multiProcessorCount) * ctas_per_sm;
  params.num_splits = choose_num_splits(base_ctas, params.cache_len, resident_ctas, min_split_keys);

  const int64_t total_rows = static_cast<int64_t>(params.batch) * params.num_q_heads * params.num_new;
  at::Tensor workspace;
  if (params.num_splits > 1) {
    // [num_splits, B, Hq, T, D] normalised partial outputs, then [num_splits, B, Hq, T] log2-sum-exps.
    const int64_t partial_rows = params.num_splits * total_rows;
    workspace = at::empty({partial_rows * (params.head_dim + 1)}, q.options().dtype(at::kFloat));
    params.partial_out = workspace.data_ptr<float>();
    params.partial_lse = params.partial_out + partial_rows * params.head_dim;
  }

  const int64_t num_ctas = base_ctas * params.num_splits;
  TORCH_CHECK(num_ctas <= INT_MAX, "verify_attention (cuda): too many blocks (", num_ctas, ")");
  kernel<<<static_cast<unsigned int>(num_ctas), threads, shared_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.num_splits > 1) {
    const int64_t merge_ctas = (total_rows + va::kMergeRowsPerBlock - 1) / va::kMergeRowsPerBlock;
    va::verify_attention_merge_kernel<T>
        <<<static_cast<unsigned int>(merge_ctas), va::kMergeThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_for_dtype(const va::Params& params, int head_dim_padded, bool tensor_cores, const at::Tensor& q,
                      cudaStream_t stream) {
  const auto run = [&](auto head_dim_tag) {
    constexpr int kHeadDimPadded = decltype(head_dim_tag)::value;
    if constexpr (std::is_same_v<T, float>) {  // fp32 runs on CUDA cores (plain FMA, no tf32)
      launch_attention<T, kHeadDimPadded, false>(params, q, stream);
    } else {
      if (tensor_cores)
        launch_attention<T, kHeadDimPadded, true>(params, q, stream);
      else
        launch_attention<T, kHeadDimPadded, false>(params, q, stream);
    }
  };
  switch (head_dim_padded) {
    case 64: run(std::integral_constant<int, 64>{}); break;
    case 128: run(std::integral_constant<int, 128>{}); break;
    default: run(std::integral_constant<int, 256>{}); break;
  }
}

// FASTVLM_VERIFY_ATTENTION_CUDA_CORES=1 forces the CUDA-core path for fp16 / bf16 (to compare paths).
bool tensor_cores_disabled_by_env() {
  static const bool disabled = [] {
    const char* value = std::getenv("FASTVLM_VERIFY_ATTENTION_CUDA_CORES");
    return value != nullptr && std::strcmp(value, "") != 0 && std::strcmp(value, "0") != 0;
  }();
  return disabled;
}

bool is_16_byte_aligned(const at::Tensor& tensor, std::initializer_list<int64_t> strides) {
  const int64_t element_size = tensor.element_size();
  if (reinterpret_cast<uintptr_t>(tensor.data_ptr()) % 16 != 0) return false;
  return std::all_of(strides.begin(), strides.end(), [&](int64_t stride) { return (stride * element_size) % 16 == 0; });
}

}  // namespace

void verify_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask, double sm_scale,
                           at::Tensor& out, const std::optional<at::Tensor>& lse) {
  // The Python wrapper validates everything; these are the checks without which a kernel could read or
  // write out of bounds.
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4 && out.dim() == 4,
              "verify_attention (cuda): q, k_cache, v_cache and out must be 4-D");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "verify_attention (cuda): q, k_cache, v_cache and out must share a dtype");
  TORCH_CHECK(q.is_cuda() && k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  out.device() == q.device() && prefix_lens.device() == q.device(),
              "verify_attention (cuda): all tensors must be on q's CUDA device");
  const int64_t batch = q.size(0), num_q_heads = q.size(1), num_new = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k_cache.size(1), cache_len = k_cache.size(2);
  TORCH_CHECK(out.sizes() == q.sizes(), "verify_attention (cuda): out must have q's shape");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == batch && k_cache.size(3) == head_dim,
              "verify_attention (cuda): k_cache and v_cache must be [B, Hkv, L_max, D] with q's B and D");
  TORCH_CHECK(head_dim % 16 == 0 && head_dim > 0 && head_dim <= 256,
              "verify_attention (cuda): head dim must be a multiple of 16 up to 256, got ", head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0,
              "verify_attention (cuda): Hq must be a multiple of Hkv");
  TORCH_CHECK(num_new >= 1 && num_new <= cache_len, "verify_attention (cuda): need 1 <= T <= L_max");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && out.stride(3) == 1,
              "verify_attention (cuda): the last dim of q, k_cache, v_cache and out must be contiguous");
  TORCH_CHECK(prefix_lens.scalar_type() == at::kInt && prefix_lens.is_contiguous() && prefix_lens.numel() == batch,
              "verify_attention (cuda): prefix_lens must be [B] int32 contiguous");
  if (tree_mask.has_value()) {
    TORCH_CHECK(tree_mask->scalar_type() == at::kLong && tree_mask->is_contiguous() &&
                    tree_mask->numel() == batch * num_new && tree_mask->device() == q.device(),
                "verify_attention (cuda): tree_mask must be [B, T] int64 contiguous on q's device");
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() == batch * num_q_heads * num_new && lse->device() == q.device(),
                "verify_attention (cuda): lse must be [B, Hq, T] fp32 contiguous on q's device");
  }
  if (batch == 0) return;

  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t total_rows = batch * num_q_heads * num_new;  // (b, h, t) rows, also the merge grid
  const int head_dim_padded = head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
  TORCH_CHECK(cache_len <= INT_MAX && total_rows <= INT_MAX,
              "verify_attention (cuda): sizes exceed the kernel's 32-bit indexing");

  va::Params params{};
  params.q = q.data_ptr();
  params.k_cache = k_cache.data_ptr();
  params.v_cache = v_cache.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  params.prefix_lens = prefix_lens.data_ptr<int32_t>();
  params.tree_mask = tree_mask.has_value() ? tree_mask->data_ptr<int64_t>() : nullptr;
  params.q_stride_b = q.stride(0);
  params.q_stride_h = q.stride(1);
  params.q_stride_t = q.stride(2);
  params.k_stride_b = k_cache.stride(0);
  params.k_stride_h = k_cache.stride(1);
  params.k_stride_l = k_cache.stride(2);
  params.v_stride_b = v_cache.stride(0);
  params.v_stride_h = v_cache.stride(1);
  params.v_stride_l = v_cache.stride(2);
  params.out_stride_b = out.stride(0);
  params.out_stride_h = out.stride(1);
  params.out_stride_t = out.stride(2);
  params.batch = static_cast<int>(batch);
  params.num_q_heads = static_cast<int>(num_q_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.group = static_cast<int>(group);
  params.num_new = static_cast<int>(num_new);
  params.cache_len = static_cast<int>(cache_len);
  params.head_dim = static_cast<int>(head_dim);
  params.scale_log2 = static_cast<float>(sm_scale) * va::kLog2e;
  params.q_vector_loads = is_16_byte_aligned(q, {q.stride(0), q.stride(1), q.stride(2)});
  params.kv_vector_loads = is_16_byte_aligned(k_cache, {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)}) &&
                           is_16_byte_aligned(v_cache, {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)});
  params.vector_loads = params.q_vector_loads && params.kv_vector_loads;
  // block_m, warps_m, num_query_blocks, num_splits and the workspace depend on the path: launch_attention.

  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8 && !tensor_cores_disabled_by_env();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kFloat: launch_for_dtype<float>(params, head_dim_padded, false, q, stream); break;
    case at::kHalf: launch_for_dtype<__half>(params, head_dim_padded, tensor_cores, q, stream); break;
    case at::kBFloat16: launch_for_dtype<__nv_bfloat16>(params, head_dim_padded, tensor_cores, q, stream); break;
    default: TORCH_CHECK(false, "verify_attention (cuda): unsupported dtype ", q.scalar_type());
  }
}

}  // namespace fastvlm
