# One executable per bench/cpp/bench_*.cpp (always) and bench/cpp/bench_*.cu (CUDA
# builds), named after its file. Each links the operator objects directly, so the
# TORCH_LIBRARY registrations are in the executable and the benchmark calls the ops
# through the dispatcher exactly as Python does.

memory_ext_glob(MEMORY_EXT_BENCH_SOURCES
  CXX "${PROJECT_SOURCE_DIR}/bench/cpp/bench_*.cpp"
  CUDA "${PROJECT_SOURCE_DIR}/bench/cpp/bench_*.cu")

set(MEMORY_EXT_BENCHMARKS "")
foreach(_src IN LISTS MEMORY_EXT_BENCH_SOURCES)
  get_filename_component(_name "${_src}" NAME_WE)
  add_executable(${_name} "${_src}" $<TARGET_OBJECTS:memory_ext_ops>)
  memory_ext_configure_target(${_name})
  set_target_properties(${_name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/bench")
  list(APPEND MEMORY_EXT_BENCHMARKS ${_name})
endforeach()
if(MEMORY_EXT_BENCHMARKS)
  message(STATUS "memory_ext: benchmarks ${MEMORY_EXT_BENCHMARKS}")
else()
  message(STATUS "memory_ext: no benchmarks for this configuration")
endif()
