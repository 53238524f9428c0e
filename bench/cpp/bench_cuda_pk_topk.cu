// CUDA benchmark of memory::pk_topk against the reference path, with the peak memory of
// each and the op at every CTA size (pk_topk_cases.h says what each case times and counts;
// cuda_timer.h how).
//
//   bench_cuda_pk_topk [--tokens 65536] [--heads 4] [--n-keys 1024] [--half 256] [--k 32]
//                      [--dtypes bfloat16] [--quick] [--json FILE] [--repeats 5]
#include "cuda_timer.h"
#include "pk_topk_cases.h"

int main(int argc, char** argv) {
  return bench::run(argc, argv, bench::cuda_setup(), bench::register_pk_topk_cases);
}
