// Timing shared by the CUDA benchmarks: CUDA events around each call on the current
// stream, after untimed warm-up calls, reporting the median.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace bench {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// Median milliseconds of `iters` calls of fn, each between two events on the current
// stream, after `warmup` untimed calls.
inline double median_ms(const std::function<void()>& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(cudaStreamSynchronize(stream), "sync");
  std::vector<double> ms;
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "event");
  check_cuda(cudaEventCreate(&stop), "event");
  for (int i = 0; i < iters; ++i) {
    check_cuda(cudaEventRecord(start, stream), "record");
    fn();
    check_cuda(cudaEventRecord(stop, stream), "record");
    check_cuda(cudaEventSynchronize(stop), "sync");
    float t = 0;
    check_cuda(cudaEventElapsedTime(&t, start, stop), "elapsed");
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace bench
