// verify_attention on CPU: flash-attention style, at::parallel_for over work items (batch row, KV head,
// block of <= 512 rows of that head's flattened [T x G] query matrix, t-major[, chunk of the key range]).
// An item streams the keys its rows can see in 64-key tiles, each read once and shared by all its rows:
// S = Q K^T (<= 4 rows: dot products along D, bf16 pairs on AVX512-BF16, next tile prefetched; more: K^T
// tile x 6-row register block), online softmax in fp32, O += P V; bf16 with AMX: 128-key tiles, both
// products as 16x16 tile matmuls (P rounded to bf16, fp32 sums); 2-32 rows: K and V tiles read in place
// (S^T = K Q^T, P V on even/odd dims), more: K^T and V repacked once per tile. Key chunks (only when items are
// too few for the threads) merge by log-sum-exp. Aim: memory speed for decode, FMA / AMX throughput when T x G is
// large.
#include "cpu/amx.h"
#include "cpu/isa.h"
#include "cpu/vec.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if !defined(__GNUC__)
#error "verify_attention.cpp uses GCC/Clang vector extensions"
#endif
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("verify_attention.cpp built without -fopenmp: at::parallel_for will run on one thread")
#endif

namespace fastvlm {
namespace {

constexpr int kKeyTile = 64;        // keys per tile (a multiple of every vector width)
constexpr int kAmxKeyTile = 128;    // keys per tile on AMX (fewer accumulator tile loads and stores per key)
constexpr int kMaxBlockRows = 512;  // query rows (t, g) per work item
constexpr int kMinSplitKeys = 256;  // a key chunk is never shorter than this
constexpr int kMaxDirectRows = 4;   // blocks with more rows transpose K tiles (or use AMX)
constexpr int kMaxFewRows = 32;     // bf16 on AMX: blocks up to this many rows read K and V tiles in place
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using namespace cpu_vec;

// Register blocking of the two micro-kernels: rows x (kVecs vectors of keys or of head dims).
template <int W>
struct Blocking {
  static constexpr int kRows = W >= 16 ? 6 : 4;
  static constexpr int kVecs = W >= 16 ? 4 : 2;
};

// Interleave the low (or high) halves of a and b: {a0, b0, a1, b1, ...}.
template <int W, size_t... Lane>
FASTVLM_INLINE typename Vec<W>::f32 zip_low(typename Vec<W>::f32 a, typename Vec<W>::f32 b,
                                            std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, ((Lane % 2) * W + Lane / 2)...);
}

template <int W, size_t... Lane>
FASTVLM_INLINE typename Vec<W>::f32 zip_high(typename Vec<W>::f32 a, typename Vec<W>::f32 b,
                                             std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, ((Lane % 2) * W + W / 2 + Lane / 2)...);
}

// In-register W x W transpose: log2(W) rounds of zipping row i with row i + W/2 (each round rotates the
// bits of the (row, column) index by one; log2(W) rounds swap row and column).
template <int W>
FASTVLM_INLINE void transpose(typename Vec<W>::f32 (&rows)[W]) {
  typename Vec<W>::f32 next[W];
#pragma GCC unroll 4
  for (int round = 1; round < W; round *= 2) {
#pragma GCC unroll 8
    for (int i = 0; i < W / 2; ++i) {
      next[2 * i] = zip_low<W>(rows[i], rows[i + W / 2], std::make_index_sequence<W>{});
      next[2 * i + 1] = zip_high<W>(rows[i], rows[i + W / 2], std::make_index_sequence<W>{});
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) rows[i] = next[i];
  }
}

// ---- the problem, flattened to raw pointers and strides -----------------------------------------------
struct Problem {
  int64_t batch, num_q_heads, num_kv_heads, group, num_new, head_dim, cache_len;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // may be null
  const int32_t* prefix_lens;
  const int64_t* tree_mask;  // null: causal chain
  float scale_log2;          // sm_scale * log2(e): scores are kept in base 2

  // Work decomposition: item = ((slot * batch + b) * num_kv_heads + kv_head) * num_splits + split.
  int64_t rows_per_block, num_blocks, num_splits, split_keys;
  float* partial_out;  // [items, rows_per_block, D] unnormalised, when num_splits > 1
  float* partial_max;  // [items, rows_per_block] (base 2)
  float* partial_sum;  // [items, rows_per_block]

  int64_t num_items() const { return num_blocks * batch * num_kv_heads * num_splits; }

  int64_t prefix(int64_t b) const {
    const int64_t value = prefix_lens[b];
    return std::min(std::max<int64_t>(value, 0), cache_len - num_new);
  }

  // Slots alternate between the cheapest and the dearest row blocks (causal rows see more keys as t
  // grows), so the contiguous ranges of items parallel_for hands each thread cost about the same.
  int64_t block_of_slot(int64_t slot) const { return slot % 2 == 0 ? slot / 2 : num_blocks - 1 - slot / 2; }

  // How many new tokens query t may read, counted from new token 0 (its last visible one plus one).
  int64_t visible_new(int64_t b, int64_t t) const {
    if (tree_mask == nullptr) return t + 1;
    const uint64_t usable = num_new >= 64 ? ~uint64_t{0} : ((uint64_t{1} << num_new) - 1);
    const uint64_t bits = static_cast<uint64_t>(tree_mask[b * num_new + t]) & usable;
    return bits == 0 ? 0 : 64 - __builtin_clzll(bits);
  }

  bool new_token_visible(int64_t b, int64_t t, int64_t i) const {
    if (tree_mask == nullptr) return i <= t;
    return i < 64 && ((static_cast<uint64_t>(tree_mask[b * num_new + t]) >> i) & 1);
  }
};

// Per-thread scratch reused across calls (grown, never shrunk): no allocation or zero-fill per call, which
// cost ~10 us per call (a fresh 70 KB+ block touched, L1 evicted) at decode shapes. `which` tells apart the
// buffers one thread holds at the same time. Every buffer is written before it is read.
float* thread_scratch(int which, int64_t floats) {
  thread_local std::vector<float> storage[2];
  if (static_cast<int64_t>(storage[which].size()) < floats) storage[which].resize(floats);
  return storage[which].data();
}

// Per-thread fp32 scratch, 64-byte aligned.
struct Buffers {
  float *q, *kt, *v, *scores, *acc, *row_max, *row_sum;

  Buffers(int64_t rows, int64_t head_dim) {
    const int64_t sizes[] = {
        rows * head_dim, head_dim * kKeyTile, kKeyTile * head_dim, rows * kKeyTile, rows * head_dim, rows, rows};
    int64_t total = 16;
    for (int64_t size : sizes) total += (size + 15) / 16 * 16;
    float* cursor = thread_scratch(0, total);
    cursor += (16 - (reinterpret_cast<uintptr_t>(cursor) / sizeof(float)) % 16) % 16;
    float** slots[] = {&q, &kt, &v, &scores, &acc, &row_max, &row_sum};
    for (int i = 0; i < 7; ++i) {
      *slots[i] = cursor;
      cursor += (sizes[i] + 15) / 16 * 16;
    }
  }
};

// Software prefetch, spread over the pass over a tile's K rows: that tile's V rows (read right after) and the
// next tile's K rows. Used where little work hides the loads (few rows, and AMX): the cache comes from L3 or
// DRAM, and the hardware prefetcher alone leaves the loads waiting. Used by the bf16 dot-product path only:
// the fp32 paths and the AMX paths measured as fast or faster without it (2026-11-25, 1 thread).
struct TilePrefetch {
  const char* v_rows;                     // this tile's V rows
  const char* next_k_rows;                // the next tile's K rows (prefetch never faults, so past the end is harmless)
  int64_t v_stride, k_stride, row_bytes;  // in bytes

  template <typename scalar_t>
  TilePrefetch(const scalar_t* v_tile, int64_t v_row_stride, const scalar_t* k_tile, int64_t k_row_stride,
               int64_t head_dim, int tile_keys)
      : v_rows(reinterpret_cast<const char*>(v_tile)),
        next_k_rows(reinterpret_cast<const char*>(k_tile + tile_keys * k_row_stride)),
        v_stride(v_row_stride * static_cast<int64_t>(sizeof(scalar_t))),
        k_stride(k_row_stride * static_cast<int64_t>(sizeof(scalar_t))),
        row_bytes(head_dim * static_cast<int64_t>(sizeof(scalar_t))) {}

  FASTVLM_INLINE void keys(int first, int count) const {
    for (int key = first; key < first + count; ++key)
      for (int64_t byte = 0; byte < row_bytes; byte += 64) {
        __builtin_prefetch(v_rows + key * v_stride + byte);
        __builtin_prefetch(next_k_rows + key * k_stride + byte, 0, 2);  // to L2: L1 holds this tile
      }
  }
};

// ---- micro-kernels ------------------------------------------------------------------------------------
// scores[R][kKeyTile] = q[R][D] . kt[D][kKeyTile], for the key vectors [first_vec, first_vec + NV).
template <int W, int R, int NV>
FASTVLM_INLINE void scores_block(const float* q, const float* kt, float* scores, int64_t head_dim, int first_vec) {
  using F = typename Vec<W>::f32;
  F acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = F{};
  const float* kt_col = kt + first_vec * W;
  for (int64_t d = 0; d < head_dim; ++d) {
    F keys[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) keys[j] = load<W>(kt_col + d * kKeyTile + j * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float query = q[r * head_dim + d];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += query * keys[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store<W>(scores + r * kKeyTile + (first_vec + j) * W, acc[r][j]);
}

template <int W, int R>
FASTVLM_INLINE void scores_rows_transposed(const float* q, const float* kt, float* scores, int64_t head_dim) {
  for (int vec = 0; vec < kKeyTile / W; vec += Blocking<W>::kVecs)
    scores_block<W, R, Blocking<W>::kVecs>(q, kt, scores, head_dim, vec);
}

// Scores of every row against a tile held as K^T.
template <int W>
FASTVLM_INLINE void scores_transposed(const float* q, const float* kt, float* scores, int64_t head_dim, int rows) {
  constexpr int kRows = Blocking<W>::kRows;
  int r = 0;
  for (; r + kRows <= rows; r += kRows)
    scores_rows_transposed<W, kRows>(q + r * head_dim, kt, scores + r * kKeyTile, head_dim);
  q += r * head_dim;
  scores += r * kKeyTile;
  switch (rows - r) {
    case 1: scores_rows_transposed<W, 1>(q, kt, scores, head_dim); break;
    case 2: scores_rows_transposed<W, 2>(q, kt, scores, head_dim); break;
    case 3: scores_rows_transposed<W, 3>(q, kt, scores, head_dim); break;
    case 4: scores_rows_transposed<W, 4>(q, kt, scores, head_dim); break;
    case 5: scores_rows_transposed<W, 5>(q, kt, scores, head_dim); break;
    default: break;
  }
}

// Lane i of the result = sum of the lanes of v[i]: log2(W) rounds of zip-and-add.
template <int W>
FASTVLM_INLINE typename Vec<W>::f32 sum_each(typename Vec<W>::f32 (&v)[W]) {
#pragma GCC unroll 4
  for (int half = W / 2; half >= 1; half /= 2) {
#pragma GCC unroll 8
    for (int i = 0; i < half; ++i)
      v[i] = zip_low<W>(v[i], v[i + half], std::make_index_sequence<W>{}) +
             zip_high<W>(v[i], v[i + half], std::make_index_sequence<W>{});
  }
  return v[0];
}

// Scores of a few rows straight from K rows (no transpose): W keys at a time, dot products along D.
template <int W, typename scalar_t>
FASTVLM_INLINE void scores_direct(const float* q, const scalar_t* k, int64_t k_row_stride, int num_keys, float* scores,
                                  int64_t head_dim, int rows) {
  using F = typename Vec<W>::f32;
  for (int key0 = 0; key0 < num_keys; key0 += W) {
    const scalar_t* key_rows[W];
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) key_rows[j] = k + std::min(key0 + j, num_keys - 1) * k_row_stride;
    for (int r = 0; r < rows; ++r) {
      F acc[W];
#pragma GCC unroll 16
      for (int j = 0; j < W; ++j) acc[j] = F{};
      for (int64_t d = 0; d < head_dim; d += W) {
        const F query = load<W>(q + r * head_dim + d);
#pragma GCC unroll 16
        for (int j = 0; j < W; ++j) acc[j] += query * load_as_float<W>(key_rows[j] + d);
      }
      store<W>(scores + r * kKeyTile + key0, sum_each<W>(acc));
    }
  }
}

// acc[R][dims NV*W from first_dim] += probs[R][:num_keys] . v[:num_keys][same dims]
template <int W, int R, int NV, typename value_t>
FASTVLM_INLINE void accumulate_block(const float* probs, const value_t* v, int64_t v_row_stride, int num_keys,
                                     float* acc_rows, int64_t head_dim, int64_t first_dim) {
  using F = typename Vec<W>::f32;
  F acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = load<W>(acc_rows + r * head_dim + first_dim + j * W);
  for (int key = 0; key < num_keys; ++key) {
    F values[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) values[j] = load_as_float<W>(v + key * v_row_stride + first_dim + j * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float prob = probs[r * kKeyTile + key];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += prob * values[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store<W>(acc_rows + r * head_dim + first_dim + j * W, acc[r][j]);
}

template <int W, int R, typename value_t>
FASTVLM_INLINE void accumulate_rows(const float* probs, const value_t* v, int64_t v_row_stride, int num_keys,
                                    float* acc_rows, int64_t head_dim) {
  constexpr int NV = Blocking<W>::kVecs;
  const int64_t dim_vecs = head_dim / W;
  int64_t vec = 0;
  for (; vec + NV <= dim_vecs; vec += NV)
    accumulate_block<W, R, NV>(probs, v, v_row_stride, num_keys, acc_rows, head_dim, vec * W);
  for (; vec < dim_vecs; ++vec)
    accumulate_block<W, R, 1>(probs, v, v_row_stride, num_keys, acc_rows, head_dim, vec * W);
}

// acc[rows][D] += probs[rows][:num_keys] . v[:num_keys][D]
template <int W, typename value_t>
FASTVLM_INLINE void accumulate(const float* probs, const value_t* v, int64_t v_row_stride, int num_keys, float* acc,
                               int64_t head_dim, int rows) {
  constexpr int kRows = Blocking<W>::kRows;
  int r = 0;
  for (; r + kRows <= rows; r += kRows)
    accumulate_rows<W, kRows>(probs + r * kKeyTile, v, v_row_stride, num_keys, acc + r * head_dim, head_dim);
  probs += r * kKeyTile;
  acc += r * head_dim;
  switch (rows - r) {
    case 1: accumulate_rows<W, 1>(probs, v, v_row_stride, num_keys, acc, head_dim); break;
    case 2: accumulate_rows<W, 2>(probs, v, v_row_stride, num_keys, acc, head_dim); break;
    case 3: accumulate_rows<W, 3>(probs, v, v_row_stride, num_keys, acc, head_dim); break;
    case 4: accumulate_rows<W, 4>(probs, v, v_row_stride, num_keys, acc, head_dim); break;
    case 5: accumulate_rows<W, 5>(probs, v, v_row_stride, num_keys, acc, head_dim); break;
    default: break;
  }
}

// K rows [0, num_keys) of the tile as fp32 K^T [D][kKeyTile]; keys past num_keys read as zero.
template <int W, typename scalar_t>
FASTVLM_INLINE void load_keys_transposed(const scalar_t* k, int64_t k_row_stride, int num_keys, int64_t head_dim,
                                         float* kt) {
  using F = typename Vec<W>::f32;
  for (int key0 = 0; key0 < kKeyTile; key0 += W) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += W) {
      F block[W];
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i)
        block[i] = key0 + i < num_keys ? load_as_float<W>(k + (key0 + i) * k_row_stride + d0) : F{};
      transpose<W>(block);
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) store<W>(kt + (d0 + i) * kKeyTile + key0, block[i]);
    }
  }
}

// scores_direct for bf16 on AVX512-BF16: q (bf16, unscaled) times K straight from the cache, bf16 pairs
// multiplied exactly and summed in fp32; no conversion of K. Defined with the AMX code (AMX CPUs have it).
void scores_direct_dpbf16(const uint16_t* q, const c10::BFloat16* k, int64_t k_row_stride, int num_keys, float* scores,
                          int64_t head_dim, int rows, const TilePrefetch& prefetch);

// acc rows from [16 even][16 odd] per 32 dims (the few-row AMX path) to natural order.
FASTVLM_INLINE void deinterleave_rows(float* acc, int64_t head_dim, int rows) {
  using F = Vec<16>::f32;
  for (int r = 0; r < rows; ++r)
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
      float* block = acc + r * head_dim + d0;
      const F even = load<16>(block), odd = load<16>(block + 16);
      store<16>(block, zip_low<16>(even, odd, std::make_index_sequence<16>{}));
      store<16>(block + 16, zip_high<16>(even, odd, std::make_index_sequence<16>{}));
    }
}

// ---- one work item --------------------------------------------------------------------------------------
// Which rows and keys item `item` owns. Rows are (t, g) pairs, t-major; query head = kv_head * G + g.
struct WorkItem {
  int64_t b, kv_head, first_row, prefix, key_begin, key_end;
  int num_rows;

  WorkItem(const Problem& p, int64_t item) {
    const int64_t split = item % p.num_splits;
    kv_head = (item / p.num_splits) % p.num_kv_heads;
    b = (item / (p.num_splits * p.num_kv_heads)) % p.batch;
    first_row = p.block_of_slot(item / (p.num_splits * p.num_kv_heads * p.batch)) * p.rows_per_block;
    num_rows = static_cast<int>(std::min(p.rows_per_block, p.num_new * p.group - first_row));
    prefix = p.prefix(b);
    int64_t visible_new = 0;
    for (int64_t t = first_row / p.group; t <= (first_row + num_rows - 1) / p.group; ++t)
      visible_new = std::max(visible_new, p.visible_new(b, t));
    key_begin = split * p.split_keys;
    key_end = std::min(prefix + visible_new, key_begin + p.split_keys);
  }
};

// Scores of keys row r may not see in this tile of tile_keys (past the tile's end, or new tokens outside its
// chain or tree) become -inf. Keys before `first_masked` are prefix positions, visible to every row.
FASTVLM_INLINE void mask_row(const Problem& p, const WorkItem& w, int64_t t, int64_t tile_start, int first_masked,
                             int num_keys, int tile_keys, float* row_scores) {
  if (p.tree_mask == nullptr) {  // a chain: new tokens 0..t, the keys before prefix + t + 1
    const int64_t chain_end = w.prefix + t + 1 - tile_start;
    const int visible_end = static_cast<int>(std::clamp<int64_t>(chain_end, first_masked, num_keys));
    std::fill(row_scores + visible_end, row_scores + tile_keys, kNegInf);
    return;
  }
  for (int key = first_masked; key < tile_keys; ++key) {
    const bool visible = key < num_keys && p.new_token_visible(w.b, t, tile_start + key - w.prefix);
    if (!visible) row_scores[key] = kNegInf;
  }
}

// Online softmax of one row's scores for one tile, in base 2 (scores * scale_log2; scale_log2 > 0, so
// masked -inf scores stay -inf): turns them into probabilities in place, then rescales the row's running
// max, sum and output accumulator.
template <int W>
FASTVLM_INLINE void softmax_row(float* row_scores, float scale_log2, float& row_max, float& row_sum, float* acc_row,
                                int64_t acc_len) {
  using F = typename Vec<W>::f32;
  F tile_max = load<W>(row_scores);
#pragma GCC unroll 8
  for (int vec = 1; vec < kKeyTile / W; ++vec) {
    const F s = load<W>(row_scores + vec * W);
    tile_max = s > tile_max ? s : tile_max;
  }
  const float old_max = row_max;
  const float new_max = std::max(old_max, reduce_max<W>(tile_max) * scale_log2);
  if (new_max == kNegInf) {  // nothing visible yet
    std::fill(row_scores, row_scores + kKeyTile, 0.0f);
    return;
  }
  F row_total{};
#pragma GCC unroll 8
  for (int vec = 0; vec < kKeyTile / W; ++vec) {
    const F prob = exp2_nonpositive<W>(load<W>(row_scores + vec * W) * scale_log2 - new_max);
    store<W>(row_scores + vec * W, prob);
    row_total += prob;
  }
  if (new_max == old_max) {
    row_sum += reduce_sum<W>(row_total);
    return;
  }
  const float rescale = std::exp2(old_max - new_max);
  row_sum = row_sum * rescale + reduce_sum<W>(row_total);
  row_max = new_max;
  for (int64_t d = 0; d < acc_len; d += W) store<W>(acc_row + d, load<W>(acc_row + d) * rescale);
}

// Normalises and writes the item's rows (or hands the unnormalised partial result to the merge).
template <typename scalar_t>
void write_rows(const Problem& p, int64_t item, const WorkItem& w, const float* acc, int64_t acc_stride,
                const float* row_max, const float* row_sum) {
  const int64_t D = p.head_dim, G = p.group;
  if (p.num_splits > 1) {
    const int64_t stride = p.rows_per_block;
    for (int r = 0; r < w.num_rows; ++r)
      std::memcpy(p.partial_out + (item * stride + r) * D, acc + r * acc_stride, sizeof(float) * D);
    std::memcpy(p.partial_max + item * stride, row_max, sizeof(float) * w.num_rows);
    std::memcpy(p.partial_sum + item * stride, row_sum, sizeof(float) * w.num_rows);
    return;
  }
  for (int r = 0; r < w.num_rows; ++r) {
    const int64_t t = (w.first_row + r) / G, head = w.kv_head * G + (w.first_row + r) % G;
    const float total = row_sum[r];
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    scalar_t* dst =
        static_cast<scalar_t*>(p.out) + w.b * p.out_stride[0] + head * p.out_stride[1] + t * p.out_stride[2];
    const float* acc_row = acc + r * acc_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc_row[d] * inverse);
    if (p.lse != nullptr)
      p.lse[(w.b * p.num_q_heads + head) * p.num_new + t] =
          total > 0.0f ? (row_max[r] + std::log2(total)) * kLn2 : kNegInf;
  }
}

template <int W, typename scalar_t, bool kBf16Dot = false>
FASTVLM_INLINE void run_item(const Problem& p, int64_t item, Buffers& buf) {
  const int64_t D = p.head_dim, G = p.group;
  const WorkItem w(p, item);
  // Few rows: dot products straight from K rows beat transposing the tile for them.
  const bool transpose_keys = w.num_rows > kMaxDirectRows;
  // The bf16 dot products read q as bf16 (in the K^T buffer, which the direct path leaves unused).
  uint16_t* q_bf16 = reinterpret_cast<uint16_t*>(buf.kt);
  // Many rows: convert each 16-bit V tile to fp32 once instead of once per group of rows.
  const bool convert_values = !std::is_same_v<scalar_t, float> && w.num_rows > Blocking<W>::kRows;

  const scalar_t* q_base = static_cast<const scalar_t*>(p.q) + w.b * p.q_stride[0];
  for (int r = 0; r < w.num_rows; ++r) {
    const int64_t t = (w.first_row + r) / G, g = (w.first_row + r) % G;
    const scalar_t* src = q_base + (w.kv_head * G + g) * p.q_stride[1] + t * p.q_stride[2];
    for (int64_t d = 0; d < D; ++d) buf.q[r * D + d] = static_cast<float>(src[d]) * p.scale_log2;
    if constexpr (kBf16Dot)
      if (!transpose_keys) std::memcpy(q_bf16 + r * D, src, D * sizeof(uint16_t));
    buf.row_max[r] = kNegInf;
    buf.row_sum[r] = 0.0f;
  }
  std::fill(buf.acc, buf.acc + w.num_rows * D, 0.0f);

  const scalar_t* k_head = static_cast<const scalar_t*>(p.k) + w.b * p.k_stride[0] + w.kv_head * p.k_stride[1];
  const scalar_t* v_head = static_cast<const scalar_t*>(p.v) + w.b * p.v_stride[0] + w.kv_head * p.v_stride[1];
  for (int64_t tile_start = w.key_begin; tile_start < w.key_end; tile_start += kKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kKeyTile, w.key_end - tile_start));
    const scalar_t* k_tile = k_head + tile_start * p.k_stride[2];
    const scalar_t* v_tile = v_head + tile_start * p.v_stride[2];

    const TilePrefetch prefetch(v_tile, p.v_stride[2], k_tile, p.k_stride[2], D, kKeyTile);
    if (transpose_keys) {
      load_keys_transposed<W>(k_tile, p.k_stride[2], num_keys, D, buf.kt);
      scores_transposed<W>(buf.q, buf.kt, buf.scores, D, w.num_rows);
    } else {
      if constexpr (kBf16Dot)
        scores_direct_dpbf16(q_bf16, k_tile, p.k_stride[2], num_keys, buf.scores, D, w.num_rows, prefetch);
      else
        scores_direct<W>(buf.q, k_tile, p.k_stride[2], num_keys, buf.scores, D, w.num_rows);
    }
    const int first_masked = static_cast<int>(std::clamp<int64_t>(w.prefix - tile_start, 0, num_keys));
    for (int r = 0; r < w.num_rows; ++r) {
      float* row_scores = buf.scores + r * kKeyTile;
      if (first_masked < kKeyTile)
        mask_row(p, w, (w.first_row + r) / G, tile_start, first_masked, num_keys, kKeyTile, row_scores);
      const float scale = kBf16Dot && !transpose_keys ? p.scale_log2 : 1.0f;  // buf.q is pre-scaled
      softmax_row<W>(row_scores, scale, buf.row_max[r], buf.row_sum[r], buf.acc + r * D, D);
    }
    if (convert_values) {
      for (int key = 0; key < num_keys; ++key)
        for (int64_t d = 0; d < D; d += W)
          store<W>(buf.v + key * D + d, load_as_float<W>(v_tile + key * p.v_stride[2] + d));
      accumulate<W>(buf.scores, buf.v, D, num_keys, buf.acc, D, w.num_rows);
    } else {
      accumulate<W>(buf.scores, v_tile, p.v_stride[2], num_keys, buf.acc, D, w.num_rows);
    }
  }
  write_rows<scalar_t>(p, item, w, buf.acc, D, buf.row_max, buf.row_sum);
}

template <int W, typename scalar_t>
FASTVLM_INLINE void run_items(const Problem& p, int64_t begin, int64_t end) {
  Buffers buf(p.rows_per_block, p.head_dim);
  for (int64_t item = begin; item < end; ++item) run_item<W, scalar_t>(p, item, buf);
}

// ---- bf16 on AMX: tiles of 16 rows x 32 bf16; S = Q K^T and O += P V as tile matmuls ------------------
// Q is zero-padded to 16-row and 32-dim multiples, K is stored as bf16 pairs transposed (VNNI: [D/2][keys]),
// V as key pairs interleaved ([keys/2][D][2]), P is rounded to bf16 (as torch's own CPU SDPA does), and
// every accumulation stays fp32. Tile registers: C 0-3, A 4-5, B 6-7 (2 x 2 blocks of 16 x 16 outputs).
#if FASTVLM_AMX
typedef uint16_t bf16x32 __attribute__((vector_size(64)));

template <size_t... Lane>
FASTVLM_INLINE bf16x32 zip16_low(bf16x32 a, bf16x32 b, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, ((Lane % 2) * 32 + Lane / 2)...);
}

template <size_t... Lane>
FASTVLM_INLINE bf16x32 zip16_high(bf16x32 a, bf16x32 b, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, ((Lane % 2) * 32 + 16 + Lane / 2)...);
}

// Up to 32 bf16 from src (fewer when the row ends: D % 32 == 16), zero-filled.
FASTVLM_INLINE bf16x32 load_bf16x32(const c10::BFloat16* src, int64_t count) {
  bf16x32 v{};
  if (count >= 32)
    std::memcpy(&v, src, 64);
  else
    std::memcpy(&v, src, 32);  // head dims are multiples of 16
  return v;
}

struct AmxBuffers {
  int64_t padded_rows, padded_dim;
  uint16_t* q;      // [padded_rows][padded_dim]
  uint32_t* kt;     // [padded_dim / 2][kAmxKeyTile]
  uint16_t* v;      // [kAmxKeyTile / 2][padded_dim][2]
  float* scores;    // [padded_rows][kAmxKeyTile]
  uint16_t* probs;  // [padded_rows][kAmxKeyTile]
  float* acc;       // [padded_rows][padded_dim]
  float *row_max, *row_sum;
  // The few-row path (run_item_amx_few): P as 32-bit words, bf16 in the low (even) or high (odd) half,
  // [kMaxFewRows][kAmxKeyTile] each; one 16 x 16 fp32 score tile; zero-padded copies of a last partial
  // group of 16 K and V rows [16][padded_dim] each.
  uint32_t *p_even, *p_odd;
  float* key_tile;
  uint16_t *k_rest, *v_rest;

  AmxBuffers(int64_t rows, int64_t head_dim)
      : padded_rows((rows + 15) / 16 * 16), padded_dim((head_dim + 31) / 32 * 32) {
    const int64_t R = padded_rows, Dp = padded_dim;
    const int64_t sizes[] = {R * Dp / 2,                 // q (in floats, as all of them)
                             Dp / 2 * kAmxKeyTile,       // kt
                             kAmxKeyTile * Dp / 2,       // v
                             R * kAmxKeyTile,            // scores
                             R * kAmxKeyTile / 2,        // probs
                             R * Dp,                     // acc
                             R,                          // row_max
                             R,                          // row_sum
                             kMaxFewRows * kAmxKeyTile,  // p_even
                             kMaxFewRows * kAmxKeyTile,  // p_odd
                             256,                        // key_tile
                             8 * Dp,                     // k_rest
                             8 * Dp};                    // v_rest
    constexpr int kParts = sizeof(sizes) / sizeof(sizes[0]);
    int64_t total = 16;
    for (int64_t size : sizes) total += (size + 15) / 16 * 16;
    float* cursor = thread_scratch(1, total);
    cursor += (16 - (reinterpret_cast<uintptr_t>(cursor) / sizeof(float)) % 16) % 16;
    void* parts[kParts];
    for (int i = 0; i < kParts; ++i) {
      parts[i] = cursor;
      cursor += (sizes[i] + 15) / 16 * 16;
    }
    p_even = static_cast<uint32_t*>(parts[8]);
    p_odd = static_cast<uint32_t*>(parts[9]);
    key_tile = static_cast<float*>(parts[10]);
    k_rest = static_cast<uint16_t*>(parts[11]);
    v_rest = static_cast<uint16_t*>(parts[12]);
    q = static_cast<uint16_t*>(parts[0]);
    kt = static_cast<uint32_t*>(parts[1]);
    v = static_cast<uint16_t*>(parts[2]);
    scores = static_cast<float*>(parts[3]);
    probs = static_cast<uint16_t*>(parts[4]);
    acc = static_cast<float*>(parts[5]);
    row_max = static_cast<float*>(parts[6]);
    row_sum = static_cast<float*>(parts[7]);
  }
};

// S = Q K^T for the 16 (kRowTiles = 1) or 32 (2) rows from r0.
template <int kRowTiles>
FASTVLM_AMX_TARGET FASTVLM_INLINE void amx_scores_rows(const AmxBuffers& buf, int64_t r0) {
  const int64_t Dp = buf.padded_dim;
  for (int k0 = 0; k0 < kAmxKeyTile; k0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (kRowTiles == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
      _tile_loadd(4, buf.q + r0 * Dp + d0, Dp * 2);
      _tile_loadd(6, buf.kt + d0 / 2 * kAmxKeyTile + k0, kAmxKeyTile * 4);
      _tile_loadd(7, buf.kt + d0 / 2 * kAmxKeyTile + k0 + 16, kAmxKeyTile * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kRowTiles == 2) {
        _tile_loadd(5, buf.q + (r0 + 16) * Dp + d0, Dp * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, buf.scores + r0 * kAmxKeyTile + k0, kAmxKeyTile * 4);
    _tile_stored(1, buf.scores + r0 * kAmxKeyTile + k0 + 16, kAmxKeyTile * 4);
    if constexpr (kRowTiles == 2) {
      _tile_stored(2, buf.scores + (r0 + 16) * kAmxKeyTile + k0, kAmxKeyTile * 4);
      _tile_stored(3, buf.scores + (r0 + 16) * kAmxKeyTile + k0 + 16, kAmxKeyTile * 4);
    }
  }
}

// O += P V for the 16 (kRowTiles = 1) or 32 (2) rows from r0.
template <int kRowTiles>
FASTVLM_AMX_TARGET FASTVLM_INLINE void amx_accumulate_rows(AmxBuffers& buf, int64_t r0) {
  const int64_t Dp = buf.padded_dim;
  for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
    _tile_loadd(0, buf.acc + r0 * Dp + d0, Dp * 4);
    _tile_loadd(1, buf.acc + r0 * Dp + d0 + 16, Dp * 4);
    if constexpr (kRowTiles == 2) {
      _tile_loadd(2, buf.acc + (r0 + 16) * Dp + d0, Dp * 4);
      _tile_loadd(3, buf.acc + (r0 + 16) * Dp + d0 + 16, Dp * 4);
    }
    for (int k0 = 0; k0 < kAmxKeyTile; k0 += 32) {
      _tile_loadd(4, buf.probs + r0 * kAmxKeyTile + k0, kAmxKeyTile * 2);
      _tile_loadd(6, buf.v + (k0 / 2 * Dp + d0) * 2, Dp * 4);
      _tile_loadd(7, buf.v + (k0 / 2 * Dp + d0 + 16) * 2, Dp * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kRowTiles == 2) {
        _tile_loadd(5, buf.probs + (r0 + 16) * kAmxKeyTile + k0, kAmxKeyTile * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, buf.acc + r0 * Dp + d0, Dp * 4);
    _tile_stored(1, buf.acc + r0 * Dp + d0 + 16, Dp * 4);
    if constexpr (kRowTiles == 2) {
      _tile_stored(2, buf.acc + (r0 + 16) * Dp + d0, Dp * 4);
      _tile_stored(3, buf.acc + (r0 + 16) * Dp + d0 + 16, Dp * 4);
    }
  }
}

// Both products over `rows` rows (a multiple of 16): 32-row blocks, then a 16-row one if left.
FASTVLM_AMX_TARGET inline void amx_scores(const AmxBuffers& buf, int64_t rows) {
  int64_t r0 = 0;
  for (; r0 + 32 <= rows; r0 += 32) amx_scores_rows<2>(buf, r0);
  if (r0 < rows) amx_scores_rows<1>(buf, r0);
}

FASTVLM_AMX_TARGET inline void amx_accumulate(AmxBuffers& buf, int64_t rows) {
  int64_t r0 = 0;
  for (; r0 + 32 <= rows; r0 += 32) amx_accumulate_rows<2>(buf, r0);
  if (r0 < rows) amx_accumulate_rows<1>(buf, r0);
}

FASTVLM_AMX_TARGET void scores_direct_dpbf16(const uint16_t* q, const c10::BFloat16* k, int64_t k_row_stride,
                                             int num_keys, float* scores, int64_t head_dim, int rows,
                                             const TilePrefetch& prefetch) {
  for (int key0 = 0; key0 < num_keys; key0 += 16) {
    prefetch.keys(key0, 16);
    const c10::BFloat16* key_rows[16];
    for (int j = 0; j < 16; ++j) key_rows[j] = k + std::min(key0 + j, num_keys - 1) * k_row_stride;
    for (int r = 0; r < rows; ++r) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < head_dim; d += 32) {
        const __mmask32 lanes = d + 32 <= head_dim ? ~__mmask32{0} : __mmask32{0xffff};  // D % 32 == 16
        const __m512bh query = (__m512bh)_mm512_maskz_loadu_epi16(lanes, q + r * head_dim + d);
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], query, (__m512bh)_mm512_maskz_loadu_epi16(lanes, key_rows[j] + d));
      }
      Vec<16>::f32 sums[16];
      for (int j = 0; j < 16; ++j) sums[j] = (Vec<16>::f32)acc[j];
      store<16>(scores + r * kKeyTile + key0, sum_each<16>(sums));
    }
  }
}

// softmax_row for the AMX path, with AVX-512 instructions the portable vectors cannot name: 2^x as
// scalef(polynomial(fraction), round(x)), masked lanes zeroed by a compare mask, and the probabilities written
// as bf16 (nearest even, 32 at a time by vcvtne2ps2bf16); the running sum, and so lse, counts the unrounded
// fp32 ones.
FASTVLM_AMX_TARGET FASTVLM_INLINE void softmax_row_amx(float* row_scores, float scale_log2, float& row_max,
                                                       float& row_sum, float* acc_row, int64_t acc_len,
                                                       uint16_t* bf16_probs) {
  static_assert(kAmxKeyTile % 32 == 0, "probabilities are converted 32 at a time");
  constexpr int kVecs = kAmxKeyTile / 16;
  __m512 scores[kVecs];
  __m512 tile_max = _mm512_set1_ps(kNegInf);
  for (int vec = 0; vec < kVecs; ++vec) {
    scores[vec] = _mm512_loadu_ps(row_scores + vec * 16);
    tile_max = _mm512_max_ps(tile_max, scores[vec]);
  }
  const float old_max = row_max;
  const float new_max = std::max(old_max, _mm512_reduce_max_ps(tile_max) * scale_log2);
  if (new_max == kNegInf) {  // nothing visible yet
    std::fill(bf16_probs, bf16_probs + kAmxKeyTile, uint16_t{0});
    return;
  }
  const __m512 scale = _mm512_set1_ps(scale_log2), shift = _mm512_set1_ps(new_max);
  __m512 row_total = _mm512_setzero_ps();
  for (int vec = 0; vec < kVecs; vec += 2) {
    __m512 probs[2];
    for (int half = 0; half < 2; ++half) {
      const __m512 x = _mm512_fmsub_ps(scores[vec + half], scale, shift);  // <= 0, or -inf when masked
      const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);
      const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 frac = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT);  // x - round(x), in [-0.5, 0.5]
      // Degree 4 (relative error 2.6e-6, far below the bf16 rounding of P that follows).
      __m512 poly = _mm512_fmadd_ps(frac, _mm512_set1_ps(9.570087306201458e-3f), _mm512_set1_ps(5.591787025332451e-2f));
      poly = _mm512_fmadd_ps(poly, frac, _mm512_set1_ps(2.402474582195282e-1f));
      poly = _mm512_fmadd_ps(poly, frac, _mm512_set1_ps(6.931217908859253e-1f));
      poly = _mm512_fmadd_ps(poly, frac, _mm512_set1_ps(9.999992847442627e-1f));
      probs[half] = _mm512_maskz_scalef_ps(live, poly, whole);
      row_total = _mm512_add_ps(row_total, probs[half]);
    }
    _mm512_storeu_si512(bf16_probs + vec * 16, (__m512i)_mm512_cvtne2ps_pbh(probs[1], probs[0]));
  }
  if (new_max == old_max) {
    row_sum += _mm512_reduce_add_ps(row_total);
    return;
  }
  const float rescale = std::exp2(old_max - new_max);
  row_sum = row_sum * rescale + _mm512_reduce_add_ps(row_total);
  row_max = new_max;
  const __m512 factor = _mm512_set1_ps(rescale);
  for (int64_t d = 0; d < acc_len; d += 16)
    _mm512_storeu_ps(acc_row + d, _mm512_mul_ps(_mm512_loadu_ps(acc_row + d), factor));
}

FASTVLM_AMX_TARGET inline void run_item_amx(const Problem& p, int64_t item, AmxBuffers& buf) {
  using F = Vec<16>::f32;
  const int64_t D = p.head_dim, Dp = buf.padded_dim, G = p.group;
  const WorkItem w(p, item);

  const c10::BFloat16* q_base = static_cast<const c10::BFloat16*>(p.q) + w.b * p.q_stride[0];
  const int64_t padded_rows = (w.num_rows + 15) / 16 * 16;  // the tile matmuls' rows (<= buf.padded_rows)
  std::fill(buf.q, buf.q + padded_rows * Dp, uint16_t{0});
  std::fill(buf.probs, buf.probs + padded_rows * kAmxKeyTile, uint16_t{0});
  for (int r = 0; r < w.num_rows; ++r) {
    const int64_t t = (w.first_row + r) / G, g = (w.first_row + r) % G;
    std::memcpy(buf.q + r * Dp, q_base + (w.kv_head * G + g) * p.q_stride[1] + t * p.q_stride[2], D * 2);
    buf.row_max[r] = kNegInf;
    buf.row_sum[r] = 0.0f;
  }
  std::fill(buf.acc, buf.acc + padded_rows * Dp, 0.0f);

  const auto* k_head = static_cast<const c10::BFloat16*>(p.k) + w.b * p.k_stride[0] + w.kv_head * p.k_stride[1];
  const auto* v_head = static_cast<const c10::BFloat16*>(p.v) + w.b * p.v_stride[0] + w.kv_head * p.v_stride[1];
  for (int64_t tile_start = w.key_begin; tile_start < w.key_end; tile_start += kAmxKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kAmxKeyTile, w.key_end - tile_start));
    const c10::BFloat16* k_tile = k_head + tile_start * p.k_stride[2];
    const c10::BFloat16* v_tile = v_head + tile_start * p.v_stride[2];

    // K^T as bf16 pairs: a 16 x 16 transpose of 32-bit words per 16 keys x 32 dims.
    for (int key0 = 0; key0 < kAmxKeyTile; key0 += 16) {
      for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
        F block[16];
        for (int i = 0; i < 16; ++i) {
          const bf16x32 words =
              key0 + i < num_keys ? load_bf16x32(k_tile + (key0 + i) * p.k_stride[2] + d0, D - d0) : bf16x32{};
          block[i] = (F)words;
        }
        transpose<16>(block);
        for (int i = 0; i < 16; ++i)
          store<16>(reinterpret_cast<float*>(buf.kt + (d0 / 2 + i) * kAmxKeyTile + key0), block[i]);
      }
    }
    amx_scores(buf, padded_rows);

    const int first_masked = static_cast<int>(std::clamp<int64_t>(w.prefix - tile_start, 0, num_keys));
    for (int r = 0; r < w.num_rows; ++r) {
      float* row_scores = buf.scores + r * kAmxKeyTile;
      if (first_masked < kAmxKeyTile)
        mask_row(p, w, (w.first_row + r) / G, tile_start, first_masked, num_keys, kAmxKeyTile, row_scores);
      softmax_row_amx(row_scores, p.scale_log2, buf.row_max[r], buf.row_sum[r], buf.acc + r * Dp, Dp,
                      buf.probs + r * kAmxKeyTile);
    }

    // V with key pairs interleaved; keys past the tile's end are zero.
    for (int pair = 0; pair < kAmxKeyTile / 2; ++pair) {
      const int key = 2 * pair;
      for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
        const bf16x32 even = key < num_keys ? load_bf16x32(v_tile + key * p.v_stride[2] + d0, D - d0) : bf16x32{};
        const bf16x32 odd =
            key + 1 < num_keys ? load_bf16x32(v_tile + (key + 1) * p.v_stride[2] + d0, D - d0) : bf16x32{};
        const bf16x32 low = zip16_low(even, odd, std::make_index_sequence<32>{});
        const bf16x32 high = zip16_high(even, odd, std::make_index_sequence<32>{});
        std::memcpy(buf.v + (pair * Dp + d0) * 2, &low, sizeof(low));
        std::memcpy(buf.v + (pair * Dp + d0 + 16) * 2, &high, sizeof(high));
      }
    }
    amx_accumulate(buf, padded_rows);
  }
  write_rows<c10::BFloat16>(p, item, w, buf.acc, Dp, buf.row_max, buf.row_sum);
}

// ---- bf16 on AMX, few rows (<= kMaxFewRows; head_dim % 32 == 0): K and V read in place by tile loads -----
// S^T = K Q^T: A = 16 K rows x 32 dims straight from the cache, B = Q^T as bf16 pairs (packed once per item:
// [row block][dim block][16 dim pairs][16 rows][2]); each 16-key x 16-row fp32 result is transposed into
// buf.scores, row-major as the many-row path has them. O += P V with 16 V rows as B straight from the cache:
// B's pairs are then dims (2n, 2n + 1) of one key, so A carries P in the low (even) or high (odd) bf16 of
// each 32-bit word and zero in the other, and two accumulator tiles get the even and the odd dims of 32:
// twice the tile products (cheap with so few rows), no K transpose, no V repacking. acc holds
// [16 even][16 odd] per 32 dims until the item ends. A last partial group of 16 keys comes from zero-padded
// copies (no read past the keys' end, no stale cache rows times zero).
FASTVLM_AMX_TARGET inline void run_item_amx_few(const Problem& p, int64_t item, AmxBuffers& buf) {
  using F = Vec<16>::f32;
  using U32 = Vec<16>::u32;
  const int64_t D = p.head_dim, G = p.group, dim_blocks = D / 32;
  const WorkItem w(p, item);
  const int row_blocks = (w.num_rows + 15) / 16;
  const int64_t padded_rows = row_blocks * 16;

  uint32_t* qt = reinterpret_cast<uint32_t*>(buf.q);  // padded_rows * D / 2 words
  std::fill(qt, qt + padded_rows * D / 2, 0u);
  const c10::BFloat16* q_base = static_cast<const c10::BFloat16*>(p.q) + w.b * p.q_stride[0];
  for (int r = 0; r < w.num_rows; ++r) {
    const int64_t t = (w.first_row + r) / G, g = (w.first_row + r) % G;
    const c10::BFloat16* src = q_base + (w.kv_head * G + g) * p.q_stride[1] + t * p.q_stride[2];
    for (int64_t word = 0; word < D / 2; ++word) {
      uint32_t value;
      std::memcpy(&value, src + 2 * word, sizeof(value));
      qt[(((r / 16) * dim_blocks + word / 16) * 16 + word % 16) * 16 + r % 16] = value;
    }
    buf.row_max[r] = kNegInf;
    buf.row_sum[r] = 0.0f;
  }
  std::fill(buf.acc, buf.acc + padded_rows * D, 0.0f);
  std::fill(buf.p_even, buf.p_even + padded_rows * kAmxKeyTile, 0u);
  std::fill(buf.p_odd, buf.p_odd + padded_rows * kAmxKeyTile, 0u);

  const auto* k_head = static_cast<const c10::BFloat16*>(p.k) + w.b * p.k_stride[0] + w.kv_head * p.k_stride[1];
  const auto* v_head = static_cast<const c10::BFloat16*>(p.v) + w.b * p.v_stride[0] + w.kv_head * p.v_stride[1];
  const int64_t k_bytes = p.k_stride[2] * 2, v_bytes = p.v_stride[2] * 2;
  for (int64_t tile_start = w.key_begin; tile_start < w.key_end; tile_start += kAmxKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kAmxKeyTile, w.key_end - tile_start));
    const c10::BFloat16* k_tile = k_head + tile_start * p.k_stride[2];
    const c10::BFloat16* v_tile = v_head + tile_start * p.v_stride[2];
    const int groups = (num_keys + 15) / 16, full_groups = num_keys / 16;
    if (full_groups < groups) {
      const int rest = num_keys - full_groups * 16;
      std::fill(buf.k_rest, buf.k_rest + 16 * D, uint16_t{0});
      std::fill(buf.v_rest, buf.v_rest + 16 * D, uint16_t{0});
      for (int i = 0; i < rest; ++i) {
        std::memcpy(buf.k_rest + i * D, k_tile + (full_groups * 16 + i) * p.k_stride[2], D * 2);
        std::memcpy(buf.v_rest + i * D, v_tile + (full_groups * 16 + i) * p.v_stride[2], D * 2);
      }
    }
    auto k_group = [&](int group) {
      return group < full_groups ? reinterpret_cast<const char*>(k_tile + group * 16 * p.k_stride[2])
                                 : reinterpret_cast<const char*>(buf.k_rest);
    };
    auto v_group = [&](int group) {
      return group < full_groups ? reinterpret_cast<const char*>(v_tile + group * 16 * p.v_stride[2])
                                 : reinterpret_cast<const char*>(buf.v_rest);
    };

    // S^T, 16 keys at a time, then transposed into the rows' scores.
    for (int group = 0; group < groups; ++group) {
      const char* k_rows = k_group(group);
      const int64_t k_row_bytes = group < full_groups ? k_bytes : D * 2;
      _tile_zero(0);
      if (row_blocks == 2) _tile_zero(1);
      for (int64_t db = 0; db < dim_blocks; ++db) {
        _tile_loadd(4, k_rows + db * 64, k_row_bytes);
        _tile_loadd(6, qt + db * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (row_blocks == 2) {
          _tile_loadd(7, qt + (dim_blocks + db) * 256, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
      }
      for (int rb = 0; rb < row_blocks; ++rb) {
        if (rb == 0)
          _tile_stored(0, buf.key_tile, 64);
        else
          _tile_stored(1, buf.key_tile, 64);
        F block[16];
        for (int i = 0; i < 16; ++i) block[i] = load<16>(buf.key_tile + 16 * i);
        transpose<16>(block);
        const int rows_here = std::min(16, w.num_rows - rb * 16);
        for (int r = 0; r < rows_here; ++r) store<16>(buf.scores + (rb * 16 + r) * kAmxKeyTile + group * 16, block[r]);
      }
    }

    const int first_masked = static_cast<int>(std::clamp<int64_t>(w.prefix - tile_start, 0, num_keys));
    for (int r = 0; r < w.num_rows; ++r) {
      float* row_scores = buf.scores + r * kAmxKeyTile;
      if (first_masked < kAmxKeyTile)
        mask_row(p, w, (w.first_row + r) / G, tile_start, first_masked, num_keys, kAmxKeyTile, row_scores);
      uint16_t* probs = buf.probs + r * kAmxKeyTile;
      softmax_row_amx(row_scores, p.scale_log2, buf.row_max[r], buf.row_sum[r], buf.acc + r * D, D, probs);
      for (int key0 = 0; key0 < groups * 16; key0 += 16) {
        Vec<16>::u16 bits;
        std::memcpy(&bits, probs + key0, sizeof(bits));
        const U32 wide = __builtin_convertvector(bits, U32);
        std::memcpy(buf.p_even + r * kAmxKeyTile + key0, &wide, sizeof(wide));
        const U32 high = wide << 16;
        std::memcpy(buf.p_odd + r * kAmxKeyTile + key0, &high, sizeof(high));
      }
    }

    // O += P V: per 32 dims, the even and odd accumulators of each row block.
    for (int64_t db = 0; db < dim_blocks; ++db) {
      float* acc0 = buf.acc + db * 32;
      float* acc1 = buf.acc + 16 * D + db * 32;
      _tile_loadd(0, acc0, D * 4);
      _tile_loadd(1, acc0 + 16, D * 4);
      if (row_blocks == 2) {
        _tile_loadd(2, acc1, D * 4);
        _tile_loadd(3, acc1 + 16, D * 4);
      }
      for (int group = 0; group < groups; ++group) {
        _tile_loadd(6, v_group(group) + db * 64, group < full_groups ? v_bytes : D * 2);
        _tile_loadd(4, buf.p_even + group * 16, kAmxKeyTile * 4);
        _tile_loadd(5, buf.p_odd + group * 16, kAmxKeyTile * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (row_blocks == 2) {
          _tile_loadd(4, buf.p_even + 16 * kAmxKeyTile + group * 16, kAmxKeyTile * 4);
          _tile_loadd(5, buf.p_odd + 16 * kAmxKeyTile + group * 16, kAmxKeyTile * 4);
          _tile_dpbf16ps(2, 4, 6);
          _tile_dpbf16ps(3, 5, 6);
        }
      }
      _tile_stored(0, acc0, D * 4);
      _tile_stored(1, acc0 + 16, D * 4);
      if (row_blocks == 2) {
        _tile_stored(2, acc1, D * 4);
        _tile_stored(3, acc1 + 16, D * 4);
      }
    }
  }

  deinterleave_rows(buf.acc, D, w.num_rows);
  write_rows<c10::BFloat16>(p, item, w, buf.acc, D, buf.row_max, buf.row_sum);
}

// bf16 items with enough rows go to AMX, the rest to the AVX-512 code.
FASTVLM_AMX_TARGET void run_items_amx_bf16(const Problem& p, int64_t begin, int64_t end) {
  bool configured = false;  // the tile registers are set up only when an item uses them (not for 1-row items)
  Buffers buf(p.rows_per_block, p.head_dim);
  for (int64_t item = begin; item < end; ++item) {
    const int rows = WorkItem(p, item).num_rows;
    const bool few = rows > 1 && rows <= kMaxFewRows && p.head_dim % 32 == 0;
    const bool amx = p.scale_log2 > 0.0f && (few || rows > kMaxDirectRows);
    if (amx && !configured) {
      amx::configure_tiles();
      configured = true;
    }
    if (amx) {
      AmxBuffers amx_buf(p.rows_per_block, p.head_dim);
      if (few)
        run_item_amx_few(p, item, amx_buf);
      else
        run_item_amx(p, item, amx_buf);
    } else if (p.scale_log2 > 0.0f) {
      run_item<16, c10::BFloat16, true>(p, item, buf);
    } else {
      run_item<16, c10::BFloat16>(p, item, buf);
    }
  }
  if (configured) amx::release_tiles();
}
#endif  // FASTVLM_AMX

// Combine the key chunks of one (slot, b, kv head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <typename scalar_t>
void merge_splits(const Problem& p, int64_t group_index) {
  const int64_t D = p.head_dim, G = p.group, T = p.num_new, S = p.num_splits;
  const int64_t kv_head = group_index % p.num_kv_heads;
  const int64_t b = (group_index / p.num_kv_heads) % p.batch;
  const int64_t first_row = p.block_of_slot(group_index / (p.num_kv_heads * p.batch)) * p.rows_per_block;
  const int64_t num_rows = std::min(p.rows_per_block, T * G - first_row);
  std::vector<float> row(D);
  for (int64_t r = 0; r < num_rows; ++r) {
    float max_all = kNegInf;
    for (int64_t s = 0; s < S; ++s)
      max_all = std::max(max_all, p.partial_max[(group_index * S + s) * p.rows_per_block + r]);
    std::fill(row.begin(), row.end(), 0.0f);
    float total = 0.0f;
    if (max_all != kNegInf) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t slot = (group_index * S + s) * p.rows_per_block + r;
        if (p.partial_max[slot] == kNegInf) continue;
        const float weight = std::exp2(p.partial_max[slot] - max_all);
        total += weight * p.partial_sum[slot];
        const float* acc = p.partial_out + slot * D;
        for (int64_t d = 0; d < D; ++d) row[d] += weight * acc[d];
      }
    }
    const int64_t t = (first_row + r) / G, head = kv_head * G + (first_row + r) % G;
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    scalar_t* dst = static_cast<scalar_t*>(p.out) + b * p.out_stride[0] + head * p.out_stride[1] + t * p.out_stride[2];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(row[d] * inverse);
    if (p.lse != nullptr)
      p.lse[(b * p.num_q_heads + head) * T + t] = total > 0.0f ? (max_all + std::log2(total)) * kLn2 : kNegInf;
  }
}

// ---- instruction-set dispatch: the same code compiled for three ISAs (+ AMX for bf16), picked at run time
using ItemsFn = void (*)(const Problem&, int64_t, int64_t);

template <typename scalar_t>
void run_items_baseline(const Problem& p, int64_t begin, int64_t end) {
  run_items<4, scalar_t>(p, begin, end);
}

#if defined(__x86_64__)
template <typename scalar_t>
FASTVLM_AVX2_TARGET void run_items_avx2(const Problem& p, int64_t begin, int64_t end) {
  run_items<8, scalar_t>(p, begin, end);
}

template <typename scalar_t>
FASTVLM_AVX512_TARGET void run_items_avx512(const Problem& p, int64_t begin, int64_t end) {
  run_items<16, scalar_t>(p, begin, end);
}
#endif

// Follows torch's own choice (cpu/isa.h).
template <typename scalar_t>
ItemsFn select_items_fn() {
#if defined(__x86_64__)
  const bool avx512 = cpu_isa::has_avx512();
#if FASTVLM_AMX
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
    if (avx512 && amx::bf16_usable()) return run_items_amx_bf16;
#endif
  if (avx512) return run_items_avx512<scalar_t>;
  if (cpu_isa::has_avx2()) return run_items_avx2<scalar_t>;
#endif
  return run_items_baseline<scalar_t>;
}

template <typename scalar_t>
void launch(const Problem& p) {
  const ItemsFn run = select_items_fn<scalar_t>();
  at::parallel_for(0, p.num_items(), 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
  if (p.num_splits > 1) {
    at::parallel_for(0, p.num_items() / p.num_splits, 1, [&](int64_t begin, int64_t end) {
      for (int64_t group_index = begin; group_index < end; ++group_index) merge_splits<scalar_t>(p, group_index);
    });
  }
}

}  // namespace

void verify_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& prefix_lens, const std::optional<at::Tensor>& tree_mask, double sm_scale,
                          at::Tensor& out, const std::optional<at::Tensor>& lse) {
  Problem p{};
  p.batch = q.size(0);
  p.num_q_heads = q.size(1);
  p.num_new = q.size(2);
  p.head_dim = q.size(3);
  p.num_kv_heads = k_cache.size(1);
  p.cache_len = k_cache.size(2);
  if (p.batch == 0) return;
  TORCH_CHECK(p.head_dim % 16 == 0, "verify_attention_cpu: head_dim must be a multiple of 16, got ", p.head_dim);
  TORCH_CHECK(p.num_new <= p.cache_len, "verify_attention_cpu: T=", p.num_new, " exceeds the cache length ",
              p.cache_len);
  p.group = p.num_q_heads / p.num_kv_heads;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k_cache.stride(i);
    p.v_stride[i] = v_cache.stride(i);
    p.out_stride[i] = out.stride(i);
  }
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  p.prefix_lens = prefix_lens.const_data_ptr<int32_t>();
  p.tree_mask = tree_mask.has_value() ? tree_mask->const_data_ptr<int64_t>() : nullptr;
  p.scale_log2 = static_cast<float>(sm_scale) * kLog2e;

  const int64_t total_rows = p.num_new * p.group;
  p.num_blocks = (total_rows + kMaxBlockRows - 1) / kMaxBlockRows;
  p.rows_per_block = (total_rows + p.num_blocks - 1) / p.num_blocks;

  // Split the key range only when the items alone cannot keep every thread busy in equal shares.
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = std::max(longest, p.prefix(b) + p.num_new);
  const int64_t threads = at::get_num_threads();
  const int64_t base_items = p.num_blocks * p.batch * p.num_kv_heads;
  p.num_splits = 1;
  if (base_items % threads != 0 && base_items < 4 * threads)
    p.num_splits = std::max<int64_t>(1, std::min((4 * threads + base_items - 1) / base_items, longest / kMinSplitKeys));
  p.split_keys = (longest + p.num_splits - 1) / p.num_splits;
  p.split_keys = (p.split_keys + kKeyTile - 1) / kKeyTile * kKeyTile;

  at::Tensor partials;
  if (p.num_splits > 1) {
    const int64_t items = p.num_items(), rows = p.rows_per_block;
    partials = at::empty({items * rows * (p.head_dim + 2)}, q.options().dtype(at::kFloat));
    p.partial_out = partials.data_ptr<float>();
    p.partial_max = p.partial_out + items * rows * p.head_dim;
    p.partial_sum = p.partial_max + items * rows;
  }

  // clang-format off
  AT_DISPATCH_SWITCH(q.scalar_type(), "verify_attention_cpu",
      AT_DISPATCH_CASE(at::kFloat, [&] { launch<scalar_t>(p); })
      AT_DISPATCH_CASE(at::kHalf, [&] { launch<scalar_t>(p); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { launch<scalar_t>(p); }));
  // clang-format on
}

}  // namespace fastvlm
