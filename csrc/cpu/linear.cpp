// skinny_linear on CPU: out[m, o] = dot(x[m, :], weight[o, :]) (+ bias[o]) for a few rows m (M <= 16), fp32.
//
// A decoder step multiplies a handful of token rows (a draft tree's depth, a verification pass) by every weight
// matrix of the layers it runs. For so few rows the product is bound by reading the weight, once, from memory;
// BLAS GEMMs tuned for large M read it at well below the bandwidth there (MKL on an AVX-512 EPYC, one thread,
// SmolLM2's layer: 1.33 ms for M = 1, 1.90 for 2, 2.14 for 3, 1.64 for 4). Here each task streams R weight rows
// once, W floats at a time, and multiplies each chunk by the M input rows (kept hot in L1/L2), accumulating
// R x M vector sums (R = 1 up to M = 4, see rows_per_block); the tail of a row (in % W) is a scalar loop. Rows
// are split over threads in blocks of R.
//
// Summation order: each (m, o) is W lane-partial sums over the input dimension, reduced pairwise at the end:
// not the order of torch's GEMM, so results agree to fp32 rounding (tests: against the reference at 1e-5).
#include "ops.h"

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "isa.h"
#include "vec.h"

namespace fastvlm {
namespace {

#if defined(__x86_64__)
struct Args {
  const float* w;
  const float* x;
  const float* bias;
  float* out;
  int64_t out_features;
  int64_t in;
};

// R weight rows starting at `w` (row stride `in`) times the M input rows of x: out[m * out_stride + r]. Generic
// W-lane vectors (cpu/vec.h), lowered to the ISA of the target-attributed function that inlines this; GNU C++
// contracts the multiply-adds to FMAs.
template <int W, int R, int M>
FASTVLM_INLINE void block(const float* __restrict w, const float* __restrict x, int64_t in, const float* bias,
                          float* __restrict out, int64_t out_stride) {
  using F = typename cpu_vec::Vec<W>::f32;
  F acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = F{};
  int64_t i = 0;
  for (; i + W <= in; i += W) {
    F wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = cpu_vec::load<W>(w + r * in + i);
      if constexpr (R > 1) __builtin_prefetch(w + r * in + i + 32 * W);   // one stream: the hardware's own
    }
    for (int m = 0; m < M; ++m) {
      const F xv = cpu_vec::load<W>(x + m * in + i);
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias != nullptr ? bias[r] : 0.0f;
    for (int m = 0; m < M; ++m) {
      float total = cpu_vec::reduce_sum<W>(acc[r][m]);
      for (int64_t j = i; j < in; ++j) total += w[r * in + j] * x[m * in + j];   // the tail (in % W)
      out[m * out_stride + r] = total + b;
    }
  }
}

// One weight row times the M input rows, U chunks of W per iteration into U independent sets of sums (so that
// each sum's multiply-add chain does not bound the loop when M is small): out[m * out_stride].
template <int W, int M, int U>
FASTVLM_INLINE void row(const float* __restrict w, const float* __restrict x, int64_t in, const float* bias,
                        float* __restrict out, int64_t out_stride) {
  using F = typename cpu_vec::Vec<W>::f32;
  F acc[U][M];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[u][m] = F{};
  int64_t i = 0;
  for (; i + W * U <= in; i += W * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const F wv = cpu_vec::load<W>(w + i + u * W);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[u][m] += wv * cpu_vec::load<W>(x + m * in + i + u * W);
    }
  }
  for (; i + W <= in; i += W) {
    const F wv = cpu_vec::load<W>(w + i);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[0][m] += wv * cpu_vec::load<W>(x + m * in + i);
  }
  const float b = bias != nullptr ? bias[0] : 0.0f;
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    F sum = acc[0][m];
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) sum += acc[u][m];
    float total = cpu_vec::reduce_sum<W>(sum);
    for (int64_t j = i; j < in; ++j) total += w[j] * x[m * in + j];   // the tail (in % W)
    out[m * out_stride] = total + b;
  }
}

// Chunks per iteration of row(). Measured in the package (bench/linear.py, SmolLM2's projections, one thread;
// runs on the shared machine vary by ~15%): up to 4 input rows one chunk (0.63-1.01 ms at M = 1..4; 4 chunks ran
// M = 2 and 4 at 1.0 ms), 5 and 6 rows two (1.15-1.34 ms against 1.43 in blocks of 4 weight rows).
template <int W, int M>
constexpr int row_unroll() {
  return M <= 4 ? 1 : 2;
}

// Blocks [begin, end) of R weight rows (the last block, past the whole blocks, row by row).
template <int W, int R, int M>
FASTVLM_INLINE void range_body(const Args& a, int64_t begin, int64_t end) {
  if constexpr (R == 1) {
    for (int64_t o = begin; o < end; ++o)
      row<W, M, row_unroll<W, M>()>(a.w + o * a.in, a.x, a.in, a.bias != nullptr ? a.bias + o : nullptr, a.out + o,
                                    a.out_features);
    return;
  }
  const int64_t blocks = a.out_features / R;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * R;
    if (b < blocks) {
      block<W, R, M>(a.w + o * a.in, a.x, a.in, a.bias != nullptr ? a.bias + o : nullptr, a.out + o, a.out_features);
    } else {
      for (int64_t row = o; row < a.out_features; ++row)
        block<W, 1, M>(a.w + row * a.in, a.x, a.in, a.bias != nullptr ? a.bias + row : nullptr, a.out + row,
                       a.out_features);
    }
  }
}

template <int R, int M>
FASTVLM_AVX512_TARGET void range_avx512(const Args& a, int64_t begin, int64_t end) {
  range_body<16, R, M>(a, begin, end);
}

template <int R, int M>
FASTVLM_AVX2_TARGET void range_avx2(const Args& a, int64_t begin, int64_t end) {
  range_body<8, R, M>(a, begin, end);
}

struct Avx512 {
  static constexpr int W = 16;
  template <int R, int M>
  static void range(const Args& a, int64_t begin, int64_t end) { range_avx512<R, M>(a, begin, end); }
};

struct Avx2 {
  static constexpr int W = 8;
  template <int R, int M>
  static void range(const Args& a, int64_t begin, int64_t end) { range_avx2<R, M>(a, begin, end); }
};

// Rows per block. Few input rows (6 with AVX-512, 4 with AVX2): one weight row at a time, a single sequential
// stream, which the hardware prefetcher follows best (one thread, SmolLM2's projections: 0.63-1.01 ms at
// M = 1..4 against 0.95-1.33 with blocks of 4 or 8 rows). More input rows: as many accumulators (R x M) as the
// registers hold beside R weight vectors and one input, so that each input load serves R rows (M = 8: 1.58 ms
// against 1.74 one row at a time).
template <class S, int M>
constexpr int rows_per_block() {
  if (M <= (S::W == 16 ? 6 : 4)) return 1;
  constexpr int registers = S::W == 16 ? 32 : 16;
  int r = 8;
  while (r > 1 && r * M + r + 1 > registers) r /= 2;
  return r;
}

template <class S, int M>
void run_rows(const Args& a) {
  constexpr int R = rows_per_block<S, M>();
  const int64_t blocks = a.out_features / R + (a.out_features % R != 0 ? 1 : 0);
  // About 128 KiB of weight per task: two threads split a 576 x 576 matrix, tiny ones stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (R * a.in * 4 + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) { S::template range<R, M>(a, begin, end); });
}

template <class S>
void dispatch_rows(int64_t rows, const Args& a) {
  switch (rows) {
#define FASTVLM_ROWS(M) \
  case M:               \
    return run_rows<S, M>(a);
    FASTVLM_ROWS(1) FASTVLM_ROWS(2) FASTVLM_ROWS(3) FASTVLM_ROWS(4) FASTVLM_ROWS(5) FASTVLM_ROWS(6)
    FASTVLM_ROWS(7) FASTVLM_ROWS(8) FASTVLM_ROWS(9) FASTVLM_ROWS(10) FASTVLM_ROWS(11) FASTVLM_ROWS(12)
    FASTVLM_ROWS(13) FASTVLM_ROWS(14) FASTVLM_ROWS(15) FASTVLM_ROWS(16)
#undef FASTVLM_ROWS
    default:
      TORCH_CHECK(false, "skinny_linear: ", rows, " rows; the CPU kernel takes 1 to ", kSkinnyMaxRows);
  }
}
#endif  // defined(__x86_64__)

// Any CPU: one scalar dot product per output (correct, not fast; x86 CPUs take the vector code above).
void run_scalar(int64_t rows, const float* w, const float* x, const float* bias, float* out, int64_t out_features,
                int64_t in) {
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t m = 0; m < rows; ++m) {
        float sum = 0.0f;
        for (int64_t i = 0; i < in; ++i) sum += w[o * in + i] * x[m * in + i];
        out[m * out_features + o] = sum + (bias != nullptr ? bias[o] : 0.0f);
      }
  });
}

}  // namespace

int64_t skinny_linear_isa() {
#if defined(__x86_64__)
  if (cpu_isa::has_avx512()) return 512;
  if (cpu_isa::has_avx2()) return 256;
#endif
  return 0;
}

void skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::Tensor& out) {
  // The Python plan checked shapes, dtypes (fp32), devices and contiguity; these guard memory.
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2, "skinny_linear: x, weight, out must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "skinny_linear: the CPU kernel takes fp32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "skinny_linear: x, weight and out must be contiguous");
  const int64_t rows = x.size(0), in = x.size(1), out_features = weight.size(0);
  TORCH_CHECK(weight.size(1) == in && out.size(0) == rows && out.size(1) == out_features,
              "skinny_linear: shapes do not match");
  TORCH_CHECK(rows <= kSkinnyMaxRows, "skinny_linear: ", rows, " rows; the CPU kernel takes at most ", kSkinnyMaxRows);
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "skinny_linear: bias must be a contiguous fp32 [O]");
    bias_data = bias->const_data_ptr<float>();
  }
  if (rows == 0 || out_features == 0) return;
  const float* w = weight.const_data_ptr<float>();
  const float* xs = x.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
#if defined(__x86_64__)
  const Args args{w, xs, bias_data, o, out_features, in};
  if (cpu_isa::has_avx512()) return dispatch_rows<Avx512>(rows, args);
  if (cpu_isa::has_avx2()) return dispatch_rows<Avx2>(rows, args);
#endif
  run_scalar(rows, w, xs, bias_data, o, out_features, in);
}

}  // namespace fastvlm
