// The index-validation switch (see memory_ext/index_checks.h) and its two ops. It is one
// process-wide flag, not thread-local, because autograd runs backward kernels on its own
// threads and they must see the caller's choice.
#include <torch/library.h>

#include <atomic>

#include "memory_ext/index_checks.h"

namespace memory_ext {
namespace {

std::atomic<bool>& checks_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

void set_index_checks_op(bool enabled) { set_index_checks(enabled); }
bool index_checks_enabled_op() { return index_checks_enabled(); }

}  // namespace

bool index_checks_enabled() { return checks_flag().load(std::memory_order_relaxed); }
void set_index_checks(bool enabled) { checks_flag().store(enabled, std::memory_order_relaxed); }

// No tensor arguments: the dispatcher routes such ops to their CompositeExplicitAutograd
// kernel whatever the device.
TORCH_LIBRARY_IMPL(memory, CompositeExplicitAutograd, m) {
  m.impl("set_index_checks", &set_index_checks_op);
  m.impl("index_checks_enabled", &index_checks_enabled_op);
}

}  // namespace memory_ext
