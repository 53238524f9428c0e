// Warp, tensor-core and async-copy primitives of the product-key kernel on the GPU. The
// kernel (pk_topk_kernel.cuh) calls only these names, so the same kernel source can also
// run on the CPU against an emulation of them (tests/pk_topk_emulate.cpp).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "pk_topk_common.cuh"

namespace memory_ext::pk {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PK_HAS_SM80 1
#else
#define PK_HAS_SM80 0
#endif

constexpr unsigned kFullMask = 0xFFFFFFFFu;

PK_FN int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }
PK_FN void warp_sync() { __syncwarp(kFullMask); }
PK_FN void block_sync() { __syncthreads(); }
PK_FN uint32_t warp_ballot(bool p) { return __ballot_sync(kFullMask, p); }
PK_FN bool warp_any(bool p) { return __any_sync(kFullMask, p) != 0; }
PK_FN int popc(uint32_t x) { return __popc(x); }
PK_FN uint32_t lanemask_lt() { return (1u << lane_id()) - 1u; }

PK_FN uint32_t lds_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
PK_FN void sts_f2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
PK_FN float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// D += A * B for one m16n8k16 tile, fp32 accumulation. Fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16"), g = lane / 4, c = lane % 4:
//   a[0] = A[g][2c..2c+1]   a[1] = A[g+8][2c..2c+1]   a[2] = A[g][2c+8..]   a[3] = A[g+8][2c+8..]
//   b0   = B[2c..2c+1][g]   b1   = B[2c+8..2c+9][g]
//   d[0..1] = D[g][2c..2c+1]  d[2..3] = D[g+8][2c..2c+1]
// with the lower-numbered element in the low 16 bits of each register.
template <bool kBf16>
PK_FN void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if PK_HAS_SM80
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the launcher never picks the tensor-core kernel below sm_80
#endif
}

// 16-byte global -> shared copy; bytes past src_bytes (0 or 16) are zero-filled.
PK_FN void cp_async_16(void* smem_dst, const void* global_src, int src_bytes) {
#if PK_HAS_SM80
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

PK_FN void cp_async_commit() {
#if PK_HAS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
PK_FN void cp_async_wait() {
#if PK_HAS_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace memory_ext::pk
