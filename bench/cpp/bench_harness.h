// What every C++ benchmark shares, CPU and CUDA: Google Benchmark as the harness, the
// benchmark's own shape options, the provenance written into the JSON context (the same
// fields as the Python benchmarks' "machine"), the copy bandwidth measured in the same
// process (the ceiling every case is reported against), and the counters and statistics
// each case reports.
//
// A benchmark's main is
//   int main(int argc, char** argv) {
//     return bench::run(argc, argv, "cpu", [](bench::Options& o, const bench::Run& run) {...});
//   }
// where the callback reads its shapes from o and registers its cases with
// bench::add_case. Beside Google Benchmark's own flags (--benchmark_filter=..., etc.):
//   --json FILE    the results as JSON (--benchmark_out=FILE --benchmark_out_format=json)
//   --quick        tiny shapes, one iteration of each case: a smoke run, not a timing
//   --repeats N    repetitions of each case (default 5; min, median and max are reported),
//                  after 0.5 s of untimed calls (--benchmark_min_warmup_time)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <sys/utsname.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "memory_ext/huge_pages.h"

#ifndef MEMORY_EXT_SOURCE_DIR
#define MEMORY_EXT_SOURCE_DIR "."
#endif

namespace bench {

// ---------------------------------------------------------------------------------------
// Options: --name value or --name=value, read by name with a default; what no benchmark
// asked for is an error (a misspelt option must not silently run the default shape).

class Options {
 public:
  Options(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) fail("unexpected argument " + a);
      a = a.substr(2);
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        values_[a.substr(0, eq)] = a.substr(eq + 1);
      } else if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
        values_[a] = argv[++i];
      } else {
        values_[a] = "";  // a flag
      }
    }
  }

  bool flag(const std::string& name) {
    known_.insert(name);
    return values_.count(name) != 0;
  }

  std::string text(const std::string& name, const std::string& fallback) {
    known_.insert(name);
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }

  int64_t integer(const std::string& name, int64_t fallback) {
    const std::vector<int64_t> v = integers(name, {fallback});
    if (v.size() != 1) fail("--" + name + " takes one integer");
    return v[0];
  }

  std::vector<int64_t> integers(const std::string& name, std::vector<int64_t> fallback) {
    std::vector<int64_t> out;
    for (const std::string& item : texts(name, {})) {
      char* end = nullptr;
      const long long v = std::strtoll(item.c_str(), &end, 10);
      if (item.empty() || *end != '\0' || v < 0) fail("--" + name + ": not a count: " + item);
      out.push_back(v);
    }
    return out.empty() ? fallback : out;
  }

  // A comma-separated list.
  std::vector<std::string> texts(const std::string& name, std::vector<std::string> fallback) {
    const std::string raw = text(name, "");
    if (raw.empty()) return fallback;
    std::vector<std::string> out;
    std::stringstream ss(raw);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(item);
    return out;
  }

  // Call after every option was read: unknown options are an error.
  void finish() const {
    for (const auto& kv : values_) {
      if (known_.count(kv.first) == 0) {
        std::string names;
        for (const std::string& k : known_) names += " --" + k;
        fail("unknown option --" + kv.first + " (this benchmark takes" + names + ")");
      }
    }
  }

  [[noreturn]] static void fail(const std::string& why) {
    std::fprintf(stderr, "error: %s\n", why.c_str());
    std::exit(2);
  }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> known_;
};

inline at::ScalarType dtype_named(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  if (name == "float64") return at::kDouble;
  Options::fail("unknown dtype " + name + " (float32, bfloat16, float16, float64)");
}

// ---------------------------------------------------------------------------------------
// Provenance: the Python benchmarks' machine fields (memory_ext/provenance.py).

inline std::string shell_line(const std::string& command) {
  std::array<char, 256> buf{};
  std::string out;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  if (!pipe) return "";
  while (fgets(buf.data(), buf.size(), pipe.get()) != nullptr) out += buf.data();
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

inline std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown";
}

// The source commit, "-dirty" when tracked files differ from it (the Python benchmarks'
// rule); "unknown" outside a git checkout.
inline std::string source_commit() {
  const std::string dir = MEMORY_EXT_SOURCE_DIR;
  const std::string head = shell_line("git -C '" + dir + "' rev-parse --short HEAD 2>/dev/null");
  if (head.empty()) return "unknown";
  const std::string dirty =
      shell_line("git -C '" + dir + "' status --porcelain --untracked-files=no 2>/dev/null");
  return head + (dirty.empty() ? "" : "-dirty");
}

inline std::string platform_name() {
  utsname u{};
  if (uname(&u) != 0) return "unknown";
  return std::string(u.sysname) + "-" + u.release + "-" + u.machine;
}

// Describes what ran: device is "cpu" or a GPU's name.
inline void add_provenance(const std::string& device) {
  benchmark::AddCustomContext("device", device);
  benchmark::AddCustomContext("cpu", cpu_model());
  benchmark::AddCustomContext("threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("torch", TORCH_VERSION);
  benchmark::AddCustomContext("compiler", __VERSION__);
  benchmark::AddCustomContext("platform", platform_name());
  benchmark::AddCustomContext("commit", source_commit());
}

// ---------------------------------------------------------------------------------------
// Timing rules and counters.

inline double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
inline double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

// What a case reports: its traffic as bytes per second and as a percentage of the copy
// bandwidth (0 bytes: not a bandwidth case), and items (tokens) per second.
struct Traffic {
  double bytes = 0;   // least bytes one call must move
  double tokens = 0;  // tokens one call serves
  double flops = 0;   // arithmetic one call must do (0: not a compute case)
};

// The copy bandwidth of this process's device, GB/s: measured once by run() after the
// cases are registered and before any runs.
inline double& copy_ceiling_gbs() {
  static double gbs = 0;
  return gbs;
}

// Set on a state after its timing loop.
inline void report(benchmark::State& state, const Traffic& t) {
  const double copy_gbs = copy_ceiling_gbs();
  const auto iters = static_cast<int64_t>(state.iterations());
  if (t.bytes > 0) {
    state.SetBytesProcessed(static_cast<int64_t>(t.bytes) * iters);
    // value * iterations / seconds: (seconds the copy needs per call) / (seconds per call).
    state.counters["pct_copy"] = benchmark::Counter(100.0 * t.bytes / (copy_gbs * 1e9),
                                                    benchmark::Counter::kIsIterationInvariantRate);
  }
  if (t.tokens > 0) {
    state.counters["tokens_per_s"] =
        benchmark::Counter(t.tokens, benchmark::Counter::kIsIterationInvariantRate);
  }
  if (t.flops > 0) {
    state.counters["gflop_per_s"] =
        benchmark::Counter(t.flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  }
}

// How a device times a case's calls: a plain loop (CPU: Google Benchmark's wall clock) or
// a loop that measures each call itself and sets it with SetIterationTime (CUDA events).
using Call = std::function<void()>;
using Loop = std::function<void(benchmark::State&, const Call&)>;

inline void cpu_loop(benchmark::State& state, const Call& call) {
  for (auto _ : state) call();
}

// What a device brings to run(): its name in the results, the copy ceiling, the loop.
struct DeviceSetup {
  std::string name;  // "cpu" or the GPU's name
  at::Device device;
  std::function<double(bool quick)> copy_gbs;
  Loop loop;
  bool manual_time = false;  // the loop sets the time
  // Peak bytes one call allocates beyond what exists before it; empty where the device
  // has no allocator statistics (the CPU: bench/bench_pk_topk.py measures it there).
  std::function<double(const Call&)> peak_extra_bytes;
};

// What run() hands the registering callback.
struct Run {
  at::Device device{at::kCPU};
  bool quick = false;  // tiny shapes, one iteration
  bool manual_time = false;
  Loop loop = cpu_loop;
  std::function<double(const Call&)> peak_extra_bytes;
  at::TensorOptions options(at::ScalarType dtype) const {
    return at::TensorOptions().device(device).dtype(dtype);
  }
};

// Registers a case: name "impl/op/dtype/key:value/...", timed in wall-clock time
// (the kernels are multi-threaded, so the main thread's CPU time would be wrong) or in
// the time the loop sets with SetIterationTime (CUDA events), in milliseconds, with min
// and max next to Google Benchmark's mean, median and stddev.
inline benchmark::internal::Benchmark* add_case(const Run& run, const std::string& name,
                                                std::function<void(benchmark::State&)> fn) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [fn](benchmark::State& s) { fn(s); });
  b->Unit(benchmark::kMillisecond)
      ->ComputeStatistics("min", min_of)
      ->ComputeStatistics("max", max_of);
  if (run.manual_time)
    b->UseManualTime();
  else
    b->UseRealTime();
  if (run.quick) b->Iterations(1);
  return b;
}

// "key:value" segments of a case name.
inline std::string case_name(const std::vector<std::string>& parts) {
  std::string out;
  for (const std::string& p : parts) out += (out.empty() ? "" : "/") + p;
  return out;
}

inline std::string kv(const std::string& key, int64_t value) {
  return key + ":" + std::to_string(value);
}

// An uninitialised table laid out as memory_ext.MemoryValues and the row optimizers lay
// out theirs: on the CPU, on transparent huge pages where the system has them (asked for
// before the first touch). Both sides of a case read the same table.
inline at::Tensor table_storage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.is_cpu()) memory_ext::cpu::advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

// The CPU's copy bandwidth: a large float32 copy (1 GiB; 64 MiB with --quick) counted as
// bytes read + written per second, median of 9 calls after 2 warm-up calls; on huge pages,
// as the tables are.
inline double cpu_copy_gbs(bool quick) {
  const int64_t bytes = quick ? (int64_t(1) << 26) : (int64_t(1) << 30);
  at::Tensor src = table_storage({bytes / 4}, at::kFloat).uniform_();
  at::Tensor dst = table_storage({bytes / 4}, at::kFloat);
  std::vector<double> s;
  for (int i = 0; i < 11; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    dst.copy_(src);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    if (i >= 2) s.push_back(dt.count());
  }
  std::sort(s.begin(), s.end());
  return 2.0 * double(bytes) / s[s.size() / 2] / 1e9;
}

// The console table: every counter's name already says its unit (bytes_per_second,
// tokens_per_s, pct_copy), so none gets Google Benchmark's "/s" suffix, which would be
// wrong on pct_copy (a rate counter only because it divides by the time).
// Colours only on a terminal.
class ConsoleTable : public benchmark::ConsoleReporter {
 public:
  ConsoleTable()
      : benchmark::ConsoleReporter(isatty(STDOUT_FILENO) ? OO_ColorTabular : OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> plain = runs;
    for (Run& r : plain)
      for (auto& kv : r.counters) kv.second.flags = benchmark::Counter::kDefaults;
    benchmark::ConsoleReporter::ReportRuns(plain);
  }
};

// ---------------------------------------------------------------------------------------
// The driver: Google Benchmark's flags first, then ours; provenance and the copy ceiling
// go into the JSON context before any case runs.

using Register = std::function<void(Options&, const Run&)>;

inline int run(int argc, char** argv, const DeviceSetup& setup, const Register& register_cases) {
  // Our defaults for Google Benchmark's flags, placed first so the command line wins.
  std::vector<std::string> args{argv[0], "--benchmark_repetitions=5",
                                "--benchmark_display_aggregates_only=true"};
  std::string json;
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick = quick || std::string(argv[i]) == "--quick";
  // Untimed calls before each case's first repetition: the first touches of fresh memory
  // (page faults, on a VM the host's too) cost up to 10x a warm call.
  args.push_back(quick ? "--benchmark_repetitions=1" : "--benchmark_min_warmup_time=0.5");
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (a.rfind("--json=", 0) == 0) {
      json = a.substr(7);
    } else if (a.rfind("--repeats", 0) == 0) {
      const std::string v =
          a.size() > 9 && a[9] == '=' ? a.substr(10) : (i + 1 < argc ? argv[++i] : "");
      args.push_back("--benchmark_repetitions=" + v);
    } else {
      args.push_back(a);
    }
  }
  if (!json.empty()) {
    args.push_back("--benchmark_out=" + json);
    args.push_back("--benchmark_out_format=json");
  }
  std::vector<char*> cargs;
  for (std::string& a : args) cargs.push_back(a.data());
  int n = static_cast<int>(cargs.size());
  benchmark::Initialize(&n, cargs.data());

  Options options(n, cargs.data());
  Run r;
  r.device = setup.device;
  r.quick = options.flag("quick");
  r.manual_time = setup.manual_time;
  r.loop = setup.loop;
  r.peak_extra_bytes = setup.peak_extra_bytes;
  add_provenance(setup.name);
  register_cases(options, r);
  options.finish();  // before the copy measurement: a wrong option fails at once
  copy_ceiling_gbs() = setup.copy_gbs(r.quick);
  benchmark::AddCustomContext("copy_gbs", std::to_string(copy_ceiling_gbs()));
  std::printf("%s (%s), %d threads, copy bandwidth %.1f GB/s\n", setup.name.c_str(),
              cpu_model().c_str(), at::get_num_threads(), copy_ceiling_gbs());
  ConsoleTable table;
  benchmark::RunSpecifiedBenchmarks(&table);
  benchmark::Shutdown();
  return 0;
}

inline DeviceSetup cpu_setup() {
  return {"cpu", at::Device(at::kCPU), cpu_copy_gbs, cpu_loop, false, {}};
}

}  // namespace bench
