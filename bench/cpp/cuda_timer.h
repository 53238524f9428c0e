// How the CUDA benchmarks time a call: CUDA events around it on the current stream, after
// the L2 cache was flushed by writing a buffer of its size (untimed), so that each call
// starts from memory as it would in a training step and not from what the previous
// repetition left in L2; the time of each call goes to Google Benchmark with
// SetIterationTime. Also the device's copy ceiling and allocator peak, for
// bench_harness.h's DeviceSetup.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_harness.h"

namespace bench {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// A device buffer as large as L2; flush() overwrites it on the current stream.
class L2Flush {
 public:
  L2Flush() {
    int bytes = 0;
    check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, current_device()), "L2 size");
    bytes_ = static_cast<size_t>(bytes);
    if (bytes_ > 0) check_cuda(cudaMalloc(&buffer_, bytes_), "cudaMalloc (L2 flush buffer)");
  }
  ~L2Flush() {
    if (buffer_ != nullptr) cudaFree(buffer_);
  }
  L2Flush(const L2Flush&) = delete;
  L2Flush& operator=(const L2Flush&) = delete;
  void flush(cudaStream_t stream) const {
    if (buffer_ != nullptr) check_cuda(cudaMemsetAsync(buffer_, 0, bytes_, stream), "L2 flush");
  }

 private:
  void* buffer_ = nullptr;
  size_t bytes_ = 0;
};

// The events of one timed call, made once per benchmark run.
class EventPair {
 public:
  EventPair() {
    check_cuda(cudaEventCreate(&start_), "cudaEventCreate");
    check_cuda(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventPair() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  // Seconds of call() on stream, measured from a flushed L2.
  double time(const L2Flush& l2, cudaStream_t stream, const Call& call) {
    l2.flush(stream);
    check_cuda(cudaEventRecord(start_, stream), "cudaEventRecord");
    call();
    check_cuda(cudaEventRecord(stop_, stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_{}, stop_{};
};

inline const L2Flush& l2_flush() {
  static const L2Flush flush;
  return flush;
}

// bench_harness.h's Loop for CUDA: two untimed warm-up calls, then each iteration's call
// timed by events from a flushed L2.
inline void cuda_loop(benchmark::State& state, const Call& call) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int i = 0; i < 2; ++i) call();
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  EventPair events;
  for (auto _ : state) state.SetIterationTime(events.time(l2_flush(), stream, call));
}

// Device-to-device copy of 1 GiB (64 MiB with --quick), bytes read + written per second,
// median of 9 timed calls.
inline double cuda_copy_gbs(bool quick) {
  const int64_t bytes = quick ? (int64_t(1) << 26) : (int64_t(1) << 30);
  const auto opt = at::TensorOptions().device(at::kCUDA, current_device()).dtype(at::kFloat);
  at::Tensor src = at::rand({bytes / 4}, opt);
  at::Tensor dst = at::empty_like(src);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EventPair events;
  std::vector<double> s;
  for (int i = 0; i < 11; ++i) {
    const double t = events.time(l2_flush(), stream, [&] { dst.copy_(src); });
    if (i >= 2) s.push_back(t);
  }
  std::sort(s.begin(), s.end());
  return 2.0 * double(bytes) / s[s.size() / 2] / 1e9;
}

// Peak bytes the caching allocator handed out during one call, beyond what was allocated
// before it.
inline double cuda_peak_extra_bytes(const Call& call) {
  const int device = current_device();
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  c10::cuda::CUDACachingAllocator::emptyCache();
  const auto before =
      c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].current;
  c10::cuda::CUDACachingAllocator::resetPeakStats(device);
  call();
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const auto peak = c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].peak;
  return static_cast<double>(peak - before);
}

// The DeviceSetup of GPU 0; exits with a message when no GPU is visible.
inline DeviceSetup cuda_setup() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "no CUDA device visible\n");
    std::exit(2);
  }
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return {prop.name, at::Device(at::kCUDA, 0), cuda_copy_gbs, cuda_loop,
          true,      cuda_peak_extra_bytes};
}

}  // namespace bench
