// The Python module that loads this library; importing it runs the TORCH_LIBRARY
// registrations. It exposes only how the library was built.
#include <pybind11/pybind11.h>

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
}
