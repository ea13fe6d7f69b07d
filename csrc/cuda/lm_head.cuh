// lm_head CUDA kernels (early_exit_head / verify_head): the [M, V] logits are never written.
// rms_norm_kernel: grid (M,), one CTA per row; writes the normed row rounded to T (the head's dtype).
// lm_head_mma_kernel (fp16 / bf16, sm_80+): grid (cdiv(num_cols, kTileCols = 128)), 8 warps. A CTA owns
// 128 vocabulary columns (head rows; subset[j] when given) and every row of a chunk of <= 64 rows
// (padded to 16). It streams [128 x 64] weight slices and [rows x 64] normed slices along H through a
// kStages-deep cp.async ring in shared memory (16-byte copies, zero-filled past H / V / M); warp w runs
// mma.sync m16n8k16 (ldmatrix operands, fp32 accumulation) for columns 16w..16w+15 and every 16-row
// tile. Epilogue: the fp32 [rows x 128] tile goes to shared memory, warp w reduces rows w, w + 8, ...:
// lane l feeds columns l, l + 32, l + 64, l + 96 in order to update(), then a butterfly merges the
// lanes' states (ties to the lower column). Bound: the weight's DRAM bandwidth (each byte read once per
// row chunk; 2 CTAs per SM keep up to 6 x 16 KB of it in flight); the normed slices (rows x H x 2 bytes
// per CTA) come from L2.
// lm_head_tile_kernel (fp32; CUDA cores, no tf32): grid (cdiv(num_tiles, kWarps)); a warp owns kColsPerWarp
// columns and the chunk's rows, streams each weight row with 16-byte loads and dots it with the rows
// (from L1/L2) in register chunks of kRowChunk; the lane that owns a row (lane, lane + 32) updates it.
// Both write [M, num_tiles] partials (max, first argmax, sum of exp, Gumbel-max winner, draft score) that
// the launcher merges in vocabulary order.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx.cuh"

namespace fastvlm::lm_head {

constexpr int kMaxRows = 64;  // rows per launch (both kernels)
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// CUDA-core kernel (fp32).
constexpr int kWarps = 8;
constexpr int kColsPerWarp = 16;
constexpr int kRowChunk = 8;

// Tensor-core kernel (fp16 / bf16).
constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kTileCols = kMmaWarps * 16;  // 128 vocabulary columns per CTA
constexpr int kChunkK = 64;                // H elements per pipeline stage
constexpr int kStages = 4;
constexpr int kOperandLd = kChunkK + 8;  // shared row pitch in elements (144 B: ldmatrix without conflicts)
constexpr int kScoreLd = kTileCols + 4;  // fp32 score tile pitch
constexpr int kWeightStageBytes = kTileCols * kOperandLd * 2;

// Shared memory of the tensor-core kernel for rows padded to `padded_rows` (a multiple of 16).
constexpr int mma_shared_bytes(int padded_rows) {
  const int pipeline = kStages * (kWeightStageBytes + padded_rows * kOperandLd * 2);
  const int scores = padded_rows * kScoreLd * 4;
  return pipeline > scores ? pipeline : scores;
}

struct Params {
  const void* normed;  // [rows, H] T (rounded through T), this chunk's rows
  const void* weight;  // [V, H] T, rows at stride_w
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
  bool vector_loads;  // tensor-core kernel: weight / normed rows allow 16-byte copies
};

// clang-format off
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// clang-format on

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ uint64_t noise_stream(const int64_t* seed) {
  return splitmix64(static_cast<uint64_t>(seed[0]) ^ splitmix64(static_cast<uint64_t>(seed[1]) + kGolden));
}

template <typename T>
__global__ void rms_norm_kernel(const T* hidden, int64_t stride_h, const T* norm_weight, T* out, int hidden_size,
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
    out[row * hidden_size + h] = from_float<T>(to_float(x[h]) * inv * (norm_offset + to_float(norm_weight[h])));
}

// ---- per-row state over columns (shared by both kernels) ---------------------------------------------
struct RowState {
  float max, sum, best, best_score, draft;
  int64_t arg, best_arg;
  uint64_t row_base;
};

__device__ __forceinline__ RowState initial_state(uint64_t stream, int64_t global_row) {
  return RowState{-INFINITY, 0.0f, -INFINITY, -INFINITY,
                  -INFINITY, -1,   -1,        splitmix64(stream + static_cast<uint64_t>(global_row + 1) * kGolden)};
}

// The raw dot product of a row and a column to its score: logit_scale, soft-cap, temperature.
__device__ __forceinline__ float score_of(const Params& p, float dot) {
  float s = dot * p.logit_scale;
  if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
  return s / p.temperature;
}

// Folds column `col` (vocabulary id `token`) with score s into a row's state; columns arrive in increasing
// order per state. draft_token: the row's draft (-1 none); probs_row: the row's probability row or null.
__device__ __forceinline__ void update(const Params& p, RowState& st, int64_t draft_token, float* probs_row,
                                       int64_t col, int64_t token, float s) {
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
  if (p.draft != nullptr && draft_token == token) st.draft = s;
  if (probs_row != nullptr) probs_row[col] = s;
}

__device__ __forceinline__ int64_t draft_of(const Params& p, int row) { return p.draft != nullptr ? p.draft[row] : -1; }

__device__ __forceinline__ float* probs_row_of(const Params& p, int row) {
  if (p.prob_index == nullptr || p.prob_index[row] < 0) return nullptr;
  return p.probs + static_cast<int64_t>(p.prob_index[row]) * p.vocab;
}

__device__ __forceinline__ void store_partials(const Params& p, const RowState& st, int row, int64_t tile) {
  const int64_t out = row * p.num_tiles + tile;
  p.tile_max[out] = st.max;
  p.tile_arg[out] = st.arg;
  p.tile_sum[out] = st.sum;
  if (p.seed != nullptr) {
    p.tile_best[out] = st.best;
    p.tile_best_arg[out] = st.best_arg;
    p.tile_best_score[out] = st.best_score;
  }
  if (p.draft != nullptr) p.tile_draft[out] = st.draft;
}

// a < b as columns, where -1 (no column) is above every column.
__device__ __forceinline__ bool lower_column(int64_t a, int64_t b) {
  return static_cast<uint64_t>(a) < static_cast<uint64_t>(b);
}

// Merges the state of disjoint columns `other` into `st`: the larger max wins, equal maxima keep the lower
// column (so the result is the first argmax whatever the lanes' column order); sums are rescaled to the
// common max (a state without columns has max -inf and sum 0 and adds nothing). Symmetric, so every lane
// of a butterfly ends with the same state.
__device__ __forceinline__ void merge_state(RowState& st, const RowState& other) {
  const float m = fmaxf(st.max, other.max);
  const float mine = st.max == -INFINITY ? 0.0f : st.sum * __expf(st.max - m);
  const float theirs = other.max == -INFINITY ? 0.0f : other.sum * __expf(other.max - m);
  if (other.max > st.max || (other.max == st.max && lower_column(other.arg, st.arg))) st.arg = other.arg;
  st.max = m;
  st.sum = mine + theirs;
  if (other.best > st.best || (other.best == st.best && lower_column(other.best_arg, st.best_arg))) {
    st.best = other.best;
    st.best_arg = other.best_arg;
    st.best_score = other.best_score;
  }
  st.draft = fmaxf(st.draft, other.draft);  // at most one column of the vocabulary is the draft token
}

__device__ __forceinline__ void warp_merge(const Params& p, RowState& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    RowState other;
    other.max = __shfl_xor_sync(0xffffffffu, st.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, st.sum, offset);
    other.arg = __shfl_xor_sync(0xffffffffu, st.arg, offset);
    if (p.seed != nullptr) {
      other.best = __shfl_xor_sync(0xffffffffu, st.best, offset);
      other.best_arg = __shfl_xor_sync(0xffffffffu, st.best_arg, offset);
      other.best_score = __shfl_xor_sync(0xffffffffu, st.best_score, offset);
    } else {
      other.best = st.best, other.best_arg = st.best_arg, other.best_score = st.best_score;
    }
    other.draft = p.draft != nullptr ? __shfl_xor_sync(0xffffffffu, st.draft, offset) : st.draft;
    merge_state(st, other);
  }
}

// ---- tensor-core kernel (fp16 / bf16) ------------------------------------------------------------------
// Weight slices are copied with an evict-first L2 policy (the head is streamed once; the normed rows stay for
// the other CTAs).
using ptx::cp_async_16;
using ptx::cp_async_16_evict_first;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::l2_evict_first_policy;
using ptx::ldmatrix_x4;
using ptx::mma_m16n8k16;
using ptx::shared_address;

// 8 elements at `src` (those at index >= limit, or all when !valid, read as zero) into 16 bytes of shared
// memory with plain loads: the path for rows that are not 16-byte aligned (odd H, offset views).
template <typename T>
__device__ __forceinline__ void copy_8_scalar(T* shared, const T* src, bool valid, int limit) {
  union {
    uint4 bits;
    T v[8];
  } pack;
#pragma unroll
  for (int e = 0; e < 8; ++e) pack.v[e] = valid && e < limit ? src[e] : from_float<T>(0.0f);
  *reinterpret_cast<uint4*>(shared) = pack.bits;
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 2) lm_head_mma_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char shared_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tile = blockIdx.x;
  const int64_t col0 = tile * kTileCols;
  const int m_tiles = (p.rows + 15) / 16;
  const int padded_rows = m_tiles * 16;
  const int stage_bytes = kWeightStageBytes + padded_rows * kOperandLd * 2;
  const T* weight = static_cast<const T*>(p.weight);
  const T* normed = static_cast<const T*>(p.normed);

  // Loader: thread tid copies 16-byte segment tid % 8 of weight rows tid / 8 + 32 j (j < 4) and of
  // normed rows tid / 8 + 32 j (j < 2), so 8 neighbouring threads read one row's 128 contiguous bytes.
  const int seg = tid % 8;
  const T* w_src[4];
  bool w_ok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = col0 + tid / 8 + 32 * j;
    w_ok[j] = col < p.num_cols;
    const int64_t token = !w_ok[j] ? 0 : p.subset != nullptr ? p.subset[col] : col;
    w_src[j] = weight + token * p.stride_w + seg * 8;
  }
  const uint64_t evict_first = l2_evict_first_policy();

  const auto load_stage = [&](int chunk) {
    unsigned char* stage = shared_raw + (chunk % kStages) * stage_bytes;
    T* w_dst = reinterpret_cast<T*>(stage);
    T* a_dst = reinterpret_cast<T*>(stage + kWeightStageBytes);
    const int k = chunk * kChunkK + seg * 8;
    const int limit = p.hidden - k;  // elements of this segment inside H
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      T* dst = w_dst + (tid / 8 + 32 * j) * kOperandLd + seg * 8;
      if (p.vector_loads)
        cp_async_16_evict_first(shared_address(dst), limit > 0 ? w_src[j] + chunk * kChunkK : weight,
                                w_ok[j] && limit > 0, evict_first);
      else
        copy_8_scalar(dst, w_src[j] + chunk * kChunkK, w_ok[j], limit);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = tid / 8 + 32 * j;
      if (r < padded_rows) {
        T* dst = a_dst + r * kOperandLd + seg * 8;
        const bool ok = r < p.rows;
        const T* src = normed + static_cast<int64_t>(ok ? r : 0) * p.hidden + k;
        if (p.vector_loads)
          cp_async_16(shared_address(dst), ok && limit > 0 ? src : normed, ok && limit > 0);
        else
          copy_8_scalar(dst, src, ok, limit);
      }
    }
  };

  float acc[kMaxRows / 16][2][4];  // [16-row tile][8-column half of the warp's 16][mma C fragment]
#pragma unroll
  for (int mt = 0; mt < kMaxRows / 16; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  // ldmatrix.x4 row addresses: lane l feeds row l % 8 of 8x8 matrix l / 8. Weight (B, [n][k] in shared):
  // matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) give the B fragments of
  // the warp's two 8-column halves; normed (A, [m][k]): (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
  // (m 8-15, k 8-15) give the A fragment of a 16-row tile.
  const int quad = lane / 8;
  const int b_offset = (warp * 16 + (quad / 2) * 8 + lane % 8) * kOperandLd + (quad % 2) * 8;
  const int a_offset = ((quad % 2) * 8 + lane % 8) * kOperandLd + (quad / 2) * 8;

  // Ring of kStages slices: slice c lives in stage c % kStages; one commit group per slice (empty past
  // the end), so wait_group<kStages - 2> at step c means slice c has landed for this thread, and the
  // barrier after it makes every thread's copies visible and retires step c - 1's reads of the stage
  // that the next load overwrites.
  const int num_chunks = (p.hidden + kChunkK - 1) / kChunkK;
#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) {
    if (c < num_chunks) load_stage(c);
    cp_async_commit();
  }
  for (int c = 0; c < num_chunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (c + kStages - 1 < num_chunks) load_stage(c + kStages - 1);
    cp_async_commit();
    const unsigned char* stage = shared_raw + (c % kStages) * stage_bytes;
    const T* w_tile = reinterpret_cast<const T*>(stage);
    const T* a_tile = reinterpret_cast<const T*>(stage + kWeightStageBytes);
#pragma unroll
    for (int kk = 0; kk < kChunkK; kk += 16) {
      uint32_t b[4];
      ldmatrix_x4(b, shared_address(w_tile + b_offset + kk));
#pragma unroll
      for (int mt = 0; mt < kMaxRows / 16; ++mt) {
        if (mt < m_tiles) {
          uint32_t a[4];
          ldmatrix_x4(a, shared_address(a_tile + mt * 16 * kOperandLd + a_offset + kk));
          mma_m16n8k16<T>(acc[mt][0], a, b[0], b[1]);
          mma_m16n8k16<T>(acc[mt][1], a, b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: the score tile reuses its memory

  // C fragment: lane l holds (row l / 4, columns 2 (l % 4) + {0, 1}) in [0], [1] and row + 8 in [2], [3].
  float* scores = reinterpret_cast<float*>(shared_raw);
#pragma unroll
  for (int mt = 0; mt < kMaxRows / 16; ++mt) {
    if (mt < m_tiles) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float* out = scores + (mt * 16 + lane / 4) * kScoreLd + warp * 16 + nt * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(out) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(out + 8 * kScoreLd) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
    }
  }
  __syncthreads();

  const uint64_t stream = p.seed != nullptr ? noise_stream(p.seed) : 0;
  int64_t token[kTileCols / 32];
#pragma unroll
  for (int j = 0; j < kTileCols / 32; ++j) {
    const int64_t col = col0 + lane + 32 * j;
    token[j] = col >= p.num_cols ? -1 : p.subset != nullptr ? p.subset[col] : col;
  }
  for (int row = warp; row < p.rows; row += kMmaWarps) {
    RowState st = initial_state(stream, p.row0 + row);
    const int64_t draft_token = draft_of(p, row);
    float* probs_row = probs_row_of(p, row);
#pragma unroll
    for (int j = 0; j < kTileCols / 32; ++j)
      if (token[j] >= 0)
        update(p, st, draft_token, probs_row, col0 + lane + 32 * j, token[j],
               score_of(p, scores[row * kScoreLd + lane + 32 * j]));
    warp_merge(p, st);
    if (lane == 0) store_partials(p, st, row, tile);
  }
#else
  __trap();  // the launcher sends sm < 80 nowhere near this kernel
#endif
}

// ---- CUDA-core kernel (fp32) -----------------------------------------------------------------------------
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

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) lm_head_tile_kernel(Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (tile >= p.num_tiles) return;
  const uint64_t stream = p.seed != nullptr ? noise_stream(p.seed) : 0;
  RowState st[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) st[i] = initial_state(stream, p.row0 + lane + 32 * i);
  const T* weight = static_cast<const T*>(p.weight);
  const float* normed = static_cast<const float*>(p.normed);
  const bool vectorised = p.hidden % (16 / sizeof(T)) == 0 && p.stride_w % (16 / sizeof(T)) == 0 &&
                          reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  const int64_t col_begin = tile * kColsPerWarp;
  const int64_t col_end = min(col_begin + kColsPerWarp, static_cast<int64_t>(p.num_cols));
  for (int64_t col = col_begin; col < col_end; ++col) {
    const int64_t token = p.subset != nullptr ? p.subset[col] : col;
    const T* w_row = weight + token * p.stride_w;
    for (int m0 = 0; m0 < p.rows; m0 += kRowChunk) {
      float acc[kRowChunk];
      accumulate<T>(w_row, normed, p.hidden, m0, min(kRowChunk, p.rows - m0), vectorised, acc);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        const int row = m0 + r;
        if (row < p.rows && (row & 31) == lane) {
          const float s = score_of(p, acc[r]);
          if (row < 32)
            update(p, st[0], draft_of(p, row), probs_row_of(p, row), col, token, s);
          else
            update(p, st[1], draft_of(p, row), probs_row_of(p, row), col, token, s);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = lane + 32 * i;
    if (row < p.rows) store_partials(p, st[i], row, tile);
  }
}

}  // namespace fastvlm::lm_head
