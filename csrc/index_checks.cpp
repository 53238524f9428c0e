// The index-validation mode (see memory_ext/index_checks.h) and its ops. It is one
// process-wide setting, not thread-local, because autograd runs backward kernels on its
// own threads and they must see the caller's choice.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "memory_ext/index_checks.h"

namespace memory_ext {
namespace {

std::atomic<IndexCheckMode>& mode_flag() {
  static std::atomic<IndexCheckMode> mode{IndexCheckMode::kSync};
  return mode;
}

std::atomic<AsyncIndexErrorReader>& reader_slot() {
  static std::atomic<AsyncIndexErrorReader> reader{nullptr};
  return reader;
}

IndexCheckMode parse_mode(const std::string& name) {
  if (name == "sync") return IndexCheckMode::kSync;
  if (name == "async") return IndexCheckMode::kAsync;
  if (name == "off") return IndexCheckMode::kOff;
  TORCH_CHECK(false,
              "memory.set_index_check_mode: mode must be \"sync\", \"async\" or \"off\", got \"",
              name, "\"");
}

const char* mode_name(IndexCheckMode mode) {
  switch (mode) {
    case IndexCheckMode::kSync:
      return "sync";
    case IndexCheckMode::kAsync:
      return "async";
    default:
      return "off";
  }
}

void set_index_checks_op(bool enabled) {
  set_index_check_mode(enabled ? IndexCheckMode::kSync : IndexCheckMode::kOff);
}
bool index_checks_enabled_op() { return index_checks_enabled(); }
void set_index_check_mode_op(c10::string_view mode) {
  set_index_check_mode(parse_mode(std::string(mode)));
}
std::string index_check_mode_op() { return mode_name(index_check_mode()); }
void check_index_errors_op() { check_async_index_errors(); }

}  // namespace

IndexCheckMode index_check_mode() { return mode_flag().load(std::memory_order_relaxed); }
void set_index_check_mode(IndexCheckMode mode) {
  mode_flag().store(mode, std::memory_order_relaxed);
}

void set_async_index_error_reader(AsyncIndexErrorReader reader) { reader_slot().store(reader); }
void check_async_index_errors() {
  if (const AsyncIndexErrorReader reader = reader_slot().load()) reader();
}

// No tensor arguments: the dispatcher routes such ops to their CompositeExplicitAutograd
// kernel whatever the device.
TORCH_LIBRARY_IMPL(memory, CompositeExplicitAutograd, m) {
  m.impl("set_index_checks", &set_index_checks_op);
  m.impl("index_checks_enabled", &index_checks_enabled_op);
  m.impl("set_index_check_mode", &set_index_check_mode_op);
  m.impl("index_check_mode", &index_check_mode_op);
  m.impl("check_index_errors", &check_index_errors_op);
}

}  // namespace memory_ext
