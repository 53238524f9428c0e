# One executable per bench/cpp/bench_*.cpp (always) and bench/cpp/bench_*.cu (CUDA
# builds), named after its file. Each links the operator objects directly, so the
# TORCH_LIBRARY registrations are in the executable and the benchmark calls the ops
# through the dispatcher exactly as Python does.

file(GLOB MEMORY_EXT_BENCH_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/bench/cpp/bench_*.cpp")
if(MEMORY_EXT_CUDA)
  file(GLOB _me_cuda_benches CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/bench/cpp/bench_*.cu")
  list(APPEND MEMORY_EXT_BENCH_SOURCES ${_me_cuda_benches})
endif()
list(SORT MEMORY_EXT_BENCH_SOURCES)

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
