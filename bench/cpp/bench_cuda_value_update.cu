// CUDA benchmark of the row optimizers and of a whole value step built from the ops
// (value_update_cases.h says what each case times and counts; cuda_timer.h how).
//
//   bench_cuda_value_update [--rows 1048576] [--dim 256] [--tokens 4096] [--bag 64]
//                           [--quick] [--json FILE] [--repeats 5]
#include "cuda_timer.h"
#include "value_update_cases.h"

int main(int argc, char** argv) {
  const bench::DeviceSetup setup = bench::cuda_setup();
  bench::MemoryOps::find(c10::DispatchKey::CUDA).set_index_checks.call(false);
  return bench::run(argc, argv, setup, bench::register_value_update_cases);
}
