// PTX wrappers shared by the tensor-core kernels (lm_head.cuh, verify_attention.cuh), sm_80+; no torch headers.
// cp.async: 16-byte global -> shared copies that bypass registers and L1, in commit groups; ldmatrix: 8x8 b16
// matrices from shared memory into the mma fragment layout; mma.sync m16n8k16 with fp32 accumulators.
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and c = lane % 4:
// A (16x16) reg 0 = (row g, cols 2c, 2c+1), reg 1 = (row g+8, same cols), reg 2 = (row g, cols 8+2c, 8+2c+1),
// reg 3 = (row g+8, cols 8+2c..); B (16x8, k x n) reg 0 = (k 2c, 2c+1; n g), reg 1 = (k 8+2c, 8+2c+1; n g);
// C/D (16x8) d0, d1 = (row g, cols 2c, 2c+1), d2, d3 = (row g+8, same).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastvlm::ptx {

// The shared-state-space address of a generic pointer into shared memory (what cp.async and ldmatrix take).
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes from global memory to shared address `shared`; when !valid, writes 16 zero bytes and reads
// nothing (`global` must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global), "r"(src_bytes) : "memory");
}

// cp_async_16 with an L2 cache policy (e.g. l2_evict_first_policy()).
__device__ __forceinline__ void cp_async_16_evict_first(uint32_t shared, const void* global, bool valid,
                                                        uint64_t policy) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(shared), "l"(global),
               "r"(src_bytes), "l"(policy)
               : "memory");
}

// A policy that marks the lines it loads first to go from L2: for data streamed once.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices: lanes 8i..8i+7 give the row addresses (shared) of matrix i; register i receives
// matrix i's fragment (row lane / 4, cols 2 (lane % 4), +1), or with _trans (rows 2 (lane % 4), +1, col lane / 4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// d += a b for a 16x16 A (row major), a 16x8 B (column major), fp32 accumulators; T is __half or
// __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace fastvlm::ptx
