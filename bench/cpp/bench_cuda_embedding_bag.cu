// CUDA benchmark of the weighted gather, its sparse backward and rows_to_dense
// (embedding_bag_cases.h says what each case times and counts; cuda_timer.h how). Index
// validation, which costs a host synchronisation on CUDA, is off: the indices are valid
// by construction, and the kernels are what is timed.
//
//   bench_cuda_embedding_bag [--rows N] [--dims 1024,4096] [--bag 128]
//                            [--tokens 16384,32768,65536] [--dtypes bfloat16]
//                            [--quick] [--json FILE] [--repeats 5]
#include "cuda_timer.h"
#include "embedding_bag_cases.h"

int main(int argc, char** argv) {
  const bench::DeviceSetup setup = bench::cuda_setup();
  bench::MemoryOps::find(c10::DispatchKey::CUDA).set_index_checks.call(false);
  return bench::run(argc, argv, setup, bench::register_embedding_bag_cases);
}
