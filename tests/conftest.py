"""Shared test fixtures: the CUDA skip marker and the device grid.

CUDA cases skip, saying why, when no GPU is visible or when this build of memory_ext did
not compile its CUDA kernels (memory_ext.testing.cuda_skip_reason). Tolerances, inputs
and references live in memory_ext.testing and memory_ext.reference.
"""
import pytest

from memory_ext.testing import cuda_skip_reason

CUDA_SKIP = cuda_skip_reason()
requires_cuda = pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
