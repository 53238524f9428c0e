// CPU benchmark of the row optimizers and of a whole value step built from the ops
// (value_update_cases.h says what each case times and counts).
//
//   bench_cpu_value_update [--rows 1048576] [--dim 256] [--tokens 4096] [--bag 64]
//                          [--quick] [--json FILE] [--repeats 5]
#include "value_update_cases.h"

int main(int argc, char** argv) {
  return bench::run(argc, argv, bench::cpu_setup(), bench::register_value_update_cases);
}
