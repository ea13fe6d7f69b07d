// verify_attention kernels: T new tokens of a KV-head group attend to their row's cache in one pass.
// Grid: 1-D, one CTA per (batch row b * KV head, block of query rows, KV split). A group's query rows
// are flattened as r = t * G + g (new token t, query head Hkv_index * G + g), so a block covers a range
// of tokens and a causal chain bounds its keys by its last token. Each K/V tile is loaded once into
// shared memory for all rows of the block; online softmax in fp32 (log2 domain). Decode shapes (T * G
// from 1 to a few hundred) are memory bound: each cached byte is read once per query block, and the
// launcher splits the cache until the grid fills the GPU's resident CTA slots. With num_splits > 1 each
// split writes normalised fp32 partial outputs and a log2-sum-exp, merged by verify_attention_merge_kernel.
// Two compute paths share the work split, masking rule and split-KV format:
//   - TensorCoreKernel (fp16 / bf16, sm_80+), flash-decoding style: 4 warps; a query block of 16, 32 or
//     64 rows (warps_m = 1, 2, 4 row groups of 16), and the 4 / warps_m warps of a row group split each
//     64-key tile into slices of 64 / 32 / 16 keys, merged across warps at the end. mma.sync m16n8k16
//     (fp32 accumulators) on ldmatrix fragments: S, P and O stay in registers, Q too for D <= 128. K/V
//     tiles stream through a 2-4 stage cp.async pipeline (swizzled 16-byte chunks, one barrier per tile).
//   - CudaCoreKernel (all dtypes; the only one for fp32, and fp16 / bf16 before sm_80): 64 query rows,
//     8 warps x 8 rows; for S = QK^T a lane owns keys lane and lane + 32, for O += PV a lane owns D / 32
//     contiguous dims. fp32 FMA, no tf32; synchronous tile loads.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

#include "ptx.cuh"

namespace fastvlm::verify_attention {

// ---- parameters ------------------------------------------------------------------------------------
struct Params {
  const void* q;               // [B, Hq, T, D]
  const void* k_cache;         // [B, Hkv, L_max, D]
  const void* v_cache;         // [B, Hkv, L_max, D]
  void* out;                   // [B, Hq, T, D], q's dtype
  float* lse;                  // [B, Hq, T] contiguous, natural log; nullptr when not requested
  const int32_t* prefix_lens;  // [B]
  const int64_t* tree_mask;    // [B, T] contiguous; nullptr for a causal chain
  float* partial_out;          // [num_splits, B, Hq, T, D] fp32, normalised per split; used when num_splits > 1
  float* partial_lse;          // [num_splits, B, Hq, T] fp32, log2 domain; used when num_splits > 1

  int64_t q_stride_b, q_stride_h, q_stride_t;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t out_stride_b, out_stride_h, out_stride_t;

  int batch, num_q_heads, num_kv_heads, group;  // group = Hq / Hkv

  int num_new;    // T
  int cache_len;  // L_max
  int head_dim;   // D, a multiple of 16, <= the instance's padded head dim
  int block_m;    // query rows per CTA: kCudaCoreBlockM, or 16 * warps_m on tensor cores
  int warps_m;    // tensor cores: row groups of 16 among the 4 warps (1, 2 or 4); the rest split keys
  int num_query_blocks;
  int num_splits;
  float scale_log2;      // sm_scale * log2(e)
  bool q_vector_loads;   // q's pointer and strides allow 16-byte loads
  bool kv_vector_loads;  // k_cache's and v_cache's pointers and strides allow 16-byte loads
  bool vector_loads;     // both
};

constexpr int kCudaCoreBlockM = 64;  // query rows per CTA of the CUDA-core path
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Keys per tile: 64, or 32 for D = 256 so that the tiles fit in an A100's shared memory.
template <int kHeadDimPadded>
constexpr int block_n() {
  return kHeadDimPadded > 128 ? 32 : 64;
}

// ---- element conversions ---------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// clang-format off
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
// clang-format on

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
  w.row_begin = w.query_block * p.block_m;
  w.num_rows = min(p.block_m, total_rows - w.row_begin);

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
  for (int r = threadIdx.x; r < kCudaCoreBlockM; r += blockDim.x) {
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
__device__ __forceinline__ void load_tile(T* smem, int smem_stride, const T* gmem, int64_t gmem_stride, int num_valid,
                                          int head_dim, bool vector_loads) {
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
__device__ __forceinline__ void load_query_tile(StoreT* smem, int smem_stride, const Params& p, const BlockWork& w,
                                                float scale) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kHeadDimPadded / kVec;
  const T* q = static_cast<const T*>(p.q) + w.b * p.q_stride_b;
  for (int chunk = threadIdx.x; chunk < kCudaCoreBlockM * kChunksPerRow; chunk += kThreads) {
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
__device__ __forceinline__ void write_row(const Params& p, const BlockWork& w, int row, int dim, const float* acc,
                                          int count, float m, float l, bool write_lse) {
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
  static constexpr int kRowsPerWarp = kCudaCoreBlockM / kWarps;  // 8
  static constexpr int kBlockN = block_n<kHeadDimPadded>();
  static constexpr int kKeysPerLane = kBlockN / 32;         // 2, or 1 for D = 256
  static constexpr int kDimsPerLane = kHeadDimPadded / 32;  // 2, 4 or 8
  static constexpr int kVec = 16 / sizeof(T);               // elements per 16-byte vector
  static constexpr int kQueryStride = kHeadDimPadded;       // fp32, read as broadcasts
  static constexpr int kKeyStride = kHeadDimPadded + kVec;  // +16 B: conflict-free row-per-lane reads
  static constexpr int kValueStride = kHeadDimPadded;       // read row-contiguously
  static constexpr size_t kQueryBytes = sizeof(float) * kCudaCoreBlockM * kQueryStride;
  static constexpr size_t kKeyBytes = sizeof(T) * kBlockN * kKeyStride;
  static constexpr size_t kValueBytes = sizeof(T) * kBlockN * kValueStride;
  static constexpr size_t kProbBytes = sizeof(float) * kCudaCoreBlockM * kBlockN;
  static constexpr size_t kRowInfoBytes = sizeof(RowInfo) * kCudaCoreBlockM;
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
  float* prob_tile =
      reinterpret_cast<float*>(shared_raw + Config::kQueryBytes + Config::kKeyBytes + Config::kValueBytes);
  RowInfo* row_info = reinterpret_cast<RowInfo*>(shared_raw + Config::kQueryBytes + Config::kKeyBytes +
                                                 Config::kValueBytes + Config::kProbBytes);

  const BlockWork w = block_work(p, kBlockN);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row = warp * kRows;  // first of this warp's rows within the block
  const bool warp_active = warp_row < w.num_rows;
  const bool has_tree = p.tree_mask != nullptr;

  load_query_tile<T, float, kHeadDimPadded, Config::kThreads>(query_tile, Config::kQueryStride, p, w, p.scale_log2);
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
                                                            keys + tile_start * p.k_stride_l, p.k_stride_l, tile_valid,
                                                            p.head_dim, p.vector_loads);
    load_tile<T, kBlockN, kHeadDimPadded, Config::kThreads>(value_tile, Config::kValueStride,
                                                            values + tile_start * p.v_stride_l, p.v_stride_l,
                                                            tile_valid, p.head_dim, p.vector_loads);
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
      for (int n = 0; n < 4; ++n)
        load_as_float<kDims>(value_tile + (n0 + n) * Config::kValueStride + lane * kDims, v[n]);
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

// ---- tensor-core path (fp16 / bf16, sm_80+) ---------------------------------------------------------
// cp.async, ldmatrix and mma.sync m16n8k16 from ptx.cuh, which gives the fragment layouts: the S
// accumulators of two neighbouring 8-key tiles are, packed to 16 bits, the A operand of P V.
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_m16n8k16;
using ptx::shared_address;

// Two floats rounded to T, the first in the low half (the lower column of a fragment register).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(low, high);
    memcpy(&bits, &pair, 4);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    memcpy(&bits, &pair, 4);
  }
  return bits;
}

// Elements [0, 2) of a global row as one register (low half first), 4-byte aligned or not.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* src, bool aligned) {
  if (aligned) return __ldg(reinterpret_cast<const unsigned int*>(src));
  const uint16_t* halves = reinterpret_cast<const uint16_t*>(src);
  return static_cast<uint32_t>(halves[0]) | (static_cast<uint32_t>(halves[1]) << 16);
}

// Shared tiles are [rows, kHeadDimPadded] in 16-byte chunks (8 elements), chunk c of row r stored at
// chunk c ^ (r % 8): the 8 rows that one ldmatrix matrix reads, or that a warp's copies write, fall in
// 8 different 16-byte bank groups (no padding, so the K / V stages stay powers of two in size).
template <int kHeadDimPadded>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDimPadded + ((chunk ^ (row & 7)) << 3);
}

// Starts copying rows [0, num_valid) of a [rows, head_dim] global matrix into a swizzled shared tile of
// kRows rows (cp.async, zero-filling rows >= num_valid; chunks past head_dim are left alone: never
// read). Without 16-byte alignment it copies element by element, synchronously. A thread keeps one
// column chunk and steps down the rows, so its addresses advance by constants.
template <typename T, int kRows, int kHeadDimPadded, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t gmem_stride, int num_valid,
                                                int head_dim, bool vector_loads) {
  constexpr int kChunksPerRow = kHeadDimPadded / 8;
  constexpr int kRowsPerRound = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kRowsPerRound == 0, "whole rounds of 16-byte chunks");
  const int first_row = static_cast<int>(threadIdx.x) / kChunksPerRow;
  const int col = static_cast<int>(threadIdx.x) % kChunksPerRow;
  if (col >= head_dim / 8) return;
  const T* src = gmem + first_row * gmem_stride + col * 8;
  const int64_t round_stride = kRowsPerRound * gmem_stride;
#pragma unroll
  for (int round = 0; round < kRows / kRowsPerRound; ++round, src += round_stride) {
    const int row = first_row + round * kRowsPerRound;
    T* dst = smem + swizzled<kHeadDimPadded>(row, col);
    const bool valid = row < num_valid;
    if (vector_loads) {
      cp_async_16(shared_address(dst), valid ? src : gmem, valid);
    } else {
      T elements[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) elements[i] = valid ? src[i] : from_float<T>(0.0f);
      memcpy(dst, elements, 16);
    }
  }
}

// ldmatrix addressing: every x4 load of this kernel reads rows whose index is lane % 8 modulo 8 and
// logical chunk 2 step + half (half = 0 or 1, fixed per lane) of a swizzled row. The physical chunk is
// 8 (step / 4) + ((2 (step % 4) + half) ^ (lane % 8)): four per-lane byte offsets, the rest immediates
// once the loops over step unroll.
struct SwizzleOffsets {
  uint32_t bytes[4];
  __device__ __forceinline__ SwizzleOffsets(int lane, int half) {
#pragma unroll
    for (int k = 0; k < 4; ++k) bytes[k] = static_cast<uint32_t>(((2 * k + half) ^ (lane % 8)) * 16);
  }
  // Byte offset within a row of logical chunks (2 step + half).
  __device__ __forceinline__ uint32_t at(int step) const { return bytes[step % 4] + (step / 4) * 128; }
};

template <typename T, int kHeadDimPadded>
struct TensorCoreConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMaxBlockM = 64;  // query rows per CTA: 16 * warps_m, warps_m in {1, 2, 4}
  static constexpr int kBlockN = 64;     // keys per K / V tile, split among the 4 / warps_m warps of a row group
  static constexpr int kKeyTiles = kBlockN / 8;  // 8-key mma tiles of S when one warp takes the whole tile
  static constexpr int kKSteps = kHeadDimPadded / 16;
  static constexpr int kDimTiles = kHeadDimPadded / 8;
  static constexpr int kStages = kHeadDimPadded <= 64 ? 4 : kHeadDimPadded <= 128 ? 3 : 2;
  // D <= 128: each warp's 16 query rows stay in registers as A fragments, read once from global memory.
  // D = 256: they stay in shared memory (registers hold the 16 x 256 fp32 O accumulator).
  static constexpr bool kQueryInRegisters = kHeadDimPadded <= 128;
  static constexpr size_t kTileBytes = sizeof(T) * kBlockN * kHeadDimPadded;
  static constexpr size_t kStageBytes = 2 * kTileBytes;  // K then V
  static constexpr size_t kQueryBytes = kQueryInRegisters ? 0 : sizeof(T) * kMaxBlockM * kHeadDimPadded;
  static constexpr size_t kStatsBytes = sizeof(float) * kWarps * 16 * 2;  // (m, l) per warp row, for the merge
  static constexpr size_t kSharedBytes = kStages * kStageBytes + kQueryBytes + kStatsBytes;
  // After the last tile the stages hold every warp's O accumulator for the merge across key slices.
  static_assert(sizeof(float) * kWarps * kDimTiles * 4 * 32 <= kStages * kStageBytes, "merge scratch fits");
};

template <typename T, int kHeadDimPadded>
__global__ void __launch_bounds__(TensorCoreConfig<T, kHeadDimPadded>::kThreads)
    verify_attention_tensor_core_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async, ldmatrix and bf16 mma need sm_80; the launcher only picks this path on sm_80+
#else
  using Config = TensorCoreConfig<T, kHeadDimPadded>;
  constexpr int kThreads = Config::kThreads;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kStages = Config::kStages;
  constexpr int kKSteps = Config::kKSteps;
  constexpr int kDimTiles = Config::kDimTiles;
  constexpr int kKeyTiles = Config::kKeyTiles;

  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* stages = reinterpret_cast<T*>(shared_raw);  // [kStages][K, V][kBlockN, kHeadDimPadded], swizzled
  T* query_tile = reinterpret_cast<T*>(shared_raw + kStages * Config::kStageBytes);  // D = 256 only
  float* stats = reinterpret_cast<float*>(shared_raw + kStages * Config::kStageBytes + Config::kQueryBytes);

  const BlockWork w = block_work(p, kBlockN);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int group_id = lane / 4;       // g: this lane's rows are g and g + 8 of its warp's 16
  const int lane_in_group = lane % 4;  // c: its columns are 2c, 2c + 1 of each 8-wide tile
  // Warps form warps_m row groups of 16 rows x warps_n key slices of each tile.
  const int warps_n = Config::kWarps / p.warps_m;
  const int warp_m = warp / warps_n;
  const int warp_n = warp % warps_n;
  const int warp_row = warp_m * 16;
  const int slice_keys = kBlockN / warps_n;  // 64, 32 or 16
  const int slice_tiles = slice_keys / 8;    // 8-key tiles of S
  const int slice_begin = warp_n * slice_keys;
  const bool warp_active = warp_row < w.num_rows;
  const bool has_tree = p.tree_mask != nullptr;
  const int head_dim_steps = p.head_dim / 16;

  const T* keys = static_cast<const T*>(p.k_cache) + w.b * p.k_stride_b + w.kv_head * p.k_stride_h;
  const T* values = static_cast<const T*>(p.v_cache) + w.b * p.v_stride_b + w.kv_head * p.v_stride_h;
  const T* queries = static_cast<const T*>(p.q) + w.b * p.q_stride_b;
  const int num_tiles = w.kv_stop > w.kv_begin ? (w.kv_stop - w.kv_begin + kBlockN - 1) / kBlockN : 0;

  const auto load_kv_tile = [&](int tile, int stage) {
    const int tile_start = w.kv_begin + tile * kBlockN;
    const int tile_valid = min(kBlockN, w.kv_stop - tile_start);
    T* key_dst = stages + static_cast<size_t>(stage) * 2 * kBlockN * kHeadDimPadded;
    T* value_dst = key_dst + kBlockN * kHeadDimPadded;
    load_tile_async<T, kBlockN, kHeadDimPadded, kThreads>(key_dst, keys + tile_start * p.k_stride_l, p.k_stride_l,
                                                          tile_valid, p.head_dim, p.kv_vector_loads);
    load_tile_async<T, kBlockN, kHeadDimPadded, kThreads>(value_dst, values + tile_start * p.v_stride_l, p.v_stride_l,
                                                          tile_valid, p.head_dim, p.kv_vector_loads);
  };

  // Prologue: the query tile (D = 256) joins the first group; then kStages - 1 tiles in flight.
  if constexpr (!Config::kQueryInRegisters) {
    constexpr int kChunksPerRow = kHeadDimPadded / 8;
    const int head_chunks = p.head_dim / 8;
    for (int chunk = threadIdx.x; chunk < p.block_m * kChunksPerRow; chunk += kThreads) {
      const int row = chunk / kChunksPerRow;
      const int col = chunk % kChunksPerRow;
      if (col >= head_chunks) continue;
      const bool valid = row < w.num_rows;
      const int flat = w.row_begin + (valid ? row : 0);
      const T* src =
          queries + (w.kv_head * p.group + flat % p.group) * p.q_stride_h + (flat / p.group) * p.q_stride_t + col * 8;
      T* dst = query_tile + swizzled<kHeadDimPadded>(row, col);
      if (p.q_vector_loads) {
        cp_async_16(shared_address(dst), src, valid);
      } else {
        T elements[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) elements[i] = valid ? src[i] : from_float<T>(0.0f);
        memcpy(dst, elements, 16);
      }
    }
  }
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < num_tiles) load_kv_tile(stage, stage);
    cp_async_commit();
  }

  // This lane's two rows: masking facts and, for D <= 128, the query A fragments (zero for padding rows).
  RowInfo rows[2];
  const T* query_rows[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_row + group_id + 8 * i;
    rows[i] = RowInfo{0, -1};
    query_rows[i] = nullptr;
    if (row < w.num_rows) {
      const int flat = w.row_begin + row;
      rows[i].token = flat / p.group;
      if (has_tree) {
        rows[i].tree_bits = static_cast<uint64_t>(p.tree_mask[static_cast<int64_t>(w.b) * p.num_new + rows[i].token]);
      }
      query_rows[i] = queries + (w.kv_head * p.group + flat % p.group) * p.q_stride_h + rows[i].token * p.q_stride_t;
    }
  }
  constexpr int kQueryFragments = Config::kQueryInRegisters ? kKSteps : 1;
  uint32_t q_frag[kQueryFragments][4];
#pragma unroll
  for (int step = 0; step < kQueryFragments; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const T* row = query_rows[r % 2];  // register r: row g + 8 (r % 2), cols 16 step + 8 (r / 2) + 2c
      const bool load = Config::kQueryInRegisters && row != nullptr && step < head_dim_steps;
      q_frag[step][r] = load ? load_pair(row + step * 16 + (r / 2) * 8 + 2 * lane_in_group, p.q_vector_loads) : 0u;
    }
  }

  // ldmatrix rows of this lane: K (B operand, keys 0-7 then 8-15 of a 16-key pair), V (transposed B,
  // keys 0-7, 8-15, 0-7, 8-15) and Q (A operand, rows 0-15); all are lane % 8 modulo 8.
  constexpr uint32_t kRowBytes = kHeadDimPadded * sizeof(T);
  const uint32_t stages_address = shared_address(stages);
  const int key_row = slice_begin + lane % 8 + (lane / 16) * 8;
  const int value_row = slice_begin + lane % 8 + ((lane / 8) % 2) * 8;
  const SwizzleOffsets key_offsets(lane, (lane / 8) % 2);
  const SwizzleOffsets value_offsets(lane, lane / 16);
  const SwizzleOffsets query_offsets(lane, lane / 16);
  const uint32_t query_row_address = shared_address(query_tile) + (warp_row + lane % 16) * kRowBytes;

  float o[kDimTiles][4];  // O of rows (g, g + 8), dims 8 j + 2c + (0, 1): fp32, unnormalised
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) o[j][r] = 0.0f;
  }
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 domain), the same in the quad
  float l[2] = {0.0f, 0.0f};            // running sum over this lane's columns only

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile` have landed
    __syncthreads();               // everyone's have, and nobody still reads the stage refilled next
    {
      const int next = tile + kStages - 1;
      if (next < num_tiles) load_kv_tile(next, next % kStages);
      cp_async_commit();  // possibly empty: keeps one group per tile
    }
    if (!warp_active) continue;

    // Shared byte addresses of this lane's ldmatrix rows in the stage of `tile`.
    const uint32_t stage_address = stages_address + static_cast<uint32_t>(tile % kStages) * Config::kStageBytes;
    const uint32_t key_row_address = stage_address + key_row * kRowBytes;
    const uint32_t value_row_address = stage_address + Config::kTileBytes + value_row * kRowBytes;
    const int tile_start = w.kv_begin + tile * kBlockN;

    // S[16, slice] = Q K^T over this warp's key slice. The x4 load gives B fragments of two 8-key
    // tiles: matrices (keys 0-7, dims lo), (keys 0-7, dims hi), (keys 8-15, lo), (keys 8-15, hi).
    float s[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) s[n][r] = 0.0f;
    }
#pragma unroll
    for (int step = 0; step < kKSteps; ++step) {
      if (step >= head_dim_steps) break;
      uint32_t a[4];
      if constexpr (Config::kQueryInRegisters) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = q_frag[step][r];
      } else {  // matrices (rows 0-7, dims lo), (rows 8-15, lo), (rows 0-7, hi), (rows 8-15, hi)
        ldmatrix_x4(a, query_row_address + query_offsets.at(step));
      }
#pragma unroll
      for (int pair = 0; pair < kKeyTiles / 2; ++pair) {
        if (2 * pair >= slice_tiles) break;
        uint32_t b[4];
        ldmatrix_x4(b, key_row_address + pair * 16 * kRowBytes + key_offsets.at(step));
        mma_m16n8k16<T>(s[2 * pair], a, b[0], b[1]);
        mma_m16n8k16<T>(s[2 * pair + 1], a, b[2], b[3]);
      }
    }

    // Online softmax on the fragments: scale to the log2 domain, mask where the tile reaches past the
    // prefix or this split, then row max over the quad (the 4 lanes of a row).
    const bool needs_mask = tile_start + kBlockN > w.prefix || tile_start + kBlockN > w.kv_stop;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      if (n >= slice_tiles) break;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float score = s[n][r] * p.scale_log2;
        if (needs_mask) {
          const int pos = tile_start + slice_begin + 8 * n + 2 * lane_in_group + r % 2;
          if (!is_visible(rows[r / 2], pos, w, p.num_new, has_tree)) score = -INFINITY;
        }
        s[n][r] = score;
        tile_max[r / 2] = fmaxf(tile_max[r / 2], score);
      }
    }
    float reference[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float m_new = fmaxf(m[i], tile_max[i]);
      reference[i] = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: avoid -inf - -inf
      const float alpha = exp2f(m[i] - reference[i]);
      m[i] = m_new;
      l[i] *= alpha;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        o[j][2 * i] *= alpha;
        o[j][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      if (n >= slice_tiles) break;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float prob = exp2f(s[n][r] - reference[r / 2]);
        l[r / 2] += prob;
        s[n][r] = prob;
      }
    }

    // O[16, D] += P[16, slice] V[slice, D]: P from registers, V via transposed x4 loads giving B
    // fragments of two 8-dim tiles: matrices (keys 0-7, dims lo), (keys 8-15, lo), (keys 0-7, hi), (8-15, hi).
#pragma unroll
    for (int chunk = 0; chunk < kKeyTiles / 2; ++chunk) {
      if (2 * chunk >= slice_tiles) break;
      const uint32_t a[4] = {pack_pair<T>(s[2 * chunk][0], s[2 * chunk][1]),
                             pack_pair<T>(s[2 * chunk][2], s[2 * chunk][3]),
                             pack_pair<T>(s[2 * chunk + 1][0], s[2 * chunk + 1][1]),
                             pack_pair<T>(s[2 * chunk + 1][2], s[2 * chunk + 1][3])};
#pragma unroll
      for (int step = 0; step < kKSteps; ++step) {  // 16 dims: two 8-dim tiles of O
        if (step >= head_dim_steps) break;
        uint32_t b[4];
        ldmatrix_x4_trans(b, value_row_address + chunk * 16 * kRowBytes + value_offsets.at(step));
        mma_m16n8k16<T>(o[2 * step], a, b[0], b[1]);
        mma_m16n8k16<T>(o[2 * step + 1], a, b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain, but leave none behind

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }

  // Warps of a row group saw different key slices: merge their (m, l, O) through shared memory; the
  // first warp of the group keeps the result. The stages are free once every warp passed the barrier.
  if (warps_n > 1) {
    __syncthreads();
    if (lane_in_group == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        stats[(warp * 16 + group_id + 8 * i) * 2] = m[i];
        stats[(warp * 16 + group_id + 8 * i) * 2 + 1] = l[i];
      }
    }
    __syncthreads();
    float scale[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int first = (warp_m * warps_n * 16 + group_id + 8 * i) * 2;  // this row in the group's first warp
      float group_max = -INFINITY;
      for (int other = 0; other < warps_n; ++other) group_max = fmaxf(group_max, stats[first + other * 32]);
      const float group_ref = group_max == -INFINITY ? 0.0f : group_max;
      float group_sum = 0.0f;
      for (int other = 0; other < warps_n; ++other) {
        group_sum += stats[first + other * 32 + 1] * exp2f(stats[first + other * 32] - group_ref);
      }
      scale[i] = exp2f(m[i] - group_ref);
      m[i] = group_max;
      l[i] = group_sum;
    }
    float* partial_o = reinterpret_cast<float*>(stages);  // [warp][kDimTiles * 4][32 lanes]
    if (warp_n > 0) {
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) partial_o[((warp * kDimTiles + j) * 4 + r) * 32 + lane] = o[j][r] * scale[r / 2];
      }
    }
    __syncthreads();
    if (warp_n > 0) return;
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float sum = o[j][r] * scale[r / 2];
        for (int other = 1; other < warps_n; ++other)
          sum += partial_o[(((warp + other) * kDimTiles + j) * 4 + r) * 32 + lane];
        o[j][r] = sum;
      }
    }
  }
  if (!warp_active) return;

  // Epilogue: rows g and g + 8, dims 8 j + 2c + (0, 1), to out (one split) or the fp32 partials.
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_new;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_row + group_id + 8 * i;
    if (row >= w.num_rows) continue;
    const int flat = w.row_begin + row;
    const int token = flat / p.group;
    const int head = w.kv_head * p.group + flat % p.group;
    const int64_t row_id = (static_cast<int64_t>(w.b) * p.num_q_heads + head) * p.num_new + token;
    const bool empty = !(l[i] > 0.0f);
    const float inv_l = empty ? 0.0f : 1.0f / l[i];
    const float lse_log2 = empty ? -INFINITY : m[i] + log2f(l[i]);
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + w.b * p.out_stride_b + head * p.out_stride_h + token * p.out_stride_t;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        const int dim = 8 * j + 2 * lane_in_group;
        if (8 * j >= p.head_dim) break;
        out[dim] = from_float<T>(o[j][2 * i] * inv_l);
        out[dim + 1] = from_float<T>(o[j][2 * i + 1] * inv_l);
      }
      if (lane_in_group == 0 && p.lse != nullptr) p.lse[row_id] = lse_log2 * kLn2;
    } else {
      const int64_t split_row = w.split * total_rows + row_id;
      float* out = p.partial_out + split_row * p.head_dim;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
        const int dim = 8 * j + 2 * lane_in_group;
        if (8 * j >= p.head_dim) break;
        *reinterpret_cast<float2*>(out + dim) = make_float2(o[j][2 * i] * inv_l, o[j][2 * i + 1] * inv_l);
      }
      if (lane_in_group == 0) p.partial_lse[split_row] = lse_log2;
    }
  }
#endif
}

// ---- split-KV merge -----------------------------------------------------------------------------------
// Grid: one warp per (b, h, t) row, kMergeThreads / 32 rows per CTA. The lanes read the row's
// num_splits log2-sum-exps (max and sum by warp shuffles), then each lane combines 4 consecutive dims
// (float4 loads; D is a multiple of 16) of the normalised partial outputs. Memory bound on the partials.
constexpr int kMergeThreads = 128;
constexpr int kMergeRowsPerBlock = kMergeThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) verify_attention_merge_kernel(const Params p) {
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_new;
  const int64_t row_id =
      static_cast<int64_t>(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;  // (b * Hq + h) * T + t
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row_id >= total_rows) return;
  const int token = static_cast<int>(row_id % p.num_new);
  const int head = static_cast<int>((row_id / p.num_new) % p.num_q_heads);
  const int b = static_cast<int>(row_id / (static_cast<int64_t>(p.num_new) * p.num_q_heads));
  const float* partial_lse = p.partial_lse + row_id;  // split s at s * total_rows

  float max_lse = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) max_lse = fmaxf(max_lse, partial_lse[s * total_rows]);
  max_lse = warp_max(max_lse);
  const bool empty = max_lse == -INFINITY;
  const float reference = empty ? 0.0f : max_lse;
  float weight_sum = 0.0f;
  for (int s = lane; s < p.num_splits; s += 32) weight_sum += exp2f(partial_lse[s * total_rows] - reference);
  weight_sum = warp_sum(weight_sum);
  const float inv_sum = empty ? 0.0f : 1.0f / weight_sum;

  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + head * p.out_stride_h + token * p.out_stride_t;
  for (int dim = 4 * lane; dim < p.head_dim; dim += 128) {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int s = 0; s < p.num_splits; ++s) {  // independent loads: 4 partials in flight per lane
      const float weight = exp2f(partial_lse[s * total_rows] - reference);  // 0 for an empty split
      const float4 part =
          *reinterpret_cast<const float4*>(p.partial_out + (s * total_rows + row_id) * p.head_dim + dim);
      acc.x = fmaf(weight, part.x, acc.x);
      acc.y = fmaf(weight, part.y, acc.y);
      acc.z = fmaf(weight, part.z, acc.z);
      acc.w = fmaf(weight, part.w, acc.w);
    }
    out[dim] = from_float<T>(acc.x * inv_sum);
    out[dim + 1] = from_float<T>(acc.y * inv_sum);
    out[dim + 2] = from_float<T>(acc.z * inv_sum);
    out[dim + 3] = from_float<T>(acc.w * inv_sum);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row_id] = empty ? -INFINITY : (max_lse + log2f(weight_sum)) * kLn2;
}

}  // namespace fastvlm::verify_attention
