# Finds the Python interpreter and the torch it imports, then torch's own CMake config, so
# the CMake build compiles against exactly the torch that setup.py would use.
#
# Sets MEMORY_EXT_TORCH_HAS_CUDA (torch is a CUDA build) and MEMORY_EXT_PYTHON_EXT_SUFFIX.
# A CUDA build of torch makes its CMake config look for a CUDA toolkit even when only the
# CPU kernels are built, so CUDA_TOOLKIT_ROOT_DIR defaults to $CUDA_HOME or /usr/local/cuda.

find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import sysconfig, torch; print(torch.utils.cmake_prefix_path); print(int(torch.version.cuda is not None)); print(sysconfig.get_config_var('EXT_SUFFIX')); print(torch.__version__)"
  OUTPUT_VARIABLE _me_torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _me_torch_rc)
if(NOT _me_torch_rc EQUAL 0)
  message(FATAL_ERROR "memory_ext: '${Python3_EXECUTABLE}' cannot import torch")
endif()
string(REPLACE "\n" ";" _me_torch_info "${_me_torch_info}")
list(GET _me_torch_info 0 _me_torch_prefix)
list(GET _me_torch_info 1 MEMORY_EXT_TORCH_HAS_CUDA)
list(GET _me_torch_info 2 MEMORY_EXT_PYTHON_EXT_SUFFIX)
list(GET _me_torch_info 3 _me_torch_version)
list(APPEND CMAKE_PREFIX_PATH "${_me_torch_prefix}")
message(STATUS "memory_ext: torch ${_me_torch_version} from ${_me_torch_prefix} (CUDA build: ${MEMORY_EXT_TORCH_HAS_CUDA})")

if(MEMORY_EXT_TORCH_HAS_CUDA AND NOT CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}")
  elseif(EXISTS "/usr/local/cuda/bin/nvcc")
    set(CUDA_TOOLKIT_ROOT_DIR "/usr/local/cuda")
  endif()
  if(CUDA_TOOLKIT_ROOT_DIR AND NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER "${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc")
  endif()
endif()

# torch's config turns TORCH_CUDA_ARCH_LIST into -gencode flags (it ignores
# CMAKE_CUDA_ARCHITECTURES); default to the architectures setup.py uses without a GPU.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
endif()

find_package(Torch REQUIRED)
# torch's config requires a CUDA standard copied from CMAKE_CXX_STANDARD (empty here), which
# makes CMake add its default -std=c++17 to nvcc; the targets pass -std=c++20 themselves
# (torch's headers need it, and CMake < 3.26 has no CUDA20 dialect for nvcc).
unset(CMAKE_CUDA_STANDARD)
set(CMAKE_CUDA_STANDARD_REQUIRED OFF)

# ATen's CUDA headers include cuBLAS/cuSPARSE, which a runtime-only toolkit has only in
# torch's pip dependencies (setup.py adds the same directory).
set(MEMORY_EXT_EXTRA_CUDA_INCLUDES "")
if(MEMORY_EXT_TORCH_HAS_CUDA)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import os, sys; print(next((p for p in (os.path.join(s, 'nvidia', 'cu13', 'include') for s in sys.path) if os.path.isdir(p)), ''))"
    OUTPUT_VARIABLE MEMORY_EXT_EXTRA_CUDA_INCLUDES
    OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()

# Targets to link: the CPU libraries only, or with torch's CUDA libraries. (TORCH_LIBRARIES
# also names nvrtc, which a runtime-only toolkit lacks and this code never uses.)
set(MEMORY_EXT_TORCH_CPU_LIBS torch_cpu c10)
set(MEMORY_EXT_TORCH_CUDA_LIBS torch c10_cuda)
