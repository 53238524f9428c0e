// CPU benchmark of the weighted gather, its sparse backward and rows_to_dense
// (embedding_bag_cases.h says what each case times and counts).
//
//   bench_cpu_embedding_bag [--rows N] [--dims 512] [--bag 128] [--tokens 4096]
//                           [--dtypes float32,bfloat16] [--quick] [--json FILE] [--repeats 5]
#include "embedding_bag_cases.h"

int main(int argc, char** argv) {
  return bench::run(argc, argv, bench::cpu_setup(), bench::register_embedding_bag_cases);
}
