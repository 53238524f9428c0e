# The C++ benchmarks: one executable per bench/cpp/bench_cpu_*.cpp (always) and
# bench/cpp/bench_cuda_*.cu (CUDA builds), named after its file, in <build>/bench/. Each
# links the operator objects directly, so the TORCH_LIBRARY registrations are in the
# executable and a benchmark calls the ops through the dispatcher exactly as Python does.
#
# The harness is Google Benchmark: found as an installed package (Debian/Ubuntu:
# apt-get install libbenchmark-dev; or -Dbenchmark_DIR=<prefix>/lib/cmake/benchmark), or,
# with -DMEMORY_EXT_FETCH_BENCHMARK=ON, built from its release source by FetchContent.
# Without it the library still builds and the benchmarks are skipped, with a message.

option(MEMORY_EXT_FETCH_BENCHMARK "Build Google Benchmark from source when it is not installed" OFF)
set(MEMORY_EXT_BENCHMARK_URL
  "https://github.com/google/benchmark/archive/refs/tags/v1.8.3.tar.gz"
  CACHE STRING "Google Benchmark source archive for MEMORY_EXT_FETCH_BENCHMARK")

find_package(benchmark 1.6 QUIET)
if(NOT benchmark_FOUND AND MEMORY_EXT_FETCH_BENCHMARK)
  include(FetchContent)
  set(BENCHMARK_ENABLE_TESTING OFF CACHE BOOL "" FORCE)
  set(BENCHMARK_ENABLE_INSTALL OFF CACHE BOOL "" FORCE)
  set(BENCHMARK_ENABLE_WERROR OFF CACHE BOOL "" FORCE)
  FetchContent_Declare(googlebenchmark URL "${MEMORY_EXT_BENCHMARK_URL}")
  FetchContent_MakeAvailable(googlebenchmark)
  set(benchmark_FOUND ON)
endif()

if(NOT benchmark_FOUND)
  message(STATUS "memory_ext: Google Benchmark not found, C++ benchmarks skipped "
                 "(apt-get install libbenchmark-dev, or -DMEMORY_EXT_FETCH_BENCHMARK=ON)")
  return()
endif()

memory_ext_glob(MEMORY_EXT_BENCH_SOURCES
  CXX "${PROJECT_SOURCE_DIR}/bench/cpp/bench_cpu_*.cpp"
  CUDA "${PROJECT_SOURCE_DIR}/bench/cpp/bench_cuda_*.cu")

set(MEMORY_EXT_BENCHMARKS "")
foreach(_src IN LISTS MEMORY_EXT_BENCH_SOURCES)
  get_filename_component(_name "${_src}" NAME_WE)
  add_executable(${_name} "${_src}" $<TARGET_OBJECTS:memory_ext_ops>)
  memory_ext_configure_target(${_name})
  target_include_directories(${_name} PRIVATE "${PROJECT_SOURCE_DIR}/bench/cpp")
  # The commit in each result is read from this checkout when the benchmark runs.
  target_compile_definitions(${_name} PRIVATE MEMORY_EXT_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  target_link_libraries(${_name} PRIVATE benchmark::benchmark)
  set_target_properties(${_name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/bench")
  list(APPEND MEMORY_EXT_BENCHMARKS ${_name})
endforeach()
message(STATUS "memory_ext: benchmarks ${MEMORY_EXT_BENCHMARKS}")
