#!/usr/bin/env bash
# Downloads Debian's Google Benchmark packages into .deps/google-benchmark (ignored by
# git), for a machine with no package registry (the GPU machine): carry .deps there and
# bench/gpu_check.sh unpacks them for the C++ CUDA benchmarks' CMake build.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .deps/google-benchmark
cd .deps/google-benchmark
apt-get download libbenchmark-dev libbenchmark1debian
ls -l
