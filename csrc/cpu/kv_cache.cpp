// kv_append on CPU: at::parallel_for over the 2 * B * Hkv (keys|values, row, KV head) slices; each copies
// its T new rows to the cache at lengths[b] + t with memcpy (rows past the cache are skipped). Memory bound.
//
// kv_compact on CPU: at::parallel_for over the num_layers * 2 * B * Hkv slices of the buffer. Each slice
// copies its row's moving positions (start + accepted[j] -> start + j, j increasing, rows that stay put
// skipped) with memcpy of one D-element row each. Sources are at or after destinations (accepted[j] >= j),
// so the sequential increasing-j order reads every source before anything overwrites it. The byte mover
// is dtype-agnostic. Memory bound: each moved row is read once and written once.
#include "ops.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

namespace fastvlm {

void kv_compact_cpu(at::Tensor& buffer, const at::Tensor& start, const at::Tensor& accepted) {
  const int64_t num_layers = buffer.size(0), batch = buffer.size(2), num_kv_heads = buffer.size(3);
  const int64_t cache_len = buffer.size(4), head_dim = buffer.size(5);
  const int64_t num_accepted = accepted.size(1);
  const int64_t num_slices = num_layers * 2 * batch * num_kv_heads;
  if (num_slices == 0 || num_accepted == 0) return;

  // The (source, destination) position pairs of each row, read once.
  const int32_t* starts = start.data_ptr<int32_t>();
  const int32_t* nodes = accepted.data_ptr<int32_t>();
  std::vector<std::vector<std::pair<int64_t, int64_t>>> moves(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row_start = starts[b];
    for (int64_t j = 0; j < num_accepted; ++j) {
      const int64_t node = nodes[b * num_accepted + j];
      if (node < 0) break;  // -1 padding is trailing
      const int64_t source = row_start + node, destination = row_start + j;
      if (node != j && destination >= 0 && source < cache_len) moves[b].emplace_back(source, destination);
    }
  }

  const int64_t element_bytes = buffer.element_size();
  const int64_t row_bytes = head_dim * element_bytes;
  const int64_t stride_layer = buffer.stride(0) * element_bytes, stride_kv = buffer.stride(1) * element_bytes;
  const int64_t stride_b = buffer.stride(2) * element_bytes, stride_h = buffer.stride(3) * element_bytes;
  const int64_t stride_pos = buffer.stride(4) * element_bytes;
  char* data = static_cast<char*>(buffer.data_ptr());
  // A grain of slices moving about 64 KiB keeps the threads busy without scheduling tiny tasks.
  int64_t moved_rows = 0;
  for (const auto& row_moves : moves) moved_rows += static_cast<int64_t>(row_moves.size());
  if (moved_rows == 0) return;
  const int64_t bytes_per_slice = moved_rows * row_bytes / batch + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / bytes_per_slice);

  at::parallel_for(0, num_slices, grain, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t head = slice % num_kv_heads;
      const int64_t b = (slice / num_kv_heads) % batch;
      const int64_t kv = (slice / (num_kv_heads * batch)) % 2;
      const int64_t layer = slice / (num_kv_heads * batch * 2);
      char* base = data + layer * stride_layer + kv * stride_kv + b * stride_b + head * stride_h;
      for (const auto& [source, destination] : moves[b]) {
        std::memcpy(base + destination * stride_pos, base + source * stride_pos, row_bytes);
      }
    }
  });
}

void kv_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lengths, const at::Tensor& keys,
                   const at::Tensor& values) {
  const int64_t batch = k_cache.size(0), num_kv_heads = k_cache.size(1), cache_len = k_cache.size(2);
  const int64_t num_new = keys.size(2);
  const int64_t num_slices = 2 * batch * num_kv_heads;
  if (num_slices == 0 || num_new == 0) return;
  const int32_t* row_lengths = lengths.data_ptr<int32_t>();
  const int64_t element_bytes = k_cache.element_size();
  const int64_t row_bytes = k_cache.size(3) * element_bytes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (num_new * row_bytes + 1));
  at::parallel_for(0, num_slices, grain, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) {
      const bool is_values = slice >= batch * num_kv_heads;
      const int64_t b = (slice / num_kv_heads) % batch, head = slice % num_kv_heads;
      const at::Tensor& cache = is_values ? v_cache : k_cache;
      const at::Tensor& source = is_values ? values : keys;
      char* target =
          static_cast<char*>(cache.data_ptr()) + (b * cache.stride(0) + head * cache.stride(1)) * element_bytes;
      const char* from = static_cast<const char*>(source.data_ptr()) +
                         (b * source.stride(0) + head * source.stride(1)) * element_bytes;
      const int64_t start = row_lengths[b];
      for (int64_t t = 0; t < num_new; ++t) {
        const int64_t position = start + t;
        if (position < 0 || position >= cache_len) continue;
        std::memcpy(target + position * cache.stride(2) * element_bytes, from + t * source.stride(2) * element_bytes,
                    row_bytes);
      }
    }
  });
}

}  // namespace fastvlm
