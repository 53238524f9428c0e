// CPU benchmark of memory::pk_topk against the reference path (pk_topk_cases.h says what
// each case times and counts).
//
//   bench_cpu_pk_topk [--tokens 4096] [--heads 4] [--n-keys 1024] [--half 128] [--k 32]
//                     [--dtypes float32,bfloat16] [--quick] [--json FILE] [--repeats 5]
#include "pk_topk_cases.h"

int main(int argc, char** argv) {
  return bench::run(argc, argv, bench::cpu_setup(), bench::register_pk_topk_cases);
}
