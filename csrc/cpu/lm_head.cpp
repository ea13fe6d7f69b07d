// lm_head on CPU (early_exit_head and verify_head): RMSNorm, projection and selection in one pass over
// the LM head's rows. The vocabulary (or vocab_subset) is cut into contiguous chunks, a few per thread
// (at::parallel_for); a chunk streams its weight rows 4 at a time, converts them to fp32 once, and
// computes them against every hidden row with a register-blocked micro-kernel (4 vocab rows x up to 6
// hidden rows of W-lane accumulators), so each weight row is read from memory once for all M rows.
// Scores of a 64-column tile feed per-row running state (max, first argmax, sum of exp, Gumbel-max best,
// top-k candidates); chunks are merged in vocabulary order, so ties keep the lowest index. Aim: the
// weight's memory bandwidth for small M, fp32 FMA throughput beyond.
#include "cpu/amx.h"
#include "cpu/isa.h"
#include "cpu/vec.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <type_traits>

namespace fastvlm {
namespace {

constexpr int kCols = 4;          // weight rows converted and computed together
constexpr int kTile = 64;         // columns whose scores are buffered before the row updates
constexpr int kMaxRowsBlock = 6;  // hidden rows per micro-kernel call
// Weight rows up to this many bytes are prefetched one group ahead (see Problem::prefetch_ahead).
constexpr int64_t kPrefetchMaxRowBytes = 8192;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
// The largest Gumbel value the noise can take: -log(-log(1 - 2^-53)) < 36.8. A column whose score is
// more than this below the best perturbed score cannot win, and its noise is never computed.
constexpr float kGumbelMax = 36.8f;

using namespace cpu_vec;

// ---- the counter-based Gumbel noise (reference.py's gumbel_noise, bit for bit) ----------------------
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

FASTVLM_INLINE uint64_t splitmix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

FASTVLM_INLINE float gumbel(uint64_t row_base, int64_t token) {
  const uint64_t h = splitmix64(row_base + static_cast<uint64_t>(token + 1) * kGolden);
  const double u = (static_cast<double>(h >> 12) + 0.5) * 0x1p-52;
  return static_cast<float>(-std::log(-std::log(u)));
}

// ---- the problem and the per-chunk state -----------------------------------------------------------
struct Problem {
  int64_t M = 0, H = 0, Hp = 0, num_cols = 0, vocab = 0;
  const float* y = nullptr;          // [M, Hp] normed hidden rows, fp32, zero padded
  const void* y_bf16 = nullptr;      // the same rows as bf16 (bf16 inputs), for the vdpbf16ps kernel
  const uint16_t* y_vnni = nullptr;  // AMX: [M / 16 blocks][H / 2][16 rows][2] bf16 pairs, zero padded
  int64_t num_row_blocks = 0;        // AMX: ceil(M / 16)
  const void* weight = nullptr;      // [V, H], rows at weight_stride
  int64_t weight_stride = 0;
  // Software prefetch distance in elements (0: none): the next group's rows (kCols, or 16 on AMX) are
  // prefetched to L2 line by line while this group is computed. Short rows are many short streams that the
  // hardware prefetcher keeps losing: measured on a 2-core Xeon (1 thread, 2026-11-26), a 49152 x 576 fp32
  // head went from 8.0 / 10.6 / 13.4 ms to 5.0-5.8 / 5.6-6.4 / 5.9-6.9 ms at M = 1 / 2 / 3, bf16 from
  // 3.3 / 4.8 / 7.0 to 2.7 / 3.0 / 3.4 ms; at 16 KB rows (4096 fp32) it cost 3-6% at M = 1, so it stops at
  // kPrefetchMaxRowBytes. Rows picked through a subset (sorted token ids) are prefetched the same way, each
  // column the row of the column kCols further on: the hardware prefetcher cannot follow them either.
  // Measured on a 2-core EPYC (1 thread, the other core busy, 2026-12-07), 8,192 sorted ids of a 49152 x 576
  // head, medians of 3 alternated processes: fp32 M = 1 1.69 -> 0.75 ms, M = 4 2.13 -> 1.34 ms; bf16 M = 1
  // 0.43 -> 0.24 ms, M = 4 0.92 -> 0.35 ms.
  int64_t prefetch_ahead = 0;
  bool prefetch_subset = false;
  const int64_t* subset = nullptr;     // column j reads weight row subset[j] (token id), or j itself
  const int64_t* draft = nullptr;      // [M] or null
  const int64_t* prob_rows = nullptr;  // [R] or null
  int64_t num_prob_rows = 0;
  float* probs = nullptr;  // [R, V] contiguous
  int mode = 0;            // 0 argmax, 1 sample, 2 topk
  int64_t top_k = 0;       // candidates kept (topk mode, or sample with top-k); 0: none
  float top_p = 1.0f;
  float logit_scale = 1.0f, softcap = 0.0f, temperature = 1.0f;
  std::vector<uint64_t> row_base;  // per-row noise streams (sample)
};

struct Candidate {
  float score;
  int64_t col;
};
// "a is better than b": higher score, then lower column.
FASTVLM_INLINE bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.col < b.col);
}
struct WorseFirst {  // heap order: the worst candidate on top
  bool operator()(const Candidate& a, const Candidate& b) const { return better(a, b); }
};

struct RowState {
  float max = kNegInf;
  int64_t arg = -1;
  float sum = 0.0f;
  float best = kNegInf;  // best perturbed score (sample without top-k)
  float best_score = kNegInf;
  int64_t best_col = -1;
  float draft_score = kNegInf;
  bool has_draft = false;
  std::vector<Candidate> heap;
};

// ---- micro-kernel: kCols weight rows (read in place, converted on the fly) x ROWS hidden rows ---------
template <int W, int ROWS, typename scalar_t>
FASTVLM_INLINE void dot_block(const scalar_t* const* wrows, const float* y, int64_t H, int64_t Hp, float* scores,
                              int64_t tile_col, const int64_t* ahead) {
  using F = typename Vec<W>::f32;
  F acc[kCols][ROWS];
#pragma GCC unroll 4
  for (int c = 0; c < kCols; ++c)
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) acc[c][r] = F{};
  const scalar_t* w0 = wrows[0];
  const scalar_t* w1 = wrows[1];
  const scalar_t* w2 = wrows[2];
  const scalar_t* w3 = wrows[3];
  const int64_t body = H / W * W;
  for (int64_t h = 0; h < body; h += W) {
    // The next group's rows, a cache line of each per line read here: ahead[c] is column c's offset to the
    // row it prefetches, in elements (Problem::prefetch_ahead; nullptr: none).
    if (ahead != nullptr && (h * static_cast<int64_t>(sizeof(scalar_t))) % 64 == 0) {
      __builtin_prefetch(w0 + ahead[0] + h, 0, 2);
      __builtin_prefetch(w1 + ahead[1] + h, 0, 2);
      __builtin_prefetch(w2 + ahead[2] + h, 0, 2);
      __builtin_prefetch(w3 + ahead[3] + h, 0, 2);
    }
    const F w[kCols] = {load_as_float<W>(w0 + h), load_as_float<W>(w1 + h), load_as_float<W>(w2 + h),
                        load_as_float<W>(w3 + h)};
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) {
      const F yv = load<W>(y + r * Hp + h);
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) acc[c][r] += w[c] * yv;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) {
      float total = reduce_sum<W>(acc[c][r]);
      for (int64_t h = body; h < H; ++h) total += static_cast<float>(wrows[c][h]) * y[r * Hp + h];
      scores[r * kTile + tile_col + c] = total;
    }
}

#if defined(__x86_64__)
// bf16 weights on CPUs with AVX512-BF16: vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32,
// twice the multiply-adds of fp32 FMA and no conversion. y holds the normed rows as bf16 ([M, Hp], Hp a
// multiple of 32, zero padded); the weight's H tail is read with a masked load.
template <int ROWS>
FASTVLM_AVX512_BF16_TARGET FASTVLM_INLINE void dot_block_bf16(const c10::BFloat16* const* wrows, const c10::BFloat16* y,
                                                              int64_t H, int64_t Hp, float* scores, int64_t tile_col,
                                                              const int64_t* ahead) {
  __m512 acc[kCols][ROWS];
#pragma GCC unroll 4
  for (int c = 0; c < kCols; ++c)
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += 32) {
    if (ahead != nullptr) {
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) __builtin_prefetch(wrows[c] + ahead[c] + h, 0, 2);
    }
    const __mmask32 mask = H - h >= 32 ? ~__mmask32{0} : (__mmask32{1} << (H - h)) - 1;
    __m512bh w[kCols];
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) w[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wrows[c] + h);
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh yv = (__m512bh)_mm512_loadu_si512(y + r * Hp + h);
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], w[c], yv);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) scores[r * kTile + tile_col + c] = _mm512_reduce_add_ps(acc[c][r]);
}
template <int ROWS_BLOCK>
FASTVLM_AVX512_BF16_TARGET void dot_rows_bf16(const c10::BFloat16* const* wrows, const c10::BFloat16* yb, int64_t M,
                                              int64_t H, int64_t Hp, float* scores, int64_t tile_col,
                                              const int64_t* ahead) {
  int64_t m = 0;
  for (; m + ROWS_BLOCK <= M; m += ROWS_BLOCK)
    dot_block_bf16<ROWS_BLOCK>(wrows, yb + m * Hp, H, Hp, scores + m * kTile, tile_col, m == 0 ? ahead : nullptr);
  const c10::BFloat16* ym = yb + m * Hp;
  float* sm = scores + m * kTile;
  const int64_t* rest_ahead = m == 0 ? ahead : nullptr;  // the group's rows are prefetched once, by its first block
  switch (M - m) {
    case 1: dot_block_bf16<1>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 2: dot_block_bf16<2>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 3: dot_block_bf16<3>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 4: dot_block_bf16<4>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 5: dot_block_bf16<5>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    default: break;
  }
}
#endif

#if FASTVLM_AMX
// ---- bf16 on AMX: 16 weight rows at a time as the A tile (read in place, row stride of the head), the
// normed rows pre-arranged as bf16 pairs (VNNI) as B tiles, C = 16 vocab rows x 16 hidden rows in fp32.
// Tiles: C 0-3 (up to 64 hidden rows per pass), A 4, B 5-7. Needs H % 32 == 0 and contiguous rows.
FASTVLM_AMX_TARGET void amx_group(const Problem& p, const c10::BFloat16* wrow0, float* scores, int64_t tile_col) {
  alignas(64) float c[4][16 * 16];
  const int64_t half = p.H / 2;
  const int64_t w_stride_bytes = p.weight_stride * 2;
  for (int64_t mb0 = 0; mb0 < p.num_row_blocks; mb0 += 4) {
    const int64_t blocks = std::min<int64_t>(4, p.num_row_blocks - mb0);
    const uint16_t* b0 = p.y_vnni + mb0 * half * 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const bool prefetch = mb0 == 0 && p.prefetch_ahead > 0;
    for (int64_t h = 0; h < p.H; h += 32) {
      if (prefetch)
        for (int r = 0; r < 16; ++r) __builtin_prefetch(wrow0 + (16 + r) * p.weight_stride + h, 0, 2);
      _tile_loadd(4, wrow0 + h, w_stride_bytes);
      const uint16_t* b = b0 + h / 2 * 32;
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (blocks > 1) {
        _tile_loadd(6, b + half * 32, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (blocks > 2) {
        _tile_loadd(7, b + 2 * half * 32, 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (blocks > 3) {
        _tile_loadd(5, b + 3 * half * 32, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, c[0], 64);
    if (blocks > 1) _tile_stored(1, c[1], 64);
    if (blocks > 2) _tile_stored(2, c[2], 64);
    if (blocks > 3) _tile_stored(3, c[3], 64);
    for (int64_t j = 0; j < blocks; ++j)
      for (int64_t mi = 0; mi < 16; ++mi) {
        const int64_t m = (mb0 + j) * 16 + mi;
        if (m >= p.M) break;
        for (int v = 0; v < 16; ++v) scores[m * kTile + tile_col + v] = c[j][v * 16 + mi];
      }
  }
}
#endif

template <int W, int ROWS_BLOCK, typename scalar_t, bool kBf16Dot>
FASTVLM_INLINE void dot_rows(const scalar_t* const* wrows, const float* y, const void* y_bf16, int64_t M, int64_t H,
                             int64_t Hp, float* scores, int64_t tile_col, const int64_t* ahead) {
#if defined(__x86_64__)
  if constexpr (kBf16Dot) {
    dot_rows_bf16<ROWS_BLOCK>(reinterpret_cast<const c10::BFloat16* const*>(wrows),
                              static_cast<const c10::BFloat16*>(y_bf16), M, H, Hp, scores, tile_col, ahead);
    return;
  }
#endif
  int64_t m = 0;
  for (; m + ROWS_BLOCK <= M; m += ROWS_BLOCK)
    dot_block<W, ROWS_BLOCK>(wrows, y + m * Hp, H, Hp, scores + m * kTile, tile_col, m == 0 ? ahead : nullptr);
  const float* ym = y + m * Hp;
  float* sm = scores + m * kTile;
  const int64_t* rest_ahead = m == 0 ? ahead : nullptr;  // the group's rows are prefetched once, by its first block
  switch (M - m) {
    case 1: dot_block<W, 1>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 2: dot_block<W, 2>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 3: dot_block<W, 3>(wrows, ym, H, Hp, sm, tile_col, rest_ahead); break;
    case 4:
      if constexpr (ROWS_BLOCK > 4) dot_block<W, 4>(wrows, ym, H, Hp, sm, tile_col, rest_ahead);
      break;
    case 5:
      if constexpr (ROWS_BLOCK > 5) dot_block<W, 5>(wrows, ym, H, Hp, sm, tile_col, rest_ahead);
      break;
    default: break;
  }
}

// Scores of one tile's row -> the row's running state.
template <int W>
FASTVLM_INLINE void update_row(const Problem& p, int64_t m, float* s, int64_t col0, int64_t n, RowState& st) {
  using F = typename Vec<W>::f32;
  float tile_max = kNegInf;
  int64_t tile_arg = 0;
  for (int64_t j = 0; j < n; ++j)
    if (s[j] > tile_max) tile_max = s[j], tile_arg = j;
  if (tile_max > st.max) {
    st.sum = st.max == kNegInf ? 0.0f : st.sum * std::exp2((st.max - tile_max) * kLog2e);
    st.max = tile_max;
    st.arg = col0 + tile_arg;
  }
  const F shift = F{} + st.max * kLog2e;
  F acc = F{};
  int64_t j = 0;
  for (; j + W <= n; j += W) acc += exp2_nonpositive<W>(load<W>(s + j) * kLog2e - shift);
  float sum = reduce_sum<W>(acc);
  for (; j < n; ++j) sum += std::exp2(s[j] * kLog2e - st.max * kLog2e);
  st.sum += sum;

  if (p.draft != nullptr) {
    const int64_t d = p.draft[m] - col0;
    if (d >= 0 && d < n) st.draft_score = s[d], st.has_draft = true;
  }
  if (p.top_k > 0) {
    const int64_t k = p.top_k;
    for (int64_t jj = 0; jj < n; ++jj) {
      const Candidate c{s[jj], col0 + jj};
      if (static_cast<int64_t>(st.heap.size()) < k) {
        st.heap.push_back(c);
        std::push_heap(st.heap.begin(), st.heap.end(), WorseFirst{});
      } else if (better(c, st.heap.front())) {
        std::pop_heap(st.heap.begin(), st.heap.end(), WorseFirst{});
        st.heap.back() = c;
        std::push_heap(st.heap.begin(), st.heap.end(), WorseFirst{});
      }
    }
  } else if (p.mode == 1 && tile_max + kGumbelMax >= st.best) {
    for (int64_t jj = 0; jj < n; ++jj) {
      if (s[jj] + kGumbelMax < st.best) continue;
      const int64_t col = col0 + jj;
      const float perturbed = s[jj] + gumbel(p.row_base[m], p.subset ? p.subset[col] : col);
      if (perturbed > st.best) st.best = perturbed, st.best_score = s[jj], st.best_col = col;
    }
  }
}

template <int W, typename scalar_t, bool kBf16Dot = false, bool kAmx = false>
FASTVLM_INLINE void run_chunk(const Problem& p, int64_t col_begin, int64_t col_end, RowState* states) {
  constexpr int kRowsBlock = W >= 16 ? 6 : 4;
  static_assert(kRowsBlock <= kMaxRowsBlock);
  std::vector<scalar_t> zero_row(p.H, scalar_t(0.0f));
  std::vector<float> scores(p.M * kTile);
  const scalar_t* weight = static_cast<const scalar_t*>(p.weight);
  const bool processed = p.logit_scale != 1.0f || p.softcap > 0.0f || p.temperature != 1.0f;
  for (int64_t tile0 = col_begin; tile0 < col_end; tile0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, col_end - tile0);
    for (int64_t g = 0; g < n; g += kCols) {
#if FASTVLM_AMX
      if constexpr (kAmx) {
        if (g + 16 <= n) {
          amx_group(p, reinterpret_cast<const c10::BFloat16*>(weight + (tile0 + g) * p.weight_stride), scores.data(),
                    g);
          g += 16 - kCols;
          continue;
        }
      }
#endif
      const scalar_t* wrows[kCols];
      int64_t ahead[kCols];
      for (int c = 0; c < kCols; ++c) {
        const int64_t col = tile0 + g + c;
        wrows[c] = g + c < n ? weight + (p.subset ? p.subset[col] : col) * p.weight_stride : zero_row.data();
        // the row kCols columns on (contiguous rows: kCols rows on); none past the chunk or the padding
        ahead[c] = p.prefetch_subset && g + c < n && col + kCols < col_end
                       ? (p.subset[col + kCols] - p.subset[col]) * p.weight_stride
                       : p.prefetch_ahead;
      }
      dot_rows<W, kRowsBlock, scalar_t, kBf16Dot>(wrows, p.y, p.y_bf16, p.M, p.H, p.Hp, scores.data(), g,
                                                  p.prefetch_ahead > 0 || p.prefetch_subset ? ahead : nullptr);
    }
    for (int64_t m = 0; m < p.M; ++m) {
      float* s = scores.data() + m * kTile;
      if (processed) {
        for (int64_t j = 0; j < n; ++j) {
          float z = s[j] * p.logit_scale;
          if (p.softcap > 0.0f) z = p.softcap * std::tanh(z / p.softcap);
          s[j] = z / p.temperature;
        }
      }
      for (int64_t r = 0; r < p.num_prob_rows; ++r)
        if (p.prob_rows[r] == m) std::memcpy(p.probs + r * p.vocab + tile0, s, n * sizeof(float));
      update_row<W>(p, m, s, tile0, n, states[m]);
    }
  }
}

using ChunkFn = void (*)(const Problem&, int64_t, int64_t, RowState*);

template <typename scalar_t>
void run_chunk_baseline(const Problem& p, int64_t b, int64_t e, RowState* s) {
  run_chunk<4, scalar_t>(p, b, e, s);
}
#if defined(__x86_64__)
template <typename scalar_t>
FASTVLM_AVX2_TARGET void run_chunk_avx2(const Problem& p, int64_t b, int64_t e, RowState* s) {
  run_chunk<8, scalar_t>(p, b, e, s);
}
template <typename scalar_t>
FASTVLM_AVX512_TARGET void run_chunk_avx512(const Problem& p, int64_t b, int64_t e, RowState* s) {
  run_chunk<16, scalar_t>(p, b, e, s);
}
FASTVLM_AVX512_BF16_TARGET void run_chunk_avx512_bf16(const Problem& p, int64_t b, int64_t e, RowState* s) {
  run_chunk<16, c10::BFloat16, true>(p, b, e, s);
}
#if FASTVLM_AMX
FASTVLM_AMX_TARGET void run_chunk_amx_bf16(const Problem& p, int64_t b, int64_t e, RowState* s) {
  amx::configure_tiles();
  run_chunk<16, c10::BFloat16, true, true>(p, b, e, s);
  amx::release_tiles();
}
#endif
#endif

template <typename scalar_t>
ChunkFn select_chunk_fn(bool amx_shape) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if FASTVLM_AMX
    // amx::bf16_usable() includes AVX512-BF16.
    if (amx_shape && cpu_isa::torch_uses_avx512() && amx::bf16_usable()) return run_chunk_amx_bf16;
#endif
    if (cpu_isa::has_avx512_bf16()) return run_chunk_avx512_bf16;
  }
  if (cpu_isa::has_avx512()) return run_chunk_avx512<scalar_t>;
  if (cpu_isa::has_avx2()) return run_chunk_avx2<scalar_t>;
#endif
  return run_chunk_baseline<scalar_t>;
}

// Normed hidden rows: x * rsqrt(mean(x^2) + eps) * (offset + w) in fp32, rounded through scalar_t.
template <typename scalar_t>
std::vector<float> normed_rows(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, double norm_offset,
                               int64_t Hp) {
  const int64_t M = hidden.size(0), H = hidden.size(1);
  std::vector<float> y(M * Hp, 0.0f);
  const scalar_t* x = hidden.data_ptr<scalar_t>();
  const scalar_t* w = norm_weight.data_ptr<scalar_t>();
  const int64_t stride = hidden.stride(0), w_stride = norm_weight.stride(0);
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* row = x + m * stride;
    double squares = 0.0;
    for (int64_t h = 0; h < H; ++h)
      squares += static_cast<double>(static_cast<float>(row[h])) * static_cast<float>(row[h]);
    const float inv = 1.0f / std::sqrt(static_cast<float>(squares / H) + static_cast<float>(eps));
    for (int64_t h = 0; h < H; ++h) {
      const float normed =
          static_cast<float>(row[h]) * inv * (static_cast<float>(norm_offset) + static_cast<float>(w[h * w_stride]));
      y[m * Hp + h] = static_cast<float>(static_cast<scalar_t>(normed));
    }
  }
  return y;
}

void merge_states(RowState& into, RowState& from, int64_t top_k) {
  if (from.max > into.max) {
    into.sum = (into.max == kNegInf ? 0.0f : into.sum * std::exp(into.max - from.max)) + from.sum;
    into.max = from.max;
    into.arg = from.arg;
  } else if (from.max != kNegInf) {
    into.sum += from.sum * std::exp(from.max - into.max);
  }
  if (from.best > into.best) into.best = from.best, into.best_score = from.best_score, into.best_col = from.best_col;
  if (from.has_draft) into.draft_score = from.draft_score, into.has_draft = true;
  if (top_k > 0) into.heap.insert(into.heap.end(), from.heap.begin(), from.heap.end());
}

}  // namespace

void lm_head_cpu(FASTVLM_LM_HEAD_ARGS) {
  const int64_t mode = selection;  // 0 argmax, 1 sample, 2 topk
  TORCH_CHECK(hidden.dim() == 2 && lm_head_weight.dim() == 2 && hidden.size(1) == lm_head_weight.size(1),
              "lm_head (cpu): hidden [M, H] and lm_head_weight [V, H] expected");
  TORCH_CHECK(lm_head_weight.stride(1) == 1 && hidden.stride(1) == 1, "lm_head (cpu): contiguous rows expected");
  TORCH_CHECK(mode >= 0 && mode <= 2, "lm_head (cpu): mode must be 0 (argmax), 1 (sample) or 2 (topk)");
  Problem p;
  p.M = hidden.size(0);
  p.H = hidden.size(1);
  p.Hp = (p.H + 31) / 32 * 32;
  p.vocab = lm_head_weight.size(0);
  p.num_cols = vocab_subset ? vocab_subset->numel() : p.vocab;
  p.weight = lm_head_weight.data_ptr();
  p.weight_stride = lm_head_weight.stride(0);
  p.subset = vocab_subset ? vocab_subset->data_ptr<int64_t>() : nullptr;
  const bool short_rows = p.H * static_cast<int64_t>(lm_head_weight.element_size()) <= kPrefetchMaxRowBytes;
  p.prefetch_ahead = p.subset == nullptr && short_rows ? kCols * p.weight_stride : 0;
  p.prefetch_subset = p.subset != nullptr && short_rows;
  p.draft = draft_tokens ? draft_tokens->data_ptr<int64_t>() : nullptr;
  p.mode = static_cast<int>(mode);
  p.top_k = (mode == 2 || (mode == 1 && top_k > 0)) ? std::min<int64_t>(top_k, p.num_cols) : 0;
  TORCH_CHECK(mode != 2 || p.top_k > 0, "lm_head (cpu): topk mode needs top_k >= 1");
  p.top_p = static_cast<float>(top_p);
  TORCH_CHECK(p.top_p >= 1.0f || p.top_k > 0, "lm_head (cpu): top_p needs top_k on this backend");
  p.logit_scale = static_cast<float>(logit_scale);
  p.softcap = static_cast<float>(logit_softcap);
  p.temperature = static_cast<float>(temperature);
  if (prob_rows && probs) {
    p.prob_rows = prob_rows->data_ptr<int64_t>();
    p.num_prob_rows = prob_rows->numel();
    p.probs = probs->data_ptr<float>();
    TORCH_CHECK(probs->is_contiguous() && probs->size(1) == p.vocab && p.subset == nullptr,
                "lm_head (cpu): probs must be [R, V] contiguous, without vocab_subset");
  }
  if (mode == 1) {
    TORCH_CHECK(seed && seed->numel() == 2 && seed->scalar_type() == at::kLong,
                "lm_head (cpu): seed [2] int64 expected");
    const int64_t* s = seed->data_ptr<int64_t>();
    const uint64_t stream = splitmix64(static_cast<uint64_t>(s[0]) ^ splitmix64(static_cast<uint64_t>(s[1]) + kGolden));
    for (int64_t m = 0; m < p.M; ++m) p.row_base.push_back(splitmix64(stream + static_cast<uint64_t>(m + 1) * kGolden));
  }
  if (p.M == 0) return;

  // AMX for bf16 heads read in place (no subset) with H % 32 == 0, once there are rows enough to use it.
  const bool amx_shape = hidden.scalar_type() == at::kBFloat16 && p.subset == nullptr && p.H % 32 == 0 && p.M >= 4;
  std::vector<float> y;
  ChunkFn run = nullptr;
  auto prepare = [&](auto typed_zero) {
    using scalar_t = decltype(typed_zero);
    y = normed_rows<scalar_t>(hidden, norm_weight, eps, norm_offset, p.Hp);
    run = select_chunk_fn<scalar_t>(amx_shape);
  };
  switch (hidden.scalar_type()) {
    case at::kFloat: prepare(float{}); break;
    case at::kHalf: prepare(c10::Half{}); break;
    case at::kBFloat16: prepare(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "lm_head (cpu): unsupported dtype ", hidden.scalar_type());
  }
  p.y = y.data();
  std::vector<c10::BFloat16> y_bf16;
  if (hidden.scalar_type() == at::kBFloat16) {
    y_bf16.resize(y.size());
    for (size_t i = 0; i < y.size(); ++i) y_bf16[i] = c10::BFloat16(y[i]);  // exact: y was rounded to bf16
    p.y_bf16 = y_bf16.data();
  }
  std::vector<uint16_t> y_vnni;
  if (amx_shape) {
    p.num_row_blocks = (p.M + 15) / 16;
    y_vnni.assign(p.num_row_blocks * p.H * 16, 0);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(y_bf16.data());
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t h = 0; h < p.H; ++h)
        y_vnni[((m / 16) * (p.H / 2) + h / 2) * 32 + (m % 16) * 2 + h % 2] = bits[m * p.Hp + h];
    p.y_vnni = y_vnni.data();
  }

  // Chunks: contiguous column ranges (multiples of kTile), a few per thread for balance.
  const int64_t num_tiles = (p.num_cols + kTile - 1) / kTile;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(num_tiles, at::get_num_threads() * 4));
  const int64_t tiles_per_chunk = (num_tiles + num_chunks - 1) / num_chunks;
  std::vector<std::vector<RowState>> states(num_chunks, std::vector<RowState>(p.M));
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t col_begin = std::min(p.num_cols, chunk * tiles_per_chunk * kTile);
      const int64_t col_end = std::min(p.num_cols, col_begin + tiles_per_chunk * kTile);
      if (col_begin < col_end) run(p, col_begin, col_end, states[chunk].data());
    }
  });

  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_max = max_logit.data_ptr<float>();
  float* out_lse = lse.data_ptr<float>();
  float* out_logprob = logprob.data_ptr<float>();
  float* out_draft = draft_logprob ? draft_logprob->data_ptr<float>() : nullptr;
  const int64_t k_out = mode == 2 ? tokens.size(1) : 1;
  auto token_of = [&](int64_t col) { return p.subset ? p.subset[col] : col; };
  for (int64_t m = 0; m < p.M; ++m) {
    RowState& st = states[0][m];
    for (int64_t chunk = 1; chunk < num_chunks; ++chunk) merge_states(st, states[chunk][m], p.top_k);
    const float full_lse = st.max + std::log(st.sum);
    std::vector<Candidate>& cands = st.heap;
    std::sort(cands.begin(), cands.end(), better);
    if (p.top_k > 0 && static_cast<int64_t>(cands.size()) > p.top_k) cands.resize(p.top_k);
    if (mode == 0) {
      out_tokens[m] = token_of(st.arg);
      out_max[m] = st.max;
      out_lse[m] = full_lse;
      out_logprob[m] = st.max - full_lse;
    } else if (mode == 2) {
      out_max[m] = st.max;
      out_lse[m] = full_lse;
      for (int64_t i = 0; i < k_out; ++i) {
        out_tokens[m * k_out + i] = token_of(cands[i].col);
        out_logprob[m * k_out + i] = cands[i].score - full_lse;
      }
    } else if (p.top_k == 0) {
      out_tokens[m] = token_of(st.best_col);
      out_max[m] = st.max;
      out_lse[m] = full_lse;
      out_logprob[m] = st.best_score - full_lse;
    } else {
      // Top-k candidates (best first), then Hugging Face's top-p over their renormalised distribution:
      // ascending cumulative mass <= 1 - top_p is removed, the best token always stays.
      const int64_t count = static_cast<int64_t>(cands.size());
      int64_t kept = count;
      if (p.top_p < 1.0f) {
        double total = 0.0;
        for (const auto& c : cands) total += std::exp(static_cast<double>(c.score - cands[0].score));
        double cumulative = 0.0;
        kept = 1;
        for (int64_t i = count - 1; i >= 1; --i) {  // ascending order
          cumulative += std::exp(static_cast<double>(cands[i].score - cands[0].score)) / total;
          if (cumulative > 1.0 - static_cast<double>(p.top_p)) {
            kept = i + 1;
            break;
          }
        }
      }
      double kept_sum = 0.0;
      float best = kNegInf;
      int64_t best_i = 0;
      for (int64_t i = 0; i < kept; ++i) {
        kept_sum += std::exp(static_cast<double>(cands[i].score - cands[0].score));
        const float perturbed = cands[i].score + gumbel(p.row_base[m], token_of(cands[i].col));
        if (perturbed > best || (perturbed == best && cands[i].col < cands[best_i].col)) best = perturbed, best_i = i;
      }
      const float kept_lse = cands[0].score + static_cast<float>(std::log(kept_sum));
      out_tokens[m] = token_of(cands[best_i].col);
      out_max[m] = cands[0].score;
      out_lse[m] = kept_lse;
      out_logprob[m] = cands[best_i].score - kept_lse;
    }
    if (out_draft) out_draft[m] = st.has_draft ? st.draft_score - full_lse : kNegInf;
  }
  if (p.num_prob_rows > 0) {
    at::parallel_for(0, p.num_prob_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float row_lse = out_lse[p.prob_rows[r]];
        float* row = p.probs + r * p.vocab;
        for (int64_t v = 0; v < p.vocab; ++v) row[v] = std::exp(row[v] - row_lse);
      }
    });
  }
}

}  // namespace fastvlm
