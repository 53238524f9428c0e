"""Build of the memory_ext extension.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu)
are built whenever nvcc and a CUDA build of torch are present, whether or not a GPU is
visible; MEMORY_EXT_CPU_ONLY=1 turns them off. CMakeLists.txt globs the same folders, so
the two builds cannot drift apart.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    # memory_ext/_version.py is the one home of the version; it is read, not imported,
    # because importing memory_ext needs the library this script builds.
    namespace = {}
    with open(os.path.join(ROOT, "memory_ext", "_version.py")) as f:
        exec(f.read(), namespace)
    return namespace["__version__"]


def _default_cuda_home():
    # torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin -> /usr/local), which
    # breaks the link on machines where the toolkit lives in /usr/local/cuda.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif shutil.which("nvcc"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))


_default_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    if os.environ.get("MEMORY_EXT_CPU_ONLY", "0") == "1":
        print("memory_ext: MEMORY_EXT_CPU_ONLY=1, building the CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("memory_ext: torch is a CPU-only build, building the CPU kernels only")
        return False
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        print("memory_ext: no nvcc found (set CUDA_HOME), building the CPU kernels only")
        return False
    return True


def _sources(with_cuda):
    src = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        src += sorted(glob.glob("csrc/cuda/*.cu"))
    return src


def _extension():
    with_cuda = _want_cuda()
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for in our kernels is an OpenMP pragma; without the flag it
    # compiles to a serial loop and every CPU kernel runs on one thread. (GCC and clang on
    # Linux; Apple's clang has no OpenMP, so macOS builds stay serial.)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-wrapv: Python's own CFLAGS (sysconfig, passed to every extension) carry -fwrapv,
    # under which GCC cannot count the trips of loops such as `for (; i + 16 <= n; i += 16)`
    # and leaves them scalar: the bf16 sparse backward ran 1.5x slower than the same code
    # built by CMake. Our code never relies on signed overflow wrapping.
    cxx = ["-O3", "-fno-wrapv", "-std=c++20", "-fvisibility=hidden", *openmp]
    link = list(openmp)
    define_macros = []
    if os.environ.get("MEMORY_EXT_DEBUG", "0") == "1":
        cxx = ["-O0", "-g", "-std=c++20", *openmp]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "memory_ext._C", _sources(False), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link, define_macros=define_macros)

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's builder derives the arch list from the visible GPUs and fails without one.
        # Ampere and Hopper code, plus Hopper's PTX so that newer GPUs (Blackwell) compile
        # the kernels at load instead of finding no code for their architecture.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print("memory_ext: no GPU visible, TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0+PTX")
    # ATen's CUDA headers include cuBLAS/cuSPARSE; a partial toolkit has them only in
    # torch's pip dependencies.
    for site in sys.path:
        pip_cuda = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(pip_cuda):
            include_dirs.append(pip_cuda)
            break
    define_macros.append(("MEMORY_EXT_WITH_CUDA", "1"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-std=c++20"]
    return cpp_extension.CUDAExtension(
        "memory_ext._C", _sources(True), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link, define_macros=define_macros)


setup(
    name="memory_ext",
    version=_version(),
    license="Apache-2.0",
    description="Fast, deterministic memory layers (product-key memory) for PyTorch",
    packages=find_packages(include=["memory_ext", "memory_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "expecttest"],
        # memory_ext.integrations (transformers; Trainer runs on accelerate) and safetensors
        "hf": ["transformers", "safetensors", "accelerate"],
    },
)
