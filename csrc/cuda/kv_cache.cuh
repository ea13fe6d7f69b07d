// kv_compact CUDA kernel (no torch headers). A byte mover: one instance per vector width, any dtype.
#pragma once

#include <cstdint>

namespace fastvlm {
namespace kv_cache {

struct CompactParams {
  char* buffer;  // [num_layers, 2, B, Hkv, L_max, D], strides in bytes below
  int64_t stride_layer, stride_kv, stride_b, stride_h, stride_pos;
  const int32_t* start;     // [B]
  const int32_t* accepted;  // [B, A], -1 padded
  int64_t batch, num_kv_heads, cache_len, num_accepted;
  int64_t vectors_per_row;  // row bytes / sizeof(Vec)
};

constexpr int kThreads = 128;
constexpr int kVectorsPerThread = 4;  // registers holding one chunk before the barrier

// Grid: (num_layers * 2 * B * Hkv,), kThreads threads. One block owns one [L_max, D] slice and walks the
// flattened (node j, vector v) items of its row in chunks of kThreads * kVectorsPerThread: every thread
// loads its items of the chunk into registers, __syncthreads, then stores them. Sources of later chunks
// lie at or after this chunk's destinations (accepted[j] >= j), and the barrier orders the chunk's loads
// before its stores, so a destination that is another node's source is safe. Rows that stay put
// (accepted[j] == j) and padding are skipped; the loop ends at a chunk that starts on padding. Memory bound: read once,
// write once.
template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_compact_kernel(CompactParams params) {
  const int64_t slice = blockIdx.x;
  const int64_t head = slice % params.num_kv_heads;
  const int64_t row = (slice / params.num_kv_heads) % params.batch;
  const int64_t kv = (slice / (params.num_kv_heads * params.batch)) % 2;
  const int64_t layer = slice / (params.num_kv_heads * params.batch * 2);
  char* base = params.buffer + layer * params.stride_layer + kv * params.stride_kv + row * params.stride_b +
               head * params.stride_h;
  const int32_t* nodes = params.accepted + row * params.num_accepted;
  const int64_t row_start = params.start[row];

  const int64_t total = params.num_accepted * params.vectors_per_row;
  constexpr int64_t kChunk = int64_t{kThreads} * kVectorsPerThread;
  for (int64_t chunk = 0; chunk < total; chunk += kChunk) {
    // Padding is trailing: once a chunk starts on a -1, nothing is left (the same test in every thread).
    if (nodes[chunk / params.vectors_per_row] < 0) break;
    Vec held[kVectorsPerThread];
    int64_t destination_offset[kVectorsPerThread];
#pragma unroll
    for (int i = 0; i < kVectorsPerThread; ++i) {
      destination_offset[i] = -1;
      const int64_t item = chunk + threadIdx.x + int64_t{i} * kThreads;
      if (item < total) {
        const int64_t j = item / params.vectors_per_row;
        const int64_t vector = item - j * params.vectors_per_row;
        const int64_t node = nodes[j];
        const int64_t source = row_start + node, destination = row_start + j;
        if (node >= 0 && node != j && destination >= 0 && source < params.cache_len) {
          held[i] = reinterpret_cast<const Vec*>(base + source * params.stride_pos)[vector];
          destination_offset[i] = destination * params.stride_pos + vector * int64_t{sizeof(Vec)};
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kVectorsPerThread; ++i) {
      if (destination_offset[i] >= 0) *reinterpret_cast<Vec*>(base + destination_offset[i]) = held[i];
    }
  }
}

struct AppendParams {
  char* cache[2];               // k_cache, v_cache [B, Hkv, L_max, D]
  const char* source[2];        // keys, values [B, Hkv, T, D]
  int64_t cache_stride[2][3];   // bytes: row, head, position
  int64_t source_stride[2][3];  // bytes: row, head, token
  const int32_t* lengths;       // [B]
  int64_t num_kv_heads, cache_len, num_new;
  int64_t vectors_per_row;
};

// Grid: (B * Hkv, 2) with kThreads threads. One block copies the T new rows of one (row, KV head) of the
// keys (blockIdx.y = 0) or the values (1) to the cache at lengths[row] + t, one Vec per thread per step.
// Sources and destinations are different tensors: no ordering needed. Memory bound: read once, write once.
template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_append_kernel(AppendParams params) {
  const int which = blockIdx.y;
  const int64_t row = blockIdx.x / params.num_kv_heads, head = blockIdx.x % params.num_kv_heads;
  const int64_t start = params.lengths[row];
  char* target = params.cache[which] + row * params.cache_stride[which][0] + head * params.cache_stride[which][1];
  const char* from =
      params.source[which] + row * params.source_stride[which][0] + head * params.source_stride[which][1];
  const int64_t total = params.num_new * params.vectors_per_row;
  for (int64_t item = threadIdx.x; item < total; item += kThreads) {
    const int64_t t = item / params.vectors_per_row;
    const int64_t vector = item - t * params.vectors_per_row;
    const int64_t position = start + t;
    if (position < 0 || position >= params.cache_len) continue;
    reinterpret_cast<Vec*>(target + position * params.cache_stride[which][2])[vector] =
        reinterpret_cast<const Vec*>(from + t * params.source_stride[which][2])[vector];
  }
}

}  // namespace kv_cache
}  // namespace fastvlm
