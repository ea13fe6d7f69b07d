// lm_head CUDA kernels (early_exit_head / verify_head): the [M, V] logits are never written.
// rms_norm_kernel: grid (M,), one CTA per row; writes the normed row (rounded through T) as fp32.
// lm_head_tile_kernel: grid (cdiv(num_tiles, kWarps)), kWarps warps per CTA; a warp owns one tile of
// kColsPerWarp consecutive columns (head rows) and up to kMaxRows hidden rows (the launcher loops over
// row chunks). Per column the warp streams the weight row with 16-byte loads, dots it with the rows in
// register chunks of kRowChunk (the normed rows come from L1/L2), butterfly-reduces, and the lane that
// owns a row (lane, lane + 32) updates that row's running max / first argmax / sum of exp / Gumbel-max
// winner / draft score, written as [M, num_tiles] partials that the launcher merges in vocabulary order.
// Aim: the weight's memory bandwidth (each weight row read from DRAM once per row chunk).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastvlm::lm_head {

constexpr int kWarps = 8;
constexpr int kColsPerWarp = 16;
constexpr int kMaxRows = 64;   // rows per launch: two per lane
constexpr int kRowChunk = 8;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

struct Params {
  const float* normed;        // [rows, H] fp32 (rounded through T), this chunk's rows
  const void* weight;         // [V, H] T, rows at stride_w
  int64_t stride_w;
  const int64_t* subset;      // [num_cols] token ids or null
  const int64_t* draft;       // [rows] or null
  const int32_t* prob_index;  // [rows] index into probs, -1 none; or null
  float* probs;               // [R, V]
  const int64_t* seed;        // [2] (seed, offset) or null (no sampling)
  int64_t row0;               // global index of this chunk's first row (the noise's row)
  float* tile_max;            // [rows, num_tiles] (row stride num_tiles)
  int64_t* tile_arg;
  float* tile_sum;
  float* tile_best;
  int64_t* tile_best_arg;
  float* tile_best_score;
  float* tile_draft;
  int rows, hidden, num_cols;
  int64_t vocab, num_tiles;
  float logit_scale, softcap, temperature;
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void rms_norm_kernel(const T* hidden, int64_t stride_h, const T* norm_weight, float* out, int hidden_size,
                                float eps, float norm_offset) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  const T* x = hidden + row * stride_h;
  float squares = 0.0f;
  for (int h = threadIdx.x; h < hidden_size; h += blockDim.x) {
    const float v = to_float(x[h]);
    squares += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = squares;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partial[w];
  const float inv = 1.0f / sqrtf(total / hidden_size + eps);
  for (int h = threadIdx.x; h < hidden_size; h += blockDim.x)
    out[row * hidden_size + h] = to_float(from_float<T>(to_float(x[h]) * inv * (norm_offset + to_float(norm_weight[h]))));
}

struct RowState {
  float max, sum, best, best_score, draft;
  int64_t arg, best_arg;
  uint64_t row_base;
};

template <typename T>
__device__ __forceinline__ void accumulate(const T* w_row, const float* normed, int hidden, int m0, int count,
                                           bool vectorised, float (&acc)[kRowChunk]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRowChunk; ++r) acc[r] = 0.0f;
  constexpr int kVec = 16 / sizeof(T);
  if (vectorised) {
    for (int h = lane * kVec; h < hidden; h += 32 * kVec) {
      const uint4 bits = *reinterpret_cast<const uint4*>(w_row + h);
      const T* w = reinterpret_cast<const T*>(&bits);
      float wf[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) wf[i] = to_float(w[i]);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (r < count) {
          const float* y = normed + static_cast<int64_t>(m0 + r) * hidden + h;
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[r] += wf[i] * y[i];
        }
      }
    }
  } else {
    for (int h = lane; h < hidden; h += 32) {
      const float wf = to_float(w_row[h]);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r)
        if (r < count) acc[r] += wf * normed[static_cast<int64_t>(m0 + r) * hidden + h];
    }
  }
#pragma unroll
  for (int r = 0; r < kRowChunk; ++r)
    for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
}

__device__ __forceinline__ void update(const Params& p, RowState& st, int row, int64_t col, int64_t token, float s) {
  if (s > st.max) {
    st.sum = st.sum * __expf(st.max - s) + 1.0f;
    st.max = s;
    st.arg = col;
  } else {
    st.sum += __expf(s - st.max);
  }
  if (p.seed != nullptr) {
    const uint64_t h = splitmix64(st.row_base + static_cast<uint64_t>(token + 1) * kGolden);
    const double u = (static_cast<double>(h >> 12) + 0.5) * 0x1p-52;
    const float perturbed = s + static_cast<float>(-log(-log(u)));
    if (perturbed > st.best) st.best = perturbed, st.best_arg = col, st.best_score = s;
  }
  if (p.draft != nullptr && p.draft[row] == token) st.draft = s;
  if (p.prob_index != nullptr && p.prob_index[row] >= 0) p.probs[p.prob_index[row] * p.vocab + col] = s;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) lm_head_tile_kernel(Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (tile >= p.num_tiles) return;
  RowState st[2];
  uint64_t stream = 0;
  if (p.seed != nullptr)
    stream = splitmix64(static_cast<uint64_t>(p.seed[0]) ^ splitmix64(static_cast<uint64_t>(p.seed[1]) + kGolden));
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st[i] = RowState{-INFINITY, 0.0f, -INFINITY, -INFINITY, -INFINITY, -1, -1, 0};
    st[i].row_base = splitmix64(stream + static_cast<uint64_t>(p.row0 + lane + 32 * i + 1) * kGolden);
  }
  const T* weight = static_cast<const T*>(p.weight);
  const bool vectorised = p.hidden % (16 / sizeof(T)) == 0 && p.stride_w % (16 / sizeof(T)) == 0 &&
                          reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  const int64_t col_begin = tile * kColsPerWarp;
  const int64_t col_end = min(col_begin + kColsPerWarp, static_cast<int64_t>(p.num_cols));
  for (int64_t col = col_begin; col < col_end; ++col) {
    const int64_t token = p.subset != nullptr ? p.subset[col] : col;
    const T* w_row = weight + token * p.stride_w;
    for (int m0 = 0; m0 < p.rows; m0 += kRowChunk) {
      float acc[kRowChunk];
      accumulate<T>(w_row, p.normed, p.hidden, m0, min(kRowChunk, p.rows - m0), vectorised, acc);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        const int row = m0 + r;
        if (row < p.rows && (row & 31) == lane) {
          float s = acc[r] * p.logit_scale;
          if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
          s = s / p.temperature;
          if (row < 32) update(p, st[0], row, col, token, s);
          else update(p, st[1], row, col, token, s);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = lane + 32 * i;
    if (row >= p.rows) continue;
    const int64_t out = row * p.num_tiles + tile;
    p.tile_max[out] = st[i].max;
    p.tile_arg[out] = st[i].arg;
    p.tile_sum[out] = st[i].sum;
    if (p.seed != nullptr) {
      p.tile_best[out] = st[i].best;
      p.tile_best_arg[out] = st[i].best_arg;
      p.tile_best_score[out] = st[i].best_score;
    }
    if (p.draft != nullptr) p.tile_draft[out] = st[i].draft;
  }
}

}  // namespace fastvlm::lm_head
