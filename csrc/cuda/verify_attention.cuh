// verify_attention kernels: T new tokens of a KV-head group attend to their row's cache in one pass.
// Grid: 1-D, one CTA per (batch row b * KV head, block of 64 query rows, KV split). A group's query rows
// are flattened as r = t * G + g (new token t, query head Hkv_index * G + g), so a block covers a range
// of tokens and a causal chain bounds its keys by its last token. Each K/V tile (64 positions, 32 for
// D = 256) is loaded once into shared memory for all rows of the block; online softmax in fp32 (log2
// domain). Decode shapes are memory bound (each cached byte is read once per group); prefill with T in
// the thousands is compute bound. With num_splits > 1 each split writes normalised partial outputs and
// a log2-sum-exp to a workspace, merged by verify_attention_merge_kernel.
// Two compute paths share the loaders, masking and epilogue:
//   - CudaCoreKernel (all dtypes; the only one for fp32): 8 warps x 8 rows; for S = QK^T a lane owns
//     keys lane and lane + 32, for O += PV a lane owns D / 32 contiguous dims. fp32 FMA, no tf32.
//   - TensorCoreKernel (fp16 / bf16, sm_80+): 4 warps x 16 rows; nvcuda::wmma 16x16x16 fragments with fp32
//     accumulation for QK^T and PV; S, P and the O accumulator live in the warp's shared-memory slice so
//     that the softmax is plain per-row thread code (a wmma accumulator's element layout is unspecified).
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace fastvlm::verify_attention {

// ---- parameters ------------------------------------------------------------------------------------
struct Params {
  const void* q;            // [B, Hq, T, D]
  const void* k_cache;      // [B, Hkv, L_max, D]
  const void* v_cache;      // [B, Hkv, L_max, D]
  void* out;                // [B, Hq, T, D], q's dtype
  float* lse;               // [B, Hq, T] contiguous, natural log; nullptr when not requested
  const int32_t* prefix_lens;   // [B]
  const int64_t* tree_mask;     // [B, T] contiguous; nullptr for a causal chain
  float* partial_out;       // [num_splits, B, Hq, T, D] fp32, normalised per split; used when num_splits > 1
  float* partial_lse;       // [num_splits, B, Hq, T] fp32, log2 domain; used when num_splits > 1

  int64_t q_stride_b, q_stride_h, q_stride_t;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t out_stride_b, out_stride_h, out_stride_t;

  int batch, num_q_heads, num_kv_heads, group;  // group = Hq / Hkv
  int num_new;        // T
  int cache_len;      // L_max
  int head_dim;       // D, a multiple of 16, <= the instance's padded head dim
  int num_query_blocks;
  int num_splits;
  float scale_log2;   // sm_scale * log2(e)
  bool vector_loads;  // q, k_cache, v_cache pointers and strides allow 16-byte loads
};

constexpr int kBlockM = 64;  // query rows per CTA, both paths
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Keys per tile: 64, or 32 for D = 256 so that the tiles fit in an A100's shared memory.
template <int kHeadDimPadded>
constexpr int block_n() { return kHeadDimPadded > 128 ? 32 : 64; }

// ---- element conversions ---------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int kBytes> struct RawVector;
template <> struct RawVector<4> { using type = uint32_t; };
template <> struct RawVector<8> { using type = uint2; };
template <> struct RawVector<16> { using type = uint4; };

// Reads N elements of T (N * sizeof(T) in {4, 8, 16, 32} bytes, `src` aligned to that size up to 16)
// from shared memory with vector loads and widens them to fp32.
template <int N, typename T>
__device__ __forceinline__ void load_as_float(const T* src, float* dst) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes > 16) {
    load_as_float<N / 2>(src, dst);
    load_as_float<N / 2>(src + N / 2, dst + N / 2);
  } else {
    using Raw = typename RawVector<kBytes>::type;
    const Raw raw = *reinterpret_cast<const Raw*>(src);
    T elements[N];
    memcpy(elements, &raw, kBytes);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_float(elements[i]);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ---- what one CTA owns -----------------------------------------------------------------------------
struct BlockWork {
  int b, kv_head, query_block, split;
  int row_begin, num_rows;  // flattened rows [row_begin, row_begin + num_rows) of T * G
  int prefix;               // prefix_lens[b] clamped to [0, L_max - T]
  int kv_begin, kv_stop;    // the positions this split reads; empty when kv_begin >= kv_stop
};

__device__ __forceinline__ BlockWork block_work(const Params& p, int block_n) {
  BlockWork w;
  int64_t index = blockIdx.x;
  w.split = static_cast<int>(index % p.num_splits);
  index /= p.num_splits;
  w.query_block = static_cast<int>(index % p.num_query_blocks);
  const int bh = static_cast<int>(index / p.num_query_blocks);
  w.b = bh / p.num_kv_heads;
  w.kv_head = bh % p.num_kv_heads;

  const int total_rows = p.num_new * p.group;
  w.row_begin = w.query_block * kBlockM;
  w.num_rows = min(kBlockM, total_rows - w.row_begin);

  const int max_prefix = max(p.cache_len - p.num_new, 0);
  w.prefix = min(max(p.prefix_lens[w.b], 0), max_prefix);
  const int last_token = (w.row_begin + w.num_rows - 1) / p.group;
  const int new_visible = p.tree_mask != nullptr ? p.num_new : min(p.num_new, last_token + 1);
  const int kv_end = min(w.prefix + new_visible, p.cache_len);

  // Splits divide this block's own range into whole tiles, so they stay balanced whatever L_max is.
  const int per_split = (kv_end + p.num_splits - 1) / p.num_splits;
  const int chunk = (per_split + block_n - 1) / block_n * block_n;
  w.kv_begin = w.split * chunk;
  w.kv_stop = min(kv_end, w.kv_begin + chunk);
  return w;
}

// Per-row facts the masking needs, kept in shared memory: the row's new-token index and tree bits.
struct RowInfo {
  uint64_t tree_bits;
  int token;  // t; -1 for a padding row past T * G (sees nothing new; never written)
};

__device__ __forceinline__ void load_row_info(const Params& p, const BlockWork& w, RowInfo* rows) {
  for (int r = threadIdx.x; r < kBlockM; r += blockDim.x) {
    RowInfo info{0, -1};
    if (r < w.num_rows) {
      info.token = (w.row_begin + r) / p.group;
      if (p.tree_mask != nullptr) {
        info.tree_bits = static_cast<uint64_t>(p.tree_mask[static_cast<int64_t>(w.b) * p.num_new + info.token]);
      }
    }
    rows[r] = info;
  }
}

// May a query row see cache position `pos`? Prefix always, new token i per the chain / tree, nothing else.
__device__ __forceinline__ bool is_visible(const RowInfo& row, int pos, const BlockWork& w, int num_new,
                                           bool has_tree) {
  if (pos >= w.kv_stop) return false;
  if (pos < w.prefix) return true;
  const int i = pos - w.prefix;
  if (i >= num_new || row.token < 0) return false;
  return has_tree ? (i < 64 && ((row.tree_bits >> i) & 1u) != 0) : i <= row.token;
}

// ---- global -> shared loaders ----------------------------------------------------------------------
// Copies rows [0, num_valid) of a [rows, head_dim] global matrix (row stride in elements) into a
// [kRows, kHeadDimPadded] shared tile with row stride smem_stride, zero-filling padding rows and dims.
template <typename T, int kRows, int kHeadDimPadded, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, int smem_stride, const T* gmem, int64_t gmem_stride,
                                          int num_valid, int head_dim, bool vector_loads) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kHeadDimPadded / kVec;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int base = 0; base < kChunks; base += kThreads) {
    const int chunk = base + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads != 0 && chunk >= kChunks) break;
    const int row = chunk / kChunksPerRow;
    const int dim = (chunk % kChunksPerRow) * kVec;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (row < num_valid && dim < head_dim) {  // head_dim is a multiple of 16: a chunk is all in or all out
      const T* src = gmem + row * gmem_stride + dim;
      if (vector_loads) {
        raw = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        T elements[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) elements[i] = src[i];
        memcpy(&raw, elements, 16);
      }
    }
    *reinterpret_cast<uint4*>(smem + row * smem_stride + dim) = raw;
  }
}

// The block's query rows: row r is token t = (row_begin + r) / G of query head kv_head * G + g.
// StoreT = float stores q * scale (the CUDA-core path); StoreT = T stores q unchanged (wmma operands).
template <typename T, typename StoreT, int kHeadDimPadded, int kThreads>
__device__ __forceinline__ void load_query_tile(StoreT* smem, int smem_stride, const Params& p,
                                                const BlockWork& w, float scale) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kHeadDimPadded / kVec;
  const T* q = static_cast<const T*>(p.q) + w.b * p.q_stride_b;
  for (int chunk = threadIdx.x; chunk < kBlockM * kChunksPerRow; chunk += kThreads) {
    const int row = chunk / kChunksPerRow;
    const int dim = (chunk % kChunksPerRow) * kVec;
    T elements[kVec];
    if (row < w.num_rows && dim < p.head_dim) {
      const int flat = w.row_begin + row;
      const int token = flat / p.group;
      const int head = w.kv_head * p.group + flat % p.group;
      const T* src = q + head * p.q_stride_h + token * p.q_stride_t + dim;
      if (p.vector_loads) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
        memcpy(elements, &raw, 16);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) elements[i] = src[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) elements[i] = from_float<T>(0.0f);
    }
    StoreT* dst = smem + row * smem_stride + dim;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if constexpr (sizeof(StoreT) == sizeof(float)) {
        dst[i] = to_float(elements[i]) * scale;
      } else {
        dst[i] = elements[i];
      }
    }
  }
}

// ---- epilogue ----------------------------------------------------------------------------------------
// Writes `count` (<= kMaxCount) consecutive dims starting at `dim` of one query row, given its
// unnormalised fp32 accumulator, running max m (log2 domain) and sum l, and the row's lse when
// write_lse. A row that saw nothing gets 0 and -inf. kMaxCount is a constant so that the loop unrolls
// and a register-array accumulator keeps constant indices.
template <typename T, int kMaxCount>
__device__ __forceinline__ void write_row(const Params& p, const BlockWork& w, int row, int dim,
                                          const float* acc, int count, float m, float l, bool write_lse) {
  const int flat = w.row_begin + row;
  const int token = flat / p.group;
  const int head = w.kv_head * p.group + flat % p.group;
  const int64_t row_id = (static_cast<int64_t>(w.b) * p.num_q_heads + head) * p.num_new + token;
  const bool empty = !(l > 0.0f);
  const float inv_l = empty ? 0.0f : 1.0f / l;
  const float lse_log2 = empty ? -INFINITY : m + log2f(l);
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + w.b * p.out_stride_b + head * p.out_stride_h + token * p.out_stride_t;
#pragma unroll
    for (int i = 0; i < kMaxCount; ++i) {
      if (i < count) out[dim + i] = from_float<T>(empty ? 0.0f : acc[i] * inv_l);
    }
    if (write_lse && p.lse != nullptr) p.lse[row_id] = lse_log2 * kLn2;
  } else {
    const int64_t total_rows = static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_new;
    const int64_t split_row = w.split * total_rows + row_id;
    float* out = p.partial_out + split_row * p.head_dim;
#pragma unroll
    for (int i = 0; i < kMaxCount; ++i) {
      if (i < count) out[dim + i] = empty ? 0.0f : acc[i] * inv_l;
    }
    if (write_lse) p.partial_lse[split_row] = lse_log2;
  }
}

// ---- CUDA-core path ---------------------------------------------------------------------------------
template <typename T, int kHeadDimPadded>
struct CudaCoreConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;              // 8
  static constexpr int kBlockN = block_n<kHeadDimPadded>();
  static constexpr int kKeysPerLane = kBlockN / 32;                  // 2, or 1 for D = 256
  static constexpr int kDimsPerLane = kHeadDimPadded / 32;           // 2, 4 or 8
  static constexpr int kVec = 16 / sizeof(T);                        // elements per 16-byte vector
  static constexpr int kQueryStride = kHeadDimPadded;                // fp32, read as broadcasts
  static constexpr int kKeyStride = kHeadDimPadded + kVec;           // +16 B: conflict-free row-per-lane reads
  static constexpr int kValueStride = kHeadDimPadded;                // read row-contiguously
  static constexpr size_t kQueryBytes = sizeof(float) * kBlockM * kQueryStride;
  static constexpr size_t kKeyBytes = sizeof(T) * kBlockN * kKeyStride;
  static constexpr size_t kValueBytes = sizeof(T) * kBlockN * kValueStride;
  static constexpr size_t kProbBytes = sizeof(float) * kBlockM * kBlockN;
  static constexpr size_t kRowInfoBytes = sizeof(RowInfo) * kBlockM;
  static constexpr size_t kSharedBytes = kQueryBytes + kKeyBytes + kValueBytes + kProbBytes + kRowInfoBytes;
};

template <typename T, int kHeadDimPadded>
__global__ void __launch_bounds__(CudaCoreConfig<T, kHeadDimPadded>::kThreads)
verify_attention_cuda_core_kernel(const Params p) {
  using Config = CudaCoreConfig<T, kHeadDimPadded>;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kRows = Config::kRowsPerWarp;
  constexpr int kKeys = Config::kKeysPerLane;
  constexpr int kDims = Config::kDimsPerLane;
  constexpr int kVec = Config::kVec;

  extern __shared__ __align__(128) unsigned char shared_raw[];
  float* query_tile = reinterpret_cast<float*>(shared_raw);
  T* key_tile = reinterpret_cast<T*>(shared_raw + Config::kQueryBytes);
  T* value_tile = reinterpret_cast<T*>(shared_raw + Config::kQueryBytes + Config::kKeyBytes);
  float* prob_tile = reinterpret_cast<float*>(shared_raw + Config::kQueryBytes + Config::kKeyBytes +
                                              Config::kValueBytes);
  RowInfo* row_info = reinterpret_cast<RowInfo*>(shared_raw + Config::kQueryBytes + Config::kKeyBytes +
                                                 Config::kValueBytes + Config::kProbBytes);

  const BlockWork w = block_work(p, kBlockN);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row = warp * kRows;  // first of this warp's rows within the block
  const bool warp_active = warp_row < w.num_rows;
  const bool has_tree = p.tree_mask != nullptr;

  load_query_tile<T, float, kHeadDimPadded, Config::kThreads>(query_tile, Config::kQueryStride, p, w,
                                                              p.scale_log2);
  load_row_info(p, w, row_info);

  float m[kRows], l[kRows], acc[kRows][kDims];  // l: this lane's keys only, summed over the warp at the end
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[r][i] = 0.0f;
  }

  const T* keys = static_cast<const T*>(p.k_cache) + w.b * p.k_stride_b + w.kv_head * p.k_stride_h;
  const T* values = static_cast<const T*>(p.v_cache) + w.b * p.v_stride_b + w.kv_head * p.v_stride_h;
  float* probs = prob_tile + warp_row * kBlockN;

  for (int tile_start = w.kv_begin; tile_start < w.kv_stop; tile_start += kBlockN) {
    const int tile_valid = min(kBlockN, w.kv_stop - tile_start);
    __syncthreads();  // the previous tile is consumed (and, first time, the query tile is stored)
    load_tile<T, kBlockN, kHeadDimPadded, Config::kThreads>(key_tile, Config::kKeyStride,
        keys + tile_start * p.k_stride_l, p.k_stride_l, tile_valid, p.head_dim, p.vector_loads);
    load_tile<T, kBlockN, kHeadDimPadded, Config::kThreads>(value_tile, Config::kValueStride,
        values + tile_start * p.v_stride_l, p.v_stride_l, tile_valid, p.head_dim, p.vector_loads);
    __syncthreads();
    if (!warp_active) continue;

    // S = (q * scale * log2 e) . k for this warp's rows and this lane's keys.
    float s[kRows][kKeys];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int j = 0; j < kKeys; ++j) s[r][j] = 0.0f;
    }
#pragma unroll 2
    for (int d0 = 0; d0 < p.head_dim; d0 += kVec) {
      float k[kKeys][kVec];
#pragma unroll
      for (int j = 0; j < kKeys; ++j) load_as_float<kVec>(key_tile + (lane + 32 * j) * Config::kKeyStride + d0, k[j]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float* q_row = query_tile + (warp_row + r) * Config::kQueryStride + d0;
#pragma unroll
        for (int v4 = 0; v4 < kVec; v4 += 4) {
          const float4 q4 = *reinterpret_cast<const float4*>(q_row + v4);
#pragma unroll
          for (int j = 0; j < kKeys; ++j) {
            s[r][j] = fmaf(q4.x, k[j][v4 + 0], s[r][j]);
            s[r][j] = fmaf(q4.y, k[j][v4 + 1], s[r][j]);
            s[r][j] = fmaf(q4.z, k[j][v4 + 2], s[r][j]);
            s[r][j] = fmaf(q4.w, k[j][v4 + 3], s[r][j]);
          }
        }
      }
    }

    // Mask only tiles that reach past the prefix (or past this split's end).
    if (tile_start + kBlockN > w.prefix || tile_start + kBlockN > w.kv_stop) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const RowInfo row = row_info[warp_row + r];
#pragma unroll
        for (int j = 0; j < kKeys; ++j) {
          if (!is_visible(row, tile_start + lane + 32 * j, w, p.num_new, has_tree)) s[r][j] = -INFINITY;
        }
      }
    }

    // Online softmax: rescale by exp2(m_old - m_new); a row with nothing visible yet keeps m = -inf
    // and uses 0 as its reference so that no -inf - -inf appears.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tile_max = s[r][0];
#pragma unroll
      for (int j = 1; j < kKeys; ++j) tile_max = fmaxf(tile_max, s[r][j]);
      const float m_new = fmaxf(m[r], warp_max(tile_max));
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - m_ref);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[r][i] *= alpha;
#pragma unroll
      for (int j = 0; j < kKeys; ++j) {
        const float prob = exp2f(s[r][j] - m_ref);
        l[r] += prob;
        probs[r * kBlockN + lane + 32 * j] = prob;
      }
    }
    __syncwarp();

    // O += P V: this lane's dims [lane * kDims, lane * kDims + kDims) for the warp's rows.
#pragma unroll 2
    for (int n0 = 0; n0 < kBlockN; n0 += 4) {
      float v[4][kDims];
#pragma unroll
      for (int n = 0; n < 4; ++n) load_as_float<kDims>(value_tile + (n0 + n) * Config::kValueStride + lane * kDims, v[n]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float4 p4 = *reinterpret_cast<const float4*>(probs + r * kBlockN + n0);
#pragma unroll
        for (int i = 0; i < kDims; ++i) {
          acc[r][i] = fmaf(p4.x, v[0][i], acc[r][i]);
          acc[r][i] = fmaf(p4.y, v[1][i], acc[r][i]);
          acc[r][i] = fmaf(p4.z, v[2][i], acc[r][i]);
          acc[r][i] = fmaf(p4.w, v[3][i], acc[r][i]);
        }
      }
    }
    __syncwarp();  // probs is rewritten by the next tile
  }

  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float row_sum = warp_sum(l[r]);
    if (warp_row + r >= w.num_rows) continue;
    const int dim = lane * kDims;
    const int count = dim < p.head_dim ? kDims : 0;  // kDims divides 16, and so head_dim
    write_row<T, kDims>(p, w, warp_row + r, dim, acc[r], count, m[r], row_sum, lane == 0);
  }
}

// ---- tensor-core path (fp16 / bf16) -----------------------------------------------------------------
template <typename T, int kHeadDimPadded>
struct TensorCoreConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16;                            // one wmma row of fragments
  static constexpr int kBlockN = block_n<kHeadDimPadded>();
  static constexpr int kPad = 8;                                     // 16 B: wmma ldm % 8 == 0, fewer bank conflicts
  static constexpr int kOperandStride = kHeadDimPadded + kPad;       // Q, K, V tiles (T)
  static constexpr int kScoreStride = kBlockN + 4;                   // S (fp32), per warp
  static constexpr int kProbStride = kBlockN + kPad;                 // P (T), per warp
  static constexpr int kAccStride = kHeadDimPadded + 4;              // O (fp32), per warp
  static constexpr size_t kQueryBytes = sizeof(T) * kBlockM * kOperandStride;
  static constexpr size_t kKeyBytes = sizeof(T) * kBlockN * kOperandStride;
  static constexpr size_t kValueBytes = kKeyBytes;
  static constexpr size_t kScoreBytes = sizeof(float) * kBlockM * kScoreStride;
  static constexpr size_t kProbBytes = sizeof(T) * kBlockM * kProbStride;
  static constexpr size_t kAccBytes = sizeof(float) * kBlockM * kAccStride;
  static constexpr size_t kRowInfoBytes = sizeof(RowInfo) * kBlockM;
  static constexpr size_t kSharedBytes =
      kQueryBytes + kKeyBytes + kValueBytes + kScoreBytes + kProbBytes + kAccBytes + kRowInfoBytes;
  // Every region size is a multiple of 32 bytes, so each region starts 32-byte aligned as wmma requires.
  static_assert(kQueryBytes % 32 == 0 && kKeyBytes % 32 == 0 && kScoreBytes % 32 == 0 && kProbBytes % 32 == 0 &&
                kAccBytes % 32 == 0, "wmma needs 32-byte aligned shared-memory regions");
};

template <typename T, int kHeadDimPadded>
__global__ void __launch_bounds__(TensorCoreConfig<T, kHeadDimPadded>::kThreads)
verify_attention_tensor_core_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the launcher only picks this path on sm_80+
#else
  namespace wmma = nvcuda::wmma;
  using Config = TensorCoreConfig<T, kHeadDimPadded>;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kRows = Config::kRowsPerWarp;
  constexpr int kKeysPerLane = kBlockN / 2;         // two lanes per row, each half of the keys
  constexpr int kDimsPerLane = kHeadDimPadded / 2;  // and half of the dims

  extern __shared__ __align__(128) unsigned char shared_raw[];
  unsigned char* cursor = shared_raw;
  T* query_tile = reinterpret_cast<T*>(cursor);      cursor += Config::kQueryBytes;
  T* key_tile = reinterpret_cast<T*>(cursor);        cursor += Config::kKeyBytes;
  T* value_tile = reinterpret_cast<T*>(cursor);      cursor += Config::kValueBytes;
  float* score_tile = reinterpret_cast<float*>(cursor); cursor += Config::kScoreBytes;
  T* prob_tile = reinterpret_cast<T*>(cursor);       cursor += Config::kProbBytes;
  float* acc_tile = reinterpret_cast<float*>(cursor); cursor += Config::kAccBytes;
  RowInfo* row_info = reinterpret_cast<RowInfo*>(cursor);

  const BlockWork w = block_work(p, kBlockN);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row = warp * kRows;
  const bool warp_active = warp_row < w.num_rows;
  const bool has_tree = p.tree_mask != nullptr;
  // In the softmax and epilogue, lanes 2r and 2r + 1 share row r of the warp's 16.
  const int my_row = lane / 2;
  const int my_half = lane % 2;

  const T* warp_queries = query_tile + warp_row * Config::kOperandStride;
  float* scores = score_tile + warp_row * Config::kScoreStride;
  T* probs = prob_tile + warp_row * Config::kProbStride;
  float* acc = acc_tile + warp_row * Config::kAccStride;

  load_query_tile<T, T, kHeadDimPadded, Config::kThreads>(query_tile, Config::kOperandStride, p, w, 1.0f);
  load_row_info(p, w, row_info);
  for (int i = lane; i < kRows * Config::kAccStride; i += 32) acc[i] = 0.0f;

  float m = -INFINITY;  // of row my_row, identical in both lanes of the pair
  float l = 0.0f;       // this lane's half of the keys

  const T* keys = static_cast<const T*>(p.k_cache) + w.b * p.k_stride_b + w.kv_head * p.k_stride_h;
  const T* values = static_cast<const T*>(p.v_cache) + w.b * p.v_stride_b + w.kv_head * p.v_stride_h;
  const int head_dim_steps = p.head_dim / 16;

  for (int tile_start = w.kv_begin; tile_start < w.kv_stop; tile_start += kBlockN) {
    const int tile_valid = min(kBlockN, w.kv_stop - tile_start);
    __syncthreads();
    load_tile<T, kBlockN, kHeadDimPadded, Config::kThreads>(key_tile, Config::kOperandStride,
        keys + tile_start * p.k_stride_l, p.k_stride_l, tile_valid, p.head_dim, p.vector_loads);
    load_tile<T, kBlockN, kHeadDimPadded, Config::kThreads>(value_tile, Config::kOperandStride,
        values + tile_start * p.v_stride_l, p.v_stride_l, tile_valid, p.head_dim, p.vector_loads);
    __syncthreads();
    if (!warp_active) continue;

    // S[16, kBlockN] = Q[16, D] K[kBlockN, D]^T (K read as a column-major D x kBlockN matrix).
#pragma unroll
    for (int n0 = 0; n0 < kBlockN; n0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
      for (int step = 0; step < head_dim_steps; ++step) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(q_frag, warp_queries + step * 16, Config::kOperandStride);
        wmma::load_matrix_sync(k_frag, key_tile + n0 * Config::kOperandStride + step * 16, Config::kOperandStride);
        wmma::mma_sync(s_frag, q_frag, k_frag, s_frag);
      }
      wmma::store_matrix_sync(scores + n0, s_frag, Config::kScoreStride, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row my_row; the lane pair interleaves keys (n = 2j + my_half) and dims, so that
    // the two lanes of a row touch neighbouring shared-memory words.
    {
      const RowInfo row = row_info[warp_row + my_row];
      const bool needs_mask = tile_start + kBlockN > w.prefix || tile_start + kBlockN > w.kv_stop;
      const float* s_row = scores + my_row * Config::kScoreStride;
      float tile_max = -INFINITY;
#pragma unroll 4
      for (int j = 0; j < kKeysPerLane; ++j) {
        const int n = 2 * j + my_half;
        if (!needs_mask || is_visible(row, tile_start + n, w, p.num_new, has_tree)) {
          tile_max = fmaxf(tile_max, s_row[n] * p.scale_log2);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_new = fmaxf(m, tile_max);
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: avoid -inf - -inf
      const float alpha = exp2f(m - m_ref);
      m = m_new;
      l *= alpha;
      T* p_row = probs + my_row * Config::kProbStride;
#pragma unroll 4
      for (int j = 0; j < kKeysPerLane; ++j) {
        const int n = 2 * j + my_half;
        const bool visible = !needs_mask || is_visible(row, tile_start + n, w, p.num_new, has_tree);
        const float prob = visible ? exp2f(s_row[n] * p.scale_log2 - m_ref) : 0.0f;
        l += prob;
        p_row[n] = from_float<T>(prob);
      }
      float* acc_row = acc + my_row * Config::kAccStride;
#pragma unroll 4
      for (int i = 0; i < kDimsPerLane; ++i) acc_row[2 * i + my_half] *= alpha;
    }
    __syncwarp();

    // O[16, D] += P[16, kBlockN] V[kBlockN, D], accumulating in the warp's fp32 shared slice.
    for (int step = 0; step < head_dim_steps; ++step) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, acc + step * 16, Config::kAccStride, wmma::mem_row_major);
#pragma unroll
      for (int k0 = 0; k0 < kBlockN; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, probs + k0, Config::kProbStride);
        wmma::load_matrix_sync(v_frag, value_tile + k0 * Config::kOperandStride + step * 16, Config::kOperandStride);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(acc + step * 16, o_frag, Config::kAccStride, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (!warp_active) return;
  __syncwarp();  // the accumulator's zero fill is visible even when this split had no tile
  const float row_sum = l + __shfl_xor_sync(0xffffffffu, l, 1);
  if (warp_row + my_row >= w.num_rows) return;
  const int dim = my_half * kDimsPerLane;
  const int count = max(0, min(kDimsPerLane, p.head_dim - dim));
  write_row<T, kDimsPerLane>(p, w, warp_row + my_row, dim, acc + my_row * Config::kAccStride + dim, count, m, row_sum,
               my_half == 0);
#endif
}

// ---- split-KV merge -----------------------------------------------------------------------------------
// Grid: one CTA per (b, h, t) row; the threads split D. Each thread reads the row's num_splits
// log2-sum-exps (a few dozen floats, cached) and combines the normalised partial outputs.
constexpr int kMergeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) verify_attention_merge_kernel(const Params p) {
  const int64_t row_id = blockIdx.x;  // (b * Hq + h) * T + t
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_new;
  const int token = static_cast<int>(row_id % p.num_new);
  const int head = static_cast<int>((row_id / p.num_new) % p.num_q_heads);
  const int b = static_cast<int>(row_id / (static_cast<int64_t>(p.num_new) * p.num_q_heads));

  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, p.partial_lse[s * total_rows + row_id]);
  const bool empty = max_lse == -INFINITY;
  float weight_sum = 0.0f;
  for (int s = 0; s < p.num_splits && !empty; ++s) weight_sum += exp2f(p.partial_lse[s * total_rows + row_id] - max_lse);

  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + head * p.out_stride_h + token * p.out_stride_t;
  for (int dim = threadIdx.x; dim < p.head_dim; dim += blockDim.x) {
    float value = 0.0f;
    for (int s = 0; s < p.num_splits && !empty; ++s) {
      const float weight = exp2f(p.partial_lse[s * total_rows + row_id] - max_lse);
      value += weight * p.partial_out[(s * total_rows + row_id) * p.head_dim + dim];
    }
    out[dim] = from_float<T>(empty ? 0.0f : value / weight_sum);
  }
  if (threadIdx.x == 0 && p.lse != nullptr) p.lse[row_id] = empty ? -INFINITY : (max_lse + log2f(weight_sum)) * kLn2;
}

}  // namespace fastvlm::verify_attention
