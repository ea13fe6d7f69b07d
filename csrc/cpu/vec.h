// Portable W-lane fp32 vectors (GCC/Clang vector extensions) and the helpers the CPU kernels share:
// loads of fp32 / bf16 / fp16 as fp32, horizontal reductions and a 2^x for x <= 0. Everything is
// always-inline, so it is lowered to the ISA of the (target-attributed) function that calls it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The wide vector types are only ever used inside always-inline code compiled for the ISA that supports
// them; the ABI note GCC prints for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define FASTVLM_INLINE inline __attribute__((always_inline))

namespace fastvlm::cpu_vec {

template <int W>
struct Vec {
  typedef float f32 __attribute__((vector_size(W * 4)));
  typedef int32_t i32 __attribute__((vector_size(W * 4)));
  typedef uint32_t u32 __attribute__((vector_size(W * 4)));
  typedef uint16_t u16 __attribute__((vector_size(W * 2)));
};

template <int W>
FASTVLM_INLINE typename Vec<W>::f32 load(const float* p) {
  typename Vec<W>::f32 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
FASTVLM_INLINE void store(float* p, typename Vec<W>::f32 v) {
  std::memcpy(p, &v, sizeof(v));
}

// W consecutive elements of any supported dtype as fp32.
template <int W>
FASTVLM_INLINE typename Vec<W>::f32 load_as_float(const float* p) {
  return load<W>(p);
}

template <int W>
FASTVLM_INLINE typename Vec<W>::f32 load_as_float(const c10::BFloat16* p) {
#if defined(__x86_64__)
  // GCC lowers the generic widening below to 6 instructions on AVX2/AVX-512; one vpmovzxwd does it.
  if constexpr (W >= 8) {
    struct Bytes {
      char bytes[W * 2];
    };
    typename Vec<W>::u32 wide;
    if constexpr (W >= 16)
      asm("vpmovzxwd %1, %0" : "=v"(wide) : "m"(*reinterpret_cast<const Bytes*>(p)));
    else
      asm("vpmovzxwd %1, %0" : "=x"(wide) : "m"(*reinterpret_cast<const Bytes*>(p)));
    return (typename Vec<W>::f32)(wide << 16);
  }
#endif
  typename Vec<W>::u16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (typename Vec<W>::f32)(__builtin_convertvector(bits, typename Vec<W>::u32) << 16);
}

template <int W>
FASTVLM_INLINE typename Vec<W>::f32 load_as_float(const c10::Half* p) {
  using U = typename Vec<W>::u32;
  using F = typename Vec<W>::f32;
  typename Vec<W>::u16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  const U half = __builtin_convertvector(bits, U);
  const U magnitude = half & 0x7fffu;
  // Exponent/mantissa shifted into place, then rescaled by 2^112: exact for normals and subnormals.
  F value = (F)(magnitude << 13) * 5.192296858534828e+33f;
  const U inf_or_nan = (U)(magnitude >= 0x7c00u);
  U result = ((U)value & ~inf_or_nan) | (((magnitude << 13) | 0x7f800000u) & inf_or_nan);
  return (F)(result | ((half & 0x8000u) << 16));
}

// v with its upper `half` lanes moved down (log-step horizontal reductions).
template <int W, int half, size_t... Lane>
FASTVLM_INLINE typename Vec<W>::f32 upper_half(typename Vec<W>::f32 v, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(v, v, ((Lane + half) % W)...);
}

template <int W, int half = W / 2>
FASTVLM_INLINE float reduce_max(typename Vec<W>::f32 v) {
  if constexpr (half == 0) {
    return v[0];
  } else {
    const typename Vec<W>::f32 upper = upper_half<W, half>(v, std::make_index_sequence<W>{});
    return reduce_max<W, half / 2>(upper > v ? upper : v);
  }
}

template <int W, int half = W / 2>
FASTVLM_INLINE float reduce_sum(typename Vec<W>::f32 v) {
  if constexpr (half == 0) {
    return v[0];
  } else {
    return reduce_sum<W, half / 2>(v + upper_half<W, half>(v, std::make_index_sequence<W>{}));
  }
}

// 2^x for x <= 0 (relative error ~2e-7); exactly 0 below -125, so masked (-inf) scores vanish.
template <int W>
FASTVLM_INLINE typename Vec<W>::f32 exp2_nonpositive(typename Vec<W>::f32 x) {
  using F = typename Vec<W>::f32;
  using I = typename Vec<W>::i32;
  const I underflow = x < -125.0f;
  x = underflow ? F{} - 125.0f : x;
  const I whole = __builtin_convertvector(x - 0.5f, I);  // round(x) for x <= 0
  const F frac = x - __builtin_convertvector(whole, F);  // in (-0.5, 0.5]
  F poly = frac * 1.535336188319500e-4f + 1.339887440266574e-3f;
  poly = poly * frac + 9.618437357674640e-3f;
  poly = poly * frac + 5.550332471162809e-2f;
  poly = poly * frac + 2.402264791363012e-1f;
  poly = poly * frac + 6.931472028550421e-1f;
  poly = poly * frac + 1.0f;
  const F result = (F)((I)poly + (whole << 23));
  return underflow ? F{} : result;
}

}  // namespace fastvlm::cpu_vec
