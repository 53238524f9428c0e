// The pool behind cpu::empty_large: free blocks by size, mapped with mmap on 2 MiB
// boundaries and advised for transparent huge pages, handed out best fit and given back by
// the deleter of the tensor that held them.
#include "large_buffers.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "memory_ext/huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace memory_ext::cpu {
namespace {

// The cap on free bytes held, from MEMORY_EXT_CPU_BUFFER_CACHE_MB (default 4096).
uint64_t cache_limit_bytes() {
  const char* env = std::getenv("MEMORY_EXT_CPU_BUFFER_CACHE_MB");
  if (env == nullptr || *env == '\0') return uint64_t(4096) << 20;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  return end != nullptr && *end == '\0' ? uint64_t(mb) << 20 : uint64_t(4096) << 20;
}

#if defined(__linux__)
// bytes (a multiple of 2 MiB) mapped at a 2 MiB boundary, advised for huge pages.
void* map_block(uint64_t bytes) {
  void* raw = mmap(nullptr, bytes + kHugePageBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = huge_page_ceil(begin);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = begin + kHugePageBytes - aligned;  // the mapping's unused end
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  advise_huge_pages(reinterpret_cast<void*>(aligned), bytes);
  return reinterpret_cast<void*>(aligned);
}
void unmap_block(void* p, uint64_t bytes) { munmap(p, bytes); }
#else
void* map_block(uint64_t) { return nullptr; }  // elsewhere empty_large uses ATen's allocator
void unmap_block(void*, uint64_t) {}
#endif

class BufferPool {
 public:
  BufferPool() : limit_(cache_limit_bytes()) {}

  bool enabled() const { return limit_ > 0; }

  // A block of at least bytes (a multiple of 2 MiB): a free one at most 1/4 larger, or a
  // new mapping; null when the system has no memory left.
  void* take(uint64_t bytes, uint64_t& got) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        got = it->first;
        void* p = it->second;
        free_.erase(it);
        free_bytes_ -= got;
        return p;
      }
    }
    got = bytes;
    return map_block(bytes);
  }

  // Keeps the block for reuse while the free bytes stay under the cap, else unmaps it.
  void give(void* p, uint64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_bytes_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        free_bytes_ += bytes;
        return;
      }
    }
    unmap_block(p, bytes);
  }

  int64_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(free_bytes_);
  }

  int64_t release() {
    std::multimap<uint64_t, void*> blocks;
    uint64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      bytes = free_bytes_;
      free_bytes_ = 0;
    }
    for (const auto& [size, p] : blocks) unmap_block(p, size);
    return static_cast<int64_t>(bytes);
  }

 private:
  std::mutex mutex_;
  std::multimap<uint64_t, void*> free_;  // size -> block
  uint64_t free_bytes_ = 0;
  const uint64_t limit_;
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

}  // namespace

// Off Linux map_block gives nothing, so every output comes from ATen's allocator there.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes =
      numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes >= kPooledBytes && pool().enabled()) {
    uint64_t got = 0;
    void* p = pool().take(huge_page_ceil(static_cast<uintptr_t>(bytes)), got);
    if (p != nullptr)
      return at::from_blob(p, sizes, [got](void* q) { pool().give(q, got); }, options);
  }
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out.data_ptr(), static_cast<uintptr_t>(out.nbytes()));
  return out;
}

int64_t cached_buffer_bytes() { return pool().free_bytes(); }

int64_t release_cached_buffers() { return pool().release(); }

}  // namespace memory_ext::cpu
