// Reused buffers for the CPU kernels' large outputs (sparse row gradients, dense gradients
// of big tables, large gathers). A fresh large tensor costs a page fault and the kernel's
// zeroing of every page on its first write, each call: for the backward of a 2^20 x 512
// float32 table (tokens 4096 x bag 128) that was a fifth of its time (166 -> 132 ms on a
// 2-core Xeon). Outputs from here take
// their memory from a pool of blocks that earlier outputs gave back, so a training loop's
// steps after the first touch no fresh pages. The pool's free blocks are capped
// (MEMORY_EXT_CPU_BUFFER_CACHE_MB, default 4096; 0 turns the pool off) and
// memory_ext.ops.release_cpu_buffers() returns them to the system.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "memory_ext/huge_pages.h"

namespace memory_ext::cpu {

// An uninitialised CPU tensor; those of at least kPooledBytes come from the pool (on
// transparent huge pages), smaller ones from ATen's allocator. The caller writes every
// element: a reused block holds an earlier output's bytes.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Smallest pooled output: the smallest allocation advised for huge pages, 8 MiB (below
// that, glibc's heap already reuses memory).
constexpr int64_t kPooledBytes = static_cast<int64_t>(kHugeAdviceMinBytes);

// Bytes the pool holds in free blocks now.
int64_t cached_buffer_bytes();

// Unmaps every free block; returns the bytes given back.
int64_t release_cached_buffers();

}  // namespace memory_ext::cpu
