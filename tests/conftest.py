"""Shared test fixtures: the device grid and per-dtype tolerances.

CUDA cases skip, saying why, when no GPU is visible or when this build of memory_ext did
not compile its CUDA kernels.
"""
import pytest
import torch

import memory_ext


def _cuda_skip_reason():
    if not memory_ext.cuda_kernels_built():
        return "memory_ext was built without its CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


CUDA_SKIP = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP)))]

# Tolerances for a float32-accumulated result rounded to the output dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
