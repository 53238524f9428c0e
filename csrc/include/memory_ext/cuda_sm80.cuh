// The sm_80 primitives of the tensor-core kernels: mma.m16n8k16 (bf16/fp16) and
// mma.m16n8k8 (TF32) with fp32 accumulation, the float -> TF32 rounding, and 16-byte
// asynchronous global -> shared copies. Inline PTX on the GPU; under the CPU emulation
// (MEMORY_EXT_EMULATE) tests/cuda_emulate.h supplies the same functions, so kernels call
// them by these names only.
#pragma once

#include <cstdint>

#include "memory_ext/cuda_device.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MEMORY_EXT_HAS_SM80 1
#else
#define MEMORY_EXT_HAS_SM80 0
#endif

#ifndef MEMORY_EXT_EMULATE
namespace memory_ext::cuda {

// D += A * B for one m16n8k16 tile, fp32 accumulation. Fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16"), g = lane / 4, c = lane % 4:
//   a[0] = A[g][2c..2c+1]   a[1] = A[g+8][2c..2c+1]   a[2] = A[g][2c+8..]   a[3] = A[g+8][2c+8..]
//   b0   = B[2c..2c+1][g]   b1   = B[2c+8..2c+9][g]
//   d[0..1] = D[g][2c..2c+1]  d[2..3] = D[g+8][2c..2c+1]
// with the lower-numbered element in the low 16 bits of each register.
template <bool kBf16>
MEMORY_EXT_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MEMORY_EXT_HAS_SM80
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

// D += A * B for one m16n8k8 tile of TF32 operands (float bits whose low 13 mantissa bits
// are zero, as to_tf32 makes them), fp32 accumulation. Fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k8", .tf32), g = lane / 4, c = lane % 4:
//   a[0] = A[g][c]   a[1] = A[g+8][c]   a[2] = A[g][c+4]   a[3] = A[g+8][c+4]
//   b0   = B[c][g]   b1   = B[c+4][g]
//   d as for m16n8k16.
// Word for word the same registers as m16n8k16 with two 16-bit elements per word, so one
// kernel serves both.
MEMORY_EXT_DEVICE void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                     uint32_t b1) {
#if MEMORY_EXT_HAS_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// The bits of float x rounded to TF32 (10 mantissa bits), to nearest with ties away from
// zero, so the mma sees the nearest TF32 values rather than whatever it makes of the low 13
// bits of a float.
MEMORY_EXT_DEVICE uint32_t to_tf32(float x) {
#if MEMORY_EXT_HAS_SM80
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  __trap();
  return 0;
#endif
}

// 16-byte global -> shared copy; bytes past src_bytes (0 or 16) are zero-filled.
MEMORY_EXT_DEVICE void cp_async_16(void* smem_dst, const void* global_src, int src_bytes) {
#if MEMORY_EXT_HAS_SM80
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

MEMORY_EXT_DEVICE void cp_async_commit() {
#if MEMORY_EXT_HAS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
MEMORY_EXT_DEVICE void cp_async_wait() {
#if MEMORY_EXT_HAS_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace memory_ext::cuda
#endif  // MEMORY_EXT_EMULATE
