// Launchers of kv_append's and kv_compact's CUDA kernels (kv_cache.cuh): picks the widest vector (16, 8, 4, 2 or 1
// bytes) that divides the row, every stride and the base address, and launches one block per slice of the buffer on the
// current stream. No host synchronisation.
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kv_cache.cuh"
#include "ops.h"

namespace fastvlm {
namespace {

template <typename Vec>
void launch_compact(kv_cache::CompactParams params, int64_t row_bytes, int64_t num_slices, cudaStream_t stream) {
  params.vectors_per_row = row_bytes / static_cast<int64_t>(sizeof(Vec));
  kv_cache::kv_compact_kernel<Vec><<<static_cast<unsigned int>(num_slices), kv_cache::kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Vec>
void launch_append(kv_cache::AppendParams params, int64_t row_bytes, int64_t num_slices, cudaStream_t stream) {
  params.vectors_per_row = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const dim3 grid(static_cast<unsigned int>(num_slices), 2);
  kv_cache::kv_append_kernel<Vec><<<grid, kv_cache::kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void kv_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lengths, const at::Tensor& keys,
                    const at::Tensor& values) {
  const int64_t batch = k_cache.size(0), num_kv_heads = k_cache.size(1);
  const int64_t num_slices = batch * num_kv_heads;
  if (num_slices == 0 || keys.size(2) == 0) return;
  TORCH_CHECK(num_slices <= INT32_MAX, "kv_append (cuda): ", num_slices, " slices exceed the grid limit");
  const c10::cuda::CUDAGuard device_guard(k_cache.device());
  const int64_t element_bytes = k_cache.element_size();
  const int64_t row_bytes = k_cache.size(3) * element_bytes;
  kv_cache::AppendParams params{};
  uint64_t alignment = static_cast<uint64_t>(row_bytes);
  const at::Tensor* caches[2] = {&k_cache, &v_cache};
  const at::Tensor* sources[2] = {&keys, &values};
  for (int which = 0; which < 2; ++which) {
    params.cache[which] = static_cast<char*>(caches[which]->data_ptr());
    params.source[which] = static_cast<const char*>(sources[which]->data_ptr());
    alignment |= reinterpret_cast<uintptr_t>(params.cache[which]) | reinterpret_cast<uintptr_t>(params.source[which]);
    for (int dim = 0; dim < 3; ++dim) {
      params.cache_stride[which][dim] = caches[which]->stride(dim) * element_bytes;
      params.source_stride[which][dim] = sources[which]->stride(dim) * element_bytes;
      if (caches[which]->size(dim) > 1) alignment |= static_cast<uint64_t>(params.cache_stride[which][dim]);
      if (sources[which]->size(dim) > 1) alignment |= static_cast<uint64_t>(params.source_stride[which][dim]);
    }
  }
  params.lengths = lengths.data_ptr<int32_t>();
  params.num_kv_heads = num_kv_heads;
  params.cache_len = k_cache.size(2);
  params.num_new = keys.size(2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (alignment % 16 == 0) {
    launch_append<uint4>(params, row_bytes, num_slices, stream);
  } else if (alignment % 8 == 0) {
    launch_append<uint2>(params, row_bytes, num_slices, stream);
  } else if (alignment % 4 == 0) {
    launch_append<uint32_t>(params, row_bytes, num_slices, stream);
  } else if (alignment % 2 == 0) {
    launch_append<uint16_t>(params, row_bytes, num_slices, stream);
  } else {
    launch_append<uint8_t>(params, row_bytes, num_slices, stream);
  }
}

void kv_compact_cuda(at::Tensor& buffer, const at::Tensor& start, const at::Tensor& accepted) {
  const int64_t num_layers = buffer.size(0), batch = buffer.size(2), num_kv_heads = buffer.size(3);
  const int64_t num_slices = num_layers * 2 * batch * num_kv_heads;
  if (num_slices == 0 || accepted.size(1) == 0) return;
  TORCH_CHECK(num_slices <= INT32_MAX, "kv_compact (cuda): ", num_slices, " slices exceed the grid limit");
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  const int64_t element_bytes = buffer.element_size();
  const int64_t row_bytes = buffer.size(5) * element_bytes;

  kv_cache::CompactParams params{};
  params.buffer = static_cast<char*>(buffer.data_ptr());
  params.stride_layer = buffer.stride(0) * element_bytes;
  params.stride_kv = buffer.stride(1) * element_bytes;
  params.stride_b = buffer.stride(2) * element_bytes;
  params.stride_h = buffer.stride(3) * element_bytes;
  params.stride_pos = buffer.stride(4) * element_bytes;
  params.start = start.data_ptr<int32_t>();
  params.accepted = accepted.data_ptr<int32_t>();
  params.batch = batch;
  params.num_kv_heads = num_kv_heads;
  params.cache_len = buffer.size(4);
  params.num_accepted = accepted.size(1);

  // The widest access that every row start can use.
  uint64_t alignment = reinterpret_cast<uintptr_t>(params.buffer) | static_cast<uint64_t>(row_bytes);
  for (int dim = 0; dim < 5; ++dim) {
    if (buffer.size(dim) > 1) alignment |= static_cast<uint64_t>(buffer.stride(dim) * element_bytes);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (alignment % 16 == 0) {
    launch_compact<uint4>(params, row_bytes, num_slices, stream);
  } else if (alignment % 8 == 0) {
    launch_compact<uint2>(params, row_bytes, num_slices, stream);
  } else if (alignment % 4 == 0) {
    launch_compact<uint32_t>(params, row_bytes, num_slices, stream);
  } else if (alignment % 2 == 0) {
    launch_compact<uint16_t>(params, row_bytes, num_slices, stream);
  } else {
    launch_compact<uint8_t>(params, row_bytes, num_slices, stream);
  }
}

}  // namespace fastvlm
