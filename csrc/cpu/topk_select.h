// Small exact top-k helpers for the CPU product-key search. Order: higher score first,
// then lower index, so results are fully determined even with ties.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace memory_ext::cpu {

template <typename S>
struct Scored {
  S score;
  int64_t index;
};

template <typename S>
inline bool ranks_before(const Scored<S>& a, const Scored<S>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// Keeps the k best entries seen so far in a heap whose top is the worst of them, so each
// new candidate costs one comparison unless it enters.
template <typename S>
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k) { heap_.reserve(k); }
  void clear() { heap_.clear(); }
  void push(S score, int64_t index) {
    const Scored<S> e{score, index};
    if (static_cast<int64_t>(heap_.size()) < k_) {
      heap_.push_back(e);
      std::push_heap(heap_.begin(), heap_.end(), ranks_before<S>);
    } else if (ranks_before(e, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), ranks_before<S>);
      heap_.back() = e;
      std::push_heap(heap_.begin(), heap_.end(), ranks_before<S>);
    }
  }
  // Best first; the heap is consumed.
  const std::vector<Scored<S>>& sorted() {
    std::sort_heap(heap_.begin(), heap_.end(), ranks_before<S>);
    return heap_;
  }

 private:
  int64_t k_;
  std::vector<Scored<S>> heap_;
};

}  // namespace memory_ext::cpu
