// The x86 instruction sets the CPU kernels (lm_head.cpp, verify_attention.cpp) are compiled for, and the run-time
// choice between them. A kernel file compiles its always-inline code once per level, in a function carrying the
// level's target attribute, and picks the widest level that this CPU has and that torch itself uses (so
// ATEN_CPU_CAPABILITY=avx2 / default selects the narrower code here as well). AMX is in cpu/amx.h.
#pragma once

#include <string>

#include <ATen/Version.h>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FASTVLM_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define FASTVLM_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// AVX-512 with vdpbf16ps (bf16 pairs multiplied exactly, summed in fp32).
#define FASTVLM_AVX512_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace fastvlm::cpu_isa {

// The instruction set torch runs its own kernels with, e.g. "AVX512" or "AVX2" (read once).
inline const std::string& torch_capability() {
  static const std::string capability = at::get_cpu_capability();
  return capability;
}

inline bool torch_uses_avx512() { return torch_capability() == "AVX512"; }

inline bool torch_uses_avx2() { return torch_capability() == "AVX512" || torch_capability() == "AVX2"; }

// FASTVLM_AVX2_TARGET code may run.
inline bool has_avx2() {
  return torch_uses_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// FASTVLM_AVX512_TARGET code may run.
inline bool has_avx512() {
  return torch_uses_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

// The vdpbf16ps code of FASTVLM_AVX512_BF16_TARGET may run (the CPUs with AVX512-BF16 have the rest of it).
inline bool has_avx512_bf16() {
  return torch_uses_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}

}  // namespace fastvlm::cpu_isa
#endif  // defined(__x86_64__)
