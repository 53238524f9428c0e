"""The modes of index validation (memory_ext.ops.set_index_checks): "sync" (the default),
"async" (CUDA records the first bad index on the device, check_errors() raises it) and
"off". On the CPU every mode raises at the call; the CUDA cases run where a GPU is."""
import pytest
import torch

from memory_ext import ops
from memory_ext.nn import quantize_rows

from conftest import requires_cuda


@pytest.fixture(autouse=True)
def restore_mode():
    previous = ops.index_check_mode()
    yield
    ops.set_index_checks(previous)


def test_modes_round_trip():
    assert ops.index_check_mode() == "sync" and ops.index_checks_enabled()
    for mode, enabled in (("async", True), ("off", False), ("sync", True)):
        ops.set_index_checks(mode)
        assert ops.index_check_mode() == mode and ops.index_checks_enabled() == enabled
    ops.set_index_checks(False)
    assert ops.index_check_mode() == "off"
    ops.set_index_checks(True)
    assert ops.index_check_mode() == "sync"


def test_unknown_mode_is_refused():
    with pytest.raises(RuntimeError, match=r'memory\.set_index_check_mode: mode must be "sync", "async" or "off", '
                                           r'got "later"'):
        ops.set_index_checks("later")
    assert ops.index_check_mode() == "sync"


def test_context_manager_restores_the_mode():
    with ops.index_checks("async"):
        assert ops.index_check_mode() == "async"
        with ops.index_checks(False):
            assert ops.index_check_mode() == "off"
        assert ops.index_check_mode() == "async"
    assert ops.index_check_mode() == "sync"


@pytest.mark.parametrize("mode", ["sync", "async", "off"])
def test_cpu_raises_at_the_call_in_every_mode(mode):
    values, weights = torch.randn(10, 4), torch.ones(1, 2)
    with ops.index_checks(mode):
        with pytest.raises(RuntimeError, match=r"indices\[0, 1\] = 10 but values has 10 rows"):
            ops.embedding_bag(values, torch.tensor([[1, 10]]), weights)
        assert ops.check_errors() is None  # nothing recorded on the CPU


# ---------------------------------------------------------------------------------------
# CUDA: the call does not wait, check_errors() raises what sync mode would have raised.


def _bad_bag():
    values = torch.randn(50, 16, device="cuda")
    indices = torch.randint(0, 50, (4, 5), device="cuda")
    indices[2, 3], indices[3, 1] = 1000, -1
    return values, indices, torch.randn(4, 5, device="cuda")


@requires_cuda
def test_cuda_async_lookup_is_reported_by_check_errors():
    values, indices, weights = _bad_bag()
    ops.check_errors()  # nothing pending from other tests
    ops.set_index_checks("async")
    ops.embedding_bag(values, indices[:1] % 50, weights[:1])  # allocates the device's record
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.embedding_bag(values, indices, weights)  # no wait, no raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 16)
    message = r"memory\.embedding_bag: index out of range: indices\[2, 3\] = 1000 but values has 50 rows"
    with pytest.raises(RuntimeError, match=message):
        ops.check_errors()
    assert ops.check_errors() is None  # cleared


@requires_cuda
def test_cuda_async_keeps_the_first_error():
    values, indices, weights = _bad_bag()
    ops.check_errors()
    with ops.index_checks("async"):
        ops.embedding_bag(values, torch.full_like(indices, -7), weights)
        ops.embedding_bag(values, indices, weights)
    with pytest.raises(RuntimeError, match=r"indices\[0, 0\] = -7 but values has 50 rows"):
        ops.check_errors()


@requires_cuda
def test_cuda_async_rows_to_dense_and_quantized_bag():
    ops.check_errors()
    with ops.index_checks("async"):
        ops.rows_to_dense(torch.tensor([4, 4, 5], device="cuda"), torch.randn(3, 4, device="cuda"), 9)
    with pytest.raises(RuntimeError, match=r"rows must be strictly ascending, but rows\[0\] = 4 and rows\[1\] = 4"):
        ops.check_errors()
    packed = quantize_rows(torch.randn(30, 16, device="cuda"), "uint8")
    with ops.index_checks("async"):
        ops.quantized_embedding_bag(packed, torch.tensor([[3, 30]], device="cuda"), torch.ones(1, 2, device="cuda"),
                                    "uint8")
    with pytest.raises(RuntimeError, match=r"memory\.quantized_embedding_bag: index out of range: indices\[0, 1\] = 30"):
        ops.check_errors()


@requires_cuda
def test_cuda_async_backward_still_raises_at_the_call():
    """embedding_bag_backward waits for the device anyway (its output size), so it raises."""
    values, indices, weights = _bad_bag()
    with ops.index_checks("async"), pytest.raises(RuntimeError, match=r"memory\.embedding_bag_backward"):
        ops.embedding_bag_backward(torch.randn(4, 16, device="cuda"), values, indices, weights, True)
