// The Python module that loads this library; importing it runs the TORCH_LIBRARY
// registrations. It exposes how the library was built, and one memory hint.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/bf16_scores.h"
#include "cpu/f32_scores.h"
#include "cpu/large_buffers.h"
#include "memory_ext/huge_pages.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "memory_ext operator library (ops live in torch.ops.memory)";
#ifdef MEMORY_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // The CPU kernels split work with at::parallel_for, an OpenMP pragma: compiled without
  // OpenMP they would silently run on one thread.
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // Takes an address and a length, not a tensor, so that the module needs no libtorch_python
  // (memory_ext.ops.advise_huge_pages passes a CPU tensor's data_ptr() and nbytes).
  m.def(
      "advise_huge_pages",
      [](uintptr_t address, uintptr_t bytes) {
        memory_ext::cpu::advise_huge_pages(reinterpret_cast<void*>(address), bytes);
      },
      "Transparent huge pages for the whole 2 MiB pages of [address, address + bytes) (a hint)");
  m.def("cpu_buffer_cache_bytes", &memory_ext::cpu::cached_buffer_bytes,
        "Bytes held in free blocks by the pool of the CPU kernels' large outputs");
  m.def("release_cpu_buffers", &memory_ext::cpu::release_cached_buffers,
        "Unmap the free blocks of the CPU kernels' output pool; returns the bytes released");
  m.def("cpu_bf16_scoring_kernel", &memory_ext::cpu::bf16_scores_kernel,
        "The kernel CPU pk_topk scores bf16 inputs with in this process: amx, avx512_bf16 "
        "or none (float32 GEMM)");
  m.def("cpu_f32_scoring_kernel", &memory_ext::cpu::f32_scores_kernel,
        "The kernel CPU pk_topk scores float32 inputs (and float16 or bf16 ones no bf16 kernel "
        "takes) with in this process, from 64 tokens on: avx512 or none (torch's GEMM)");
}
