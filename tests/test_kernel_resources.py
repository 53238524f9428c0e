"""bench/kernel_resources.py reads every kernel's registers and local-memory accesses from
the built library (no GPU needed, only a cuobjdump)."""
import os
import sys

import pytest

import memory_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import kernel_resources  # noqa: E402


def test_short_name_drops_namespaces_and_parameters():
    name = "void memory_ext::cuda::(anonymous namespace)::bag_kernel<__nv_bfloat16, 8>(memory_ext::cuda::Args, int (*)(int))"
    assert kernel_resources.short_name(name) == "bag_kernel<bf16, 8>"


@pytest.mark.skipif(not memory_ext.cuda_kernels_built(), reason="memory_ext was built without its CUDA kernels")
@pytest.mark.skipif(kernel_resources.find_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or Triton) found")
def test_every_kernel_of_the_library_is_listed_with_its_resources(tmp_path):
    report = kernel_resources.main(["--library", memory_ext._C.__file__, "--out", str(tmp_path / "k.json")])
    kernels = report["kernels"]
    assert {r["arch"] for r in kernels} == set(report["summary"])
    names = {r["kernel"] for r in kernels}
    for kernel in ("embedding_bag_kernel", "embedding_bag_backward_kernel", "pk::pk_topk_mma_kernel", "row_adam_kernel"):
        assert any(n.startswith(kernel + "<") for n in names), kernel
    for r in kernels:
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] >= 0
        assert r["local_stores"] >= 0 and r["local_loads"] >= 0
