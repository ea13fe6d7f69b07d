// AMX-BF16 for the bf16 CPU kernels (lm_head.cpp, verify_attention.cpp): the target attribute of code that uses
// the tile registers, the one tile configuration both kernels use, and whether this process may use AMX at all
// (the CPU has it and Linux granted the permission every process must request first). FASTVLM_AMX is 0 off
// x86-64 Linux, or when built with -DFASTVLM_NO_AMX: the kernels then leave out their AMX paths.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

#if defined(__x86_64__) && defined(__linux__) && !defined(FASTVLM_NO_AMX)
#define FASTVLM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FASTVLM_AMX 0
#endif

#if FASTVLM_AMX
#define FASTVLM_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")))

namespace fastvlm::amx {

// The 64-byte operand of ldtilecfg: palette 1, then each tile's bytes per row and rows.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Tiles 0-7 as 16 rows x 64 bytes each: a 16 x 16 fp32 accumulator, or 16 rows of 32 bf16 (16 bf16 pairs)
// as an operand. release_tiles() returns them to their initial state when the work is done.
FASTVLM_AMX_TARGET inline __attribute__((always_inline)) void configure_tiles() {
  TileConfig config{};
  config.palette = 1;
  for (int i = 0; i < 8; ++i) {
    config.bytes_per_row[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

FASTVLM_AMX_TARGET inline __attribute__((always_inline)) void release_tiles() { _tile_release(); }

// The CPU has AMX-BF16 (and AVX512-BF16, which the code around the tile products uses) and Linux lets this
// process use the tile registers: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), requested once.
inline bool bf16_usable() {
  static const bool usable = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16"))
      return false;
    constexpr long kArchRequestXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

}  // namespace fastvlm::amx
#endif  // FASTVLM_AMX
